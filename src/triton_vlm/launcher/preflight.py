"""Checks before ``tritonserver`` starts, for traps that otherwise surface as obscure failures later.

/dev/shm: every Python backend stub talks to the server through a shared-memory region in /dev/shm that grows
with the tensors of a batch (a batch of 8 large images is tens of MiB). When the tmpfs is full, the stub fails
to start ("Can't create shared memory region"), or the server dies of SIGBUS in the middle of a request. Docker
gives containers 64 MB unless ``--shm-size`` says otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from triton_vlm.launcher.distribution import LauncherError

log = logging.getLogger("triton_vlm")

SHM_PATH = "/dev/shm"
MIB = 1024 * 1024
#: Each stub's region starts at 1 MiB (Triton's shm-default-byte-size) and grows; below this per stub plus
#: the base, models may not even load. Override with TRITON_VLM_MIN_SHM_MB (0 skips the check).
SHM_BASE_BYTES = 64 * MIB
SHM_PER_STUB_BYTES = 16 * MIB
#: Below this, large images or full batches may not fit: a warning, not an error.
SHM_COMFORTABLE_BYTES = 512 * MIB


def shm_free_bytes(path: str = SHM_PATH) -> int | None:
    """Free bytes of the shared-memory file system; None where there is none (not Linux)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def check_shm(stubs: int, path: str = SHM_PATH, env: Mapping[str, str] | None = None) -> None:
    """Raise :class:`LauncherError` when ``path`` has too little free space for ``stubs`` Python stubs."""
    env = os.environ if env is None else env
    override = env.get("TRITON_VLM_MIN_SHM_MB", "").strip()
    try:
        needed = int(override) * MIB if override else SHM_BASE_BYTES + stubs * SHM_PER_STUB_BYTES
    except ValueError:
        raise LauncherError(f"TRITON_VLM_MIN_SHM_MB must be a number of MiB, got {override!r}") from None
    if needed <= 0:
        return
    free = shm_free_bytes(path)
    if free is None:
        log.warning("%s not found: the Python backend needs a shared-memory file system", path)
        return
    if free < needed:
        raise LauncherError(
            f"{path} has {free / MIB:.0f} MiB free; the Python backend needs at least {needed / MIB:.0f} MiB for "
            f"{stubs} model instance(s) (tensors travel between tritonserver and its Python stubs through it). "
            f"In Docker, run with --shm-size=2g (compose: shm_size: 2gb); on Kubernetes, mount an emptyDir with "
            f"medium: Memory at /dev/shm; elsewhere free space in {path} (stale triton_python_backend_shm_region_* "
            f"files of killed servers?) or set TRITON_VLM_MIN_SHM_MB to a lower floor (0 skips this check).")
    if free < SHM_COMFORTABLE_BYTES and not override:
        log.warning("%s has only %.0f MiB free: large images or full batches may fail; 2 GiB is comfortable",
                    path, free / MIB)

"""Locate a Triton server tree and lay out the Python backend the way ``tritonserver`` expects it."""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from triton_vlm.errors import TritonVLMError


class LauncherError(TritonVLMError):
    """The server cannot be started; the message says why in plain words and what to do."""


@dataclass(frozen=True)
class TritonDistribution:
    """A ``tritonserver`` tree: the wheel's ``pytriton/tritonserver`` or any tree with the same layout."""

    root: Path
    libs: Path | None

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub_for(self, version: tuple[int, int]) -> Path:
        return self.root / "python_backend_stubs" / f"{version[0]}.{version[1]}" / "triton_python_backend_stub"


def find_distribution() -> TritonDistribution:
    """``$TRITON_VLM_TRITON_HOME`` if set, else the tree inside the installed nvidia-pytriton wheel."""
    override = os.environ.get("TRITON_VLM_TRITON_HOME")
    if override:
        root = Path(override)
        libs = os.environ.get("TRITON_VLM_TRITON_LIBS")
        dist = TritonDistribution(root, Path(libs) if libs else _sibling_libs(root))
    else:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise LauncherError(
                "tritonserver not found: install the server extra (`pip install 'triton-vlm[server]'`, which "
                "brings nvidia-pytriton==0.7.0 with Triton 2.51) or set TRITON_VLM_TRITON_HOME to a server tree."
            )
        package = Path(list(spec.submodule_search_locations)[0])
        dist = TritonDistribution(package / "tritonserver", package.parent / "nvidia_pytriton.libs")
    if not dist.binary.is_file():
        raise LauncherError(f"tritonserver binary missing at {dist.binary}")
    return dist


def _sibling_libs(root: Path) -> Path | None:
    for candidate in (root / "nvidia_pytriton.libs", root.parent / "nvidia_pytriton.libs",
                      root.parent.parent / "nvidia_pytriton.libs"):
        if candidate.is_dir():
            return candidate
    return None


def prepare_backend_dir(dist: TritonDistribution, work_dir: Path,
                        version: tuple[int, int] | None = None) -> Path:
    """A ``backends/python`` directory holding the backend library and the stub matching our Python."""
    version = version or (sys.version_info.major, sys.version_info.minor)
    stub = dist.stub_for(version)
    if not stub.is_file():
        available = sorted(p.name for p in (dist.root / "python_backend_stubs").glob("*"))
        raise LauncherError(
            f"no Triton Python backend stub for Python {version[0]}.{version[1]} (available: "
            f"{', '.join(available) or 'none'}); use one of those Python versions for the virtual environment."
        )
    backends = work_dir / "backends"
    target = backends / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in [*dist.python_backend.iterdir(), stub]:
        if source.name == "__pycache__":
            continue
        link = target / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return backends


def library_path(dist: TritonDistribution) -> str:
    """``LD_LIBRARY_PATH`` for the server and stub: the wheel's bundled libraries and libpython."""
    parts = [str(dist.libs)] if dist.libs else []
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        parts.append(libdir)
    existing = os.environ.get("LD_LIBRARY_PATH")
    if existing:
        parts.append(existing)
    return os.pathsep.join(parts)

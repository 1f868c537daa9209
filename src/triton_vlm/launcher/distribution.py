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
    """A ``tritonserver`` tree: the wheel's ``pytriton/tritonserver``, or a server install such as NVIDIA's
    container image (``/opt/tritonserver``).

    The wheel ships one Python backend stub per Python version under ``python_backend_stubs/X.Y/``; a server
    install has a single stub, built for its own Python, inside ``backends/python/``.
    """

    root: Path
    libs: Path | None

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def stubs_dir(self) -> Path:
        return self.root / "python_backend_stubs"

    @property
    def bundled_stub(self) -> Path:
        """The stub a server install keeps beside the backend library (``backends/python``)."""
        return self.python_backend / "triton_python_backend_stub"

    def stub_for(self, version: tuple[int, int]) -> Path:
        return self.stubs_dir / f"{version[0]}.{version[1]}" / "triton_python_backend_stub"

    @property
    def has_versioned_stubs(self) -> bool:
        return self.stubs_dir.is_dir()


def find_distribution() -> TritonDistribution:
    """``$TRITON_VLM_TRITON_HOME`` if set, else the tree inside the installed nvidia-pytriton wheel."""
    override = os.environ.get("TRITON_VLM_TRITON_HOME")
    if override:
        root = Path(override)
        libs = os.environ.get("TRITON_VLM_TRITON_LIBS")
        dist = TritonDistribution(root, Path(libs) if libs else _sibling_libs(root))
        if not dist.root.is_dir():
            raise LauncherError(f"TRITON_VLM_TRITON_HOME={override} is not a directory; point it at a Triton "
                                "server tree (the one holding bin/tritonserver, e.g. /opt/tritonserver)")
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
    # A server install (NVIDIA's image: /opt/tritonserver/lib holds libtritonserver.so).
    if (root / "lib").is_dir():
        return root / "lib"
    return None


def prepare_backend_dir(dist: TritonDistribution, work_dir: Path,
                        version: tuple[int, int] | None = None) -> Path:
    """A backend directory whose ``python/`` holds the backend library and the stub matching our Python.

    A tree without ``python_backend_stubs/`` (a server install such as NVIDIA's image) already has its stub in
    ``backends/python``, built for the Python installed beside it: its own ``backends`` directory is used as is.
    """
    version = version or (sys.version_info.major, sys.version_info.minor)
    if not dist.has_versioned_stubs:
        if not (dist.python_backend / "libtriton_python.so").is_file():
            raise LauncherError(f"the Triton tree {dist.root} has no Python backend "
                                f"({dist.python_backend / 'libtriton_python.so'} is missing)")
        if not dist.bundled_stub.is_file():
            raise LauncherError(f"the Triton tree {dist.root} has no Python backend stub: neither "
                                f"{dist.bundled_stub} nor {dist.stubs_dir}/<python version>/ exists")
        return dist.python_backend.parent
    stub = dist.stub_for(version)
    if not stub.is_file():
        available = sorted(p.name for p in dist.stubs_dir.glob("*"))
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

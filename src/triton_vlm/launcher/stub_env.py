"""The Python environment Triton's stub runs in, and the numpy 2 trap.

The stub ignores PYTHONPATH and takes its environment from the first ``python3`` on PATH. Triton 2.51's stub
was built with a pybind11 that predates numpy 2: with numpy 2 every STRING input crashes it ("unpack_from
requires a buffer of at least 84215049 bytes"; python_backend PR #384, server issue #7722). Where numpy 2 is
installed we build a small venv with numpy 1.26 that still sees this environment's packages (torch, ...).
"""

from __future__ import annotations

import glob
import importlib.metadata
import logging
import os
import site
import subprocess
import sys
from pathlib import Path

from triton_vlm.launcher.distribution import LauncherError

log = logging.getLogger("triton_vlm")

NUMPY1_SPEC = "numpy>=1.26,<2"


def numpy_major() -> int:
    try:
        return int(importlib.metadata.version("numpy").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 0


def stub_python_bin(work_dir: Path) -> Path:
    """The directory to put first on PATH so the stub picks a numpy-1 Python that sees our packages."""
    here = Path(sys.executable).parent
    if numpy_major() < 2:
        return here
    return _numpy1_overlay(work_dir / "stub-env")


def _numpy1_overlay(env_dir: Path) -> Path:
    bin_dir = env_dir / "bin"
    marker = env_dir / ".numpy1-ready"
    if marker.exists():
        return bin_dir
    log.info("numpy 2 found: preparing a numpy 1.26 environment for the Triton stub in %s", env_dir)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(env_dir)], check=True)
    site_dir = Path(subprocess.check_output(
        [str(bin_dir / "python3"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())
    hosts = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    hidden = {p: _requires_numpy2(Path(p)) for p in hosts}  # each host's metadata read once
    for name in NUMPY1_BUILDS:
        if name == "numpy" or any(name in names for names in hidden.values()):
            _install_numpy1(site_dir, name)
    # Our site-packages come after the overlay's own, so its numpy 1.26 wins and torch & co. are still found.
    # addsitedir (not a bare path) so .pth files there (editable installs) are processed too.
    # PYTHONPATH first, as in this process (the stub ignores PYTHONPATH itself), then site-packages, then the
    # directory holding triton_vlm (a source checkout that was never installed).
    import triton_vlm

    views = [str(_numpy1_view(Path(p), env_dir / "host-site" / str(i), hidden[p])) for i, p in enumerate(hosts)]
    candidates = [*os.environ.get("PYTHONPATH", "").split(os.pathsep), *views,
                  str(Path(triton_vlm.__file__).resolve().parents[1])]
    paths = list(dict.fromkeys(os.path.abspath(p) for p in candidates if p and os.path.isdir(p)))
    (site_dir / "zz_triton_vlm_host.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in paths))
    marker.write_text(NUMPY1_SPEC + "\n")
    return bin_dir


#: Installed here with numpy 2 but unusable under numpy 1.26 (scipy >= 1.17 uses ``np.long``); transformers
#: imports them only when present, so the stub's view leaves them out.
NEEDS_NUMPY2 = {"scipy", "sklearn", "scikit_learn"}


def _numpy1_view(host_site: Path, view: Path, requires_numpy2: set[str]) -> Path:
    """A directory of links to ``host_site``'s entries, minus the packages that need numpy 2 (``requires_numpy2``:
    :func:`_requires_numpy2` of it)."""
    blocked = set(NEEDS_NUMPY2) | requires_numpy2
    view.mkdir(parents=True, exist_ok=True)
    for entry in host_site.iterdir():
        name = entry.name.split("-")[0].split(".")[0].lower()
        if name in blocked or entry.name == "numpy" or name == "numpy":
            continue
        link = view / entry.name
        if not link.exists():
            link.symlink_to(entry)
    return view


def _requires_numpy2(host_site: Path) -> set[str]:
    """Top-level names of distributions whose metadata, for this Python, requires a numpy that 1.26 is not.

    Environment markers count: ml_dtypes 0.5 asks for numpy >= 2.1 only on Python >= 3.13; hidden from a 3.12
    stub, it took tritonclient (which imports it) along."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import Version

    numpy1 = Version("1.26.4")
    names: set[str] = set()
    for metadata in host_site.glob("*.dist-info/METADATA"):
        needs2 = False
        for line in metadata.read_text(errors="replace").splitlines():
            if not line.lower().startswith("requires-dist:"):
                continue
            try:
                requirement = Requirement(line.split(":", 1)[1].strip())
            except InvalidRequirement:
                continue
            applies = requirement.marker is None or requirement.marker.evaluate({"extra": ""})
            if requirement.name.lower() == "numpy" and applies and not requirement.specifier.contains(numpy1):
                needs2 = True
        if not needs2:
            continue
        top_level = metadata.parent / "top_level.txt"
        dist = metadata.parent.name.split("-")[0].lower()
        names.add(dist)
        if top_level.is_file():
            names.update(line.strip().lower() for line in top_level.read_text().splitlines() if line.strip())
    return names


#: Packages the stub needs built for numpy 1, with the versions that are. ml_dtypes (which tritonclient imports,
#: and with it the forwarders on engine hosts) requires numpy 2 from 0.6 on: where the host's is hidden from the
#: stub, the overlay gets its own.
NUMPY1_BUILDS = {"numpy": (NUMPY1_SPEC, "numpy-1.*"), "ml_dtypes": ("ml_dtypes>=0.4,<0.6", "ml_dtypes-0.[45].*")}


def _install_numpy1(site_dir: Path, name: str = "numpy") -> None:
    """Install ``name``'s numpy 1 build into the overlay: a wheel from TRITON_VLM_WHEELHOUSE (or, for numpy,
    TRITON_VLM_NUMPY1_WHEEL) where there is one, else from the package index."""
    wheels = _numpy1_wheels(name)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(site_dir)]
    command = pip + (["--no-index", wheels[0]] if wheels else [NUMPY1_BUILDS[name][0]])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        spec = NUMPY1_BUILDS[name][0]
        where = ("a numpy 1.26 wheel for this Python via TRITON_VLM_NUMPY1_WHEEL=/path/to/numpy-1.26.4-...whl"
                 if name == "numpy" else f"a wheel of '{spec}' for this Python in TRITON_VLM_WHEELHOUSE=/path/to/dir")
        raise LauncherError(
            "numpy 2 is installed, and Triton 2.51's Python stub crashes on STRING inputs with numpy 2. "
            f"Installing {spec!r} for the stub failed: give {where}, or install 'numpy<2' in this environment. "
            f"pip said: {result.stderr.strip()[-400:]}"
        )


def _numpy1_wheels(name: str = "numpy") -> list[str]:
    explicit = os.environ.get("TRITON_VLM_NUMPY1_WHEEL") if name == "numpy" else None
    if explicit:
        return [explicit]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    found: list[str] = []
    for directory in filter(None, os.environ.get("TRITON_VLM_WHEELHOUSE", "").split(os.pathsep)):
        found += sorted(glob.glob(os.path.join(directory, f"{NUMPY1_BUILDS[name][1]}-{tag}-{tag}-*.whl")))
    return found

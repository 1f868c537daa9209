"""Unit-test set-up: a per-session tiny-checkpoint cache and one loaded tiny runtime per family."""

from __future__ import annotations

import os
import tempfile

# Before anything builds or loads a tiny checkpoint: never touch the user's cache.
if "TRITON_VLM_CACHE" not in os.environ:
    os.environ["TRITON_VLM_CACHE"] = tempfile.mkdtemp(prefix="triton-vlm-unit-cache-")
# Model hubs are unreachable here; nothing in the unit suite may try to reach one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(2)

settings.register_profile(
    "unit", deadline=None, max_examples=150, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("unit")

FAMILIES = ("llava", "kosmos2", "smolvlm", "auto")
#: The hub id of the model the ``auto`` runtime serves: SmolVLM written by `triton-vlm add-model` with the auto
#: family (a tiny Idefics3 under --tiny), the same architecture the smolvlm family runs on the engine.
AUTO_HUB_ID = "HuggingFaceTB/SmolVLM-256M-Instruct"


def _runtime(family: str):  # type: ignore[no-untyped-def]
    from triton_vlm.direct import direct_runtime

    repository = None
    if family == "auto":
        from triton_vlm.launcher.scaffold import add_model

        repository = Path(tempfile.mkdtemp(prefix="triton-vlm-unit-auto-"))
        add_model(repository, "smolvlm_auto", AUTO_HUB_ID, family="auto")
    runtime = direct_runtime("smolvlm_auto" if family == "auto" else family, tiny=True, device="cpu",
                             repository=repository)
    runtime.ensure_loaded()
    return runtime


@pytest.fixture(scope="session")
def llava_runtime():  # type: ignore[no-untyped-def]
    """The tiny llava, loaded once for the whole session (built into the session cache on first use)."""
    return _runtime("llava")


@pytest.fixture(scope="session")
def kosmos2_runtime():  # type: ignore[no-untyped-def]
    return _runtime("kosmos2")


@pytest.fixture(scope="session")
def smolvlm_runtime():  # type: ignore[no-untyped-def]
    """``triton_models/smolvlm``: the smolvlm family (a tiny Idefics3 with image splitting)."""
    return _runtime("smolvlm")


@pytest.fixture(scope="session")
def auto_runtime():  # type: ignore[no-untyped-def]
    """The ``auto`` family serving an `add-model` SmolVLM (its tiny stand-in: the same Idefics3 as smolvlm's)."""
    return _runtime("auto")


@pytest.fixture(params=FAMILIES)
def runtime(request: pytest.FixtureRequest) -> Iterator[object]:
    """Each tiny family in turn (session-loaded)."""
    yield request.getfixturevalue(f"{request.param}_runtime")

"""triton_vlm.engine.vision: which graph a batch replays, what comes back, and the eager fallbacks. The graphs
are stood in for on CPU (a replay runs the tower on the static input), so the bookkeeping is what is tested."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from triton_vlm.engine.vision import GraphedVision

WEIGHT = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))


def tower(pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in vision tower: [n, 3, 2, 2] pixels -> [n, 4, 5] features, each image on its own."""
    return (pixels.reshape(pixels.shape[0], 12) @ WEIGHT).reshape(-1, 1, 5).expand(-1, 4, 5) + 1.0


class FakeGraph:
    def __init__(self, run: Any) -> None:
        self.replay = run


@pytest.fixture
def vision(monkeypatch: pytest.MonkeyPatch) -> tuple[GraphedVision, list[int]]:
    graphed = GraphedVision(tower, (3, 2, 2), torch.float32, torch.device("cpu"))
    captured: list[int] = []

    def capture(bucket: int) -> tuple[FakeGraph, torch.Tensor]:
        captured.append(bucket)
        pixels = graphed._pixels[:bucket]
        features = tower(pixels).clone()
        return FakeGraph(lambda: features.copy_(tower(pixels))), features

    monkeypatch.setattr(graphed, "_capture", capture)
    return graphed, captured


def pixels(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_a_batch_replays_the_next_bucket_up_and_gets_its_own_rows(vision: tuple[GraphedVision, list[int]]) -> None:
    graphed, captured = vision
    three = pixels(3, seed=1)
    assert torch.equal(graphed(three), tower(three))
    assert captured == [4]
    two = pixels(2, seed=2)
    first = graphed(two)
    assert torch.equal(first, tower(two)) and captured == [4, 2]
    graphed(pixels(2, seed=3))  # the same graph again: what the first call returned must not change
    assert torch.equal(first, tower(two)) and captured == [4, 2]


def test_batches_over_the_largest_bucket_or_of_another_shape_run_eagerly(
        vision: tuple[GraphedVision, list[int]]) -> None:
    graphed, captured = vision
    many = pixels(17, seed=4)
    assert torch.equal(graphed(many), tower(many)) and captured == []
    other = torch.randn(2, 3, 1, 4, generator=torch.Generator().manual_seed(7))  # 12 values a row, not 3x2x2
    assert torch.equal(graphed(other), tower(other)) and captured == []


def test_a_failed_capture_leaves_the_tower_eager_for_good(vision: tuple[GraphedVision, list[int]],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    graphed, _ = vision

    def broken(bucket: int) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed, "_capture", broken)
    one = pixels(1, seed=5)
    assert torch.equal(graphed(one), tower(one))
    assert graphed.eager and "runs eagerly" in caplog.text
    graphed.warmup()  # nothing more to try
    assert torch.equal(graphed(pixels(1, seed=6)), tower(pixels(1, seed=6)))


def test_warmup_captures_every_bucket(vision: tuple[GraphedVision, list[int]]) -> None:
    graphed, captured = vision
    graphed.warmup()
    assert captured == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("family", ["llava", "kosmos2"])
def test_every_quick_gelu_of_a_clip_tower_is_fused_and_the_features_stay_the_same(family: str) -> None:
    from tests.unit.helpers import load_tiny
    from transformers.activations import QuickGELUActivation

    from triton_vlm.engine.vision import FusedQuickGELU, fuse_quick_gelu

    loaded_family, model, _processor = load_tiny(family)
    vision_layers = model.config.vision_config.num_hidden_layers
    adapter = loaded_family.engine_adapter()
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    before = adapter.encode_images(model, pixels)
    assert fuse_quick_gelu(model) == vision_layers  # one in each layer's MLP
    assert not any(isinstance(m, QuickGELUActivation) for m in model.modules())
    assert sum(isinstance(m, FusedQuickGELU) for m in model.modules()) == vision_layers
    torch.testing.assert_close(adapter.encode_images(model, pixels), before)  # the twin on CPU
    assert fuse_quick_gelu(model) == 0


#: Ops that make the host wait for the device (a tensor's value read back, or an output sized by the data): none
#: can be captured in a CUDA graph, so a tower that runs one is left eager on the GPU.
HOST_SYNCS = frozenset({"_local_scalar_dense", "is_nonzero", "item", "nonzero", "masked_select", "equal",
                        "_assert_async", "unique", "repeat_interleave"})


class RecordHostSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.__name__.split(".")[0]
        if name in HOST_SYNCS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "kosmos2", "moondream2", "smolvlm"])
def test_graphed_towers_never_wait_for_the_device(family: str) -> None:
    """A CUDA graph captures no host sync: every tower the engine graphs (a family with one ``image_shape``) is
    checked here, on the CPU, op by op (SmolVLM's asked the host whether its mask was all true: eager on the H100)."""
    from tests.unit.helpers import load_tiny

    loaded_family, model, _processor = load_tiny(family)
    adapter = loaded_family.engine_adapter()
    shape = adapter.image_shape(model)
    assert shape is not None
    pixels = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), RecordHostSyncs() as syncs:
        adapter.encode_images(model, pixels)
    assert syncs.seen == []


def test_smolvlm_tower_without_a_mask_gives_the_models_own_features() -> None:
    from tests.unit.helpers import load_tiny

    family, model, _processor = load_tiny("smolvlm")
    pixels = torch.randn(3, *family.engine_adapter().image_shape(model), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = family.engine_adapter().encode_images(model, pixels)
        theirs = model.model.get_image_features(pixel_values=pixels[None])
    theirs = getattr(theirs, "pooler_output", theirs)
    theirs = torch.cat(list(theirs)) if isinstance(theirs, (list, tuple)) else theirs
    torch.testing.assert_close(ours, theirs.reshape(ours.shape))

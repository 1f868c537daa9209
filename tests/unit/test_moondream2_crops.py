"""moondream2 image preprocessing: tiling choice, crops, stitching, normalization (hand-computed cases)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from triton_vlm.models.moondream2.config import VisionConfig
from triton_vlm.models.moondream2.image import normalize_crops, overlap_crops, select_tiling, stitch_tiles

REAL = VisionConfig()
# Real geometry: 378-pixel crops of 14-pixel patches, 4-patch margins -> each tile adds 266 pixels, and the
# tiling is chosen for the image minus 2 * 56 margin pixels.
WINDOW = 266


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("height", "width", "expected"), [
    (266, 5000, (1, 1)),   # a side within one window: no grid at all
    (288, 1488, (2, 6)),   # ceil -> 2 x 6 needed; aspect wants 1 x 7 -> 2 x 7 = 14 > 12, trim the columns
    (688, 488, (4, 2)),    # aspect wants 4 x 2 (8 tiles), more than the 3 x 2 minimum
    (532, 532, (3, 3)),    # square: floor(sqrt(12)) = 3 per side
    (3888, 3888, (3, 3)),  # 15 x 15 needed > 12: both scaled by sqrt(12 / 225) -> floor(3.46) = 3
    (300, 5000, (1, 10)),  # 2 x 19 needed > 12: scaled by sqrt(12 / 38) -> floor(1.12) x floor(10.68)
    # Extreme strips: the scaled-down row count clamps up to 1, so the reference's rule overshoots the budget
    # (2 x 100 needed, scaled by sqrt(12 / 200): floor(0.49) -> 1 row, floor(24.49) = 24 columns). Kept as is.
    (267, 26600, (1, 24)),
])
def test_select_tiling_hand_computed(height: int, width: int, expected: tuple[int, int]) -> None:
    assert select_tiling(height, width, WINDOW, 12) == expected


@given(st.integers(1, 20000), st.integers(1, 20000), st.integers(1, 16))
def test_select_tiling_stays_within_budget_when_native_coverage_fits(height: int, width: int,
                                                                     max_tiles: int) -> None:
    rows, cols = select_tiling(height, width, WINDOW, max_tiles)
    assert rows >= 1 and cols >= 1
    needed = -(-height // WINDOW) * -(-width // WINDOW)
    if needed <= max_tiles or min(height, width) <= WINDOW:
        assert rows * cols <= max_tiles


def test_378_square_gives_one_local_crop_equal_to_the_image() -> None:
    picture = image(378, 378)
    crops = overlap_crops(picture, REAL)
    assert crops.tiling == (1, 1)
    assert crops.crops.shape == (2, 378, 378, 3)  # global + one local crop
    # 1 * 266 + 2 * 56 = 378: neither view is resampled.
    assert np.array_equal(crops.crops[0], np.asarray(picture))
    assert np.array_equal(crops.crops[1], np.asarray(picture))


@pytest.mark.parametrize(("size", "tiling"), [((1600, 400), (2, 6)), ((600, 800), (4, 2)), ((300, 200), (1, 1)),
                                              ((644, 644), (3, 3))])
def test_crop_counts_follow_the_tiling(size: tuple[int, int], tiling: tuple[int, int]) -> None:
    crops = overlap_crops(image(*size), REAL)
    assert crops.tiling == tiling
    assert crops.crops.shape == (1 + tiling[0] * tiling[1], 378, 378, 3)


def test_stitching_pixel_tiles_rebuilds_the_resized_image() -> None:
    # The tiles are windows of one resized image; dropping the shared margins must give that image back.
    picture = image(1000, 700, seed=3)
    crops = overlap_crops(picture, REAL)
    rows, cols = crops.tiling
    margin = REAL.overlap_margin * REAL.enc_patch_size
    resized = picture.resize((cols * WINDOW + 2 * margin, rows * WINDOW + 2 * margin), Image.Resampling.LANCZOS)
    stitched = stitch_tiles(torch.from_numpy(crops.crops[1:].copy()), crops.tiling, margin)
    assert torch.equal(stitched, torch.from_numpy(np.array(resized)))


def test_stitch_tiles_keeps_outer_margins_and_drops_shared_ones() -> None:
    tiles = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1).expand(6, 5, 5, 1).clone()
    out = stitch_tiles(tiles, (2, 3), margin=1)[..., 0]
    assert out.shape == (2 * 3 + 2, 3 * 3 + 2)
    assert out[0, 0] == 0 and out[-1, -1] == 5
    # Column 3 is the last one tile (0, 0) keeps; column 4 the first of tile (0, 1).
    assert out[0, 3] == 0 and out[0, 4] == 1
    assert out[3, 0] == 0 and out[4, 0] == 3


def test_normalize_crops_maps_bytes_to_minus_one_one() -> None:
    crops = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    crops[1] = 255
    pixels = normalize_crops(crops)
    assert pixels.shape == (2, 3, 4, 4) and pixels.dtype == torch.float32
    assert pixels[0].eq(-1).all() and pixels[1].eq(1).all()

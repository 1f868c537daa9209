"""Image preprocessing of moondream2: one global crop plus a grid of overlapping local crops.

The whole image, squashed to one crop, gives the global view. For detail, the image is resized so that a grid of
crops covers it exactly, neighbouring crops sharing ``2 * overlap_margin`` patches; each crop's features later
lose their shared margins (keeping the outer ones) and the grid is stitched back together
(:func:`stitch_tiles`). Resizing uses PIL's Lanczos filter, as the reference does when pyvips is absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from triton_vlm.models.moondream2.config import VisionConfig


def select_tiling(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """Rows and columns of ``tile``-pixel tiles for a ``height`` x ``width`` area, at most ``max_tiles`` tiles.

    Aims for the aspect ratio of the area while covering it at native resolution when the budget allows.
    """
    if height <= tile or width <= tile:
        return 1, 1
    need_rows, need_cols = math.ceil(height / tile), math.ceil(width / tile)
    if need_rows * need_cols > max_tiles:
        # Not enough tiles to cover at native size: shrink both counts by the same factor.
        shrink = math.sqrt(max_tiles / (need_rows * need_cols))
        return max(1, math.floor(need_rows * shrink)), max(1, math.floor(need_cols * shrink))
    rows = max(need_rows, math.floor(math.sqrt(max_tiles * height / width)))
    cols = max(need_cols, math.floor(math.sqrt(max_tiles * width / height)))
    if rows * cols > max_tiles:
        # Over budget: trim the longer side, keeping the other at its count.
        if cols > rows:
            cols = max_tiles // rows
        else:
            rows = max_tiles // cols
    return max(1, rows), max(1, cols)


@dataclass(frozen=True)
class CropSet:
    """``crops[0]`` is the global view, ``crops[1:]`` the local tiles in row-major order."""

    crops: npt.NDArray[np.uint8]  # [1 + rows * cols, crop, crop, 3]
    tiling: tuple[int, int]  # (rows, cols)


def overlap_crops(image: Image.Image, config: VisionConfig) -> CropSet:
    """The global crop and the overlapping local crops of an RGB ``image``."""
    image = image.convert("RGB")
    size, patch = config.crop_size, config.enc_patch_size
    margin_px = config.overlap_margin * patch
    window = (config.grid - 2 * config.overlap_margin) * patch  # pixels a tile adds beyond the margins
    width, height = image.size
    rows, cols = select_tiling(height - 2 * margin_px, width - 2 * margin_px, window, config.max_crops)

    crops = np.zeros((1 + rows * cols, size, size, 3), dtype=np.uint8)
    crops[0] = np.asarray(image.resize((size, size), resample=Image.Resampling.LANCZOS))
    grid_w, grid_h = cols * window + 2 * margin_px, rows * window + 2 * margin_px
    resized = np.asarray(image.resize((grid_w, grid_h), resample=Image.Resampling.LANCZOS))
    for row in range(rows):
        for col in range(cols):
            tile = resized[row * window: row * window + size, col * window: col * window + size]
            crops[1 + row * cols + col, : tile.shape[0], : tile.shape[1]] = tile
    return CropSet(crops=crops, tiling=(rows, cols))


def normalize_crops(crops: npt.NDArray[Any]) -> torch.Tensor:
    """uint8 ``[n, H, W, 3]`` -> float32 ``[n, 3, H, W]`` scaled to [-1, 1] (mean 0.5, std 0.5)."""
    pixels = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
    return (pixels / 255.0 - 0.5) / 0.5


def stitch_tiles(tiles: torch.Tensor, tiling: tuple[int, int], margin: int) -> torch.Tensor:
    """Join ``[rows * cols, h, w, C]`` overlapping tiles into one ``[H, W, C]`` grid.

    Each tile gives up the ``margin`` cells it shares with a neighbour; tiles on the border keep their outer
    margins, so the result is ``(h - 2 * margin) * rows + 2 * margin`` cells high (likewise wide).
    """
    rows, cols = tiling
    _, h, w, channels = tiles.shape
    step_h, step_w = h - 2 * margin, w - 2 * margin
    out = tiles.new_zeros((step_h * rows + 2 * margin, step_w * cols + 2 * margin, channels))
    for index in range(rows * cols):
        row, col = divmod(index, cols)
        top = 0 if row == 0 else margin
        bottom = h if row == rows - 1 else h - margin
        left = 0 if col == 0 else margin
        right = w if col == cols - 1 else w - margin
        y, x = row * step_h, col * step_w
        out[y + top: y + bottom, x + left: x + right] = tiles[index, top:bottom, left:right]
    return out

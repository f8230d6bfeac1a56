"""Anchor generation in detectron2 `DefaultAnchorGenerator` order (host-side NumPy constants).

Anchors depend only on static feature shapes, so they are built once with NumPy and enter jit as
constants. Order: level-major; within a level, location-major in row-major (y, x) order; within a
location, detectron2's cell-anchor order (size-major, then aspect ratio). Arithmetic mirrors
detectron2's float32 path: cell anchors computed in float64 and cast to float32, shifts
`offset * stride + i * stride` in float32, summed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _per_level(sizes: Sequence[Sequence[float]], num_levels: int) -> list[list[float]]:
    sizes = [list(s) for s in sizes]
    if len(sizes) == 1:
        sizes = sizes * num_levels  # detectron2 broadcasts a single size list to every level
    if len(sizes) != num_levels:
        raise ValueError(
            f"sizes has {len(sizes)} entries but there are {num_levels} feature levels; give one "
            "size list per level (or a single list for all)."
        )
    return sizes


def num_anchors_per_location(sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[float]):
    """Cell anchors per feature-map location for each level: len(sizes[l]) * len(aspect_ratios)."""
    return [len(s) * len(aspect_ratios) for s in sizes]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """[len(sizes) * len(aspect_ratios), 4] float32 anchors centred at 0 (size-major order).

    For size s and ratio a (= height / width): w = sqrt(s^2 / a), h = a w.
    """
    out = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return np.asarray(out, np.float64).astype(np.float32).reshape(-1, 4)


def generate_anchors(
    feature_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    sizes: Sequence[Sequence[float]],
    aspect_ratios: Sequence[float],
    offset: float = 0.0,
) -> np.ndarray:
    """All anchors of all levels, [A_total, 4] float32 x1y1x2y2 in input-image pixels.

    feature_shapes: per level (H_l, W_l); strides: per level; sizes: per level a list of anchor
    sizes (sqrt of area, pixels) or one list for every level; aspect_ratios: height / width,
    shared by every level; offset: anchor centre offset in units of stride (0.0 = detectron2
    default, 0.5 = pixel centres). A_total = sum_l H_l W_l len(sizes_l) len(aspect_ratios).
    """
    if len(feature_shapes) != len(strides):
        raise ValueError(f"{len(feature_shapes)} feature shapes but {len(strides)} strides.")
    if not 0.0 <= offset < 1.0:
        raise ValueError(f"offset must be in [0, 1) (a fraction of the stride); got {offset}.")
    per_level = _per_level(sizes, len(strides))
    out = []
    for (h, w), stride, lvl_sizes in zip(feature_shapes, strides, per_level):
        base = cell_anchors(lvl_sizes, aspect_ratios)
        start = np.float32(offset * stride)
        sx = start + np.arange(w, dtype=np.float32) * np.float32(stride)
        sy = start + np.arange(h, dtype=np.float32) * np.float32(stride)
        yy, xx = np.meshgrid(sy, sx, indexing="ij")
        xx = xx.reshape(-1)
        yy = yy.reshape(-1)
        shifts = np.stack([xx, yy, xx, yy], axis=1)
        out.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
    return np.concatenate(out, axis=0).astype(np.float32)

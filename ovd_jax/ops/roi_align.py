"""RoIAlign (torchvision `roi_align` / detectron2 `ROIAlignV2`) and its multi-level FPN pooler.

Formulation: every output bin averages a grid of bilinear samples. For each sample we compute
the 4 corner rows of the image's flattened feature table [rows, C] and their weights, gather
those rows and sum them with the weights. The gathers are emitted as one weighted sum per
(sample, corner), which XLA fuses into a single loop kernel writing the output once: no
[R, H, W] one-hot matrices, and the gradient w.r.t. the features is the matching scatter-add
(what torchvision's backward does). The batch is a gather batching dimension (one table per
image), so batch-sharded features are pooled on their own device.

Sampling follows torchvision's `bilinear_interpolate` exactly: a sample with y < -1, y > H,
x < -1 or x > W contributes 0; otherwise y, x are clamped at 0 from below and the high corner is
clamped at H - 1 / W - 1. With `aligned=True` the box is shifted by -0.5 pixel (pixel centres at
integer + 0.5); with `aligned=False` RoI sizes are forced to be at least 1 (legacy behaviour).

`sampling_ratio > 0` uses a fixed sampling_ratio x sampling_ratio grid per bin. torchvision's
adaptive mode (`sampling_ratio <= 0`: ceil(roi_size / output_size) samples per bin) has a
data-dependent grid; we support it inside jit with a static upper bound `adaptive_max_grid`:
each RoI samples min(ceil(roi / out), adaptive_max_grid) points per bin axis (exact whenever the
bound is not hit; the cost scales with adaptive_max_grid**2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

_UNROLL_MAX_GRID = 4


def _pair(output_size) -> tuple[int, int]:
    if isinstance(output_size, int):
        return int(output_size), int(output_size)
    oh, ow = output_size
    return int(oh), int(ow)


def _axis_samples(start, bin_size, grid, out: int, max_grid: int, limit):
    """Sample positions along one axis and their bilinear corners.

    start, bin_size, limit: [R] float; grid: [R] int (samples per bin, <= max_grid).
    Returns (low, high) int32 [R, out, max_grid] and weights (w_low, w_high) [R, out, max_grid],
    the weights already zero for samples outside [-1, limit] or beyond the RoI's own grid.
    """
    p = jnp.arange(out, dtype=start.dtype)[None, :, None]
    i = jnp.arange(max_grid, dtype=start.dtype)[None, None, :]
    g = grid.astype(start.dtype)[:, None, None]
    bs = bin_size[:, None, None]
    # Same evaluation order as torchvision: start + p * bin + ((i + .5) * bin) / grid.
    pos = start[:, None, None] + p * bs + (i + 0.5) * bs / jnp.maximum(g, 1)
    lim = limit[:, None, None]
    inside = (pos >= -1.0) & (pos <= lim) & (i < g)
    pos = jnp.maximum(pos, 0.0)
    low = jnp.floor(pos)
    last = lim - 1
    at_edge = low >= last
    low = jnp.where(at_edge, last, low)
    high = jnp.where(at_edge, last, low + 1)
    pos = jnp.where(at_edge, low, pos)
    frac = pos - low
    w_low = jnp.where(inside, 1.0 - frac, 0.0)
    w_high = jnp.where(inside, frac, 0.0)
    return low.astype(jnp.int32), high.astype(jnp.int32), w_low, w_high


def _roi_align_table(
    table, base, height, width, scale, boxes, output_size, sampling_ratio, aligned,
    adaptive_max_grid,
):
    """RoIAlign on a flattened feature table.

    table: [rows, C]; row of pixel (y, x) of a RoI's map is base + y * width + x.
    base, height, width: [R] int32; scale: [R] float (spatial scale); boxes: [R, 4].
    Returns [R, oh, ow, C].
    """
    oh, ow = _pair(output_size)
    f32 = jnp.float32
    boxes = boxes.astype(f32)
    offset = 0.5 if aligned else 0.0
    x1 = boxes[:, 0] * scale - offset
    y1 = boxes[:, 1] * scale - offset
    roi_w = boxes[:, 2] * scale - offset - x1
    roi_h = boxes[:, 3] * scale - offset - y1
    if not aligned:
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    bin_w = roi_w / ow
    bin_h = roi_h / oh
    if sampling_ratio > 0:
        gmax = int(sampling_ratio)
        grid_h = jnp.full(boxes.shape[:1], gmax, jnp.int32)
        grid_w = grid_h
    else:
        gmax = int(adaptive_max_grid)
        grid_h = jnp.clip(jnp.ceil(roi_h / oh), 0, gmax).astype(jnp.int32)
        grid_w = jnp.clip(jnp.ceil(roi_w / ow), 0, gmax).astype(jnp.int32)
    count = jnp.maximum(grid_h * grid_w, 1).astype(f32)
    hf = height.astype(f32)
    wf = width.astype(f32)
    yl, yh, wyl, wyh = _axis_samples(y1, bin_h, grid_h, oh, gmax, hf)
    xl, xh, wxl, wxh = _axis_samples(x1, bin_w, grid_w, ow, gmax, wf)
    # Fold the 1 / count average into the y weights (cheaper than scaling the output).
    inv = (1.0 / count)[:, None, None]
    wyl = wyl * inv
    wyh = wyh * inv
    rows_l = base[:, None, None] + yl * width[:, None, None]  # [R, oh, g]
    rows_h = base[:, None, None] + yh * width[:, None, None]
    def sample_sum(iy, ix):
        """Weighted sum of the 4 corners of sample (iy, ix) of every bin: [R, oh, ow, C]."""
        acc = None
        for ry, wy in ((rows_l[:, :, iy], wyl[:, :, iy]), (rows_h[:, :, iy], wyh[:, :, iy])):
            for cx, wx in ((xl[:, :, ix], wxl[:, :, ix]), (xh[:, :, ix], wxh[:, :, ix])):
                idx = ry[:, :, None] + cx[:, None, :]  # [R, oh, ow]
                w = (wy[:, :, None] * wx[:, None, :])[..., None]
                term = table[idx] * w  # bf16 features accumulate in float32
                acc = term if acc is None else acc + term
        return acc

    if gmax <= _UNROLL_MAX_GRID:
        # Unrolled: XLA fuses all gathers and the weighted sum into one kernel.
        out = None
        for iy in range(gmax):
            for ix in range(gmax):
                term = sample_sum(iy, ix)
                out = term if out is None else out + term
    else:
        # Large (adaptive) grids: a loop keeps the program small.
        def body(acc, k):
            return acc + sample_sum(k // gmax, k % gmax), None

        init = jnp.zeros(boxes.shape[:1] + (oh, ow, table.shape[-1]),
                         jnp.promote_types(table.dtype, f32))
        out, _ = jax.lax.scan(body, init, jnp.arange(gmax * gmax))
    return out.astype(table.dtype)


def _check(features, boxes, sampling_ratio, adaptive_max_grid):
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, R, 4] (x1, y1, x2, y2); got shape {boxes.shape}.")
    if boxes.shape[0] != features[0].shape[0]:
        raise ValueError(
            f"boxes batch {boxes.shape[0]} != features batch {features[0].shape[0]}; pass one "
            "box set per image."
        )
    if sampling_ratio <= 0 and (adaptive_max_grid is None or adaptive_max_grid < 1):
        raise ValueError(
            f"sampling_ratio={sampling_ratio} selects torchvision's adaptive grid, whose size is "
            "data-dependent; pass sampling_ratio > 0 or a static bound adaptive_max_grid >= 1."
        )


def roi_align(
    features,
    boxes,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
    adaptive_max_grid: int | None = None,
):
    """torchvision `roi_align` on NHWC features with per-image boxes.

    features: [N, H, W, C]; boxes: [N, R, 4] (x1, y1, x2, y2) in input-image pixels, mapped to
    the feature map by `spatial_scale` (1 / stride). Padded boxes are fine (their output is
    whatever they sample; mask them downstream). `sampling_ratio <= 0` needs
    `adaptive_max_grid` (see module docstring). Returns [N, R, oh, ow, C] in features' dtype.
    Jittable and differentiable w.r.t. `features` (and boxes, though torchvision gives none).
    """
    if features.ndim != 4:
        raise ValueError(f"features must be NHWC [N, H, W, C]; got shape {features.shape}.")
    _check([features], boxes, sampling_ratio, adaptive_max_grid)
    n, h, w, c = features.shape
    r = boxes.shape[1]
    ones = jnp.ones((n, r), jnp.int32)
    return _per_image(
        features.reshape(n, h * w, c), ones * 0, ones * h, ones * w,
        jnp.full((n, r), spatial_scale, jnp.float32), boxes, output_size, sampling_ratio,
        aligned, adaptive_max_grid,
    )


def _per_image(tables, base, height, width, scale, boxes, output_size, sampling_ratio, aligned,
               adaptive_max_grid):
    """`_roi_align_table` mapped over images: tables [N, rows, C], the rest [N, R(, 4)].

    Each image's RoIs index only that image's table, so the gather (and its scatter-add
    gradient) carries the batch as a batching dimension: a batch-sharded call stays local to
    each device (a table flattened over the batch would be all-gathered under data
    parallelism). Returns [N, R, oh, ow, C].
    """
    def one(table, b, hh, ww, s, bx):
        return _roi_align_table(table, b, hh, ww, s, bx, output_size, sampling_ratio, aligned,
                                adaptive_max_grid)

    return jax.vmap(one)(tables, base, height, width, scale, boxes)


def assign_boxes_to_levels(
    boxes, min_level: int, max_level: int, canonical_box_size: float = 224.0,
    canonical_level: int = 4,
):
    """detectron2 `assign_boxes_to_levels`: FPN level index (0 = min_level) per box.

    boxes: [..., 4]; returns int32 [...] in [0, max_level - min_level]:
    floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)), clamped.
    """
    b = boxes.astype(jnp.float32)
    size = jnp.sqrt((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))
    lvl = jnp.floor(canonical_level + jnp.log2(size / canonical_box_size + 1e-8))
    lvl = jnp.clip(lvl, min_level, max_level)
    return (lvl - min_level).astype(jnp.int32)


def multilevel_roi_align(
    features: Sequence,
    boxes,
    output_size: int | tuple[int, int],
    strides: Sequence[int],
    sampling_ratio: int,
    canonical_level: int = 4,
    canonical_box_size: float = 224.0,
    aligned: bool = True,
    adaptive_max_grid: int | None = None,
):
    """detectron2 `ROIPooler` (ROIAlignV2 per FPN level) with static shapes.

    features: per level [N, Hl, Wl, C] (finest first), `strides`: their strides (powers of 2);
    boxes: [N, R, 4] in input-image pixels. Each box is pooled from level
    `assign_boxes_to_levels(box, log2(strides[0]), log2(strides[-1]))`.

    Static scheme: each image's levels are flattened into one feature table and each RoI carries
    its level's row offset, height, width and scale, so the cost is that of ONE roi_align over R
    boxes (not one per level) and no data-dependent shapes appear. Returns [N, R, oh, ow, C].
    """
    if len(features) != len(strides):
        raise ValueError(f"got {len(features)} feature levels but {len(strides)} strides.")
    for s in strides:
        if s <= 0 or (s & (s - 1)) != 0:
            raise ValueError(f"strides must be powers of two (FPN levels); got {list(strides)}.")
    n0, c0 = features[0].shape[0], features[0].shape[-1]
    for f in features:
        if f.ndim != 4 or f.shape[0] != n0 or f.shape[-1] != c0:
            raise ValueError("every feature level must be [N, Hl, Wl, C] with the same N and C.")
    _check(features, boxes, sampling_ratio, adaptive_max_grid)
    n = boxes.shape[0]
    c = features[0].shape[-1]
    sizes = [f.shape[1] * f.shape[2] for f in features]
    tables = jnp.concatenate([f.reshape(n, s, c) for f, s in zip(features, sizes)], axis=1)
    min_level = int(round(math.log2(strides[0])))
    max_level = int(round(math.log2(strides[-1])))
    lvl = assign_boxes_to_levels(boxes, min_level, max_level, canonical_box_size,
                                 canonical_level)  # [N, R]
    offsets = jnp.asarray([sum(sizes[:i]) for i in range(len(sizes))], jnp.int32)
    heights = jnp.asarray([f.shape[1] for f in features], jnp.int32)
    widths = jnp.asarray([f.shape[2] for f in features], jnp.int32)
    scales = jnp.asarray([1.0 / s for s in strides], jnp.float32)
    return _per_image(
        tables, offsets[lvl], heights[lvl], widths[lvl], scales[lvl], boxes, output_size,
        sampling_ratio, aligned, adaptive_max_grid,
    )

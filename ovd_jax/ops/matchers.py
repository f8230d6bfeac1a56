"""RPN / RoI-head target assignment: detectron2's IoU `Matcher` and `subsample_labels`.

Static shapes: gts are padded to G with a validity mask; anchors (or proposals) are A.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ovd_jax.ops.topk import top_k


def iou_matcher(
    iou,
    gt_valid,
    thresholds: Sequence[float] = (0.3, 0.7),
    labels: Sequence[int] = (0, -1, 1),
    allow_low_quality_matches: bool = True,
):
    """detectron2 `Matcher` on a [G, A] quality matrix.

    iou: [G, A] (gt x anchor IoU); gt_valid: [G] bool (False = padding, never matched).
    Each anchor takes its best valid gt (first index on ties); its label is labels[i] for the
    band thresholds[i-1] <= best IoU < thresholds[i] (bands open at -inf / +inf). With
    `allow_low_quality_matches`, for each valid gt every anchor whose IoU equals that gt's best
    IoU gets label 1 (its matched gt stays the argmax, as in detectron2; note that a gt with best
    IoU 0 thereby marks all its IoU-0 anchors, a detectron2 quirk kept for faithfulness).
    With no valid gt every anchor gets labels[0] and matched gt 0.

    Returns (matched_gt [A] int32, match_labels [A] int32).
    """
    thresholds = list(thresholds)
    labels = list(labels)
    if len(labels) != len(thresholds) + 1:
        raise ValueError(
            f"labels needs len(thresholds) + 1 = {len(thresholds) + 1} entries; got {labels}."
        )
    if any(a > b for a, b in zip(thresholds[:-1], thresholds[1:])):
        raise ValueError(f"thresholds must be non-decreasing; got {thresholds}.")
    if iou.ndim != 2 or gt_valid.shape != iou.shape[:1]:
        raise ValueError(f"iou must be [G, A] and gt_valid [G]; got {iou.shape}, {gt_valid.shape}.")
    g, a = iou.shape
    if g == 0:
        return jnp.zeros((a,), jnp.int32), jnp.full((a,), labels[0], jnp.int32)
    masked = jnp.where(gt_valid[:, None], iou, -jnp.inf)
    vals = jnp.max(masked, axis=0)
    matched = jnp.argmax(masked, axis=0).astype(jnp.int32)
    bounds = [-jnp.inf] + thresholds + [jnp.inf]
    out = jnp.ones((a,), jnp.int32)
    for lab, lo, hi in zip(labels, bounds[:-1], bounds[1:]):
        out = jnp.where((vals >= lo) & (vals < hi), lab, out)
    if allow_low_quality_matches:
        best = jnp.max(masked, axis=1, keepdims=True)
        hit = jnp.any(gt_valid[:, None] & (masked == best), axis=0)
        out = jnp.where(hit, 1, out)
    # No valid gt: -inf >= -inf lands every anchor in the first band, i.e. labels[0].
    return matched, out.astype(jnp.int32)


def sample_balanced(key, labels, num_samples: int, positive_fraction: float):
    """detectron2 `subsample_labels` with static shapes.

    labels: [A] int32 (1 foreground, 0 background, -1 ignore). Keeps a uniformly random subset of
    min(#fg, int(num_samples * positive_fraction)) foregrounds and
    min(#bg, num_samples - #kept fg) backgrounds. Returns (fg_mask [A] bool, bg_mask [A] bool).
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be [A]; got {labels.shape}. vmap over batches.")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1]; got {positive_fraction}.")
    a = labels.shape[0]
    kf, kb = jax.random.split(key)
    is_fg = (labels != -1) & (labels != 0)
    is_bg = labels == 0
    max_fg = min(int(num_samples * positive_fraction), a)
    max_bg = min(int(num_samples), a)

    def pick(k, mask, cap, limit):
        if cap == 0:
            return jnp.zeros((a,), bool)
        # Random priorities in [0, 1); non-members get -1 so they rank last.
        prio = jnp.where(mask, jax.random.uniform(k, (a,)), -1.0)
        top_vals, top_idx = top_k(prio, cap)
        sel = (top_vals >= 0) & (jnp.arange(cap) < limit)
        return jnp.zeros((a,), bool).at[top_idx].set(sel)

    fg = pick(kf, is_fg, max_fg, max_fg)
    num_fg = jnp.sum(fg, dtype=jnp.int32)
    bg = pick(kb, is_bg, max_bg, int(num_samples) - num_fg)
    return fg, bg

"""Box ops and anchors against torchvision (fresh random boxes each run)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder as TvBoxCoder

from ovd_jax.ops import (
    BoxCoder,
    box_area,
    box_iou,
    clip_boxes,
    cxcywh_to_xyxy,
    generalized_box_iou,
    generate_anchors,
    num_anchors_per_location,
    xyxy_to_cxcywh,
)


def random_boxes(rng, n, size=100.0):
    """Boxes partly outside a size x size image, plus zero-width, zero-area and tiny ones."""
    xy = rng.uniform(-0.2 * size, size, (n, 2))
    wh = rng.uniform(0, 0.5 * size, (n, 2))
    b = np.concatenate([xy, xy + wh], 1)
    k = n // 5
    b[:k, 2] = b[:k, 0]  # zero width
    b[k:2 * k, 2:] = b[k:2 * k, :2]  # zero area (a point)
    b[2 * k:3 * k, 2:] = b[2 * k:3 * k, :2] + rng.uniform(0, 1e-2, (k, 2))  # tiny
    return b.astype(np.float32)


def test_iou_giou_match_torchvision(rng, seed):
    a = random_boxes(rng, 37)
    b = random_boxes(rng, 23)
    a[0] = b[0]  # identical pair
    b[-1] = 0  # padded all-zero box
    ta, tb = torch.tensor(a), torch.tensor(b)
    fn = jax.jit(lambda x, y: (box_iou(x, y), generalized_box_iou(x, y), box_area(x)))
    iou, giou, area = (np.asarray(v) for v in fn(a, b))
    ref_iou = torchvision.ops.box_iou(ta, tb).numpy()
    ref_giou = torchvision.ops.generalized_box_iou(ta, tb).numpy()
    # torchvision gives NaN where the union / enclosing box is empty; we define those as 0.
    nan_iou = np.isnan(ref_iou)
    assert nan_iou.any(), "the random set should contain zero-area pairs"
    assert np.all(iou[nan_iou] == 0), f"seed={seed}"
    assert np.abs(iou[~nan_iou] - ref_iou[~nan_iou]).max() <= 1e-6, f"seed={seed}"
    ok = ~np.isnan(ref_giou)
    assert np.abs(giou[ok] - ref_giou[ok]).max() <= 1e-6, f"seed={seed}"
    assert np.all(np.isfinite(giou)), f"seed={seed}"
    assert np.abs(area - torchvision.ops.box_area(ta).numpy()).max() <= 1e-6 * 1e4
    # Batched leading dims.
    ib = np.asarray(box_iou(np.stack([a, a]), np.stack([b, b])))
    np.testing.assert_array_equal(ib[1], iou)


def test_box_coder_matches_torchvision(rng, seed):
    anchors = random_boxes(rng, 50)
    anchors[:, 2:] = anchors[:, :2] + rng.uniform(1, 60, (50, 2)).astype(np.float32)
    gt = anchors + rng.normal(0, 5, (50, 4)).astype(np.float32)
    gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 0.5)
    weights = (10.0, 10.0, 5.0, 5.0)
    coder = BoxCoder(weights)
    tv = TvBoxCoder(weights, bbox_xform_clip=math.log(1000.0 / 16))
    deltas = np.asarray(coder.encode(anchors, gt))
    ref = tv.encode_single(torch.tensor(gt), torch.tensor(anchors)).numpy()
    np.testing.assert_allclose(deltas, ref, rtol=1e-5, atol=1e-5, err_msg=f"seed={seed}")
    d = rng.normal(0, 2, (50, 4)).astype(np.float32)
    d[0, 2:] = 50.0  # exercises the scale clamp
    dec = np.asarray(coder.decode(d, anchors))
    ref = tv.decode_single(torch.tensor(d), torch.tensor(anchors)).numpy()
    np.testing.assert_allclose(dec, ref, rtol=1e-5, atol=1e-3, err_msg=f"seed={seed}")
    np.testing.assert_allclose(
        np.asarray(coder.decode(deltas, anchors)), gt, rtol=1e-5, atol=1e-3, err_msg=f"seed={seed}"
    )


def test_clip_and_convert(rng, seed):
    b = random_boxes(rng, 40)
    ref = torchvision.ops.clip_boxes_to_image(torch.tensor(b), (60, 80)).numpy()
    np.testing.assert_array_equal(np.asarray(clip_boxes(b, 60, 80)), ref, err_msg=f"seed={seed}")
    # Per-image sizes broadcast over boxes.
    bb = np.stack([b, b])
    out = np.asarray(clip_boxes(bb, jnp.array([[60.0], [30.0]]), jnp.array([[80.0], [20.0]])))
    np.testing.assert_array_equal(out[0], ref)
    np.testing.assert_array_equal(
        out[1], torchvision.ops.clip_boxes_to_image(torch.tensor(b), (30, 20)).numpy()
    )
    c = np.asarray(xyxy_to_cxcywh(b))
    ref = torchvision.ops.box_convert(torch.tensor(b), "xyxy", "cxcywh").numpy()
    np.testing.assert_allclose(c, ref, atol=1e-5, err_msg=f"seed={seed}")
    np.testing.assert_allclose(np.asarray(cxcywh_to_xyxy(c)), b, atol=1e-4)


def test_anchors_detectron2_order(rng, seed):
    shapes = [(int(rng.integers(1, 6)), int(rng.integers(1, 6))) for _ in range(3)]
    strides = [8, 16, 32]
    sizes = [[32.0, 40.3], [64.0, 80.6], [128.0, 161.3]]
    ratios = [0.5, 1.0, 2.0]
    offset = float(rng.choice([0.0, 0.5]))
    got = generate_anchors(shapes, strides, sizes, ratios, offset)
    ref = []
    for (h, w), s, sz in zip(shapes, strides, sizes):
        for y in range(h):
            for x in range(w):
                for size in sz:
                    for r in ratios:
                        aw = math.sqrt(size * size / r)
                        ah = r * aw
                        cx, cy = (x + offset) * s, (y + offset) * s
                        ref.append([cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2])
    assert got.dtype == np.float32 and got.shape == (len(ref), 4)
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-6, atol=1e-4, err_msg=f"seed={seed}")
    assert num_anchors_per_location(sizes, ratios) == [6, 6, 6]

"""RoIAlign values and feature gradients against torchvision.ops.roi_align (NCHW, [K, 5] boxes)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from ovd_jax.ops import multilevel_roi_align, roi_align


def random_rois(rng, n, r, img):
    """[n, r, 4] boxes partly outside an img x img image, plus degenerate and tiny boxes."""
    xy = rng.uniform(-0.3 * img, 1.1 * img, (n, r, 2))
    wh = rng.uniform(0, 0.7 * img, (n, r, 2))
    wh[:, :3] = 0  # points
    wh[:, 3:6] = rng.uniform(0, 0.05, (n, 3, 2))  # tiny
    wh[:, 6:8, 0] = 0  # zero width
    b = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    b[:, -1] = 0  # padded box
    return b


def torch_rois(b):
    n, r = b.shape[:2]
    idx = torch.arange(n, dtype=torch.float32).repeat_interleave(r)[:, None]
    return torch.cat([idx, torch.tensor(b.reshape(-1, 4))], 1)


@pytest.mark.parametrize(
    "sampling_ratio,aligned,out",
    [(2, True, (7, 7)), (0, True, (4, 5)), (3, False, (5, 3)), (0, False, (3, 3))],
)
def test_roi_align_values_and_grads(rng, seed, sampling_ratio, aligned, out):
    n, h, w, c, r, stride = 2, 11, 14, 3, 24, 8
    feats = rng.standard_normal((n, h, w, c)).astype(np.float32)
    boxes = random_rois(rng, n, r, stride * max(h, w))
    cot = rng.standard_normal((n, r) + out + (c,)).astype(np.float32)

    def f(x):
        return roi_align(x, jnp.asarray(boxes), out, 1.0 / stride, sampling_ratio, aligned,
                         adaptive_max_grid=6)

    got, vjp = jax.vjp(jax.jit(f), jnp.asarray(feats))
    (grad,) = vjp(jnp.asarray(cot))

    ft = torch.tensor(feats).permute(0, 3, 1, 2).requires_grad_()
    ref = torchvision.ops.roi_align(ft, torch_rois(boxes), out, 1.0 / stride, sampling_ratio,
                                    aligned)
    ref.backward(torch.tensor(cot).reshape((n * r,) + out + (c,)).permute(0, 3, 1, 2))
    ref = ref.detach().permute(0, 2, 3, 1).numpy().reshape(got.shape)
    err = np.abs(np.asarray(got) - ref).max()
    gerr = np.abs(np.asarray(grad) - ft.grad.permute(0, 2, 3, 1).numpy()).max()
    assert err <= 1e-4, f"seed={seed} value err {err}"
    assert gerr <= 1e-4, f"seed={seed} grad err {gerr}"
    assert np.abs(ref).max() > 0.1  # the test samples real values


def test_multilevel_matches_detectron2_pooler(rng, seed):
    n, c, r, img = 2, 4, 30, 256
    strides = [4, 8, 16, 32]
    feats = [rng.standard_normal((n, img // s, img // s - 1, c)).astype(np.float32)
             for s in strides]
    boxes = random_rois(rng, n, r, img)
    boxes[:, 8:16] *= 2.5  # some large boxes for the coarse levels
    got = jax.jit(lambda f, b: multilevel_roi_align(f, b, 7, strides, 2))(
        [jnp.asarray(f) for f in feats], jnp.asarray(boxes)
    )
    # Reference: detectron2's level rule in torch + one torchvision roi_align per level.
    tb = torch.tensor(boxes.reshape(-1, 4))
    size = torch.sqrt((tb[:, 2] - tb[:, 0]) * (tb[:, 3] - tb[:, 1]))
    lvl = torch.floor(4 + torch.log2(size / 224 + 1e-8)).clamp(2, 5).long() - 2
    rois = torch_rois(boxes)
    ref = torch.zeros(n * r, c, 7, 7)
    for i, s in enumerate(strides):
        sel = lvl == i
        ft = torch.tensor(feats[i]).permute(0, 3, 1, 2)
        ref[sel] = torchvision.ops.roi_align(ft, rois[sel], 7, 1.0 / s, 2, True)
    assert len(set(lvl.tolist())) >= 3, "random boxes should hit several levels"
    ref = ref.permute(0, 2, 3, 1).numpy().reshape(got.shape)
    err = np.abs(np.asarray(got) - ref).max()
    assert err <= 1e-4, f"seed={seed} err {err}"
    assert math.isfinite(err)


def test_bad_inputs_raise():
    f = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match="adaptive"):
        roi_align(f, jnp.zeros((1, 3, 4)), 2, 1.0, 0)
    with pytest.raises(ValueError, match="boxes"):
        roi_align(f, jnp.zeros((3, 4)), 2, 1.0, 2)

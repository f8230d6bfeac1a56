"""NMS kept sets against torchvision.ops.nms / batched_nms on fresh random boxes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from ovd_jax.ops import batched_nms, nms, topk_nms


def random_boxes(rng, n, img=200.0):
    xy = rng.uniform(-20, img, (n, 2))
    wh = rng.uniform(0, 60, (n, 2))
    wh[: n // 10] = 0  # degenerate
    wh[n // 10: n // 5] = rng.uniform(0, 1e-2, (n // 5 - n // 10, 2))  # tiny
    b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    return b


def kept(idx, valid):
    return np.asarray(idx)[np.asarray(valid)]


@pytest.mark.parametrize("n", [1, 7, 300, 700])
def test_nms_matches_torchvision(rng, seed, n):
    b = random_boxes(rng, n)
    s = rng.random(n).astype(np.float32)
    if n > 10:
        s[:4] = s[4]  # score ties: torchvision keeps the lower index first
    thr = float(rng.uniform(0.3, 0.7))
    ref = torchvision.ops.nms(torch.tensor(b), torch.tensor(s), thr).numpy()
    f = jax.jit(nms, static_argnums=(2, 3))
    got = kept(*f(jnp.asarray(b), jnp.asarray(s), thr, n))
    np.testing.assert_array_equal(got, ref, err_msg=f"seed={seed}")
    # A short max_output keeps the top of the same list; padding is index 0 / False.
    idx, valid = f(jnp.asarray(b), jnp.asarray(s), thr, 5)
    np.testing.assert_array_equal(kept(idx, valid), ref[:5], err_msg=f"seed={seed}")
    assert np.all(np.asarray(idx)[~np.asarray(valid)] == 0)


def test_nms_valid_mask_and_vmap(rng, seed):
    n = 400
    b = np.stack([random_boxes(rng, n) for _ in range(3)])
    s = rng.random((3, n)).astype(np.float32)
    valid = rng.random((3, n)) < 0.7
    valid[2] = False  # an image with no boxes
    idx, kv = jax.jit(jax.vmap(lambda b, s, v: nms(b, s, 0.5, 300, v)))(b, s, valid)
    for i in range(3):
        sel = np.nonzero(valid[i])[0]
        ref = sel[torchvision.ops.nms(torch.tensor(b[i][sel]), torch.tensor(s[i][sel]), 0.5)]
        np.testing.assert_array_equal(kept(idx[i], kv[i]), ref[:300], err_msg=f"seed={seed}")


def test_batched_and_topk_nms(rng, seed):
    n = 600
    b = random_boxes(rng, n)
    s = rng.random(n).astype(np.float32)
    c = rng.integers(0, 4, n)
    ref = torchvision.ops.batched_nms(torch.tensor(b), torch.tensor(s), torch.tensor(c), 0.5)
    got = kept(*batched_nms(jnp.asarray(b), jnp.asarray(s), jnp.asarray(c), 0.5, n))
    np.testing.assert_array_equal(got, ref.numpy(), err_msg=f"seed={seed}")

    valid = rng.random(n) < 0.8
    k = 250
    sv = np.where(valid, s, -np.inf)
    top = np.argsort(-sv, kind="stable")[:k]
    top = top[valid[top]]
    ref = top[torchvision.ops.nms(torch.tensor(b[top]), torch.tensor(s[top]), 0.6).numpy()]
    idx, kv = jax.jit(lambda b, s, v: topk_nms(b, s, k, 0.6, 100, v))(b, s, valid)
    np.testing.assert_array_equal(kept(idx, kv), ref[:100], err_msg=f"seed={seed}")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="boxes"):
        nms(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)), 0.5, 4)
    with pytest.raises(ValueError, match="max_output"):
        nms(jnp.zeros((3, 4)), jnp.zeros((3,)), 0.5, 0)

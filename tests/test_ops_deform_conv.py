"""deform_conv2d (v2 with mask, and v1) against torchvision.ops.deform_conv2d."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from ovd_jax.ops.deform_conv import ModulatedDeformConv, deform_conv2d


@pytest.mark.parametrize(
    "stride,padding,dilation,groups,use_mask",
    [(1, 1, 1, 1, True), (2, 2, 2, 2, True), (1, 0, 1, 1, False)],
)
def test_deform_conv_matches_torchvision(rng, seed, stride, padding, dilation, groups, use_mask):
    n, h, w, cin, cout, kh, kw = 2, 9, 11, 4, 5, 3, 3
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    # Offsets large enough to push samples outside the map on every side.
    off = (rng.standard_normal((n, ho, wo, 2 * groups * kh * kw)) * 3).astype(np.float32)
    mask = rng.random((n, ho, wo, groups * kh * kw)).astype(np.float32) if use_mask else None
    kern = rng.standard_normal((kh, kw, cin, cout)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    cot = rng.standard_normal((n, ho, wo, cout)).astype(np.float32)

    def f(x, off, mask, kern):
        return deform_conv2d(x, off, mask, kern, stride, padding, dilation, bias)

    got, vjp = jax.vjp(jax.jit(f), x, off, mask, kern)
    gx, goff, gmask, gk = vjp(jnp.asarray(cot))

    def t(a):
        return torch.tensor(a).permute(0, 3, 1, 2).requires_grad_()

    tx, toff = t(x), t(off)
    tmask = t(mask) if use_mask else None
    tw = torch.tensor(kern).permute(3, 2, 0, 1).contiguous().requires_grad_()
    ref = torchvision.ops.deform_conv2d(tx, toff, tw, torch.tensor(bias), stride, padding,
                                        dilation, tmask)
    ref.backward(torch.tensor(cot).permute(0, 3, 1, 2))

    def nhwc(a):
        return a.detach().permute(0, 2, 3, 1).numpy()

    err = np.abs(np.asarray(got) - nhwc(ref)).max()
    assert err <= 1e-4, f"seed={seed} value err {err}"
    assert np.abs(nhwc(ref)).max() > 0.5
    gerr = np.abs(np.asarray(gx) - nhwc(tx.grad)).max()
    assert gerr <= 1e-4, f"seed={seed} input grad err {gerr}"
    kerr = np.abs(np.asarray(gk) - tw.grad.permute(2, 3, 1, 0).numpy()).max()
    assert kerr <= 1e-4 * max(1.0, np.abs(np.asarray(gk)).max()), f"seed={seed} kernel grad {kerr}"
    # Offset gradients jump where a sample crosses an integer; compare where both are smooth.
    oerr = np.abs(np.asarray(goff) - nhwc(toff.grad))
    assert np.median(oerr) <= 1e-4, f"seed={seed} offset grad err {np.median(oerr)}"
    if use_mask:
        merr = np.abs(np.asarray(gmask) - nhwc(tmask.grad)).max()
        assert merr <= 1e-4, f"seed={seed} mask grad err {merr}"


def test_module_params_and_call(rng):
    m = ModulatedDeformConv(features=6, kernel_size=(3, 3), padding=1)
    x = jnp.asarray(rng.standard_normal((1, 5, 6, 4)), jnp.float32)
    off = jnp.zeros((1, 5, 6, 18))
    mask = jnp.ones((1, 5, 6, 9))
    variables = m.init(jax.random.key(0), x, off, mask)
    params = variables["params"]
    assert params["kernel"].names == (None, None, "conv_in", "conv_out")
    out = m.apply(variables, x, off, mask)
    # Zero offsets and unit mask: an ordinary 3x3 convolution.
    ref = jax.lax.conv_general_dilated(
        x, params["kernel"].value, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ) + params["bias"].value
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    with pytest.raises(ValueError, match="offset"):
        m.apply(variables, x, jnp.zeros((1, 5, 6, 17)), mask)

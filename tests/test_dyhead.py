"""GLIP's DyHead layer and FPN (ovd_jax/models/dyhead.py, fpn.py) against independent references.

* DyConv vs a PyTorch transcription of GLIP's `DyConv.forward` (torchvision's `deform_conv2d`
  with mask, `F.group_norm`, `F.interpolate(bilinear, align_corners=True)`, DyReLU's formula),
  on 3-5 levels with random weights and non-trivial offsets, including upstream's reading of the
  level-l offsets for the coarser input.
* properties: zero offsets + mask 1 make the spatial branches plain 3x3 convs (jax.lax.conv);
  the scale attention lies in [0.5, 1]; DyReLU = a NumPy transcription.
* FPN vs a PyTorch transcription of maskrcnn_benchmark's FPN + LastLevelP6P7.
* the fused stack (VLFuse -> DyConv) under jit on the 8-device mesh with the batch sharded.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from configs.common import DEFAULT_SHARDING_RULES
from ovd_jax.models.dyhead import DyConv, DyReLU, resize_bilinear_align_corners
from ovd_jax.models.fpn import FPN
from ovd_jax.models.fusion import VLFuse
from ovd_jax.training import sharding as shd

SIZES = [(10, 12), (5, 6), (3, 3), (2, 2), (1, 1)]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def random_params(module, rng, *args):
    shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args)))

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(
                np.float32)
        if name == "scale":
            return (1.0 + 0.2 * rng.standard_normal(s.shape)).astype(np.float32)
        return (0.2 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes["params"])


def pyramid(rng, n, c, num_levels):
    return [rng.standard_normal((n, h, w, c)).astype(np.float32) for h, w in SIZES[:num_levels]]


# ---------------------------------------------------------------- PyTorch transcription of GLIP


def t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def t_conv_weight(kernel):  # [kh, kw, in, out] -> [out, in, kh, kw]
    return t(np.asarray(kernel).transpose(3, 2, 0, 1))


def torch_dyconv(p, levels, use_deform, use_dyrelu, use_dyfuse, use_gn, coarser="upstream"):
    xs = [t(x).permute(0, 3, 1, 2) for x in levels]

    def branch(name, x, stride, offset, mask):
        q = p[name]
        if use_deform:
            y = torchvision.ops.deform_conv2d(x, offset, t_conv_weight(q["conv"]["kernel"]),
                                              t(q["conv"]["bias"]), stride=stride, padding=1,
                                              mask=mask)
        else:
            y = F.conv2d(x, t_conv_weight(q["conv"]["kernel"]), t(q["conv"]["bias"]),
                         stride=stride, padding=1)
        if use_gn:
            y = F.group_norm(y, 16, t(q["norm"]["scale"]), t(q["norm"]["bias"]), eps=1e-5)
        return y

    outs = []
    for i, x in enumerate(xs):
        offset = mask = None
        if use_deform:
            om = F.conv2d(x, t_conv_weight(p["offset"]["kernel"]), t(p["offset"]["bias"]),
                          padding=1)
            offset, mask = om[:, :18], om[:, 18:].sigmoid()
        feats = [branch("conv_same", x, 1, offset, mask)]
        if i > 0:
            feats.append(branch("conv_finer", xs[i - 1], 2, offset, mask))
        if i < len(xs) - 1:
            up = xs[i + 1]
            n, _, hc, wc = up.shape
            oc = mc = None
            if use_deform and coarser == "upstream":
                # The CUDA kernel indexes the (too large) offset/mask buffers with the coarser
                # map's strides: per image, the first K*hc*wc values in NCHW order.
                oc = offset.reshape(n, -1)[:, : 18 * hc * wc].reshape(n, 18, hc, wc)
                mc = mask.reshape(n, -1)[:, : 9 * hc * wc].reshape(n, 9, hc, wc)
            elif use_deform:
                iy = (np.arange(hc) * x.shape[2]) // hc
                ix = (np.arange(wc) * x.shape[3]) // wc
                oc, mc = offset[:, :, iy][:, :, :, ix], mask[:, :, iy][:, :, :, ix]
            y = branch("conv_coarser", up, 1, oc, mc)
            feats.append(F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=True))
        if use_dyfuse:
            w = t_conv_weight(p["scale_attn"]["kernel"])
            attn = [F.relu6(F.relu(F.conv2d(F.adaptive_avg_pool2d(f, 1), w,
                                            t(p["scale_attn"]["bias"]))) + 3) / 6 for f in feats]
            y = torch.mean(torch.stack(feats) * torch.stack(attn), dim=0)
        else:
            y = torch.mean(torch.stack(feats), dim=0)
        if use_dyrelu:
            q = p["dyrelu"]
            c = y.shape[1]
            s = F.adaptive_avg_pool2d(y, 1).flatten(1)
            s = F.relu(F.linear(s, t(q["fc1"]["kernel"]).T, t(q["fc1"]["bias"])))
            s = F.relu6(F.linear(s, t(q["fc2"]["kernel"]).T, t(q["fc2"]["bias"])) + 3) / 6
            a1, b1, a2, b2 = torch.split(s.view(-1, 4 * c, 1, 1), c, dim=1)
            y = torch.max(y * ((a1 - 0.5) * 2 + 1) + b1 - 0.5, y * ((a2 - 0.5) * 2) + b2 - 0.5)
        else:
            y = F.relu(y)
        outs.append(y.permute(0, 2, 3, 1).numpy())
    return outs


@pytest.mark.parametrize("num_levels,switches,coarser", [
    (3, (True, True, True, True), "upstream"),
    (5, (True, True, True, True), "upstream"),
    (4, (True, True, True, True), "subsample"),
    (4, (False, False, True, False), "upstream"),
])
def test_dyconv_matches_torch_transcription(seed, rng, num_levels, switches, coarser):
    use_deform, use_dyrelu, use_dyfuse, use_gn = switches
    levels = pyramid(rng, 2, 32, num_levels)
    module = DyConv(out_channels=32, use_deform=use_deform, use_dyrelu=use_dyrelu,
                    use_dyfuse=use_dyfuse, use_gn=use_gn, coarser_offsets=coarser)
    params = random_params(module, rng, levels)
    ours = module.apply({"params": params}, levels)
    ref = torch_dyconv(params, levels, use_deform, use_dyrelu, use_dyfuse, use_gn, coarser)
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    print(f"DyConv vs torch ({num_levels} levels, {switches}, {coarser}):", errs)
    assert [o.shape for o in ours] == [(2, h, w, 32) for h, w in SIZES[:num_levels]]
    assert max(errs) <= 2e-5, (seed, errs)


def test_zero_offsets_make_plain_convs(seed, rng):
    levels = pyramid(rng, 2, 8, 3)
    module = DyConv(out_channels=8, use_deform=True, use_dyrelu=False, use_dyfuse=False,
                    use_gn=False)
    params = random_params(module, rng, levels)
    params["offset"]["kernel"] = np.zeros_like(params["offset"]["kernel"])
    # Offsets 0; mask logits 30 so that sigmoid = 1 in float32.
    params["offset"]["bias"] = np.concatenate([np.zeros(18), np.full(9, 30.0)]).astype(np.float32)
    ours = module.apply({"params": params}, levels)

    def conv(x, q, stride):
        y = jax.lax.conv_general_dilated(x, q["conv"]["kernel"], (stride, stride),
                                         ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return np.asarray(y) + q["conv"]["bias"]

    def upsample(x, h, w):  # bilinear, align_corners=True, written out per output pixel
        hi, wi = x.shape[1:3]
        out = np.zeros((x.shape[0], h, w, x.shape[3]), np.float64)
        for i in range(h):
            sy = i * (hi - 1) / (h - 1) if h > 1 else 0.0
            y0 = int(np.floor(sy)); y1 = min(y0 + 1, hi - 1); fy = sy - y0  # noqa: E702
            for j in range(w):
                sx = j * (wi - 1) / (w - 1) if w > 1 else 0.0
                x0 = int(np.floor(sx)); x1 = min(x0 + 1, wi - 1); fx = sx - x0  # noqa: E702
                out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                                + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
        return out

    for i, x in enumerate(levels):
        feats = [conv(x, params["conv_same"], 1)]
        if i > 0:
            feats.append(conv(levels[i - 1], params["conv_finer"], 2))
        if i < len(levels) - 1:
            feats.append(upsample(conv(levels[i + 1], params["conv_coarser"], 1), *x.shape[1:3]))
        ref = np.maximum(np.mean(feats, axis=0), 0)
        np.testing.assert_allclose(ours[i], ref, rtol=1e-5, atol=1e-5, err_msg=str(seed))


def test_scale_attention_is_a_hard_sigmoid_of_a_relu(seed, rng):
    levels = pyramid(rng, 2, 16, 3)
    kw = dict(out_channels=16, use_deform=False, use_dyrelu=False)
    plain = DyConv(use_dyfuse=False, **kw)
    fused = DyConv(use_dyfuse=True, **kw)
    params = random_params(fused, rng, levels)
    base = plain.apply({"params": {k: v for k, v in params.items() if k != "scale_attn"}}, levels)
    # The ReLU floors the attention at hsigmoid(0) = 0.5; a large logit saturates it at 1.
    for bias, factor in ((-100.0, 0.5), (100.0, 1.0)):
        params["scale_attn"]["bias"] = np.full(1, bias, np.float32)
        out = fused.apply({"params": params}, levels)
        for a, b in zip(out, base):
            np.testing.assert_allclose(a, factor * np.asarray(b), rtol=1e-5, atol=1e-6)
    # In between: with one level there is one branch, so each image's output is its plain output
    # times one attention value, which must lie in [0.5, 1].
    params["scale_attn"]["bias"] = np.full(1, 1.0, np.float32)
    out = np.asarray(fused.apply({"params": params}, levels[:1])[0])
    ref = np.asarray(plain.apply({"params": {k: v for k, v in params.items()
                                             if k != "scale_attn"}}, levels[:1])[0])
    for a, b in zip(out, ref):
        ratio = a[b > 1e-3] / b[b > 1e-3]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
        assert 0.5 < ratio[0] < 1.0, (seed, ratio[0])


def test_dyrelu_matches_numpy(seed, rng):
    x = rng.standard_normal((3, 5, 4, 12)).astype(np.float32)
    module = DyReLU()
    p = random_params(module, rng, x)
    ours = np.asarray(module.apply({"params": p}, x))
    s = x.mean(axis=(1, 2))
    s = np.maximum(s @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    s = np.clip(s @ p["fc2"]["kernel"] + p["fc2"]["bias"] + 3, 0, 6) / 6
    a1, b1, a2, b2 = (s[:, None, None, k * 12:(k + 1) * 12] for k in range(4))
    ref = np.maximum(x * ((a1 - 0.5) * 2.0 + 1.0) + (b1 - 0.5), x * ((a2 - 0.5) * 2.0) + (b2 - 0.5))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6, err_msg=str(seed))


def test_bilinear_resize_matches_torch(rng):
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    for size in ((6, 9), (1, 1), (3, 5), (7, 2)):
        ref = F.interpolate(t(x).permute(0, 3, 1, 2), size=size, mode="bilinear",
                            align_corners=True).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(resize_bilinear_align_corners(x, *size), ref, rtol=1e-5,
                                   atol=1e-6)


def torch_fpn(p, feats, num_extra, p6_from):
    xs = [t(x).permute(0, 3, 1, 2) for x in feats]

    def conv(x, name, stride=1, pad=1):
        return F.conv2d(x, t_conv_weight(p[name]["kernel"]), t(p[name]["bias"]), stride=stride,
                        padding=pad)

    last = conv(xs[-1], f"lateral_{len(xs) - 1}", pad=0)
    results = [conv(last, f"output_{len(xs) - 1}")]
    for i in range(len(xs) - 2, -1, -1):
        lateral = conv(xs[i], f"lateral_{i}", pad=0)
        last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
        results.insert(0, conv(last, f"output_{i}"))
    if num_extra:
        p6 = conv(results[-1] if p6_from == "p5" else xs[-1], "p6", stride=2)
        results.append(p6)
        if num_extra > 1:
            results.append(conv(F.relu(p6), "p7", stride=2))
    return [r.permute(0, 2, 3, 1).numpy() for r in results]


@pytest.mark.parametrize("p6_from,num_extra", [("p5", 2), ("c5", 1)])
def test_fpn_matches_torch_transcription(seed, rng, p6_from, num_extra):
    # Swin-like res2..res5 (channel ratios 1:2:4:8), odd sizes so nearest upsampling is not 2x.
    feats = [rng.standard_normal((2, h, w, c)).astype(np.float32)
             for (h, w), c in zip([(20, 27), (10, 14), (5, 7), (3, 4)], (6, 12, 24, 48))]
    module = FPN(out_channels=16, num_extra_levels=num_extra, p6_from=p6_from)
    params = random_params(module, rng, feats)
    ours = module.apply({"params": params}, feats)
    ref = torch_fpn(params, feats[1:], num_extra, p6_from)
    assert len(ours) == 3 + num_extra
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert rel_err(a, b) <= 1e-5, seed


def test_fpn_vit_adapter_and_drop_block(seed, rng):
    x = [rng.standard_normal((2, 8, 6, 24)).astype(np.float32)]
    module = FPN(out_channels=16, single_scale_input=True, drop_block_prob=0.3)
    variables = module.init(jax.random.key(seed), x)
    outs = module.apply(variables, x)
    assert [o.shape for o in outs] == [(2, 16, 12, 16), (2, 8, 6, 16), (2, 4, 3, 16),
                                       (2, 2, 2, 16), (2, 1, 1, 16)]
    train = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train[0], outs[0]) and np.allclose(train[2], outs[2])
    assert all(np.all(np.isfinite(o)) for o in train)
    with pytest.raises(ValueError, match="one stride-16 map"):
        module.init(jax.random.key(0), x * 2)


def test_bad_pyramid_raises(rng):
    levels = [np.zeros((1, 8, 8, 16), np.float32), np.zeros((1, 3, 3, 16), np.float32)]
    with pytest.raises(ValueError, match="stride-2 reduction"):
        DyConv(out_channels=16).init(jax.random.key(0), levels)
    with pytest.raises(ValueError, match="coarser_offsets"):
        DyConv(out_channels=16, coarser_offsets="nearest").init(jax.random.key(0), levels[:1])
    with pytest.raises(ValueError, match="num_inputs"):
        FPN(out_channels=16).init(jax.random.key(0), levels)


def test_fused_stack_under_jit_on_eight_devices(seed, rng):
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (see tests/conftest.py)"
    n, c = 8, 16
    levels = pyramid(rng, n, c, 3)
    text = rng.standard_normal((n, 6, 24)).astype(np.float32)
    mask = np.arange(6)[None, :] < rng.integers(1, 7, size=n)[:, None]
    fuse = VLFuse(embed_dim=32, num_heads=4)
    dyconv = DyConv(out_channels=c)

    def stack(p, levels, text, mask):
        levels, text = fuse.apply({"params": p["fuse"]}, levels, text, mask)
        return dyconv.apply({"params": p["dyconv"]}, levels), text

    params = {"fuse": random_params(fuse, rng, levels, text, mask),
              "dyconv": random_params(dyconv, rng, levels)}
    ref_levels, ref_text = stack(params, levels, text, mask)

    mesh = shd.make_mesh((-1, 1, 1))
    batch = shd.batch_sharding(mesh)
    args = jax.device_put((levels, text, mask), batch)
    with mesh, nn.logical_axis_rules(DEFAULT_SHARDING_RULES):
        out_levels, out_text = jax.jit(stack)(jax.device_put(params, shd.replicated(mesh)), *args)
        jax.block_until_ready(out_levels)
    assert len(out_levels[0].sharding.device_set) == 8
    assert out_levels[0].sharding.shard_shape(out_levels[0].shape)[0] == 1
    for a, b in zip(out_levels + [out_text], list(ref_levels) + [ref_text]):
        assert rel_err(a, b) <= 1e-5, seed

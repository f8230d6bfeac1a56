"""GLIP's bi-directional X-MHA (ovd_jax/models/fusion.py) against independent references.

* transformers' PyTorch Grounding DINO `GroundingDinoBiMultiHeadAttention` /
  `GroundingDinoFusionLayer` (the same attention with GLIP's STABLE_SOFTMAX_2D global shift, no
  image mask passed), random weights copied into ours: outputs and gradients w.r.t. inputs and
  every parameter, float32 ours vs float64 torch.
* a plain NumPy transcription of GLIP's default path (no global shift), also where the +-50000
  clamps bind (float64 on both sides, so the comparison is exact there too).
* invariants: padded tokens get no attention, padding length changes nothing on real tokens,
  1e4-scale inputs stay finite; VLFuse = the block on the concatenated pyramid.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GroundingDinoConfig
from transformers.models.grounding_dino import modeling_grounding_dino as gd

from ovd_jax.models.fusion import CLAMP, BiAttentionBlock, BiMultiHeadAttention, VLFuse

D, E, HEADS = 16, 32, 4  # stream width, attention width, heads (head_dim 8)
LN = (("layer_norm_v", "layer_norm_vision"), ("layer_norm_l", "layer_norm_text"))
PROJ = ["v_proj", "l_proj", "values_v_proj", "values_l_proj", "out_v_proj", "out_l_proj"]
GD_PROJ = ["vision_proj", "text_proj", "values_vision_proj", "values_text_proj",
           "out_vision_proj", "out_text_proj"]


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (a normwise relative error that is stable near zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def random_params(module, rng, *args):
    """Our module's parameter tree with every leaf replaced by fresh random values."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
    shapes = nn.meta.unbox(shapes)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(s.shape) / np.sqrt(s.shape[0])).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.2 * rng.standard_normal(s.shape)).astype(np.float32)
        if name.startswith("gamma"):
            return (0.5 * rng.standard_normal(s.shape)).astype(np.float32)
        return (0.2 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def make_inputs(rng, n=2, sv=11, sl=7, real=(7, 4)):
    v = rng.standard_normal((n, sv, D)).astype(np.float32)
    lang = rng.standard_normal((n, sl, D)).astype(np.float32)
    mask = np.arange(sl)[None, :] < np.asarray(real)[:, None]
    return v, lang, mask


def gd_config():
    return GroundingDinoConfig(d_model=D, encoder_ffn_dim=2 * E, encoder_attention_heads=2 * HEADS,
                               fusion_dropout=0.0, fusion_droppath=0.0, layer_norm_eps=1e-5)


def load_gd_attn(mod, p):
    """Copies our BiMultiHeadAttention params into a Grounding DINO attention module."""
    for ours, theirs in zip(PROJ, GD_PROJ):
        lin = getattr(mod, theirs)
        lin.weight.data = torch.tensor(np.asarray(p[ours]["kernel"]).T, dtype=torch.float64)
        lin.bias.data = torch.tensor(np.asarray(p[ours]["bias"]), dtype=torch.float64)


def gd_grads(mod, outputs_fn, inputs, cot):
    """Runs outputs_fn on float64 leaf tensors; returns outputs and grads of sum(out * cot)."""
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in inputs]
    outs = outputs_fn(*ts)
    loss = sum((o * torch.tensor(c, dtype=torch.float64)).sum() for o, c in zip(outs, cot))
    loss.backward()
    return [o.detach().numpy() for o in outs], [t.grad.numpy() for t in ts]


def jax_grads(module, params, v, lang, mask, cot):
    def loss(p, v, lang):
        ov, ol = module.apply({"params": p}, v, lang, mask)
        return jnp.sum(ov * cot[0]) + jnp.sum(ol * cot[1]), (ov, ol)

    (_, outs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, v, lang)
    return outs, grads


def test_bi_mha_matches_grounding_dino(seed, rng):
    module = BiMultiHeadAttention(D, D, embed_dim=E, num_heads=HEADS, stable_softmax_2d=True)
    v, lang, mask = make_inputs(rng)
    params = random_params(module, rng, v, lang, mask)
    cot = [rng.standard_normal(v.shape), rng.standard_normal(lang.shape)]

    ref = gd.GroundingDinoBiMultiHeadAttention(gd_config()).double().eval()
    load_gd_attn(ref, params)
    ref_out, ref_in_grads = gd_grads(
        ref, lambda a, b: [x[0] for x in ref(a, b, text_attention_mask=torch.tensor(~mask))],
        [v, lang], cot)
    outs, (gp, gv, gl) = jax_grads(module, params, v, lang, mask, cot)

    errs = {"out_v": rel_err(outs[0], ref_out[0]), "out_l": rel_err(outs[1], ref_out[1]),
            "grad_v": rel_err(gv, ref_in_grads[0]), "grad_l": rel_err(gl, ref_in_grads[1])}
    for ours, theirs in zip(PROJ, GD_PROJ):
        lin = getattr(ref, theirs)
        errs[f"grad_{ours}.kernel"] = rel_err(gp[ours]["kernel"], lin.weight.grad.numpy().T)
        errs[f"grad_{ours}.bias"] = rel_err(gp[ours]["bias"], lin.bias.grad.numpy())
    print("BiMultiHeadAttention vs Grounding DINO, max relative errors:", errs)
    assert max(errs.values()) <= 1e-5, (seed, errs)


def test_block_matches_grounding_dino_fusion_layer(seed, rng):
    module = BiAttentionBlock(D, D, embed_dim=E, num_heads=HEADS, stable_softmax_2d=True)
    v, lang, mask = make_inputs(rng)
    params = random_params(module, rng, v, lang, mask)
    cot = [rng.standard_normal(v.shape), rng.standard_normal(lang.shape)]

    ref = gd.GroundingDinoFusionLayer(gd_config()).double().eval()
    load_gd_attn(ref.attn, params["attn"])
    for ours, theirs in LN:
        getattr(ref, theirs).weight.data = torch.tensor(np.asarray(params[ours]["scale"]),
                                                        dtype=torch.float64)
        getattr(ref, theirs).bias.data = torch.tensor(np.asarray(params[ours]["bias"]),
                                                      dtype=torch.float64)
    ref.vision_param.data = torch.tensor(np.asarray(params["gamma_v"]), dtype=torch.float64)
    ref.text_param.data = torch.tensor(np.asarray(params["gamma_l"]), dtype=torch.float64)
    ref_out, ref_in_grads = gd_grads(
        ref, lambda a, b: [x[0] for x in ref(a, b, attention_mask_text=torch.tensor(~mask))],
        [v, lang], cot)
    outs, (gp, gv, gl) = jax_grads(module, params, v, lang, mask, cot)

    errs = {"out_v": rel_err(outs[0], ref_out[0]), "out_l": rel_err(outs[1], ref_out[1]),
            "grad_v": rel_err(gv, ref_in_grads[0]), "grad_l": rel_err(gl, ref_in_grads[1]),
            "grad_gamma_v": rel_err(gp["gamma_v"], ref.vision_param.grad.numpy()),
            "grad_gamma_l": rel_err(gp["gamma_l"], ref.text_param.grad.numpy())}
    for ours, theirs in LN:
        errs[f"grad_{ours}.scale"] = rel_err(gp[ours]["scale"],
                                             getattr(ref, theirs).weight.grad.numpy())
        errs[f"grad_{ours}.bias"] = rel_err(gp[ours]["bias"],
                                            getattr(ref, theirs).bias.grad.numpy())
    for ours, theirs in zip(PROJ, GD_PROJ):
        lin = getattr(ref.attn, theirs)
        errs[f"grad_{ours}.kernel"] = rel_err(gp["attn"][ours]["kernel"], lin.weight.grad.numpy().T)
        errs[f"grad_{ours}.bias"] = rel_err(gp["attn"][ours]["bias"], lin.bias.grad.numpy())
    print("BiAttentionBlock vs GroundingDinoFusionLayer, max relative errors:", errs)
    assert max(errs.values()) <= 1e-5, (seed, errs)


def numpy_glip_attention(p, v, lang, mask, heads, stable=False, clamp=True):
    """GLIP's BiMultiHeadAttention.forward (eval mode) written plainly in float64 NumPy."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
    n, sv, _ = v.shape
    sl = lang.shape[1]
    e = p["v_proj"]["kernel"].shape[1]
    hd = e // heads

    def lin(x, name):
        return x @ p[name]["kernel"] + p[name]["bias"]

    def split(x):
        return x.reshape(n, -1, heads, hd).transpose(0, 2, 1, 3)

    def softmax(x):
        x = x - x.max(-1, keepdims=True)
        ex = np.exp(x)
        return ex / ex.sum(-1, keepdims=True)

    clip = (lambda x: np.clip(x, -50000, 50000)) if clamp else (lambda x: x)
    q = split(lin(v, "v_proj") * hd**-0.5)
    k = split(lin(lang, "l_proj"))
    vv, vl = split(lin(v, "values_v_proj")), split(lin(lang, "values_l_proj"))
    w = q @ k.transpose(0, 1, 3, 2)
    if stable:
        w = w - w.max()
    w = clip(w)
    wt = w.transpose(0, 1, 3, 2)
    wl = softmax(clip(wt - wt.max(-1, keepdims=True)))
    w = w + np.where(mask, 0.0, -9e15)[:, None, None, :]
    wv = softmax(w)
    ov = (wv @ vl).transpose(0, 2, 1, 3).reshape(n, sv, e)
    ol = (wl @ vv).transpose(0, 2, 1, 3).reshape(n, sl, e)
    return lin(ov, "out_v_proj"), lin(ol, "out_l_proj"), q @ k.transpose(0, 1, 3, 2)


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_default_path_matches_numpy_including_clamps(seed, rng, scale):
    v, lang, mask = make_inputs(rng)
    v, lang = v * scale, lang * scale
    with jax.enable_x64(True):
        module = BiMultiHeadAttention(D, D, embed_dim=E, num_heads=HEADS, dtype=jnp.float64,
                                      param_dtype=jnp.float64)
        params = jax.tree.map(lambda x: np.asarray(x, np.float64),
                              random_params(module, rng, v, lang, mask))
        v64, l64 = v.astype(np.float64), lang.astype(np.float64)
        ov, ol = module.apply({"params": params}, v64, l64, mask)
        ov, ol = np.asarray(ov), np.asarray(ol)
        stable = BiMultiHeadAttention(D, D, embed_dim=E, num_heads=HEADS, stable_softmax_2d=True,
                                      dtype=jnp.float64, param_dtype=jnp.float64)
        sv_, sl_ = stable.apply({"params": params}, v64, l64, mask)
    rv, rl, raw = numpy_glip_attention(params, v, lang, mask, HEADS)
    errs = (rel_err(ov, rv), rel_err(ol, rl))
    print(f"default path vs NumPy (scale {scale}): {errs}")
    assert max(errs) <= 1e-10, (seed, errs)
    # The stable (global shift) path is Grounding DINO's; check it too against the transcription.
    rsv, rsl, _ = numpy_glip_attention(params, v, lang, mask, HEADS, stable=True)
    assert max(rel_err(sv_, rsv), rel_err(sl_, rsl)) <= 1e-10, seed
    if scale > 1:
        # The clamps really bind here, and without them the result would differ.
        assert np.mean(np.abs(raw) > CLAMP) > 0.05, (seed, np.abs(raw).max())
        uv, ul, _ = numpy_glip_attention(params, v, lang, mask, HEADS, clamp=False)
        assert rel_err(uv, rv) > 1e-3 or rel_err(ul, rl) > 1e-3, seed


def test_padding_gets_no_attention_and_length_does_not_matter(seed, rng):
    n, sv, real = 2, 9, (5, 3)
    module = BiAttentionBlock(D, D, embed_dim=E, num_heads=HEADS)
    v = rng.standard_normal((n, sv, D)).astype(np.float32)
    base = rng.standard_normal((n, 5, D)).astype(np.float32)
    params = random_params(module, rng, v, base, np.ones((n, 5), bool))

    def run(pad_to):
        lang = rng.standard_normal((n, pad_to, D)).astype(np.float32) * 100.0  # garbage padding
        lang[:, :5] = base
        mask = np.arange(pad_to)[None, :] < np.asarray(real)[:, None]
        return module.apply({"params": params}, v, lang, mask)

    v1, l1 = run(5)
    v2, l2 = run(12)
    v3, l3 = run(12)  # same length, different garbage in the padded slots
    assert np.array_equal(np.asarray(v2), np.asarray(v3)), seed  # zero mass on padded tokens
    np.testing.assert_allclose(v1, v2, rtol=1e-6, atol=1e-6, err_msg=str(seed))
    for i, r in enumerate(real):
        np.testing.assert_allclose(l1[i, :r], l2[i, :r], rtol=1e-6, atol=1e-6, err_msg=str(seed))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_inputs_stay_finite(seed, rng, dtype):
    v, lang, mask = make_inputs(rng)
    mask[1] = False  # an image whose prompt is all padding
    v, lang = v * 1e4, lang * 1e4
    for module in (BiMultiHeadAttention(D, D, embed_dim=E, num_heads=HEADS, dtype=dtype),
                   BiAttentionBlock(D, D, embed_dim=E, num_heads=HEADS, dtype=dtype)):
        params = random_params(module, rng, v, lang, mask)
        params = jax.tree.map(lambda x: x * 30.0, params)  # large weights too

        def loss(p, v, lang, module=module):
            ov, ol = module.apply({"params": p}, v, lang, mask)
            return jnp.sum(ov.astype(jnp.float32)) + jnp.sum(ol.astype(jnp.float32)), (ov, ol)

        grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        (_, outs), grads = grad_fn(params, v, lang)
        for leaf in jax.tree.leaves((outs, grads)):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32))), (seed, type(module).__name__)


def test_vlfuse_is_the_block_on_the_concatenated_pyramid(seed, rng):
    n, c, lw = 2, 16, 24
    levels = [rng.standard_normal((n, h, w, c)).astype(np.float32)
              for h, w in ((6, 8), (3, 4), (2, 2))]
    text = rng.standard_normal((n, 5, lw)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    fuse = VLFuse(embed_dim=E, num_heads=HEADS, init_values=0.25)
    variables = fuse.init(jax.random.key(seed), levels, text, mask)
    # Logical axis names on every parameter; layer scale initialised to init_values.
    specs = jax.tree.leaves(nn.get_partition_spec(variables),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert all(len(s) > 0 for s in specs)
    params = nn.meta.unbox(variables)["params"]
    np.testing.assert_array_equal(params["b_attn"]["gamma_v"], np.full(c, 0.25, np.float32))
    params = random_params(fuse, rng, levels, text, mask)
    out_levels, out_text = fuse.apply({"params": params}, levels, text, mask)

    flat = np.concatenate([x.reshape(n, -1, c) for x in levels], axis=1)
    block = BiAttentionBlock(c, lw, embed_dim=E, num_heads=HEADS)
    ref_v, ref_l = block.apply({"params": params["b_attn"]}, flat, text, mask)
    np.testing.assert_allclose(out_text, ref_l, rtol=1e-6, atol=1e-6)
    start = 0
    for x, y in zip(levels, out_levels):
        h, w = x.shape[1:3]
        assert y.shape == x.shape
        np.testing.assert_allclose(y, np.asarray(ref_v[:, start:start + h * w]).reshape(x.shape),
                                   rtol=1e-6, atol=1e-6)
        start += h * w

    # Dropout is active only when asked, and then needs (and uses) the 'dropout' rng.
    noisy = fuse.apply({"params": params}, levels, text, mask, deterministic=False,
                       rngs={"dropout": jax.random.key(1)})[1]
    assert not np.allclose(noisy, out_text)


def test_bad_inputs_raise(rng):
    v, lang, mask = make_inputs(rng)
    module = BiMultiHeadAttention(D, D, embed_dim=E, num_heads=HEADS)
    with pytest.raises(ValueError, match="l_mask"):
        module.init(jax.random.key(0), v, lang, mask[:, :3])
    with pytest.raises(ValueError, match="v_dim"):
        module.init(jax.random.key(0), v[..., :8], lang, mask)
    with pytest.raises(ValueError, match="divisible"):
        BiMultiHeadAttention(D, D, embed_dim=30, num_heads=HEADS).init(jax.random.key(0), v, lang)
    with pytest.raises(ValueError, match="every level"):
        VLFuse(embed_dim=E, num_heads=HEADS).init(
            jax.random.key(0), [np.zeros((2, 4, 4, 8)), np.zeros((2, 2, 2, 4))], lang, mask)

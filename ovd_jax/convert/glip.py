"""Import official GLIP checkpoints (microsoft/GLIP `GeneralizedVLRCNN` with a `VLDyHead`: Swin +
FPN + BERT + deep fusion + dot-product ATSS head) into `ovd_jax.models.glip.GLIPDetector`.

Python: `variables = glip_variables_from_state_dict(state_dict, config)`, or
`model, variables = load_glip(path, config=None)`; CLI: `python -m ovd_jax.convert --format glip
--input glip_tiny_model_o365_goldg.pth --output ckpt/glip_t [--model glip_t]`, then train or
evaluate with `--config.model.init_checkpoint=ckpt/glip_t`.

`config` is a `configs/glip.py` config (`config.model` describes the detector); without one,
`load_glip` takes `configs/glip.py:glip_t` or `:glip_l`, chosen by the Swin width in the file.
The checkpoint is read with `read_state_dict` (a `{"model": ...}` wrapper and the `module.`
prefix of distributed training are removed). Every parameter of the model is looked up through
`MAPPING`; every checkpoint key must be used by it or match `IGNORED`. Missing, unexpected and
shape-mismatched keys are listed by name in one CheckpointMismatchError (with `strict=False`
missing and unexpected keys are only logged and the missing parameters are left out).

The mapping (`MAPPING`, read top to bottom). Left: our parameter path under `params/`, right: the
GLIP key after `module.`. `{s}`, `{b}`, `{i}` are indices, `{3i+1}` is arithmetic on `i`. A module
row maps its leaves by its layout:

    dense  kernel [in, out] = weight.T, bias = bias                      (nn.Linear)
    conv   kernel [kh, kw, in, out] = weight.permute(2, 3, 1, 0), bias   (nn.Conv2d, deform conv)
    norm   scale = weight, bias = bias                                   (LayerNorm, GroupNorm)
    embed  embedding = weight                                            (nn.Embedding)
    param  the row names one tensor, copied as it is                     (nn.Parameter)

Two things are not plain renames:

* Input normalisation. GLIP feeds the Swin BGR pixels in 0-255 minus (103.53, 116.28, 123.675)
  over (57.375, 57.12, 58.395) (its configs' INPUT.PIXEL_MEAN/STD, TO_BGR255); ovd_jax feeds RGB
  normalised with CLIP's statistics (`ovd_jax.data.transforms`). Both are affine per channel, so
  `fold_pixel_normalization` rewrites the patch-embedding convolution (channel order, scale and
  bias) to give the same output on our input; exact, since that convolution has no padding. Only
  the mean-colour padding of non-square images differs: ours is 0 after CLIP normalisation, GLIP's
  0 after its own (a difference of under 0.02 in GLIP's units). `fold_pixel_norm=False` keeps the
  weights as they are (then feed GLIP-normalised BGR images).
* `backbone/stages_0/out_norm`: GLIP's `SWINT-FPN-RETINANET` body builds `norm0` as nn.Identity
  (no tensors) because the FPN never reads stage 2. When the checkpoint has no `norm0`, that
  LayerNorm is set to scale 1, bias 0 (it feeds nothing in the detector).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from ovd_jax.convert.common import (
    CheckpointMismatchError,
    conv_kernel,
    flatten,
    linear_kernel,
    model_shapes,
    read_state_dict,
    save_checkpoint,
    unflatten,
)

DENSE, CONV, NORM, EMBED, PARAM = "dense", "conv", "norm", "embed", "param"

# Our leaf name -> the torch tensor name, per module layout.
_LEAVES = {
    DENSE: {"kernel": "weight", "bias": "bias"},
    CONV: {"kernel": "weight", "bias": "bias"},
    NORM: {"scale": "weight", "bias": "bias"},
    EMBED: {"embedding": "weight"},
}

_BERT = "language_backbone.body.model"  # an HF BertModel (built without pooler)
_SWIN = "backbone.body"

# (our parameter path under params/, GLIP key after `module.`, layout). GLIP's fusion layer i
# is three modules of rpn.head.dyhead_tower: {3i} VLFuse, {3i+1} BertEncoderLayer, {3i+2} DyConv.
# fmt: off
MAPPING: tuple[tuple[str, str, str], ...] = (
    # --- Swin (backbone.body)
    ("backbone/patch_proj", "backbone.body.patch_embed.proj", CONV),
    ("backbone/patch_norm", "backbone.body.patch_embed.norm", NORM),
    ("backbone/stages_{s}/block_{b}/norm1", "backbone.body.layers.{s}.blocks.{b}.norm1", NORM),
    ("backbone/stages_{s}/block_{b}/attn/qkv",
     "backbone.body.layers.{s}.blocks.{b}.attn.qkv", DENSE),
    ("backbone/stages_{s}/block_{b}/attn/proj",
     "backbone.body.layers.{s}.blocks.{b}.attn.proj", DENSE),
    ("backbone/stages_{s}/block_{b}/attn/relative_position_bias_table",
     "backbone.body.layers.{s}.blocks.{b}.attn.relative_position_bias_table", PARAM),
    ("backbone/stages_{s}/block_{b}/norm2", "backbone.body.layers.{s}.blocks.{b}.norm2", NORM),
    ("backbone/stages_{s}/block_{b}/fc1", "backbone.body.layers.{s}.blocks.{b}.mlp.fc1", DENSE),
    ("backbone/stages_{s}/block_{b}/fc2", "backbone.body.layers.{s}.blocks.{b}.mlp.fc2", DENSE),
    ("backbone/stages_{s}/downsample/norm", "backbone.body.layers.{s}.downsample.norm", NORM),
    ("backbone/stages_{s}/downsample/reduction",
     "backbone.body.layers.{s}.downsample.reduction", DENSE),
    ("backbone/stages_{s}/out_norm", "backbone.body.norm{s}", NORM),
    # --- FPN (backbone.fpn): inputs numbered from 1 with res2's slot empty, so res3 is "2"
    ("fpn/lateral_{i}", "backbone.fpn.fpn_inner{i+2}", CONV),
    ("fpn/output_{i}", "backbone.fpn.fpn_layer{i+2}", CONV),
    ("fpn/p6", "backbone.fpn.top_blocks.p6", CONV),
    ("fpn/p7", "backbone.fpn.top_blocks.p7", CONV),
    # --- BERT (language_backbone.body.model)
    ("language_backbone/word_embeddings",
     "language_backbone.body.model.embeddings.word_embeddings", EMBED),
    ("language_backbone/position_embeddings",
     "language_backbone.body.model.embeddings.position_embeddings", EMBED),
    ("language_backbone/token_type_embeddings",
     "language_backbone.body.model.embeddings.token_type_embeddings", EMBED),
    ("language_backbone/embeddings_norm",
     "language_backbone.body.model.embeddings.LayerNorm", NORM),
    ("language_backbone/layer_{i}/query",
     "language_backbone.body.model.encoder.layer.{i}.attention.self.query", DENSE),
    ("language_backbone/layer_{i}/key",
     "language_backbone.body.model.encoder.layer.{i}.attention.self.key", DENSE),
    ("language_backbone/layer_{i}/value",
     "language_backbone.body.model.encoder.layer.{i}.attention.self.value", DENSE),
    ("language_backbone/layer_{i}/attention_output",
     "language_backbone.body.model.encoder.layer.{i}.attention.output.dense", DENSE),
    ("language_backbone/layer_{i}/attention_norm",
     "language_backbone.body.model.encoder.layer.{i}.attention.output.LayerNorm", NORM),
    ("language_backbone/layer_{i}/intermediate",
     "language_backbone.body.model.encoder.layer.{i}.intermediate.dense", DENSE),
    ("language_backbone/layer_{i}/output",
     "language_backbone.body.model.encoder.layer.{i}.output.dense", DENSE),
    ("language_backbone/layer_{i}/output_norm",
     "language_backbone.body.model.encoder.layer.{i}.output.LayerNorm", NORM),
    # --- fusion layer i, X-MHA (VLFuse.b_attn = BiAttentionBlockForCheckpoint)
    ("fuse_{i}/b_attn/layer_norm_v", "rpn.head.dyhead_tower.{3i}.b_attn.layer_norm_v", NORM),
    ("fuse_{i}/b_attn/layer_norm_l", "rpn.head.dyhead_tower.{3i}.b_attn.layer_norm_l", NORM),
    ("fuse_{i}/b_attn/attn/v_proj", "rpn.head.dyhead_tower.{3i}.b_attn.attn.v_proj", DENSE),
    ("fuse_{i}/b_attn/attn/l_proj", "rpn.head.dyhead_tower.{3i}.b_attn.attn.l_proj", DENSE),
    ("fuse_{i}/b_attn/attn/values_v_proj",
     "rpn.head.dyhead_tower.{3i}.b_attn.attn.values_v_proj", DENSE),
    ("fuse_{i}/b_attn/attn/values_l_proj",
     "rpn.head.dyhead_tower.{3i}.b_attn.attn.values_l_proj", DENSE),
    ("fuse_{i}/b_attn/attn/out_v_proj", "rpn.head.dyhead_tower.{3i}.b_attn.attn.out_v_proj", DENSE),
    ("fuse_{i}/b_attn/attn/out_l_proj", "rpn.head.dyhead_tower.{3i}.b_attn.attn.out_l_proj", DENSE),
    ("fuse_{i}/b_attn/gamma_v", "rpn.head.dyhead_tower.{3i}.b_attn.gamma_v", PARAM),
    ("fuse_{i}/b_attn/gamma_l", "rpn.head.dyhead_tower.{3i}.b_attn.gamma_l", PARAM),
    # --- fusion layer i, BERT layer on the text (BertEncoderLayer)
    ("lang_layers_{i}/query", "rpn.head.dyhead_tower.{3i+1}.attention.self.query", DENSE),
    ("lang_layers_{i}/key", "rpn.head.dyhead_tower.{3i+1}.attention.self.key", DENSE),
    ("lang_layers_{i}/value", "rpn.head.dyhead_tower.{3i+1}.attention.self.value", DENSE),
    ("lang_layers_{i}/attention_output",
     "rpn.head.dyhead_tower.{3i+1}.attention.output.dense", DENSE),
    ("lang_layers_{i}/attention_norm",
     "rpn.head.dyhead_tower.{3i+1}.attention.output.LayerNorm", NORM),
    ("lang_layers_{i}/intermediate", "rpn.head.dyhead_tower.{3i+1}.intermediate.dense", DENSE),
    ("lang_layers_{i}/output", "rpn.head.dyhead_tower.{3i+1}.output.dense", DENSE),
    ("lang_layers_{i}/output_norm", "rpn.head.dyhead_tower.{3i+1}.output.LayerNorm", NORM),
    # --- fusion layer i, DyConv: DyConv[0] reads level l+1, [1] level l, [2] level l-1
    ("dyconv_{i}/conv_coarser/conv", "rpn.head.dyhead_tower.{3i+2}.DyConv.0.conv", CONV),
    ("dyconv_{i}/conv_coarser/norm", "rpn.head.dyhead_tower.{3i+2}.DyConv.0.bn", NORM),
    ("dyconv_{i}/conv_same/conv", "rpn.head.dyhead_tower.{3i+2}.DyConv.1.conv", CONV),
    ("dyconv_{i}/conv_same/norm", "rpn.head.dyhead_tower.{3i+2}.DyConv.1.bn", NORM),
    ("dyconv_{i}/conv_finer/conv", "rpn.head.dyhead_tower.{3i+2}.DyConv.2.conv", CONV),
    ("dyconv_{i}/conv_finer/norm", "rpn.head.dyhead_tower.{3i+2}.DyConv.2.bn", NORM),
    ("dyconv_{i}/offset", "rpn.head.dyhead_tower.{3i+2}.offset", CONV),
    ("dyconv_{i}/scale_attn", "rpn.head.dyhead_tower.{3i+2}.AttnConv.1", CONV),
    ("dyconv_{i}/dyrelu/fc1", "rpn.head.dyhead_tower.{3i+2}.relu.fc.0", DENSE),
    ("dyconv_{i}/dyrelu/fc2", "rpn.head.dyhead_tower.{3i+2}.relu.fc.2", DENSE),
    # --- ATSS head with the dot-product token classifier (rpn.head)
    ("bbox_pred", "rpn.head.bbox_pred", CONV),
    ("centerness", "rpn.head.centerness", CONV),
    ("scales_{i}/scale", "rpn.head.scales.{i}.scale", PARAM),
    ("dot_product_projection_text", "rpn.head.dot_product_projection_text", DENSE),
    ("log_scale", "rpn.head.log_scale", PARAM),
    ("bias_lang", "rpn.head.bias_lang", PARAM),
    ("bias0", "rpn.head.bias0", PARAM),
)

# Checkpoint keys that are deliberately not imported, with the reason.
IGNORED: tuple[tuple[str, str], ...] = (
    (r"(^|\.)num_batches_tracked$",            "BatchNorm step counters"),
    (r"\.relative_position_index$",            "Swin's index buffer (recomputed)"),
    (r"\.attn_mask$",                          "shifted-window masks (recomputed)"),
    (rf"^{re.escape(_BERT)}\.embeddings\.(position_ids|token_type_ids)$",
                                               "HF BERT index buffers"),
    (rf"^{re.escape(_BERT)}\.pooler\.",        "BERT pooler: GLIP never reads it"),
    (r"^rpn\.head\.cls_logits\.",              "fixed-class classifier, frozen and unused by the "
                                               "dot-product token head"),
    (r"^rpn\.anchor_generator\.",              "anchor buffers (ovd_jax.methods.glip.anchors)"),
    (r"^rpn\.head\.mlm_head\.",                "masked-language-model head (MLM_LOSS), training"),
    (r"^roi_heads\.",                          "mask head of the segmentation variants, not built"),
)
# fmt: on

# GLIP's pixel normalisation (all released Swin configs): BGR order, 0-255 units.
GLIP_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
GLIP_PIXEL_STD_BGR = (57.375, 57.120, 58.395)
_BGR = (2, 1, 0)  # GLIP input channel j holds RGB channel _BGR[j]
_PATCH = f"{_SWIN}.patch_embed.proj"
_NORM0 = "backbone/stages_0/out_norm/"
_IGNORED_RES = [re.compile(p) for p, _ in IGNORED]
_FIELD = re.compile(r"\{(\d*)([a-z])([+-]\d+)?\}")


# ----------------------------------------------------------------------------- the table


def _our_regex(template: str) -> re.Pattern:
    """'fuse_{i}/b_attn' -> ^fuse_(?P<i>\\d+)/b_attn$ ."""
    parts, pos = [], 0
    for m in re.finditer(r"\{([a-z])\}", template):
        parts += [re.escape(template[pos:m.start()]), rf"(?P<{m.group(1)}>\d+)"]
        pos = m.end()
    return re.compile("^" + "".join(parts) + re.escape(template[pos:]) + "$")


_RULES = [(_our_regex(ours), glip, layout) for ours, glip, layout in MAPPING]


def _glip_name(template: str, fields: Mapping[str, str]) -> str:
    """Fills '{i}', '{3i}', '{3i+1}', '{i+2}' from the matched indices."""
    def fill(m):
        scale, var, offset = int(m.group(1) or 1), m.group(2), int(m.group(3) or 0)
        return str(scale * int(fields[var]) + offset)

    return _FIELD.sub(fill, template)


def glip_key(path: str) -> tuple[str, str]:
    """Our flat parameter path (without 'params/', e.g. 'fuse_0/b_attn/attn/v_proj/kernel') ->
    (GLIP key without 'module.', layout). ValueError when no MAPPING row covers it."""
    module, _, leaf = path.rpartition("/")
    for regex, template, layout in _RULES:
        if layout == PARAM:
            m = regex.match(path)
            if m:
                return _glip_name(template, m.groupdict()), layout
        elif leaf in _LEAVES[layout]:
            m = regex.match(module)
            if m:
                return f"{_glip_name(template, m.groupdict())}.{_LEAVES[layout][leaf]}", layout
    raise ValueError(f"convert.glip: no MAPPING row for parameter {path!r}; the model has a part "
                     "GLIP checkpoints do not describe (add a row if GLIP has it).")


def _to_ours(layout: str, path: str, arr: np.ndarray) -> np.ndarray:
    if path.endswith("/kernel"):
        return linear_kernel(arr) if layout == DENSE else conv_kernel(arr)
    return np.asarray(arr)


def _to_glip(layout: str, path: str, arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if path.endswith("/kernel"):
        return np.ascontiguousarray(arr.T if layout == DENSE else arr.transpose(3, 2, 0, 1))
    return arr


def is_ignored(key: str) -> bool:
    """True for a checkpoint key (without 'module.') that IGNORED leaves out on purpose."""
    return any(r.search(key) for r in _IGNORED_RES)


# ----------------------------------------------------------------------------- pixel statistics


def _our_pixel_stats():
    from ovd_jax.data.transforms import CLIP_MEAN, CLIP_STD  # noqa: PLC0415

    return np.asarray(CLIP_MEAN, np.float64), np.asarray(CLIP_STD, np.float64)


def fold_pixel_normalization(weight, bias, *, inverse: bool = False):
    """Rewrites GLIP's patch-embedding conv for ovd_jax's input normalisation.

    weight [O, 3, k, k], bias [O] (torch layout). GLIP's input channel j is
    u_j = (p[_BGR[j]] - m_j) / d_j (p: RGB pixels, 0-255); ours is x_c = (p_c - a_c) / s_c. So
    p_c = s_c x_c + a_c and conv(u) = conv'(x) with
        W'[:, _BGR[j]] = W[:, j] * s_{_BGR[j]} / d_j,
        b' = b + sum_j sum_taps W[:, j] * (a_{_BGR[j]} - m_j) / d_j.
    `inverse=True` undoes it (ours -> GLIP). Returns float32 (weight, bias).
    """
    a, s = _our_pixel_stats()
    m = np.asarray(GLIP_PIXEL_MEAN_BGR, np.float64)
    d = np.asarray(GLIP_PIXEL_STD_BGR, np.float64)
    src = list(_BGR)
    w, b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"fold_pixel_normalization: expected a [O, 3, k, k] patch conv, got "
                         f"{w.shape}.")
    shift = (a[src] - m) / d  # [3], per GLIP channel j
    if not inverse:
        out = np.empty_like(w)
        out[:, src] = w * (s[src] / d)[None, :, None, None]
        b = b + np.einsum("ojhw,j->o", w, shift)
        return out.astype(np.float32), b.astype(np.float32)
    orig = w[:, src] * (d / s[src])[None, :, None, None]
    b = b - np.einsum("ojhw,j->o", orig, shift)
    return orig.astype(np.float32), b.astype(np.float32)


# ----------------------------------------------------------------------------- model


def _check_config(config) -> None:
    m = config.model
    if not str(m.backbone).startswith("swin"):
        raise ValueError(f"convert.glip: config.model.backbone={m.backbone!r}, but GLIP "
                         "checkpoints hold a Swin backbone; use a swin_* backbone "
                         "(configs/glip.py:glip_t / glip_l).")
    if tuple(m.backbone_levels) != ("res3", "res4", "res5"):
        raise ValueError(f"convert.glip: config.model.backbone_levels={tuple(m.backbone_levels)}"
                         "; GLIP's FPN reads ('res3', 'res4', 'res5').")
    if not m.early_fusion:
        raise ValueError("convert.glip: config.model.early_fusion=False; the released GLIP "
                         "checkpoints interleave VLFuse / BERT layer / DyConv (early fusion on).")


def build_glip(config):
    """The detector `config` describes, with BERT's vocabulary from `config.model.bert`."""
    from ovd_jax.methods import glip as glip_method  # noqa: PLC0415

    return glip_method.build_model(
        config, text_vocab_size=int(config.model.bert.vocab_size), eot_token_id=None)


_SHAPES: dict[str, dict] = {}  # model description (JSON) -> _expected's result


def _expected(config) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{'backbone/patch_proj/kernel': (shape, dtype), ...} of the model's 'params'."""
    key = json.dumps([config.model.to_dict(), str(config.get("dtype"))], sort_keys=True,
                     default=str)
    if key not in _SHAPES:
        if len(_SHAPES) >= 8:
            _SHAPES.pop(next(iter(_SHAPES)))
        _SHAPES[key] = _trace_shapes(config)
    return dict(_SHAPES[key])


def _trace_shapes(config) -> dict[str, tuple[tuple[int, ...], Any]]:
    from ovd_jax.methods import glip as glip_method  # noqa: PLC0415

    # Parameter shapes do not depend on the input size: trace a small input.
    small = config.copy_and_resolve_references()
    small.data.image_size = 128
    small.text.context_length = min(int(small.text.context_length), 8)
    shapes = model_shapes(build_glip(small), *glip_method.init_args(small))
    others = sorted({k.split("/")[0] for k in shapes} - {"params"})
    if others:
        raise ValueError(f"convert.glip: the model has variable collections {others} that GLIP "
                         "checkpoints do not hold.")
    return {k[len("params/"):]: v for k, v in shapes.items()}


def _strip_module(sd: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    anchor = f"{_PATCH}.weight"
    found = sorted(k[: -len(anchor)] for k in sd if k.endswith(anchor))
    if len(found) != 1 or found[0] not in ("", "module."):
        raise ValueError(f"convert.glip: {source} has no single '{anchor}' (found prefixes "
                         f"{found or 'none'}); it is not a GLIP Swin checkpoint.")
    p = found[0]
    return {k[len(p):] if k.startswith(p) else k: v for k, v in sd.items()}


def _numpy(v) -> np.ndarray:
    """numpy / torch (any float dtype, bfloat16 included) -> numpy, floats as float32."""
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        v = v.float() if v.is_floating_point() else v
        return v.numpy()
    v = np.asarray(v)
    return v.astype(np.float32) if v.dtype.kind == "f" else v


def glip_variables_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config,
    *,
    strict: bool = True,
    fold_pixel_norm: bool = True,
    source: str = "state dict",
) -> dict[str, Any]:
    """Converts a GLIP state dict (GLIP key names, `module.` prefix optional, torch layouts, numpy
    or torch arrays) into `{"params": ...}` for the detector `config.model` describes.

    Returns nested numpy arrays in the model's parameter dtypes. Raises CheckpointMismatchError
    naming every missing key, unexpected key and shape mismatch (`strict=False`: missing and
    unexpected keys are logged, missing parameters left out; shape mismatches still raise).
    """
    _check_config(config)
    sd = {k: _numpy(v) for k, v in _strip_module(state_dict, source).items()}
    if fold_pixel_norm and f"{_PATCH}.bias" in sd:  # a missing bias is reported below
        sd[f"{_PATCH}.weight"], sd[f"{_PATCH}.bias"] = fold_pixel_normalization(
            sd[f"{_PATCH}.weight"], sd[f"{_PATCH}.bias"])
    out, used, missing, bad = {}, set(), [], []
    for path, (shape, dtype) in _expected(config).items():
        key, layout = glip_key(path)
        if key not in sd:
            if path.startswith(_NORM0) and f"{_SWIN}.norm0.weight" not in sd:
                out[path] = (np.ones if path.endswith("scale") else np.zeros)(shape, dtype)
            else:
                missing.append(key)
            continue
        used.add(key)
        arr = _to_ours(layout, path, sd[key])
        if tuple(arr.shape) != tuple(shape):
            bad.append(f"{key} -> {path}: checkpoint gives {tuple(arr.shape)}, model has "
                       f"{tuple(shape)}")
            continue
        out[path] = np.asarray(arr, dtype)
    unexpected = sorted(k for k in sd if k not in used and not is_ignored(k))
    problems = []
    for name, items in (("missing", missing), ("unexpected", unexpected),
                        ("shape-mismatched", bad)):
        if items:
            problems.append(f"{len(items)} {name}: " + ", ".join(items[:10])
                            + (f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""))
    if bad or (problems and strict):
        raise CheckpointMismatchError(
            f"convert.glip: {source} does not fit the GLIP model of this config:\n  "
            + "\n  ".join(problems)
            + "\n  Pick the config the weights were trained with (glip_t: Swin-T, 6 fusion "
            "layers; glip_l: Swin-L, 8) and its overrides (model.bert, model.channels, ...).")
    if problems:
        logging.warning("convert.glip: %s: %s", source, "; ".join(problems))
    return {"params": unflatten(out)}


def glip_state_dict_from_variables(variables: Mapping, config, *,
                                   fold_pixel_norm: bool = True) -> dict[str, np.ndarray]:
    """The inverse: our `{"params": ...}` -> a GLIP state dict (GLIP key names without
    `module.`, torch layouts, numpy). The stage-0 output norm, which GLIP does not have, is
    dropped; ignored keys (buffers, cls_logits, ...) are not produced."""
    _check_config(config)
    params = nn.meta.unbox(variables.get("params", variables))
    sd = {}
    for path, arr in flatten(params).items():
        if path.startswith(_NORM0):
            continue
        key, layout = glip_key(path)
        sd[key] = _to_glip(layout, path, np.asarray(arr))
    if fold_pixel_norm:
        sd[f"{_PATCH}.weight"], sd[f"{_PATCH}.bias"] = fold_pixel_normalization(
            sd[f"{_PATCH}.weight"], sd[f"{_PATCH}.bias"], inverse=True)
    return sd


# ----------------------------------------------------------------------------- files


def recipe_config(variant: str):
    """`configs/glip.py`'s `get_config(variant)` (e.g. 'glip_t', 'glip_l,lvis'); the repository
    root must be importable (it is when run from there)."""
    try:
        from configs import glip as recipe  # noqa: PLC0415
    except ImportError as e:
        raise ValueError("convert.glip: cannot import configs/glip.py; run from the repository "
                         "root or pass config= explicitly.") from e
    return recipe.get_config(variant)


def _variant_for(sd: Mapping[str, np.ndarray]) -> str:
    w = next(v for k, v in sd.items() if k.endswith(f"{_PATCH}.weight"))
    return {96: "glip_t", 192: "glip_l"}.get(int(w.shape[0]), "glip_t")


def load_glip(path: str | os.PathLike, config=None, *, strict: bool = True,
              fold_pixel_norm: bool = True):
    """Reads a GLIP checkpoint (`.pth` as released, `{"model": ...}` and `module.` handled) and
    returns `(model, variables)` for `config` (default: configs/glip.py glip_t or glip_l by the
    Swin width). `model.apply(variables, images, token_ids, token_mask)` runs the detector."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"load_glip: {path!r} does not exist; pass a GLIP .pth checkpoint.")
    sd = read_state_dict(path)
    if config is None:
        config = recipe_config(_variant_for(_strip_module(sd, path)))
    variables = glip_variables_from_state_dict(sd, config, strict=strict,
                                               fold_pixel_norm=fold_pixel_norm, source=path)
    return build_glip(config), variables


def convert_glip(path: str | os.PathLike, output: str | os.PathLike, variant: str | None = None,
                 *, config=None, strict: bool = True) -> str:
    """GLIP checkpoint -> our checkpoint folder holding the whole detector.

    The model is `config`, else configs/glip.py's `variant` (default: glip_t or glip_l by the Swin
    width). `config.json` records the variant, `config.model` and `towers`: the top-level
    parameter subtrees whose every parameter was imported (all of them unless `strict=False` left
    some out); `--config.model.init_checkpoint` copies exactly those. Returns the folder.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"convert_glip: {path!r} does not exist; pass a GLIP .pth checkpoint.")
    sd = read_state_dict(path)
    if config is None:
        variant = variant or _variant_for(_strip_module(sd, path))
        config = recipe_config(variant)
    variables = glip_variables_from_state_dict(sd, config, strict=strict, source=path)
    expected = _expected(config)
    got = flatten(variables["params"])
    towers = sorted({k.split("/")[0] for k in expected}
                    - {k.split("/")[0] for k in expected if k not in got})
    meta = {"type": "glip", "variant": variant or "custom", "towers": towers,
            "pixel_normalization": "clip", "model": config.model.to_dict()}
    return save_checkpoint(output, meta, variables)

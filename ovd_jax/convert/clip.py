"""Import CLIP checkpoints (OpenAI releases, Hugging Face CLIPModel, open_clip, RegionCLIP) into
our Flax CLIP.

Every format is first renamed to OpenAI's key names (`visual.*`, `transformer.*`,
`token_embedding.weight`, ...), the model config is inferred from the tensor shapes as OpenAI's
`build_model` does, and one rule table maps OpenAI keys onto our parameter tree.

Formats:
  openai_clip  OpenAI `.pt` releases (TorchScript archives included) and any state dict with
               OpenAI key names; QuickGELU.
  open_clip    open_clip `CLIP` state dicts (same key names); GELU unless the model name (the
               `model` argument) contains 'quickgelu' or act='quick_gelu' is given.
  hf_clip      a Hugging Face `CLIPModel` folder (config.json + model.safetensors or
               pytorch_model.bin), or its weights file with config.json beside it.
  regionclip   a RegionCLIP detectron2 `.pth`: `backbone.*` is the ModifiedResNet image tower,
               `lang_encoder.*` the text tower (other detector keys are ignored). It holds no
               logit_scale; RegionCLIP's temperature 0.01 is used (logit_scale = log 100).

Text heads and ViT heads are not visible in the weights; like OpenAI, width/64 is assumed
(override with `text_heads=` / `vision_heads=`). Hugging Face configs give them explicitly.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from ovd_jax.convert.common import (
    VARIABLES_FILE,
    check_and_build,
    conv_kernel,
    convert_keys,
    linear_kernel,
    load_checkpoint,
    model_shapes,
    read_state_dict,
    save_checkpoint,
)
from ovd_jax.models.clip import CLIP, build_clip, clip_config

FORMATS = ("openai_clip", "open_clip", "hf_clip", "regionclip")
REGIONCLIP_LOGIT_SCALE = float(np.log(100.0))


# ----------------------------------------------------------------------------- renaming

_HF_RENAMES = (
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("embeddings.patch_embedding.weight", "conv1.weight"),
    ("embeddings.class_embedding", "class_embedding"),
    ("pre_layrnorm.", "ln_pre."),  # sic: HF's attribute name
    ("post_layernorm.", "ln_post."),
    ("final_layer_norm.", "ln_final."),
    ("encoder.layers.", "transformer.resblocks."),
    (".self_attn.", ".attn."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
)


def hf_to_openai(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename a Hugging Face CLIPModel state dict to OpenAI key names (projections transposed to
    OpenAI's [width, dim] parameters)."""
    out = {}
    for key, v in sd.items():
        if key == "text_projection.weight":
            out["text_projection"] = v.T
            continue
        if key == "visual_projection.weight":
            out["visual.proj"] = v.T
            continue
        for hf_prefix, prefix in (("text_model.", ""), ("vision_model.", "visual.")):
            if key.startswith(hf_prefix):
                rest = key[len(hf_prefix):]
                for a, b in _HF_RENAMES:
                    rest = rest.replace(a, b)
                out[prefix + rest] = v
                break
        else:
            out[key] = v  # logit_scale, or a key reported as unexpected later
    return out


def regionclip_to_openai(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep RegionCLIP's `backbone.*` (-> `visual.*`) and `lang_encoder.*` (-> OpenAI text keys);
    drop the detector's other parts (RPN, RoI heads, teacher backbone)."""
    out = {}
    for key, v in sd.items():
        if key.startswith("backbone."):
            out["visual." + key[len("backbone."):]] = v
        elif key.startswith("lang_encoder."):
            out[key[len("lang_encoder."):]] = v
    if not any(k.startswith("visual.") for k in out):
        raise ValueError("No 'backbone.*' keys found: this is not a RegionCLIP CLIP-backbone "
                         "checkpoint (use --format openai_clip/open_clip/hf_clip instead).")
    out.setdefault("logit_scale", np.asarray(REGIONCLIP_LOGIT_SCALE, np.float32))
    return out


def detect_format(sd: dict[str, np.ndarray]) -> str:
    """Guess the format from key names ('openai_clip' for OpenAI/open_clip key names)."""
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        return "hf_clip"
    if any(k.startswith("backbone.") for k in sd) and not any(k.startswith("visual.") for k in sd):
        return "regionclip"
    if any(k.startswith("visual.") for k in sd) or "token_embedding.weight" in sd:
        return "openai_clip"
    raise ValueError("Unrecognised checkpoint: no CLIP keys (visual.*, text_model.*, backbone.*)"
                     "; pass format= explicitly.")


# ----------------------------------------------------------------------------- config


def _count(sd, pattern: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict[str, np.ndarray], act: str = "quick_gelu",
                 vision_heads: int | None = None, text_heads: int | None = None,
                 eot_token_id: int | None = None) -> dict[str, Any]:
    """Model config from an OpenAI-named state dict's shapes (as OpenAI's build_model)."""
    need = ["visual.conv1.weight", "token_embedding.weight", "positional_embedding",
            "ln_final.weight", "text_projection"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"Checkpoint lacks {missing}: not a full CLIP (image + text) model.")
    if "visual.proj" in sd:
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(type="vit", input_resolution=patch * grid, patch_size=patch, width=width,
                      layers=_count(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
                      heads=vision_heads or max(1, width // 64),
                      output_dim=sd["visual.proj"].shape[1], act=act)
    else:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        layers = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")})
                  for b in (1, 2, 3, 4)]
        pos = sd.get("visual.attnpool.positional_embedding")
        if pos is None:
            raise ValueError("Checkpoint has no visual.attnpool.*: the ResNet tower has no "
                             "attention pool (a RegionCLIP checkpoint trained without it?).")
        grid = round((pos.shape[0] - 1) ** 0.5)
        vision = dict(type="resnet", layers=layers,
                      output_dim=sd["visual.attnpool.c_proj.weight"].shape[0],
                      heads=vision_heads or width * 32 // 64, input_resolution=grid * 32,
                      width=width)
    t_width = sd["ln_final.weight"].shape[0]
    text = dict(vocab_size=sd["token_embedding.weight"].shape[0],
                context_length=sd["positional_embedding"].shape[0], width=t_width,
                heads=text_heads or max(1, t_width // 64),
                layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),
                output_dim=sd["text_projection"].shape[1], eot_token_id=eot_token_id, act=act)
    return {"vision": vision, "text": text}


# ----------------------------------------------------------------------------- key rules


def _ln(base: str, which: str, v) -> list:
    return [(f"{base}/{'scale' if which == 'weight' else 'bias'}", v)]


def _block_rule(rest: str, v: np.ndarray, base: str):
    """One ResidualAttentionBlock's key (after `resblocks.<i>.`) -> our paths under `base`."""
    if m := re.fullmatch(r"(ln_1|ln_2)\.(weight|bias)", rest):
        return _ln(f"{base}/{m.group(1)}", m.group(2), v)
    if rest == "attn.in_proj_weight":  # fused [3E, E] q/k/v of torch MultiheadAttention
        return [(f"{base}/attn/{n}_proj/kernel", linear_kernel(w))
                for n, w in zip("qkv", np.split(v, 3, axis=0))]
    if rest == "attn.in_proj_bias":
        return [(f"{base}/attn/{n}_proj/bias", b) for n, b in zip("qkv", np.split(v, 3))]
    if m := re.fullmatch(r"attn\.(q|k|v|out)_proj\.(weight|bias)", rest):
        leaf = "kernel" if m.group(2) == "weight" else "bias"
        return [(f"{base}/attn/{m.group(1)}_proj/{leaf}",
                 linear_kernel(v) if leaf == "kernel" else v)]
    if m := re.fullmatch(r"mlp\.(c_fc|c_proj)\.(weight|bias)", rest):
        leaf = "kernel" if m.group(2) == "weight" else "bias"
        return [(f"{base}/{m.group(1)}/{leaf}", linear_kernel(v) if leaf == "kernel" else v)]
    return None


def _bn(base: str, leaf: str, v):
    tgt = {"weight": ("params", "scale"), "bias": ("params", "bias"),
           "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
    if leaf not in tgt:
        return None
    col, name = tgt[leaf]
    return [(f"{col}/{base}/{name}", v)]


def _resnet_rule(rest: str, v):
    """`visual.<rest>` of a ModifiedResNet -> our paths (collection included)."""
    if m := re.fullmatch(r"conv([123])\.weight", rest):
        return [(f"params/vision/conv{m.group(1)}/kernel", conv_kernel(v))]
    if m := re.fullmatch(r"bn([123])\.(\w+)", rest):
        return _bn(f"vision/bn{m.group(1)}", m.group(2), v)
    if m := re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", rest):
        base = f"vision/layer{m.group(1)}_{m.group(2)}"
        sub = m.group(3)
        if mm := re.fullmatch(r"conv([123])\.weight", sub):
            return [(f"params/{base}/conv{mm.group(1)}/kernel", conv_kernel(v))]
        if mm := re.fullmatch(r"bn([123])\.(\w+)", sub):
            return _bn(f"{base}/bn{mm.group(1)}", mm.group(2), v)
        if sub == "downsample.0.weight":
            return [(f"params/{base}/downsample_conv/kernel", conv_kernel(v))]
        if mm := re.fullmatch(r"downsample\.1\.(\w+)", sub):
            return _bn(f"{base}/downsample_bn", mm.group(1), v)
        return None
    if rest == "attnpool.positional_embedding":
        return [("params/vision/attn_pool/positional_embedding", v)]
    if m := re.fullmatch(r"attnpool\.(q|k|v|c)_proj\.(weight|bias)", rest):
        name = "out" if m.group(1) == "c" else m.group(1)
        leaf = "kernel" if m.group(2) == "weight" else "bias"
        return [(f"params/vision/attn_pool/attn/{name}_proj/{leaf}",
                 linear_kernel(v) if leaf == "kernel" else v)]
    return None


def _vit_rule(rest: str, v):
    """`visual.<rest>` of a CLIP ViT -> our paths."""
    if rest == "conv1.weight":
        return [("params/vision/conv1/kernel", conv_kernel(v))]
    if rest in ("class_embedding", "positional_embedding", "proj"):
        return [(f"params/vision/{rest}", v)]
    if m := re.fullmatch(r"(ln_pre|ln_post)\.(weight|bias)", rest):
        return _ln(f"params/vision/{m.group(1)}", m.group(2), v)
    if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", rest):
        return _block_rule(m.group(2), v, f"params/vision/transformer/resblocks_{m.group(1)}")
    return None


def openai_rule(key: str, v: np.ndarray, vit: bool):
    """An OpenAI-named key -> [(our flat path, array)], or None when it maps to nothing."""
    if key.startswith("visual."):
        return (_vit_rule if vit else _resnet_rule)(key[len("visual."):], v)
    if key == "token_embedding.weight":
        return [("params/text/token_embedding/embedding", v)]
    if key in ("positional_embedding", "text_projection"):
        return [(f"params/text/{key}", v)]
    if m := re.fullmatch(r"ln_final\.(weight|bias)", key):
        return _ln("params/text/ln_final", m.group(1), v)
    if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key):
        return _block_rule(m.group(2), v, f"params/text/transformer/resblocks_{m.group(1)}")
    if key == "logit_scale":
        return [("params/logit_scale", np.asarray(v).reshape(()))]
    if key in ("input_resolution", "context_length", "vocab_size"):
        return []  # scalars stored in OpenAI's TorchScript archives; build_model drops them too
    return None


# ----------------------------------------------------------------------------- public API


def _dummy_inputs(config: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    res = config["vision"]["input_resolution"]
    return (jnp.zeros((1, res, res, 3), jnp.float32),
            jnp.zeros((1, config["text"]["context_length"]), jnp.int32))


def _hf_config(path: str) -> dict:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"hf_clip checkpoint {path}: config.json not found in {folder}.")
    with open(cfg_path) as f:
        return json.load(f)


def openai_state_dict(path: str, format: str | None = None, model: str | None = None,
                      act: str | None = None, vision_heads: int | None = None,
                      text_heads: int | None = None):
    """Read any supported checkpoint and return (OpenAI-named state dict, model config)."""
    sd = read_state_dict(path)
    fmt = format or detect_format(sd)
    if fmt not in FORMATS:
        raise ValueError(f"Unknown CLIP format {fmt!r}; choose one of {FORMATS}.")
    eot = None
    if fmt == "hf_clip":
        hf = _hf_config(path)
        tc, vc = hf.get("text_config", {}), hf.get("vision_config", {})
        act = act or tc.get("hidden_act", "quick_gelu")
        text_heads = text_heads or tc.get("num_attention_heads")
        vision_heads = vision_heads or vc.get("num_attention_heads")
        for name, c in (("text_config", tc), ("vision_config", vc)):
            if abs(c.get("layer_norm_eps", 1e-5) - 1e-5) > 1e-12:
                raise ValueError(f"{path}: {name}.layer_norm_eps={c['layer_norm_eps']} but our "
                                 "CLIP towers use 1e-5.")
        # HF pools at argmax(ids) for legacy configs with eos_token_id == 2, else at the first
        # occurrence of eos_token_id.
        eos = tc.get("eos_token_id", 2)
        eot = None if eos == 2 else int(eos)
        sd = hf_to_openai(sd)
    elif fmt == "regionclip":
        sd = regionclip_to_openai(sd)
    if act is None:
        quick = fmt != "open_clip" or (model is not None and "quickgelu" in model.lower())
        act = "quick_gelu" if quick else "gelu"
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {act!r}.")
    config = infer_config(sd, act, vision_heads, text_heads, eot)
    return sd, config


def load_clip(path: str, format: str | None = None, *, model: str | None = None,
              act: str | None = None, vision_heads: int | None = None,
              text_heads: int | None = None, **model_kw) -> tuple[CLIP, dict]:
    """Load a CLIP checkpoint of any supported format (or one of ours) as (model, variables).

    `model.apply(variables, images, method="encode_image")` (NHWC float32, normalised) and
    `model.apply(variables, token_ids, method="encode_text")` give the reference's projected
    embeddings. `format` is guessed from the key names when None (OpenAI key names are read as
    'openai_clip', i.e. QuickGELU: pass format='open_clip' for GELU open_clip models).
    `model_kw` (dtype, param_dtype, remat) go to both towers. Raises CheckpointMismatchError
    listing missing / unexpected / shape-mismatched keys when the weights do not fit.
    """
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, VARIABLES_FILE)):
        return load_clip_checkpoint(path, **model_kw)
    sd, config = openai_state_dict(path, format, model, act, vision_heads, text_heads)
    clip = build_clip(config, **model_kw)
    vit = config["vision"]["type"] == "vit"
    converted, unused = convert_keys(sd, lambda k, v: openai_rule(k, v, vit))
    expected = model_shapes(clip, *_dummy_inputs(config))
    variables = check_and_build(converted, expected, path, unused)
    return clip, variables


def load_clip_checkpoint(directory: str, **model_kw) -> tuple[CLIP, dict]:
    """Load a CLIP saved by `convert_clip` / `save_checkpoint` (our format)."""
    config, variables = load_checkpoint(directory)
    clip = build_clip(config, **model_kw)
    from ovd_jax.convert.common import flatten  # noqa: PLC0415

    expected = model_shapes(clip, *_dummy_inputs(config))
    variables = check_and_build(flatten(variables), expected, directory)
    return clip, variables


def convert_clip(path: str, output: str, format: str | None = None,
                 model: str | None = None) -> str:
    """Import `path` and write it to `output` in our format; returns the output folder."""
    clip, variables = load_clip(path, format, model=model)
    return save_checkpoint(output, clip_config(clip), variables)

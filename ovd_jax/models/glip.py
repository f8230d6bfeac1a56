"""GLIP's detector: backbone -> FPN, BERT -> deep vision-language fusion in DyHead -> ATSS head.

Layout (GLIP's `GeneralizedVLRCNN` with a `VLDyHead`, dot-product token head):

    images ──backbone──▶ res3..res5 ──FPN──▶ P3..P7 (channels C) ─┐
    token ids ──BERT──▶ token features [N, L, D] ──────────────────┤
                                                                    ▼
      num_fusion_layers x [ VLFuse (image <-> text X-MHA) -> BertLayer on text -> DyConv on image ]
                                                                    ▼
      per level: box deltas = Scale_l(bbox_pred(x)), centerness(x);
      alignment logits = x · W(norm(t) / 2) / exp(log_scale) + (norm(t) · bias_lang + bias0)

The image features enter the dot product as they are (upstream's image projection is an
identity, no normalisation); only the text features are L2-normalised. Logits are clamped to
±50000 as upstream. Every level is flattened row-major and concatenated finest first, one
anchor per location, so anchor index a matches `ovd_jax.methods.glip.anchors`.

Parameter names follow upstream modules so that an importer is a flat key mapping:
`backbone` (= backbone.body), `fpn` (= backbone.fpn), `language_backbone` (= language_backbone.
body.model), `fuse_i` / `lang_layers_i` / `dyconv_i` (= rpn.head.dyhead_tower.{3i, 3i+1, 3i+2}),
`bbox_pred`, `centerness`, `scales_l`, `dot_product_projection_text`, `log_scale`, `bias_lang`,
`bias0` (= rpn.head.*). Upstream's unused `cls_logits` (frozen when the dot-product head is on)
is not built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ovd_jax.models import layers
from ovd_jax.models.layers import l2_normalize

Dtype = Any

# Upstream clamps the dot-product logits to this range (CLAMP_DOT_PRODUCT).
LOGIT_CLAMP = 50000.0
# Focal-loss prior: sigmoid(bias0) = 0.01 at initialisation, so the many background anchors do
# not swamp the first steps.
PRIOR_PROB = 0.01


def prior_bias(prior_prob: float = PRIOR_PROB) -> float:
    """-log((1 - p) / p): the logit whose sigmoid is `prior_prob`."""
    return -math.log((1.0 - prior_prob) / prior_prob)


def dot_product_logits(visual, proj_text, text_normed, log_scale, bias_lang, bias0):
    """GLIP's dot-product token logits from their pieces.

    visual [N, A, C] image features (not normalised); proj_text [N, L, C] = Linear(norm(t) / 2);
    text_normed [N, L, D] = norm(t); log_scale [1]; bias_lang [D]; bias0 [1].
    Returns float32 [N, A, L] = `v · proj / exp(log_scale) + (norm(t) · bias_lang + bias0)`,
    clamped to ±50000. Padding tokens get logits like any other; losses and scores mask them.
    """
    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)  # noqa: E731
    dot = jnp.einsum("nac,nlc->nal", f32(visual), f32(proj_text))
    bias = f32(text_normed) @ f32(bias_lang) + f32(bias0)  # [N, L]
    logits = dot / jnp.exp(f32(log_scale)) + bias[:, None, :]
    return jnp.clip(logits, -LOGIT_CLAMP, LOGIT_CLAMP)


class Scale(nn.Module):
    """A learnable scalar multiplier (init 1), one per FPN level on the box regression."""

    init_value: float = 1.0
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.init_value), (None,)),
            (1,), self.param_dtype,
        )
        return x * s.astype(x.dtype)


def _flatten_levels(levels: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """[N, H_l, W_l, C] per level -> [N, sum_l H_l W_l, C] (row-major, finest level first)."""
    return jnp.concatenate([x.reshape(x.shape[0], -1, x.shape[-1]) for x in levels], axis=1)


def resnet_levels(resnet, images) -> dict[str, jnp.ndarray]:
    """res3, res4, res5 (strides 8, 16, 32) of a CLIP ModifiedResNet; it only exposes res4/res5,
    so the stem and its stages are run here to tap res3 on the way."""
    x = resnet.stem(images.astype(resnet.dtype))
    for blk in (*resnet.layer1, *resnet.layer2):
        x = blk(x)
    res3 = x
    for blk in resnet.layer3:
        x = blk(x)
    res4 = x
    return {"res3": res3, "res4": res4, "res5": resnet.res5(res4)}


class GLIPDetector(nn.Module):
    """GLIP detector (see the module docstring).

    Fields:
      backbone: a SwinTransformer (`features(images, deterministic)`) or a CLIP ModifiedResNet.
      backbone_levels: which backbone outputs feed the FPN, finest first (e.g. res3..res5).
      fpn: maps that list of maps to the FPN levels (finest first, `channels` wide each).
      language_backbone: a BertEncoder.
      fuse / lang_layers / dyconv: one module per fusion layer (equal lengths, or `fuse` and
        `lang_layers` empty for a DyHead without early fusion). `fuse(levels, text, mask) ->
        (levels, text)`, `lang_layers` are BertLayers, `dyconv(levels) -> levels`.
      num_levels: FPN levels produced (one Scale each); channels: their width C.
      text_dim: BERT hidden size D.
    """

    backbone: nn.Module
    fpn: nn.Module
    language_backbone: nn.Module
    fuse: Sequence[nn.Module]
    lang_layers: Sequence[nn.Module]
    dyconv: Sequence[nn.Module]
    backbone_levels: Sequence[str] = ("res3", "res4", "res5")
    num_levels: int = 5
    channels: int = 256
    text_dim: int = 768
    log_scale_init: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if len(self.fuse) != len(self.lang_layers) or (
            self.fuse and len(self.fuse) != len(self.dyconv)
        ):
            raise ValueError(
                f"GLIPDetector: {len(self.fuse)} fusion blocks, {len(self.lang_layers)} BERT "
                f"layers and {len(self.dyconv)} DyConvs; give one of each per fusion layer "
                "(or no fusion/BERT layers for a plain DyHead)."
            )
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        small = nn.initializers.normal(stddev=0.01)
        self.bbox_pred = layers.conv(4, (1, 1), kernel_init=small, **dt)
        self.centerness = layers.conv(1, (1, 1), kernel_init=small, **dt)
        self.scales = [Scale(param_dtype=self.param_dtype) for _ in range(self.num_levels)]
        self.dot_product_projection_text = layers.dense(
            self.channels, ("embed", "conv_out"), **dt
        )
        self.log_scale = self.param(
            "log_scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.log_scale_init), (None,)),
            (1,), self.param_dtype,
        )
        self.bias_lang = self.param(
            "bias_lang", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            (self.text_dim,), self.param_dtype,
        )
        self.bias0 = self.param(
            "bias0",
            nn.with_logical_partitioning(nn.initializers.constant(prior_bias()), (None,)),
            (1,), self.param_dtype,
        )

    # ------------------------------------------------------------------------------------------
    # Towers

    def encode_text(self, token_ids, token_mask, deterministic: bool = True):
        """token_ids [N, L] int, token_mask [N, L] bool -> BERT token features [N, L, D].

        The last layer's hidden states (upstream averages the last N_LAYERS=1 layers, which is
        the last layer itself). Padding rows are computed like any other and masked later.
        """
        out = self.language_backbone(token_ids, token_mask.astype(jnp.int32),
                                     deterministic=deterministic)
        return out["last_hidden_state"]

    def visual_features(self, images, deterministic: bool = True) -> list[jnp.ndarray]:
        """images [N, S, S, 3] normalised -> FPN levels, finest first, each [N, H_l, W_l, C]."""
        if hasattr(self.backbone, "features"):
            feats = self.backbone.features(images, deterministic=deterministic)
        else:
            feats = resnet_levels(self.backbone, images)
        missing = [k for k in self.backbone_levels if k not in feats]
        if missing:
            raise ValueError(f"GLIPDetector: backbone has no outputs {missing}; it gives "
                             f"{sorted(feats)} (fix config.model.backbone_levels).")
        inputs = [feats[k] for k in self.backbone_levels]
        levels = list(self.fpn(inputs, deterministic=deterministic))
        if len(levels) != self.num_levels:
            raise ValueError(f"GLIPDetector: the FPN gave {len(levels)} levels but num_levels="
                             f"{self.num_levels}; make config.model.fpn match.")
        return levels

    def head(self, levels, text, token_mask, deterministic: bool = True,
             return_features: bool = False) -> dict:
        """Fusion + DyHead + ATSS head.

        levels: FPN maps (finest first) [N, H_l, W_l, C]; text [N, L, D] BERT features;
        token_mask [N, L] bool. Returns float32 `logits` [N, A, L], `box_deltas` [N, A, 4]
        (already multiplied by the level's Scale), `centerness` [N, A] (logits),
        A = sum_l H_l W_l; with `return_features` also the fused `visual` [N, A, C] and `text`
        [N, L, D] that the logits are computed from.
        """
        levels = list(levels)
        mask_i = token_mask.astype(jnp.int32)
        for i, dyconv in enumerate(self.dyconv):
            if self.fuse:
                levels, text = self.fuse[i](levels, text, token_mask, deterministic=deterministic)
                levels = list(levels)
                text = self.lang_layers[i](text, mask_i, deterministic)
            levels = list(dyconv(levels))
        deltas = [self.scales[k](self.bbox_pred(x)) for k, x in enumerate(levels)]
        ctr = [self.centerness(x) for x in levels]
        visual = _flatten_levels(levels)
        # Upstream: normalise the (fused) token features, halve them, project to C channels.
        text_normed = l2_normalize(text.astype(jnp.float32))
        proj = self.dot_product_projection_text((text_normed / 2.0).astype(self.dtype))
        logits = dot_product_logits(visual, proj, text_normed, self.log_scale, self.bias_lang,
                                    self.bias0)
        logits = nn.with_logical_constraint(logits, ("batch", None, None))
        out = {
            "logits": logits,
            "box_deltas": _flatten_levels(deltas).astype(jnp.float32),
            "centerness": _flatten_levels(ctr)[..., 0].astype(jnp.float32),
        }
        if return_features:
            out.update(visual=visual, text=text)
        return out

    def __call__(self, images, token_ids, token_mask, deterministic: bool = True) -> dict:
        """images [N, S, S, 3], token_ids [N, L], token_mask [N, L] -> `head`'s outputs."""
        levels = self.visual_features(images, deterministic)
        text = self.encode_text(token_ids, token_mask, deterministic)
        return self.head(levels, text, token_mask, deterministic)

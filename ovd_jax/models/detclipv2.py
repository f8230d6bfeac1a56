"""DetCLIPv2's detector: backbone -> FPN -> ATSS head whose classifier is a set of concept
embeddings from a text encoder (one text sequence per concept, pooled). No deep fusion: image
and text meet only in the final dot product, so concepts are encoded once per vocabulary.

    images ──backbone──▶ res3..res5 ──FPN──▶ P3..P7 ─┬─ reg tower (num_convs x conv-GN-ReLU) ──▶
                                                      │      box deltas x Scale_l, centerness
                                                      │      │ offsets + mask (3x3 conv)
                                                      │      ▼
                                                      └─ modulated deformable conv-GN-ReLU ──▶
                                                         cls tower (num_convs x conv-GN-ReLU)
                                                         ──▶ region embedding f^P (3x3 conv, D)
    concept token ids [.., L] ──text encoder──▶ pooled ──▶ concept embedding f^T (D)

    alignment logits [N, A, K] = cos(f^P, f^T) * exp(logit_scale) + bias0

The deformable conv at the start of the classification branch is DetCLIPv2's addition to vanilla
ATSS: its offsets and mask come from the regression tower, so the alignment (and image-text
contrastive) gradients reach the regression features. The paper says only "a lightweight
deformable convolution at the beginning of the classification branch"; where its offsets come
from is our reading (docs/detclipv2.md). Every level is flattened row-major and concatenated
finest first, one anchor per location, in the layout of `ovd_jax.methods.glip.anchors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ovd_jax.models import layers
from ovd_jax.models.bert import mean_pool
from ovd_jax.models.glip import Scale, prior_bias, resnet_levels
from ovd_jax.models.layers import l2_normalize
from ovd_jax.ops.deform_conv import ModulatedDeformConv

Dtype = Any

# ATSS (mmdet / maskrcnn_benchmark) initialises the head's convs with N(0, 0.01).
_NORMAL_001 = nn.initializers.normal(stddev=0.01)
TEXT_POOLINGS = ("mean", "first")


def _group_norm(groups: int, dt: dict) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=groups, epsilon=1e-5, use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        **dt,
    )


def flatten_levels(levels: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """[N, H_l, W_l, C] per level -> [N, sum_l H_l W_l, C] (row-major, finest level first)."""
    return jnp.concatenate([x.reshape(x.shape[0], -1, x.shape[-1]) for x in levels], axis=1)


class ATSSConceptHead(nn.Module):
    """Vanilla ATSS head (towers shared across levels) with a concept-embedding classifier.

    Call `(levels)` with FPN maps [N, H_l, W_l, C] (finest first). Returns float32
    `region_emb` [N, A, embed_dim] (not normalised), `box_deltas` [N, A, 4] (times the level's
    Scale), `centerness` [N, A] logits.
    """

    channels: int = 256
    embed_dim: int = 768
    num_levels: int = 5
    num_convs: int = 4
    gn_groups: int = 32
    deform_cls: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.channels % self.gn_groups:
            raise ValueError(f"ATSSConceptHead: {self.channels} channels are not divisible by "
                             f"gn_groups={self.gn_groups}; change config.model.gn_groups.")
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pad = ((1, 1), (1, 1))

        # Submodule names come from the attributes (cls_convs_0, cls_norms_0, ...).
        def convs():
            return [layers.conv(self.channels, (3, 3), 1, pad, kernel_init=_NORMAL_001, **dt)
                    for _ in range(self.num_convs)]

        def norms():
            return [_group_norm(self.gn_groups, dt) for _ in range(self.num_convs)]

        self.cls_convs, self.cls_norms = convs(), norms()
        self.reg_convs, self.reg_norms = convs(), norms()
        if self.deform_cls:
            # Zero-initialised offsets and mask logits: the layer starts as a plain 3x3 conv
            # with every tap weighted sigmoid(0) = 0.5 (the usual DCNv2 start).
            self.cls_offset = layers.conv(27, (3, 3), 1, pad, kernel_init=nn.initializers.zeros,
                                          **dt)
            self.cls_deform = ModulatedDeformConv(self.channels, (3, 3), padding=1,
                                                  kernel_init=_NORMAL_001, **dt)
            self.cls_deform_norm = _group_norm(self.gn_groups, dt)
        self.region_embed = layers.conv(self.embed_dim, (3, 3), 1, pad, kernel_init=_NORMAL_001,
                                        **dt)
        self.bbox_pred = layers.conv(4, (3, 3), 1, pad, kernel_init=_NORMAL_001, **dt)
        self.centerness = layers.conv(1, (3, 3), 1, pad, kernel_init=_NORMAL_001, **dt)
        self.scales = [Scale(param_dtype=self.param_dtype) for _ in range(self.num_levels)]

    def _level(self, k, x):
        reg = x
        for conv, norm in zip(self.reg_convs, self.reg_norms):
            reg = nn.relu(norm(conv(reg)))
        cls = x
        if self.deform_cls:
            om = self.cls_offset(reg)
            offset, mask = om[..., :18], nn.sigmoid(om[..., 18:].astype(jnp.float32))
            cls = nn.relu(self.cls_deform_norm(self.cls_deform(x, offset, mask)))
        for conv, norm in zip(self.cls_convs, self.cls_norms):
            cls = nn.relu(norm(conv(cls)))
        return self.region_embed(cls), self.scales[k](self.bbox_pred(reg)), self.centerness(reg)

    def __call__(self, levels) -> dict:
        if len(levels) != self.num_levels:
            raise ValueError(f"ATSSConceptHead: got {len(levels)} FPN levels, built for "
                             f"{self.num_levels}; make config.model.strides match the FPN.")
        outs = [self._level(k, x) for k, x in enumerate(levels)]
        emb, deltas, ctr = (flatten_levels([o[i] for o in outs]) for i in range(3))
        return {"region_emb": emb.astype(jnp.float32),
                "box_deltas": deltas.astype(jnp.float32),
                "centerness": ctr[..., 0].astype(jnp.float32)}


class DetCLIPv2Detector(nn.Module):
    """DetCLIPv2 (see the module docstring).

    Fields: backbone (SwinTransformer with `features`, or a CLIP ModifiedResNet), fpn,
    text_encoder (BertEncoder), head (ATSSConceptHead), backbone_levels (backbone outputs fed
    to the FPN, finest first), num_levels, text_pooling ("mean" over real tokens, or "first" =
    the [CLS] position), logit_scale_init (log of the initial cosine multiplier).
    """

    backbone: nn.Module
    fpn: nn.Module
    text_encoder: nn.Module
    head: nn.Module
    backbone_levels: Sequence[str] = ("res3", "res4", "res5")
    num_levels: int = 5
    text_pooling: str = "mean"
    logit_scale_init: float = float(np.log(10.0))
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"config.model.text_pooling={self.text_pooling!r}: use one of "
                             f"{TEXT_POOLINGS}.")
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init),
                                         (None,)),
            (1,), self.param_dtype,
        )
        # Focal-loss prior: every alignment logit starts near sigmoid^-1(0.01).
        self.bias0 = self.param(
            "bias0",
            nn.with_logical_partitioning(nn.initializers.constant(prior_bias()), (None,)),
            (1,), self.param_dtype,
        )

    def encode_concepts(self, token_ids, token_mask, deterministic: bool = True):
        """token_ids [..., L] int, token_mask [..., L] bool (one concept per row) ->
        L2-normalised float32 concept embeddings [..., D]. All-padding rows give a finite
        vector (masked by the losses)."""
        lead, length = token_ids.shape[:-1], token_ids.shape[-1]
        ids = token_ids.reshape(-1, length)
        mask = token_mask.reshape(-1, length)
        hidden = self.text_encoder(ids, mask.astype(jnp.int32),
                                   deterministic=deterministic)["last_hidden_state"]
        if self.text_pooling == "mean":
            pooled = mean_pool(hidden.astype(jnp.float32), mask)
        else:
            pooled = hidden[:, 0].astype(jnp.float32)
        return l2_normalize(pooled).reshape(*lead, pooled.shape[-1])

    def visual_features(self, images, deterministic: bool = True) -> list[jnp.ndarray]:
        """images [N, S, S, 3] normalised -> FPN levels, finest first, [N, H_l, W_l, C]."""
        if hasattr(self.backbone, "features"):
            feats = self.backbone.features(images, deterministic=deterministic)
        else:
            feats = resnet_levels(self.backbone, images)
        missing = [k for k in self.backbone_levels if k not in feats]
        if missing:
            raise ValueError(f"DetCLIPv2Detector: backbone has no outputs {missing}; it gives "
                             f"{sorted(feats)} (fix config.model.backbone_levels).")
        levels = list(self.fpn([feats[k] for k in self.backbone_levels],
                               deterministic=deterministic))
        if len(levels) != self.num_levels:
            raise ValueError(f"DetCLIPv2Detector: the FPN gave {len(levels)} levels but "
                             f"num_levels={self.num_levels}; make config.model.strides match.")
        return levels

    def regions(self, images, deterministic: bool = True) -> dict:
        """images [N, S, S, 3] -> head outputs with `region_emb` L2-normalised [N, A, D]."""
        out = self.head(self.visual_features(images, deterministic))
        out["region_emb"] = nn.with_logical_constraint(
            l2_normalize(out["region_emb"]), ("batch", None, None))
        return out

    def align_logits(self, region_emb, concept_emb):
        """region_emb [N, A, D], concept_emb [N, K, D] (per image) or [K, D] (shared), both
        normalised -> float32 [N, A, K] = cos * exp(logit_scale) + bias0."""
        eq = "nad,nkd->nak" if concept_emb.ndim == 3 else "nad,kd->nak"
        cos = jnp.einsum(eq, region_emb.astype(jnp.float32), concept_emb.astype(jnp.float32))
        return cos * jnp.exp(self.logit_scale.astype(jnp.float32)) + self.bias0.astype(
            jnp.float32)

    def __call__(self, images, token_ids, token_mask, deterministic: bool = True) -> dict:
        """images [N, S, S, 3], token_ids / token_mask [N, K, L] (K concepts per image) ->
        `regions`' outputs plus `concept_emb` [N, K, D] and `logits` [N, A, K]."""
        out = self.regions(images, deterministic)
        concepts = self.encode_concepts(token_ids, token_mask, deterministic)
        out["concept_emb"] = concepts
        out["logits"] = self.align_logits(out["region_emb"], concepts)
        return out

"""RegionCLIP's losses, as the official code computes them, temperature 0.01.

Transfer detector: region-vs-concept classification with a fixed background logit of 0 and
focal-scaled softmax CE. The region-text pretraining losses are in
`ovd_jax.losses.regionclip_pretrain`.
"""

from __future__ import annotations

import jax.numpy as jnp

from ovd_jax.losses import common
from ovd_jax.models.layers import l2_normalize


def region_logits(region_emb: jnp.ndarray, concept_emb: jnp.ndarray, temperature: float):
    """[..., R, D] and [K, D] (both L2-normalised) -> [..., R, 1 + K]; column 0 is background
    with a fixed logit of 0, columns 1.. are cos / temperature."""
    cls = jnp.einsum("...rd,kd->...rk", region_emb, concept_emb) / temperature
    bg = jnp.zeros(cls.shape[:-1] + (1,), cls.dtype)
    return jnp.concatenate([bg, cls], axis=-1)


def transfer_classification_loss(
    logits, targets, valid, *, gamma: float | None, background_weight: float
):
    """Softmax CE over [bg, concepts], background entries weighted by `background_weight`.

    logits [..., R, 1 + K]; targets [..., R] int (0 background, k + 1 concept k); valid [..., R]
    (False entries, e.g. padding, count nowhere). Two reductions, as upstream's
    `FastRCNNOutputLayers.losses` has them:
      * gamma not None (`focal_loss`, COCO OVD gamma 0.5): per-RoI w * CE * (1 - p_t)^gamma,
        then the plain mean over the valid RoIs;
      * gamma None (LVIS): torch `cross_entropy(weight=w)`, i.e. sum(w * CE) / sum(w).
    Returns a float32 scalar (0 when no entry is valid).
    """
    w = jnp.where(targets == 0, background_weight, 1.0)
    if gamma is None:
        ce = common.softmax_focal_cross_entropy(logits, targets, 0.0)
        w = jnp.where(valid, w, 0.0)
        den = jnp.sum(w)
        # Not masked_mean: its max(sum(w), 1) floor would change the weighted mean whenever
        # the weights sum below 1 (e.g. two background RoIs at weight 0.2).
        return jnp.where(den > 0, jnp.sum(ce * w) / jnp.where(den > 0, den, 1.0), 0.0)
    ce = common.softmax_focal_cross_entropy(logits, targets, gamma)
    return common.masked_mean(ce * w, valid)


normalize = l2_normalize


def concept_embeddings(text_features: jnp.ndarray, num_templates: int) -> jnp.ndarray:
    """Prompt ensembling: [K * T, D] text features (concept-major) -> [K, D] normalised.

    Features are averaged over the T templates *before* normalisation (RegionCLIP's choice).
    """
    k = text_features.shape[0] // num_templates
    return normalize(text_features.reshape(k, num_templates, -1).mean(axis=1))

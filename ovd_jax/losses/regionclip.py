"""RegionCLIP's losses, as the official code computes them (DESIGN §3), temperature 0.01.

Transfer detector: region-vs-concept classification with a fixed background logit of 0 and
focal-scaled softmax CE. Pretraining: pseudo-labelled region-concept contrastive, KL
distillation from the CLIP teacher, image-caption contrastive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ovd_jax.losses import common
from ovd_jax.models.layers import l2_normalize


def region_logits(region_emb: jnp.ndarray, concept_emb: jnp.ndarray, temperature: float):
    """[..., R, D] and [K, D] (both L2-normalised) -> [..., R, 1 + K]; column 0 is background
    with a fixed logit of 0, columns 1.. are cos / temperature."""
    cls = jnp.einsum("...rd,kd->...rk", region_emb, concept_emb) / temperature
    bg = jnp.zeros(cls.shape[:-1] + (1,), cls.dtype)
    return jnp.concatenate([bg, cls], axis=-1)


def transfer_classification_loss(logits, targets, valid, *, gamma: float, background_weight: float):
    """Focal-scaled softmax CE over [bg, concepts].

    logits [..., R, 1 + K]; targets [..., R] int (0 background, k + 1 concept k); valid [..., R].
    Background entries are weighted by `background_weight`; the result is the weighted mean, as
    torch's `cross_entropy(weight=...)` reduces.
    """
    ce = common.softmax_focal_cross_entropy(logits, targets, gamma)
    w = jnp.where(targets == 0, background_weight, 1.0)
    return common.masked_mean(ce, valid, w)


normalize = l2_normalize


def concept_embeddings(text_features: jnp.ndarray, num_templates: int) -> jnp.ndarray:
    """Prompt ensembling: [K * T, D] text features (concept-major) -> [K, D] normalised.

    Features are averaged over the T templates *before* normalisation (RegionCLIP's choice).
    """
    k = text_features.shape[0] // num_templates
    return normalize(text_features.reshape(k, num_templates, -1).mean(axis=1))


def pseudo_labels(teacher_region_emb, concept_emb, valid, *, temperature=0.01, threshold=0.1):
    """Teacher region embeddings [R, D] vs concepts [K, D] -> (labels [R], keep [R], probs [R, K]).

    A region is kept when its max teacher probability exceeds `threshold`; its label is the argmax.
    """
    probs = jax.nn.softmax(teacher_region_emb @ concept_emb.T / temperature, axis=-1)
    keep = valid & (probs.max(axis=-1) > threshold)
    return jnp.argmax(probs, axis=-1), keep, probs


def region_concept_contrastive(student_region_emb, concept_emb, labels, keep, temperature=0.01):
    """Regions sharing a pseudo concept are all positives: -log of the softmax mass summed over
    the positives, for each concept present in the batch (region axis softmax), averaged.

    student_region_emb [R, D], concept_emb [K, D], labels [R], keep [R] -> scalar.
    """
    logits = concept_emb @ student_region_emb.T / temperature  # [K, R]
    logits = jnp.where(keep[None, :], logits, -jnp.inf)
    positives = (labels[None, :] == jnp.arange(concept_emb.shape[0])[:, None]) & keep[None, :]
    present = positives.any(axis=-1)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    log_pos = jax.nn.logsumexp(jnp.where(positives, logits, -jnp.inf), axis=-1)
    per_concept = jnp.where(present, log_norm - log_pos, 0.0)
    return jnp.sum(per_concept) / jnp.maximum(present.sum(), 1)


def distillation_kl(student_region_emb, teacher_probs, concept_emb, valid, temperature=0.01):
    """KL(teacher || student) over the concept pool, mean over valid regions."""
    log_q = jax.nn.log_softmax(student_region_emb @ concept_emb.T / temperature, axis=-1)
    log_p = jnp.log(jnp.clip(teacher_probs, 1e-12))
    kl = jnp.sum(teacher_probs * (log_p - log_q), axis=-1)
    return common.masked_mean(kl, valid)


def image_text_contrastive(image_emb, text_emb, temperature=0.01, valid=None):
    """Symmetric InfoNCE between [B, D] whole-image region embeddings and [B, D] caption
    embeddings (both normalised); pair i is (image i, caption i). Under jit with a sharded batch
    the [B, B] similarity covers every device's examples, i.e. negatives gathered across devices.
    """
    logits = image_emb @ text_emb.T / temperature
    b = logits.shape[0]
    valid = jnp.ones((b,), bool) if valid is None else valid
    mask = valid[:, None] & valid[None, :]
    logits = jnp.where(mask, logits, -1e9)
    targets = jnp.arange(b)
    i2t = common.softmax_focal_cross_entropy(logits, targets, 0.0)
    t2i = common.softmax_focal_cross_entropy(logits.T, targets, 0.0)
    return 0.5 * (common.masked_mean(i2t, valid) + common.masked_mean(t2i, valid))

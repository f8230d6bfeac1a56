"""Loss pieces shared by the methods: pure functions of arrays, masks honoured."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_mean(x: jnp.ndarray, mask: jnp.ndarray, weights: jnp.ndarray | None = None):
    """Sum(x * w) / max(sum(w), 1) over entries where mask is True (w defaults to 1)."""
    w = mask.astype(jnp.float32) if weights is None else weights * mask
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def softmax_focal_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, gamma: float):
    """Cross-entropy scaled by (1 - p_t)^gamma (RegionCLIP's focal scaling of softmax CE).

    logits [..., K], integer targets [...] -> per-entry loss [...]; gamma 0 gives plain CE.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp_t = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    ce = -logp_t
    if gamma:
        # Clamped: d/dp (1 - p)^gamma is infinite at p = 1 for gamma < 1 (saturated logits).
        ce = ce * jnp.maximum(1.0 - jnp.exp(logp_t), 1e-12) ** gamma
    return ce


def sigmoid_bce(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Element-wise binary cross-entropy with logits."""
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Element-wise sigmoid focal loss (RetinaNet/GLIP); alpha < 0 disables the alpha weight."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    ce = sigmoid_bce(logits, targets)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def l1(pred: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """Per-box L1 summed over the last axis (detectron2's smooth_l1 with beta=0)."""
    return jnp.sum(jnp.abs(pred - target), axis=-1)

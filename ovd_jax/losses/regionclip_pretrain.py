"""RegionCLIP's region-text pretraining losses, as `PretrainFastRCNN` computes them (tau 0.01).

All inputs are L2-normalised embeddings; region sets may carry leading batch axes ([..., R, D]):
the region-level losses treat every region of the array as one pool, as upstream pools every
region of its (per-GPU) batch. Masks are honoured everywhere so shapes stay static:

* `pseudo_labels`: teacher region-concept softmax (tau 0.01); a region is kept when its maximum
  probability exceeds 0.1, its label is the argmax; when no region of the pool is kept, all
  valid regions are (upstream falls back to `max > 0`).
* `region_concept_contrastive`: upstream multiplies each kept region with the target concept
  embedding of *every* kept region ([#kept, #kept], duplicates included), takes a softmax over
  those columns and `-log` of the mass on the columns sharing the region's label
  (MILCrossEntropy, summed positives), averaged over the kept regions. Duplicated columns are
  the same concept, so this equals a softmax over the concepts present in the pool with logit
  `s_k + log n_k` (n_k = kept regions labelled k): computed that way here, [R, K] not [R, R].
* `distillation_kl`: KL(teacher || student) over the concept pool, `batchmean` over the kept
  regions (torch `kl_div(log q, p, reduction='batchmean')`).
* `image_text_contrastive`: symmetric cross-entropy between whole-image ("global box") region
  embeddings and caption embeddings, (image->text + text->image) / 2. Called on the global batch
  inside a sharded jit, the similarity matrix spans every device's examples (upstream's
  `gather_tensors` across GPUs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite stand-in for -inf where a whole row may be masked (avoids inf - inf = NaN).
_NEG = -1e9


def pseudo_labels(teacher_region_emb, concept_emb, valid, *, temperature: float = 0.01,
                  threshold: float = 0.1):
    """Teacher regions [..., R, D] vs concepts [K, D], valid [..., R] ->
    (labels [..., R] int32, keep [..., R] bool, probs [..., R, K] float32)."""
    logits = jnp.einsum("...rd,kd->...rk", teacher_region_emb.astype(jnp.float32),
                        concept_emb.astype(jnp.float32)) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    keep = valid & (probs.max(axis=-1) > threshold)
    # Upstream: "all regions can't match to any concept" -> keep every region (max > 0).
    keep = jnp.where(keep.any(), keep, valid)
    return jnp.argmax(probs, axis=-1).astype(jnp.int32), keep, probs


def region_concept_contrastive(student_region_emb, concept_emb, labels, keep,
                               temperature: float = 0.01):
    """Per-region multi-positive cross-entropy over the pool's pseudo concepts (see module doc).

    student_region_emb [..., R, D], concept_emb [K, D], labels [..., R] int, keep [..., R]
    -> scalar: mean over the kept regions of -log(softmax mass on the region's own concept);
    0 when no region is kept.
    """
    k = concept_emb.shape[0]
    emb = student_region_emb.reshape(-1, student_region_emb.shape[-1]).astype(jnp.float32)
    labels, keep = labels.reshape(-1), keep.reshape(-1)
    onehot = jax.nn.one_hot(labels, k, dtype=jnp.float32) * keep[:, None]
    counts = jnp.sum(onehot, axis=0)  # kept regions per concept: the duplicated columns
    logits = emb @ concept_emb.astype(jnp.float32).T / temperature
    z = jnp.where(counts > 0, logits + jnp.log(jnp.maximum(counts, 1.0)), _NEG)
    own = jnp.sum(jnp.where(onehot > 0, z, 0.0), axis=-1)
    per_region = jax.nn.logsumexp(z, axis=-1) - own
    per_region = jnp.where(keep, per_region, 0.0)
    return jnp.sum(per_region) / jnp.maximum(jnp.sum(keep), 1)


def distillation_kl(student_region_emb, teacher_probs, concept_emb, keep,
                    temperature: float = 0.01):
    """KL(teacher || student) of the region-concept distributions, summed over regions and
    divided by the number of kept regions. student_region_emb [..., R, D], teacher_probs
    [..., R, K], concept_emb [K, D], keep [..., R] -> scalar (0 when none is kept)."""
    logits = jnp.einsum("...rd,kd->...rk", student_region_emb.astype(jnp.float32),
                        concept_emb.astype(jnp.float32)) / temperature
    log_q = jax.nn.log_softmax(logits, axis=-1)
    p = jax.lax.stop_gradient(teacher_probs.astype(jnp.float32))
    # xlogy: 0 * log 0 = 0, as torch's kl_div treats zero targets.
    kl = jnp.sum(jax.scipy.special.xlogy(p, p) - p * log_q, axis=-1)
    return jnp.sum(jnp.where(keep, kl, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def image_text_contrastive(image_emb, text_emb, temperature: float = 0.01, valid=None):
    """Symmetric InfoNCE: image_emb [B, D] (global-box region embeddings), text_emb [B, D]
    (caption embeddings), pair i = (image i, caption i); valid [B] drops padding entries from
    both the rows and the negatives. Returns (mean_i CE(row i) + mean_j CE(column j)) / 2."""
    logits = image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T / temperature
    b = logits.shape[0]
    valid = jnp.ones((b,), bool) if valid is None else valid
    logits = jnp.where(valid[:, None] & valid[None, :], logits, _NEG)
    diag = jnp.diagonal(logits)
    i2t = jax.nn.logsumexp(logits, axis=1) - diag
    t2i = jax.nn.logsumexp(logits, axis=0) - diag
    n = jnp.maximum(jnp.sum(valid), 1)
    return 0.5 * (jnp.sum(jnp.where(valid, i2t, 0.0)) + jnp.sum(jnp.where(valid, t2i, 0.0))) / n

"""DetCLIPv2's losses: word-region alignment on image-text pairs, concept-level ATSS losses.

Image-text pairs (no boxes) follow the paper's Section 3.2:

* `proposal_objectness` / `select_proposals`: every anchor's objectness is its largest
  similarity to any concept in the (global) batch; per image the `pre_nms_topk` best anchors go
  through NMS on their predicted boxes and the first `num_proposals` survivors are the image's
  proposals P.
* `set_similarity`: s^T(x^I_j, x^T_i) between caption i's concepts T_i and image j's proposals
  P_j. Per concept t the best region, s_t = max_k s_{t,k} (`aggregation="max"`), or the
  softmax-weighted sum s_t = sum_k softmax_k(s_{t,k} / tau_t) s_{t,k} (`"softmax"`); then the
  mean over the caption's concepts. s_{t,k} is the cosine similarity of the L2-normalised
  embeddings.
* `text_to_image_contrastive`: L_cts = -(1/B) sum_i log(exp(s_ii / tau) / sum_j exp(s_ij / tau))
  over the captions i of the batch, negatives j = every other image of the batch. Text->image
  only: a web caption names a few of an image's objects, so image->text is not used.

Everything is a function of the whole global batch: inside a jit over a batch sharded along
the data axes the [B, B] similarity spans every device's images (XLA gathers the embeddings),
so the negatives are global, not per device.

Detection and grounding (`concept_atss_loss`): GLIP's ATSS losses (ovd_jax.losses.glip) with the
token axis replaced by the concept axis: every anchor assigned to a box gets the box's concept
row as its sigmoid-focal target; GIoU weighted by centerness targets and centerness BCE as ATSS.

Shapes: B images / captions, A anchors, D embedding width, M concepts per caption, P proposals
per image, K concepts per image (detection / grounding), G boxes per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ovd_jax.losses.glip import glip_atss_loss
from ovd_jax.ops.nms import topk_nms

# Finite stand-in for -inf where a whole row can be masked (keeps inf - inf out of the math).
_NEG = -1e9
AGGREGATIONS = ("max", "softmax")


def proposal_objectness(region_emb, concept_emb, concept_valid):
    """Objectness of every anchor: its largest similarity to any valid concept of the batch.

    region_emb [N, A, D] and concept_emb [C, D] (the batch's concepts, flattened; L2-normalised
    for cosine similarity), concept_valid [C] bool. Returns float32 [N, A]; -1e9 when the batch
    has no valid concept.
    """
    sim = jnp.einsum("nad,cd->nac", region_emb.astype(jnp.float32),
                     concept_emb.astype(jnp.float32))
    return jnp.max(jnp.where(concept_valid[None, None, :], sim, _NEG), axis=-1)


def select_proposals(boxes, objectness, *, num_proposals: int, nms_threshold: float,
                     pre_nms_topk: int):
    """Per image: the `pre_nms_topk` anchors with the highest objectness, NMS on their boxes,
    the first `num_proposals` survivors.

    boxes [N, A, 4] (x1y1x2y2), objectness [N, A]. Returns (indices [N, P] int32 into the
    anchors, valid [N, P] bool); P = num_proposals, invalid entries point at anchor 0.
    Selection is not differentiated (indices only).
    """
    boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
    objectness = jax.lax.stop_gradient(objectness.astype(jnp.float32))
    return jax.vmap(
        lambda b, s: topk_nms(b, s, int(pre_nms_topk), float(nms_threshold), int(num_proposals))
    )(boxes, objectness)


def set_similarity(concept_emb, concept_valid, region_emb, region_valid, *,
                   aggregation: str = "max", tau_t: float = 0.1):
    """Text->image set similarity of every (caption i, image j) pair of the batch.

    concept_emb [B, M, D] (caption i's concepts), concept_valid [B, M]; region_emb [B, P, D]
    (image j's proposals), region_valid [B, P]. Embeddings are L2-normalised by the caller, so
    s_{t,k} is a cosine similarity. Returns float32 [B, B]: entry [i, j] = s^T(x^I_j, x^T_i),
    the mean over caption i's valid concepts of each concept's best region of image j (max) or
    its softmax(s / tau_t)-weighted sum of regions. Rows with no valid concept, and columns of
    images with no valid region, are 0 (the caller masks them).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: use one of {AGGREGATIONS} "
                         "(config.model.set_similarity).")
    sim = jnp.einsum("imd,jpd->ijmp", concept_emb.astype(jnp.float32),
                     region_emb.astype(jnp.float32))
    rmask = region_valid[None, :, None, :]
    if aggregation == "max":
        per_concept = jnp.max(jnp.where(rmask, sim, _NEG), axis=-1)
    else:
        w = jax.nn.softmax(jnp.where(rmask, sim / float(tau_t), _NEG), axis=-1)
        per_concept = jnp.sum(jnp.where(rmask, w * sim, 0.0), axis=-1)
    has_region = jnp.any(region_valid, axis=-1)[None, :, None]
    per_concept = jnp.where(has_region, per_concept, 0.0)
    cmask = concept_valid[:, None, :].astype(jnp.float32)
    return jnp.sum(per_concept * cmask, axis=-1) / jnp.maximum(jnp.sum(cmask, axis=-1), 1.0)


def text_to_image_contrastive(similarity, temperature: float, text_valid, image_valid):
    """L_cts = mean over valid captions i of -log softmax_j(s_ij / temperature)[i].

    similarity [B, B] from `set_similarity` (rows captions, columns images; caption i belongs
    to image i); text_valid [B] (caption has a concept), image_valid [B] (image is real and has
    a proposal). Invalid images are no negatives; a caption counts only when it and its own
    image are valid. Returns a float32 scalar (0 when no caption counts).
    """
    logits = similarity.astype(jnp.float32) / float(temperature)
    logits = jnp.where(image_valid[None, :], logits, _NEG)
    rows = text_valid & image_valid
    per_row = jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits)
    return jnp.sum(jnp.where(rows, per_row, 0.0)) / jnp.maximum(jnp.sum(rows), 1)


def image_text_loss(region_emb, boxes, concept_emb, concept_valid, image_valid, *,
                    num_proposals: int, nms_threshold: float, pre_nms_topk: int,
                    aggregation: str, tau_t: float, temperature: float) -> dict:
    """The whole image-text branch: proposal selection, set similarity, L_cts.

    region_emb [B, A, D] (L2-normalised anchor embeddings), boxes [B, A, 4] (decoded predicted
    boxes), concept_emb [B, M, D] (L2-normalised), concept_valid [B, M], image_valid [B].
    Returns {"cts": L_cts, "similarity": [B, B], "proposals": [B, P], "proposal_valid": [B, P]}.
    """
    flat_emb = concept_emb.reshape(-1, concept_emb.shape[-1])
    objectness = proposal_objectness(region_emb, flat_emb, concept_valid.reshape(-1))
    idx, valid = select_proposals(boxes, objectness, num_proposals=num_proposals,
                                  nms_threshold=nms_threshold, pre_nms_topk=pre_nms_topk)
    valid = valid & image_valid[:, None]
    regions = jnp.take_along_axis(region_emb, idx[..., None], axis=1)  # [B, P, D]
    sim = set_similarity(concept_emb, concept_valid, regions, valid, aggregation=aggregation,
                         tau_t=tau_t)
    text_valid = jnp.any(concept_valid, axis=-1)
    cts = text_to_image_contrastive(sim, temperature, text_valid, jnp.any(valid, axis=-1))
    return {"cts": cts, "similarity": sim, "proposals": idx, "proposal_valid": valid}


def concept_atss_loss(anchors, anchors_per_level: Sequence[int], logits, box_deltas, centerness,
                      gt_boxes, gt_valid, box_concepts, concept_valid, *, alpha: float = 0.25,
                      gamma: float = 2.0, topk: int = 9, reg_weight: float = 2.0,
                      center_weight: float = 1.0) -> dict:
    """L_align (concept-level sigmoid focal loss), L_reg (GIoU) and L_center for a batch.

    anchors [A, 4], anchors_per_level static counts; logits [N, A, K] region-concept alignment
    logits; box_deltas [N, A, 4]; centerness [N, A] logits; gt_boxes [N, G, 4]; gt_valid [N, G];
    box_concepts [N, G, K] (1 where concept k names box g; a grounding phrase may name several
    boxes and a box may carry several phrases); concept_valid [N, K] (padding concepts add no
    loss). Normalisations as GLIP's ATSS loss (focal / #positive anchors of the global batch,
    GIoU / sum of centerness targets). Returns {"align", "reg" (x reg_weight), "center"
    (x center_weight), "num_pos"}.
    """
    terms = glip_atss_loss(
        anchors, anchors_per_level, logits, box_deltas, centerness, gt_boxes, gt_valid,
        box_concepts, concept_valid, alpha=alpha, gamma=gamma, topk=topk,
        giou_weight=reg_weight, centerness_weight=center_weight,
    )
    return {"align": terms["cls"], "reg": terms["box"], "center": terms["centerness"],
            "num_pos": terms["num_pos"]}

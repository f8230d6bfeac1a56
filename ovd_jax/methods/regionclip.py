"""RegionCLIP transfer detector: model construction, the training loss and batched inference.

Everything here is a pure function of arrays and static config values so that it can be jitted
with shardings by ovd_jax/training. Shapes (N images, A anchors, P proposals, R sampled RoIs,
M padded ground-truth boxes, K concepts, T templates, L tokens) are fixed by the config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.losses import common as loss_common
from ovd_jax.losses import regionclip as rc_losses
from ovd_jax.methods.base import DETECTION_KEYS, compute_dtype, detection_train_loader
from ovd_jax.models.clip_resnet import clip_resnet
from ovd_jax.models.clip_text import clip_text
from ovd_jax.models.regionclip import RES4_STRIDE, RegionCLIPDetector
from ovd_jax.models.rpn import select_proposals
from ovd_jax.ops import anchors as anchor_ops
from ovd_jax.ops import boxes as box_ops
from ovd_jax.ops import matchers
from ovd_jax.ops.nms import batched_nms


def build_model(config, *, text_vocab_size: int, eot_token_id: int | None) -> RegionCLIPDetector:
    """The detector described by `config.model` / `config.text` (random init)."""
    m = config.model
    dtype = compute_dtype(config)
    vision_kw = dict(m.vision_overrides.to_dict()) if m.vision_overrides else {}
    # Trained from scratch, the attention pool's position grid matches the pooled RoI grid
    # (res5 halves it); a pretrained tower keeps its own grid and interpolates.
    if not m.init_checkpoint:
        vision_kw.setdefault("input_resolution", m.pooler_resolution * 16)
    vision = clip_resnet(m.vision, dtype=dtype, remat=m.remat, **vision_kw)
    text_kw = dict(m.text_overrides.to_dict()) if m.text_overrides else {}
    text_kw.setdefault("vocab_size", text_vocab_size)
    text_kw.setdefault("context_length", config.text.context_length)
    text = clip_text(m.text, dtype=dtype, remat=m.remat, eot_token_id=eot_token_id, **text_kw)
    return RegionCLIPDetector(
        vision=vision,
        text=text,
        num_anchors=len(m.anchor_sizes) * len(m.anchor_aspect_ratios),
        rpn_channels=m.rpn_channels,
        pooler_resolution=m.pooler_resolution,
        pooler_sampling_ratio=m.pooler_sampling_ratio,
        dtype=dtype,
    )


def feature_hw(config) -> tuple[int, int]:
    s = int(config.data.image_size)
    if s % 32:
        raise ValueError(
            f"config.data.image_size={s} must be a multiple of 32 (CLIP ResNet strides)"
        )
    return s // RES4_STRIDE, s // RES4_STRIDE


def anchors(config) -> np.ndarray:
    """[A, 4] anchors of the res4 map in input pixels."""
    m = config.model
    return anchor_ops.generate_anchors(
        [feature_hw(config)], [RES4_STRIDE], [tuple(m.anchor_sizes)], tuple(m.anchor_aspect_ratios)
    )


def init_args(config):
    """Dummy inputs for `model.init` (one image, one box, one prompt)."""
    s = int(config.data.image_size)
    return (
        jnp.zeros((1, s, s, 3), jnp.float32),
        jnp.asarray([[[0.0, 0.0, 32.0, 32.0]]]),
        jnp.zeros((1, int(config.text.context_length)), jnp.int32),
    )


def device_keys(config) -> tuple[str, ...]:
    return DETECTION_KEYS


def make_train_loader(exp, *, num_epochs=None):
    return detection_train_loader(exp, num_epochs=num_epochs)


def train_constants(exp, variables) -> dict:
    """The training vocabulary's prompt tokens [K * T, L] (encoded inside the step)."""
    return {"concept_tokens": jnp.asarray(exp.train_tokens)}


def eval_queries(exp, variables):
    """[K, D] template-ensembled, normalised embeddings of the evaluation vocabulary."""
    templates = len(exp.config.text.templates)
    return jax.jit(
        lambda v, t: concept_embeddings(exp.model, v, t, templates)
    )(variables, jnp.asarray(exp.eval_tokens))


def concept_embeddings(model, variables, concept_tokens, num_templates: int):
    """[K * T, L] prompt tokens -> [K, D] normalised, template-averaged concept embeddings."""
    feats = model.apply(variables, concept_tokens, method=RegionCLIPDetector.encode_text)
    return rc_losses.concept_embeddings(feats, num_templates)


def _rpn_targets(key, anchors_, gt_boxes, gt_valid, m):
    """One image: sampled anchor labels and regression targets."""
    iou = box_ops.box_iou(gt_boxes, anchors_)
    matched, labels = matchers.iou_matcher(
        iou, gt_valid, thresholds=tuple(m.rpn_iou_thresholds), labels=(0, -1, 1),
        allow_low_quality_matches=True,
    )
    fg, bg = matchers.sample_balanced(key, labels, m.rpn_batch_size_per_image,
                                      m.rpn_positive_fraction)
    deltas = box_ops.BoxCoder().encode(anchors_, gt_boxes[matched])
    return fg, bg, deltas


def _roi_targets(key, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, m):
    """One image: R sampled RoIs (proposals + GT boxes), their class targets and box targets."""
    boxes = jnp.concatenate([proposals, gt_boxes], axis=0)
    valid = jnp.concatenate([proposal_valid, gt_valid], axis=0)
    iou = box_ops.box_iou(gt_boxes, boxes)
    t = float(m.roi_iou_threshold)
    matched, labels = matchers.iou_matcher(
        iou, gt_valid, thresholds=(t, t), labels=(0, -1, 1), allow_low_quality_matches=False
    )
    labels = jnp.where(valid, labels, -1)
    fg, bg = matchers.sample_balanced(key, labels, m.roi_batch_size_per_image,
                                      m.roi_positive_fraction)
    sampled = fg | bg
    # Stable sort puts the (at most R) sampled entries first: a static-size selection.
    order = jnp.argsort(~sampled, stable=True)[: m.roi_batch_size_per_image]
    roi_valid = sampled[order]
    roi_fg = fg[order]
    roi_boxes = boxes[order]
    matched_gt = matched[order]
    cls_targets = jnp.where(roi_fg, gt_labels[matched_gt] + 1, 0)
    coder = box_ops.BoxCoder(weights=tuple(m.box_reg_weights))
    box_targets = coder.encode(roi_boxes, gt_boxes[matched_gt])
    return roi_boxes, roi_valid, roi_fg, cls_targets, box_targets


def train_loss(model, params, model_state, batch, constants, rng, config):
    """Total loss and metrics for one batch.

    batch: image [N,S,S,3], boxes [N,M,4], labels [N,M] (index into the training vocabulary),
    box_mask [N,M], image_hw [N,2]. constants: `train_constants` (concept_tokens [K*T, L]).
    """
    concept_tokens = constants["concept_tokens"]
    m = config.model
    variables = {"params": params, **model_state}
    text_vars = variables if config.text.trainable else jax.lax.stop_gradient(variables)
    concepts = concept_embeddings(model, text_vars, concept_tokens, len(config.text.templates))

    images, gt_boxes, gt_valid = batch["image"], batch["boxes"], batch["box_mask"]
    n = images.shape[0]
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    objectness, rpn_deltas = model.apply(variables, res4, method=RegionCLIPDetector.rpn)

    anchors_ = jnp.asarray(anchors(config))
    k_rpn, k_roi = jax.random.split(rng)
    fg, bg, rpn_targets = jax.vmap(
        lambda k, b, v: _rpn_targets(k, anchors_, b, v, m)
    )(jax.random.split(k_rpn, n), gt_boxes, gt_valid)
    normaliser = float(n * m.rpn_batch_size_per_image)
    # jnp.where, not a multiply: targets of unmatched entries may be inf/NaN (padded boxes).
    rpn_cls = jnp.sum(
        jnp.where(fg | bg, loss_common.sigmoid_bce(objectness, fg.astype(jnp.float32)), 0.0)
    ) / normaliser
    rpn_targets = jnp.where(fg[..., None], rpn_targets, 0.0)
    rpn_box = jnp.sum(jnp.where(fg, loss_common.l1(rpn_deltas, rpn_targets), 0.0)) / normaliser

    proposals, _, prop_valid = jax.vmap(
        lambda o, d, hw: select_proposals(
            anchors_, o, d, hw, pre_nms_topk=m.rpn_pre_nms_topk_train,
            post_nms_topk=m.rpn_post_nms_topk_train, nms_threshold=m.rpn_nms_threshold,
        )
    )(objectness, rpn_deltas, batch["image_hw"])
    roi_boxes, roi_valid, roi_fg, cls_t, box_t = jax.vmap(
        lambda k, p, pv, b, lab, v: _roi_targets(k, p, pv, b, lab, v, m)
    )(jax.random.split(k_roi, n), proposals, prop_valid, gt_boxes, batch["labels"], gt_valid)

    region_emb, box_deltas = model.apply(
        variables, res4, roi_boxes, method=RegionCLIPDetector.region_features
    )
    logits = rc_losses.region_logits(region_emb, concepts, m.temperature)
    cls_loss = rc_losses.transfer_classification_loss(
        logits, cls_t, roi_valid, gamma=m.focal_gamma, background_weight=m.background_weight
    )
    box_t = jnp.where(roi_fg[..., None], box_t, 0.0)
    box_loss = jnp.sum(jnp.where(roi_fg, loss_common.l1(box_deltas, box_t), 0.0)) / jnp.maximum(
        roi_valid.sum(), 1.0
    )
    loss = m.rpn_loss_weight * (rpn_cls + rpn_box) + cls_loss + m.box_loss_weight * box_loss
    accuracy = loss_common.masked_mean(
        (jnp.argmax(logits, -1) == cls_t).astype(jnp.float32), roi_valid & roi_fg
    )
    metrics = {
        "loss": loss,
        "rpn_cls": rpn_cls,
        "rpn_box": rpn_box,
        "roi_cls": cls_loss,
        "roi_box": box_loss,
        "fg_accuracy": accuracy,
        "num_fg_rois": jnp.sum(roi_fg) / n,
    }
    return loss, metrics


def predict(model, variables, images, image_hw, concepts, config):
    """Batched inference. images [N,S,S,3], image_hw [N,2], concepts [K, D] normalised.

    Returns dict of boxes [N,D,4] (input pixels), scores [N,D], classes [N,D] (index into the
    concept list), valid [N,D]; D = config.eval.max_detections.
    """
    m, e = config.model, config.eval
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    objectness, rpn_deltas = model.apply(variables, res4, method=RegionCLIPDetector.rpn)
    anchors_ = jnp.asarray(anchors(config))
    proposals, prop_logits, prop_valid = jax.vmap(
        lambda o, d, hw: select_proposals(
            anchors_, o, d, hw, pre_nms_topk=m.rpn_pre_nms_topk_test,
            post_nms_topk=m.rpn_post_nms_topk_test, nms_threshold=m.rpn_nms_threshold,
        )
    )(objectness, rpn_deltas, image_hw)
    region_emb, box_deltas = model.apply(
        variables, res4, proposals, method=RegionCLIPDetector.region_features
    )
    probs = jax.nn.softmax(rc_losses.region_logits(region_emb, concepts, m.temperature), -1)
    probs = probs[..., 1:]
    if m.score == "sqrt_objectness":
        probs = jnp.sqrt(probs * jax.nn.sigmoid(prop_logits)[..., None])
    elif m.score != "softmax":
        raise ValueError(f"config.model.score={m.score!r}: use 'softmax' or 'sqrt_objectness'")
    coder = box_ops.BoxCoder(weights=tuple(m.box_reg_weights))
    boxes = coder.decode(box_deltas, proposals)
    boxes = box_ops.clip_boxes(boxes, image_hw[:, None, 0], image_hw[:, None, 1])
    return jax.vmap(lambda b, p, v: _per_class_nms(b, p, v, e))(boxes, probs, prop_valid)


def _per_class_nms(boxes, probs, valid, e):
    """One image: [P,4] boxes and [P,K] scores -> class-aware NMS'ed top detections."""
    p, k = probs.shape
    scores = jnp.where(valid[:, None], probs, -jnp.inf).reshape(-1)
    classes = jnp.tile(jnp.arange(k, dtype=jnp.int32), p)
    flat_boxes = jnp.repeat(boxes, k, axis=0)
    topk = min(int(e.pre_nms_topk), p * k)
    top_scores, top_idx = jax.lax.top_k(scores, topk)
    ok = top_scores > e.score_threshold
    keep, keep_valid = batched_nms(
        flat_boxes[top_idx], top_scores, classes[top_idx], e.nms_threshold, e.max_detections,
        valid=ok,
    )
    return {
        "boxes": flat_boxes[top_idx][keep],
        "scores": jnp.where(keep_valid, top_scores[keep], 0.0),
        "classes": classes[top_idx][keep],
        "valid": keep_valid,
    }


def classify_boxes(model, variables, images, boxes, concepts, config):
    """RegionCLIP's zero-shot-with-GT-boxes protocol: class probabilities of given boxes.

    images [N,S,S,3], boxes [N,M,4] input pixels, concepts [K,D] -> probs [N,M,K] (softmax over
    the concepts at the config temperature; no background).
    """
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    region_emb, _ = model.apply(variables, res4, boxes, method=RegionCLIPDetector.region_features)
    logits = jnp.einsum("nmd,kd->nmk", region_emb, concepts) / config.model.temperature
    return jax.nn.softmax(logits, axis=-1)

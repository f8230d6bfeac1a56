"""RegionCLIP transfer detector: model construction, the training loss and batched inference.

Everything here is a pure function of arrays and static config values so that it can be jitted
with shardings by ovd_jax/training. Shapes (N images, A anchors, P proposals, R sampled RoIs,
M padded ground-truth boxes, K concepts, T templates, L tokens) are fixed by the config.
docs/regionclip.md lists the constants and where they come from.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.data import lvis
from ovd_jax.losses import common as loss_common
from ovd_jax.losses import regionclip as rc_losses
from ovd_jax.methods import regionclip_offline
from ovd_jax.methods.base import (
    DETECTION_KEYS,
    compute_dtype,
    detection_train_loader,
    tower_options,
)
from ovd_jax.models.clip_resnet import clip_resnet
from ovd_jax.models.clip_text import clip_text
from ovd_jax.models.regionclip import RES4_STRIDE, RegionCLIPDetector
from ovd_jax.models.rpn import select_proposals
from ovd_jax.ops import anchors as anchor_ops
from ovd_jax.ops import boxes as box_ops
from ovd_jax.ops import matchers
from ovd_jax.ops.nms import batched_nms, shared_box_nms

log = logging.getLogger(__name__)

# Prompts encoded per call when concept embeddings are precomputed (LVIS: 1203 x 81 prompts).
_PROMPTS_PER_CALL = 4096


def vision_tower(config):
    """The CLIP ModifiedResNet of `config.model`, its attention-pool grid equal to the pooled
    RoI grid after res5 (pooler_resolution / 2): RN50 14 -> 7x7, RN50x4 18 -> 9x9.

    Trained from scratch, the grid is set from the pooler; with `init_checkpoint` (or an
    explicit `vision_overrides.input_resolution`) a mismatch is an error rather than a silent
    interpolation of the pretrained position embedding.
    """
    m = config.model
    kw = dict(m.vision_overrides.to_dict()) if m.vision_overrides else {}
    kw = {**tower_options(m, "remat_policy", "attention_impl"), **kw}
    p = int(m.pooler_resolution)
    if p % 2:
        raise ValueError(f"config.model.pooler_resolution={p} must be even (res5 halves it).")
    if "input_resolution" not in kw and not m.init_checkpoint:
        kw["input_resolution"] = p // 2 * 32
    tower = clip_resnet(m.vision, dtype=compute_dtype(config), remat=m.remat, **kw)
    grid = tower.input_resolution // 32
    if grid != p // 2:
        raise ValueError(
            f"config.model.pooler_resolution={p} pools {p // 2}x{p // 2} res5 grids, but the "
            f"{m.vision!r} attention pool has a {grid}x{grid} position grid (input resolution "
            f"{tower.input_resolution}); set pooler_resolution={grid * 2} (RegionCLIP: RN50 14, "
            "RN50x4 18) instead of interpolating pretrained position embeddings."
        )
    return tower


def build_model(config, *, text_vocab_size: int, eot_token_id: int | None) -> RegionCLIPDetector:
    """The detector described by `config.model` / `config.text` (random init). With an offline
    RPN (`config.model.offline_rpn`) the detector has no RPN head of its own."""
    m = config.model
    dtype = compute_dtype(config)
    text_kw = dict(m.text_overrides.to_dict()) if m.text_overrides else {}
    text_kw = {**tower_options(m, "remat_policy", "attention_impl", "scan_layers"),
               **text_kw}
    text_kw.setdefault("vocab_size", text_vocab_size)
    text_kw.setdefault("context_length", config.text.context_length)
    text = clip_text(m.text, dtype=dtype, remat=m.remat, eot_token_id=eot_token_id, **text_kw)
    return RegionCLIPDetector(
        vision=vision_tower(config),
        text=text,
        num_anchors=0 if m.offline_rpn else len(m.anchor_sizes) * len(m.anchor_aspect_ratios),
        rpn_channels=m.rpn_channels,
        pooler_resolution=m.pooler_resolution,
        pooler_sampling_ratio=m.pooler_sampling_ratio,
        freeze_at=int(m.freeze_at),
        dtype=dtype,
    )


def frozen_params(config) -> tuple[str, ...]:
    """Parameter-path patterns the optimizer freezes: detectron2 FREEZE_AT (1: the stem, 2: the
    stem and res2, ...) and, with `model.frozen_bn`, every batch-norm affine (FrozenBN)."""
    m = config.model
    pats = []
    if m.freeze_at >= 1:
        pats += [f"vision/{n}{i}" for n in ("conv", "bn") for i in (1, 2, 3)]
    pats += [f"vision/layer{stage - 1}_*" for stage in range(2, int(m.freeze_at) + 1)]
    if m.frozen_bn:
        pats += ["vision/bn[0-9]", "vision/*/bn[0-9]", "vision/*/downsample_bn"]
    return tuple(pats)


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


def training_records(exp):
    """The training records as upstream samples them: images without a non-crowd box dropped
    (detectron2 FILTER_EMPTY_ANNOTATIONS), then repeat-factor sampling when
    `data.repeat_factor_threshold` > 0 (one seeded stochastic rounding per run)."""
    config = exp.config
    records = exp.train_data.records
    kept = [r for r in records if (~np.asarray(r["iscrowd"], bool)).any()]
    if len(kept) < len(records):
        log.warning("dropped %d of %d training images without annotations",
                    len(records) - len(kept), len(records))
    if not kept:
        raise ValueError("no training image has a (non-crowd) annotation of the training "
                         "vocabulary; check config.data.train_instances and the split.")
    most = max(int((~np.asarray(r["iscrowd"], bool)).sum()) for r in kept)
    if most > int(config.data.max_boxes):
        raise ValueError(f"a training image has {most} boxes but config.data.max_boxes is "
                         f"{config.data.max_boxes}; set config.data.max_boxes >= {most}.")
    t = float(config.data.get("repeat_factor_threshold", 0.0))
    if t > 0:
        factors = lvis.repeat_factors(kept, t)
        idx = lvis.repeat_factor_indices(factors, int(config.seed))
        log.warning("repeat-factor sampling (t=%g): %d images -> %d per epoch", t, len(kept),
                    len(idx))
        kept = lvis.RepeatedRecords(kept, idx)
    return kept


def make_train_loader(exp, *, num_epochs=None):
    return detection_train_loader(exp, num_epochs=num_epochs, records=training_records(exp))


def concept_embeddings(model, variables, concept_tokens, num_templates: int):
    """[K * T, L] prompt tokens -> [K, D] normalised, template-averaged concept embeddings."""
    feats = model.apply(variables, concept_tokens, method=RegionCLIPDetector.encode_text)
    return rc_losses.concept_embeddings(feats, num_templates)


def encode_concepts(model, variables, tokens, num_templates: int) -> jnp.ndarray:
    """`concept_embeddings` of a whole vocabulary, a fixed-size chunk of concepts per jitted
    call (the last chunk zero-padded), so 1203 x 81 prompts do not go through at once."""
    tokens = np.asarray(tokens)
    k = tokens.shape[0] // num_templates
    per = max(1, min(k, _PROMPTS_PER_CALL // num_templates))
    fn = jax.jit(lambda v, t: concept_embeddings(model, v, t, num_templates))
    out = []
    for start in range(0, k, per):
        part = tokens[start * num_templates:(start + per) * num_templates]
        n = part.shape[0] // num_templates
        if n < per:
            part = np.concatenate([part, np.zeros(((per - n) * num_templates,) + part.shape[1:],
                                                  part.dtype)])
        out.append(fn(variables, jnp.asarray(part))[:n])
    return jnp.concatenate(out, axis=0)


def train_constants(exp, variables) -> dict:
    """What the step needs besides the batch: with a frozen text tower (`text.trainable` False)
    the training vocabulary's concept embeddings [K, D], computed once here; otherwise its
    prompt tokens [K * T, L] (encoded inside the step). Plus the offline RPN's variables."""
    config = exp.config
    if config.text.trainable:
        out = {"concept_tokens": jnp.asarray(exp.train_tokens)}
    else:
        out = {"concepts": encode_concepts(exp.model, variables, exp.train_tokens,
                                           len(config.text.templates))}
    if config.model.offline_rpn:
        out["offline_rpn"] = regionclip_offline.load(config)[1]
    return out


def eval_queries(exp, variables) -> dict:
    """{"concepts": [K, D] embeddings of the evaluation vocabulary (computed once), and with an
    offline RPN "offline_rpn": its variables}."""
    config = exp.config
    out = {"concepts": encode_concepts(exp.model, variables, exp.eval_tokens,
                                       len(config.text.templates))}
    if config.model.offline_rpn:
        out["offline_rpn"] = regionclip_offline.load(config)[1]
    return out


def _rpn_targets(key, anchors_, gt_boxes, gt_valid, m):
    """One image: detectron2's RPN `label_and_sample_anchors`.

    anchors_ [A,4], gt_boxes [M,4], gt_valid [M] -> (fg [A] bool, bg [A] bool: the sampled
    anchors, deltas [A,4]: regression targets (weights 1) to each anchor's matched gt).
    """
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
    """One image: detectron2's `label_and_sample_proposals` (gt boxes appended as proposals).

    Returns R = roi_batch_size_per_image entries, sampled ones first: (boxes [R,4], valid [R],
    fg [R], class targets [R] (0 background, label + 1), box targets [R,4] (box_reg_weights)).
    """
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


def rpn_losses(objectness, deltas, fg, bg, targets, batch_size_per_image: int):
    """detectron2's RPN losses: BCE over the sampled anchors and L1 (smooth L1, beta 0) over
    the foreground ones, both summed and divided by N * batch_size_per_image.

    objectness [N,A], deltas / targets [N,A,4], fg / bg [N,A] -> (cls, box) float32 scalars.
    """
    normaliser = float(objectness.shape[0] * batch_size_per_image)
    # jnp.where, not a multiply: targets of unmatched entries may be inf/NaN (padded boxes).
    cls = jnp.sum(jnp.where(
        fg | bg, loss_common.sigmoid_bce(objectness, fg.astype(jnp.float32)), 0.0)) / normaliser
    targets = jnp.where(fg[..., None], targets, 0.0)
    box = jnp.sum(jnp.where(fg, loss_common.l1(deltas, targets), 0.0)) / normaliser
    return cls, box


def box_regression_loss(deltas, targets, fg, valid):
    """detectron2's Fast R-CNN box loss: L1 over the foreground RoIs divided by the number of
    sampled RoIs (foreground and background). deltas / targets [..., R, 4], fg / valid [..., R]."""
    targets = jnp.where(fg[..., None], targets, 0.0)
    total = jnp.sum(jnp.where(fg, loss_common.l1(deltas, targets), 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1.0)


def _cls_gamma(m):
    if m.cls_loss == "focal_scaled":
        return float(m.focal_gamma)
    if m.cls_loss == "weighted_ce":
        return None
    raise ValueError(f"config.model.cls_loss={m.cls_loss!r}: use 'focal_scaled' or 'weighted_ce'.")


def _proposals(model, variables, res4, images, image_hw, offline, config, *, train: bool):
    """(proposals [N,P,4], logits [N,P], valid [N,P], objectness [N,A] / None, deltas / None)."""
    m = config.model
    if m.offline_rpn:
        return (*regionclip_offline.proposals(config, offline, images, image_hw), None, None)
    objectness, rpn_deltas = model.apply(variables, res4, method=RegionCLIPDetector.rpn)
    anchors_ = jnp.asarray(anchors(config))
    pre = m.rpn_pre_nms_topk_train if train else m.rpn_pre_nms_topk_test
    post = m.rpn_post_nms_topk_train if train else m.rpn_post_nms_topk_test
    props = jax.vmap(
        lambda o, d, hw: select_proposals(
            anchors_, o, d, hw, pre_nms_topk=pre, post_nms_topk=post,
            nms_threshold=m.rpn_nms_threshold, min_size=m.rpn_min_box_size,
        )
    )(objectness, rpn_deltas, image_hw)
    return (*props, objectness, rpn_deltas)


def train_loss(model, params, model_state, batch, constants, rng, config):
    """Total loss and metrics for one batch.

    batch: image [N,S,S,3], boxes [N,M,4], labels [N,M] (index into the training vocabulary),
    box_mask [N,M], image_hw [N,2]. constants: `train_constants` (concepts [K, D] or
    concept_tokens [K*T, L]; offline_rpn variables).
    """
    m = config.model
    variables = {"params": params, **model_state}
    if "concepts" in constants:
        concepts = jax.lax.stop_gradient(constants["concepts"])
    else:
        text_vars = variables if config.text.trainable else jax.lax.stop_gradient(variables)
        concepts = concept_embeddings(model, text_vars, constants["concept_tokens"],
                                      len(config.text.templates))

    images, gt_boxes, gt_valid = batch["image"], batch["boxes"], batch["box_mask"]
    n = images.shape[0]
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    k_rpn, k_roi = jax.random.split(rng)
    proposals, _, prop_valid, objectness, rpn_deltas = _proposals(
        model, variables, res4, images, batch["image_hw"], constants.get("offline_rpn"), config,
        train=True,
    )
    metrics = {}
    rpn_loss = 0.0
    if objectness is not None:
        anchors_ = jnp.asarray(anchors(config))
        fg, bg, rpn_targets = jax.vmap(
            lambda k, b, v: _rpn_targets(k, anchors_, b, v, m)
        )(jax.random.split(k_rpn, n), gt_boxes, gt_valid)
        rpn_cls, rpn_box = rpn_losses(objectness, rpn_deltas, fg, bg, rpn_targets,
                                      m.rpn_batch_size_per_image)
        rpn_loss = m.rpn_loss_weight * (rpn_cls + rpn_box)
        metrics.update(rpn_cls=rpn_cls, rpn_box=rpn_box)

    roi_boxes, roi_valid, roi_fg, cls_t, box_t = jax.vmap(
        lambda k, p, pv, b, lab, v: _roi_targets(k, p, pv, b, lab, v, m)
    )(jax.random.split(k_roi, n), proposals, prop_valid, gt_boxes, batch["labels"], gt_valid)

    region_emb, box_deltas = model.apply(
        variables, res4, roi_boxes, method=RegionCLIPDetector.region_features
    )
    logits = rc_losses.region_logits(region_emb, concepts, m.temperature)
    cls_loss = rc_losses.transfer_classification_loss(
        logits, cls_t, roi_valid, gamma=_cls_gamma(m), background_weight=m.background_weight
    )
    box_loss = box_regression_loss(box_deltas, box_t, roi_fg, roi_valid)
    loss = rpn_loss + cls_loss + m.box_loss_weight * box_loss
    accuracy = loss_common.masked_mean(
        (jnp.argmax(logits, -1) == cls_t).astype(jnp.float32), roi_valid & roi_fg
    )
    metrics.update(
        loss=loss, roi_cls=cls_loss, roi_box=box_loss, fg_accuracy=accuracy,
        num_fg_rois=jnp.sum(roi_fg) / n, num_proposals=jnp.sum(prop_valid) / n,
    )
    return loss, metrics


def inference_rois_per_chunk(config) -> int:
    """`config.eval.rois_per_chunk` (0 for a config written before the key existed)."""
    return int(config.eval.get("rois_per_chunk", 0))


def region_features(model, variables, res4, boxes, rois_per_chunk: int = 0):
    """`RegionCLIPDetector.region_features` at inference, in chunks of proposals.

    res4 [N, h, w, C4], boxes [N, R, 4] input pixels -> (embeddings [N, R, D] L2-normalised,
    box deltas [N, R, 4]). `rois_per_chunk` > 0 (`config.eval.rois_per_chunk`) cuts each
    image's R boxes into chunks of that many, run one after another by `lax.map` (each step
    pools N x rois_per_chunk RoIs), so the head's temporaries scale with the chunk rather than
    with N x R: the RN50 head at 14x14 keeps ~17 MB per RoI on the CPU backend, 136 GB for
    8 images x 1,000 proposals at once. The chunk is per image so that it does not depend on
    the batch size (symbolic in exported programs). The last chunk is padded with copies of
    each image's first box, dropped afterwards. 0 runs every RoI at once. No op of the head
    mixes RoIs, so chunking changes at most the summation order inside XLA's kernels.
    """
    n, r = boxes.shape[:2]
    per_image = r if rois_per_chunk <= 0 else min(r, int(rois_per_chunk))
    if per_image >= r:
        return model.apply(variables, res4, boxes, method=RegionCLIPDetector.region_features)
    chunks = -(-r // per_image)
    pad = chunks * per_image - r
    if pad:
        boxes = jnp.concatenate([boxes, jnp.broadcast_to(boxes[:, :1], (n, pad, 4))], axis=1)
    # [chunks, N, per_image, 4]: the batch axis stays where the mesh shards it inside the body.
    chunked = jnp.swapaxes(boxes.reshape(n, chunks, per_image, 4), 0, 1)
    emb, deltas = jax.lax.map(
        lambda b: model.apply(variables, res4, b, method=RegionCLIPDetector.region_features),
        chunked)

    def unchunk(x):
        return jnp.swapaxes(x, 0, 1).reshape(n, chunks * per_image, x.shape[-1])[:, :r]

    return unchunk(emb), unchunk(deltas)


def predict(model, variables, images, image_hw, queries, config):
    """Batched inference. images [N,S,S,3], image_hw [N,2], queries from `eval_queries`.

    Returns dict of boxes [N,D,4] (input pixels), scores [N,D], classes [N,D] (index into the
    concept list), valid [N,D]; D = config.eval.max_detections.
    """
    m, e = config.model, config.eval
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    proposals, prop_logits, prop_valid, _, _ = _proposals(
        model, variables, res4, images, image_hw, queries.get("offline_rpn"), config, train=False
    )
    region_emb, box_deltas = region_features(model, variables, res4, proposals,
                                             inference_rois_per_chunk(config))
    logits = rc_losses.region_logits(region_emb, queries["concepts"], m.temperature)
    probs = jax.nn.softmax(logits, -1)[..., 1:]
    if m.score == "sqrt_objectness":
        # Upstream MULTIPLY_RPN_SCORE multiplies by the raw RPN logit (negative ones turn into
        # NaN and are dropped); the sigmoid keeps every proposal and the order among positives.
        probs = jnp.sqrt(probs * jax.nn.sigmoid(prop_logits)[..., None])
    elif m.score != "softmax":
        raise ValueError(f"config.model.score={m.score!r}: use 'softmax' or 'sqrt_objectness'")
    coder = box_ops.BoxCoder(weights=tuple(m.box_reg_weights))
    boxes = coder.decode(box_deltas, proposals)
    boxes = box_ops.clip_boxes(boxes, image_hw[:, None, 0], image_hw[:, None, 1])
    return jax.vmap(lambda b, p, v: per_class_nms(b, p, v, e))(boxes, probs, prop_valid)


def per_class_nms(boxes, probs, valid, e):
    """One image, detectron2's `fast_rcnn_inference_single_image`: every (proposal, class)
    pair scoring above `e.score_threshold` is a candidate, NMS runs per class at
    `e.nms_threshold`, and the `e.max_detections` best survivors are returned.

    boxes [P,4] (class-agnostic), probs [P,K], valid [P]. `e.pre_nms_topk` > 0 keeps only that
    many best candidates before NMS (a speed knob upstream does not have); 0 = all P * K
    candidates, run per class on the shared boxes (`ops.nms.shared_box_nms`, O(P^2 + P K)
    memory).
    """
    p, k = probs.shape
    cut = int(e.pre_nms_topk)
    if not 0 < cut < p * k:
        # Every candidate (upstream): the boxes are class-agnostic, so NMS runs per class on
        # the P boxes' shared IoU instead of over P * K flattened candidates.
        ok = valid[:, None] & (probs > e.score_threshold)
        box_idx, cls, keep_valid = shared_box_nms(boxes, probs, ok, e.nms_threshold,
                                                  e.max_detections)
        return {
            "boxes": jnp.where(keep_valid[:, None], boxes[box_idx], 0.0),
            "scores": jnp.where(keep_valid, probs[box_idx, cls], 0.0),
            "classes": cls,
            "valid": keep_valid,
        }
    scores = jnp.where(valid[:, None], probs, -jnp.inf).reshape(-1)
    classes = jnp.tile(jnp.arange(k, dtype=jnp.int32), p)
    scores, top = jax.lax.top_k(scores, cut)
    flat_boxes, classes = jnp.repeat(boxes, k, axis=0)[top], classes[top]
    ok = scores > e.score_threshold
    keep, keep_valid = batched_nms(flat_boxes, scores, classes, e.nms_threshold,
                                   e.max_detections, valid=ok)
    return {
        "boxes": jnp.where(keep_valid[:, None], flat_boxes[keep], 0.0),
        "scores": jnp.where(keep_valid, scores[keep], 0.0),
        "classes": classes[keep],
        "valid": keep_valid,
    }


def classify_boxes(model, variables, images, boxes, queries, config):
    """RegionCLIP's zero-shot-with-GT-boxes protocol: class probabilities of given boxes.

    images [N,S,S,3], boxes [N,M,4] input pixels, queries from `eval_queries` -> probs [N,M,K]
    (softmax over the concepts at the config temperature; no background).
    """
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    region_emb, _ = region_features(model, variables, res4, boxes,
                                    inference_rois_per_chunk(config))
    logits = jnp.einsum("nmd,kd->nmk", region_emb, queries["concepts"]) / config.model.temperature
    return jax.nn.softmax(logits, axis=-1)

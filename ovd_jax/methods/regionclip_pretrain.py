"""RegionCLIP region-text pretraining (`config.method = "regionclip_pretrain"`).

As microsoft/RegionCLIP's `PretrainFastRCNN` runs it, per image-text batch:

1. proposals from a frozen offline RPN (`config.model.offline_rpn`, a separate RegionCLIP
   proposal run, or else the RPN head of the teacher's workdir), `model.rpn_post_nms_topk_test`
   (300) per image after NMS at `model.rpn_nms_threshold` (0.5); `pretrain.regions_per_image`
   (100) of them drawn at random;
2. the frozen teacher (`config.model.teacher`: a training workdir or a converted CLIP) embeds
   those regions (RoIAlign on its res4 -> res5 -> attention pool) and pseudo-labels them against
   the concept pool (template-ensembled text embeddings): softmax at tau 0.01, kept when the
   maximum probability exceeds 0.1;
3. the student (same architecture, initialised from the teacher, text tower frozen) embeds the
   same regions plus one whole-image "global box" per image;
4. losses (each switched and weighted by `config.pretrain`): region-concept contrastive and
   KL(teacher || student) on the kept regions, image-text contrastive between the global-box
   embeddings and the caption embeddings over the global batch.

The teacher's and the proposal network's parameters are train constants (replicated step
arguments), never part of the student's state. Evaluation is zero-shot detection with the
offline RPN's proposals (`zero_shot_detections`) and RegionCLIP's GT-box protocol.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.data import image_text
from ovd_jax.losses import regionclip as rc_losses
from ovd_jax.losses import regionclip_pretrain as pt_losses
from ovd_jax.methods import regionclip
from ovd_jax.models.layers import l2_normalize
from ovd_jax.models.regionclip import RES4_STRIDE, RegionCLIPDetector
from ovd_jax.models.rpn import select_proposals
from ovd_jax.models.scan_layout import match_layer_layout
from ovd_jax.ops import anchors as anchor_ops
from ovd_jax.training.pretrained import load_pretrained

DEVICE_KEYS = ("image", "image_hw", "valid", "caption_tokens")


def build_model(config, *, text_vocab_size: int, eot_token_id: int | None):
    """The student: the detector of `config.model` without an RPN head of its own."""
    if config.text.trainable:
        raise ValueError("region-text pretraining keeps the text tower frozen (upstream freezes "
                         "its language encoder): set config.text.trainable=False.")
    det = regionclip.build_model(config, text_vocab_size=text_vocab_size,
                                 eot_token_id=eot_token_id)
    return det.clone(num_anchors=0)


init_args = regionclip.init_args


def device_keys(config) -> tuple[str, ...]:
    return DEVICE_KEYS


def make_train_loader(exp, *, num_epochs=None):
    """Image-text batches of `config.train.batch_size` (image, image_hw, valid,
    caption_tokens)."""
    config = exp.config
    records = image_text.image_text_records(config)
    return image_text.caption_loader(config, exp.tokenizer, records, num_epochs=num_epochs,
                                     batch_size=int(config.train.batch_size))


# ------------------------------------------------------------------------------------------
# Teacher, proposals and concepts (train constants / evaluation queries)


def _subtrees(variables: dict, names) -> dict:
    out = {}
    for collection, tree in variables.items():
        kept = {k: v for k, v in tree.items() if k in names}
        if kept:
            out[collection] = kept
    return out


def teacher_constants(exp, variables) -> dict:
    """{"teacher": the teacher's vision + text (+ RPN head) variables, shaped for the student
    module, "anchors": [A, 4] anchors of its RPN (absent with config.model.offline_rpn), and
    "offline_rpn": the offline RPN's variables (with config.model.offline_rpn)}."""
    config = exp.config
    if not config.model.teacher:
        raise ValueError("region-text pretraining needs a teacher: --config.model.teacher=<a "
                         "CLIP teacher workdir or a converted CLIP checkpoint>.")
    loaded = load_pretrained(config.model.teacher)
    # A teacher saved with the other layer layout (config.model.scan_layers) is converted.
    teacher = match_layer_layout(_subtrees(loaded.variables, ("vision", "text", "rpn_head")),
                                 variables)
    # The student module's region path also runs its (unused here) box head: give it the
    # student's initial one so the teacher tree fits the module.
    teacher["params"]["box_head"] = jax.device_get(variables["params"]["box_head"])
    check = jax.tree.map(np.shape, _subtrees(variables, ("vision", "text")))
    got = jax.tree.map(np.shape, _subtrees(teacher, ("vision", "text")))
    if check != got:
        raise ValueError(f"the teacher {config.model.teacher} does not have the student's "
                         "architecture (config.model.vision / text and their overrides); the "
                         "student is initialised from it, so they must match.")
    out = {"teacher": teacher}
    if config.model.offline_rpn:
        from ovd_jax.methods import regionclip_offline  # noqa: PLC0415

        out["offline_rpn"] = regionclip_offline.load(config)[1]
    else:
        if "rpn_head" not in teacher["params"]:
            raise ValueError(
                f"the teacher {config.model.teacher} has no RPN head to propose regions: set "
                "config.model.offline_rpn to a proposal run (configs/regionclip.py:...,rpn), or "
                "train the teacher with config.clip.train_rpn=True.")
        out["anchors"] = jnp.asarray(teacher_anchors(loaded.config, config))
    return out


def teacher_anchors(run_config: dict, config) -> np.ndarray:
    """[A, 4] anchors of the teacher run's RPN (its config's anchor sizes and ratios) on this
    config's input canvas."""
    m = run_config.get("model", {})
    sizes = tuple(m.get("anchor_sizes", config.model.anchor_sizes))
    ratios = tuple(m.get("anchor_aspect_ratios", config.model.anchor_aspect_ratios))
    h, w = regionclip.feature_hw(config)
    return anchor_ops.generate_anchors([(h, w)], [RES4_STRIDE], [sizes], ratios)


def concept_embeddings(exp, teacher_variables) -> jnp.ndarray:
    """[K, D] template-ensembled, normalised embeddings of the concept pool (teacher text)."""
    config = exp.config
    records = image_text.image_text_records(config)
    concepts = image_text.concept_pool(config, records)
    tokens = exp.tokenizer(
        [t.format(c) for c in concepts for t in config.text.templates])
    return regionclip.encode_concepts(exp.model, teacher_variables, tokens,
                                      len(config.text.templates))


def train_constants(exp, variables) -> dict:
    """The teacher (+ proposal network) variables and the concept pool's embeddings."""
    out = teacher_constants(exp, variables)
    out["concepts"] = concept_embeddings(exp, out["teacher"])
    return out


def eval_queries(exp, variables) -> dict:
    """{"concepts": evaluation vocabulary [K, D]} + the proposal network (teacher RPN or
    offline RPN), for zero-shot detection with the student's region embeddings."""
    out = teacher_constants(exp, variables)
    out["concepts"] = regionclip.encode_concepts(exp.model, variables, exp.eval_tokens,
                                                 len(exp.config.text.templates))
    return out


# ------------------------------------------------------------------------------------------
# Step pieces


def proposal_settings(config, *, train: bool) -> dict:
    """Offline-RPN settings: `config.pretrain.proposal_*` in pretraining (300 after NMS 0.5),
    the detector's test-time `model.rpn_*` values in (zero-shot) evaluation."""
    m = config.model
    if train:
        p = config.pretrain
        return dict(pre_nms_topk=int(p.proposal_pre_nms_topk),
                    post_nms_topk=int(p.proposals_per_image),
                    nms_threshold=float(p.proposal_nms_threshold))
    return dict(pre_nms_topk=int(m.rpn_pre_nms_topk_test),
                post_nms_topk=int(m.rpn_post_nms_topk_test),
                nms_threshold=float(m.rpn_nms_threshold))


def rpn_proposals(model, variables, images, image_hw, anchors, *, pre_nms_topk: int,
                  post_nms_topk: int, nms_threshold: float, min_size: float = 0.0):
    """Frozen proposals of a model with an RPN head: (boxes [N,P,4], logits [N,P], valid [N,P]),
    P = post_nms_topk. images [N,S,S,3], image_hw [N,2], anchors [A,4]."""
    variables = jax.lax.stop_gradient(variables)
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    objectness, deltas = model.apply(variables, res4, method=RegionCLIPDetector.rpn)
    anchors = jnp.asarray(anchors)
    return jax.vmap(lambda o, d, hw: select_proposals(
        anchors, o, d, hw, pre_nms_topk=pre_nms_topk, post_nms_topk=post_nms_topk,
        nms_threshold=nms_threshold, min_size=min_size))(objectness, deltas, image_hw)


def proposals(model, constants, images, image_hw, config, *, train: bool):
    """Offline-RPN proposals (boxes [N,P,4], logits [N,P], valid [N,P]), no gradients; the
    counts and NMS threshold of `proposal_settings`."""
    settings = proposal_settings(config, train=train)
    min_size = float(config.model.get("rpn_min_box_size", 0.0))
    if config.model.offline_rpn:
        from ovd_jax.methods import regionclip_offline  # noqa: PLC0415

        cfg = config.copy_and_resolve_references()  # the offline RPN reads model.rpn_*_test
        cfg.model.rpn_pre_nms_topk_test = settings["pre_nms_topk"]
        cfg.model.rpn_post_nms_topk_test = settings["post_nms_topk"]
        cfg.model.rpn_nms_threshold = settings["nms_threshold"]
        return regionclip_offline.proposals(cfg, constants["offline_rpn"], images, image_hw)
    # The student class with the teacher's RPN head, sized from its (static) parameter shapes.
    rpn = constants["teacher"]["params"]["rpn_head"]
    teacher_model = model.clone(num_anchors=rpn["objectness"]["kernel"].shape[-1],
                                rpn_channels=rpn["conv"]["kernel"].shape[-1])
    return rpn_proposals(teacher_model, constants["teacher"], images, image_hw,
                         constants["anchors"], min_size=min_size, **settings)


def sample_regions(key, boxes, valid, num: int):
    """Up to `num` of one image's valid proposals drawn uniformly without replacement
    (upstream's randperm[:100]); boxes [P,4], valid [P] -> ([num,4], [num] bool)."""
    order = jnp.argsort(jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0))[:num]
    return boxes[order], valid[order]


def train_loss(model, params, model_state, batch, constants, rng, config):
    """Region-text pretraining loss for one image-text batch (see module docstring).

    batch: image [N,S,S,3], image_hw [N,2], valid [N], caption_tokens [N,L]. constants:
    `train_constants`. Returns (weighted sum of the enabled losses, metrics).
    """
    p = config.pretrain
    images, valid_img = batch["image"], batch["valid"]
    n, s = images.shape[0], images.shape[1]
    variables = {"params": params, **model_state}
    teacher = jax.lax.stop_gradient(constants["teacher"])
    concepts = jax.lax.stop_gradient(constants["concepts"])

    boxes, _, prop_valid = proposals(model, constants, images, batch["image_hw"], config,
                                     train=True)
    boxes, region_valid = jax.vmap(lambda k, b, v: sample_regions(k, b, v, p.regions_per_image))(
        jax.random.split(rng, n), boxes, prop_valid)
    region_valid = region_valid & valid_img[:, None]

    t_res4 = model.apply(teacher, images, method=RegionCLIPDetector.backbone)
    t_emb, _ = model.apply(teacher, t_res4, boxes, method=RegionCLIPDetector.region_features)
    labels, keep, t_probs = pt_losses.pseudo_labels(
        jax.lax.stop_gradient(t_emb), concepts, region_valid,
        temperature=p.teacher_temperature, threshold=p.concept_threshold)

    # The global box covers the padded input canvas, as upstream's covers the padded tensor.
    global_box = jnp.broadcast_to(jnp.asarray([0.0, 0.0, s, s], jnp.float32), (n, 1, 4))
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    emb, _ = model.apply(variables, res4, jnp.concatenate([boxes, global_box], axis=1),
                         method=RegionCLIPDetector.region_features)
    s_emb, g_emb = emb[:, :-1], emb[:, -1]

    metrics = {}
    loss = 0.0
    if p.use_region_concept:
        rc = pt_losses.region_concept_contrastive(s_emb, concepts, labels, keep, p.temperature)
        loss = loss + p.region_concept_weight * rc
        metrics["loss_region_concept"] = rc
    if p.use_distillation:
        kl = pt_losses.distillation_kl(s_emb, t_probs, concepts, keep, p.temperature)
        loss = loss + p.distillation_weight * kl
        metrics["loss_distillation"] = kl
    if p.use_image_text:
        text_vars = jax.lax.stop_gradient(variables)  # the language encoder stays frozen
        txt = l2_normalize(model.apply(text_vars, batch["caption_tokens"],
                                       method=RegionCLIPDetector.encode_text))
        it = pt_losses.image_text_contrastive(g_emb, txt, p.temperature, valid=valid_img)
        loss = loss + p.image_text_weight * it
        metrics["loss_image_text"] = it
    s_labels = jnp.argmax(jnp.einsum("nrd,kd->nrk", s_emb, concepts), -1)
    kept = jnp.maximum(jnp.sum(keep), 1)
    metrics.update(
        loss=loss,
        kept_regions=jnp.sum(keep) / jnp.maximum(jnp.sum(region_valid), 1),
        student_teacher_agreement=jnp.sum((s_labels == labels) & keep) / kept,
        proposals_per_image=jnp.sum(prop_valid) / n,
    )
    return loss, metrics


# ------------------------------------------------------------------------------------------
# Zero-shot inference


def zero_shot_detections(model, variables, images, image_hw, props, concepts, config):
    """Detections from given proposals: each proposal's region embedding vs the concepts
    (softmax over [background logit 0, cos / temperature], as the transfer detector scores),
    `config.model.score` ("sqrt_objectness": sqrt(p * sigmoid(rpn logit))), the proposal boxes
    unchanged (no trained box regressor: upstream's zero-shot inference skips box deltas too),
    class-aware NMS. Returns boxes / scores / classes / valid [N, D]."""
    m = config.model
    boxes, logits_rpn, valid = props
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    emb, _ = regionclip.region_features(model, variables, res4, boxes,
                                        regionclip.inference_rois_per_chunk(config))
    probs = jax.nn.softmax(rc_losses.region_logits(emb, concepts, m.temperature), -1)[..., 1:]
    if m.score == "sqrt_objectness":
        probs = jnp.sqrt(probs * jax.nn.sigmoid(logits_rpn)[..., None])
    elif m.score != "softmax":
        raise ValueError(f"config.model.score={m.score!r}: use 'softmax' or 'sqrt_objectness'")
    return jax.vmap(lambda b, pr, v: regionclip.per_class_nms(b, pr, v, config.eval))(
        boxes, probs, valid)


def predict(model, variables, images, image_hw, queries, config):
    """Zero-shot detection with the student's region embeddings and the offline proposals."""
    props = proposals(model, queries, images, image_hw, config, train=False)
    return zero_shot_detections(model, variables, images, image_hw, props, queries["concepts"],
                                config)


classify_boxes = regionclip.classify_boxes

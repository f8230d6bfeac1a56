"""DetCLIPv2: joint training on detection, grounding and image-text pairs (unified examples).

Data types (`data_types(config)`, drawn one whole batch at a time by `config.train.schedule`;
each has its own global batch size `config.train.batch_sizes.<type>`, resolution, device keys
and compiled train step):

    detection   image at config.data.image_size, boxes, positive + negative class concepts
                (enriched with definitions); loss = L_align + alpha L_reg + beta L_center
    grounding   same resolution, the caption's box phrases + negative phrases; loss = L_align
    image_text  image at config.image_text.image_size (low), the caption's noun phrases, no
                boxes; loss = lambda L_cts (proposals by max concept similarity, NMS, top-k;
                text->image set-similarity contrastive over the global batch)

Inference: the evaluation vocabulary's enriched names are encoded once (`eval_queries`); per
image every anchor scores sqrt(sigmoid(alignment logit) * sigmoid(centerness)) for every class,
the best `eval.pre_nms_topk` (anchor, class) pairs go through class-aware NMS, and the first
`eval.max_detections` are kept.

Shapes: N images, S side, A anchors, K concepts per image, L tokens, G boxes, D text width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.data import captions as captions_lib
from ovd_jax.data import image_text as image_text_data
from ovd_jax.data import unified
from ovd_jax.data.grounding import aligned_tokens_positive
from ovd_jax.data.pipeline import (
    WorkerLock,
    loader_options,
    make_caption_loader,
    make_detection_loader,
    resize_options,
)
from ovd_jax.losses import detclipv2 as losses
from ovd_jax.methods import glip as glip_method
from ovd_jax.methods.base import compute_dtype, tower_options
from ovd_jax.models import bert as bert_lib
from ovd_jax.models.detclipv2 import ATSSConceptHead, DetCLIPv2Detector
from ovd_jax.models.fpn import FPN
from ovd_jax.ops import anchors as anchor_ops
from ovd_jax.ops.nms import batched_nms

DATA_TYPES = ("detection", "grounding", "image_text")
_BOX_KEYS = ("image", "boxes", "box_mask", "box_valid", "box_concepts", "image_hw",
             *unified.CONCEPT_KEYS)
_DEVICE_KEYS = {"detection": _BOX_KEYS, "grounding": _BOX_KEYS,
                "image_text": ("image", "image_hw", "valid", *unified.CONCEPT_KEYS)}
# Concepts encoded per text-tower call when embedding an evaluation vocabulary.
_CONCEPTS_PER_CALL = 1024


# ----------------------------------------------------------------------------------------------
# Model


def build_model(config, *, text_vocab_size: int, eot_token_id: int | None) -> DetCLIPv2Detector:
    """The detector of `config.model` (random init); BERT's vocabulary is the tokenizer's."""
    del eot_token_id  # concepts are pooled over all their tokens (or read at [CLS])
    m = config.model
    dtype = compute_dtype(config)
    bert_kw = dict(m.bert.to_dict(), vocab_size=int(text_vocab_size))
    if int(config.text.context_length) > bert_kw["max_position_embeddings"]:
        raise ValueError(f"config.text.context_length={config.text.context_length} exceeds the "
                         f"text encoder's {bert_kw['max_position_embeddings']} positions; lower "
                         "it or raise config.model.bert.max_position_embeddings.")
    bert_cfg = bert_lib.BertConfig(**bert_kw)
    n_in = len(m.backbone_levels)
    return DetCLIPv2Detector(
        backbone=glip_method._backbone(m, dtype),
        fpn=FPN(out_channels=m.channels, num_inputs=n_in, num_extra_levels=len(m.strides) - n_in,
                p6_from="p5", dtype=dtype),
        text_encoder=bert_lib.BertEncoder(
            bert_cfg, remat=m.remat, **tower_options(m, "remat_policy", "scan_layers"),
            dtype=dtype),
        head=ATSSConceptHead(channels=m.channels, embed_dim=bert_cfg.hidden_size,
                             num_levels=len(m.strides), num_convs=m.num_convs,
                             gn_groups=m.gn_groups, deform_cls=m.deform_cls, dtype=dtype),
        backbone_levels=tuple(m.backbone_levels), num_levels=len(m.strides),
        text_pooling=m.text_pooling, logit_scale_init=math.log(float(m.logit_scale_init)),
        dtype=dtype,
    )


def anchors(config, image_size: int | None = None) -> tuple[np.ndarray, list[int]]:
    """ATSS anchors for a square input of `image_size` (default config.data.image_size):
    ([A, 4] input pixels, per-level counts), one square anchor of side anchor_scale x stride per
    location, centred on its cell (the layout of `ovd_jax.methods.glip.anchors`)."""
    m = config.model
    s = int(config.data.image_size if image_size is None else image_size)
    strides = [int(v) for v in m.strides]
    nb = len(m.backbone_levels)
    if s % strides[nb - 1]:
        raise ValueError(f"input size {s} must be a multiple of {strides[nb - 1]} (the coarsest "
                         "backbone stride); fix config.data.image_size / image_text.image_size.")
    shapes = [(s // st, s // st) for st in strides[:nb]]
    for _ in strides[nb:]:  # stride-2 SAME convs: ceil of half the previous level
        shapes.append((math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)))
    sizes = [[float(m.anchor_scale) * st] for st in strides]
    a = anchor_ops.generate_anchors(shapes, strides, sizes, (1.0,), offset=0.5)
    return a, [h * w for h, w in shapes]


def init_args(config):
    """Dummy inputs for `model.init`: one image, one concept."""
    s, length = int(config.data.image_size), int(config.text.context_length)
    return (jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, 1, length), jnp.int32),
            jnp.ones((1, 1, length), bool))


def data_types(config) -> tuple[str, ...]:
    """The data types `config.train.schedule` draws, in first-appearance order."""
    kinds = tuple(dict.fromkeys(config.train.schedule))
    unknown = sorted(set(kinds) - set(DATA_TYPES))
    if unknown or not kinds:
        raise ValueError(f"config.train.schedule={tuple(config.train.schedule)} must list data "
                         f"types from {DATA_TYPES}.")
    return kinds


def device_keys(config, data_type: str = "detection") -> tuple[str, ...]:
    return _DEVICE_KEYS[data_type]


def batch_size(config, data_type: str) -> int:
    """Global batch size of one data type (`config.train.batch_sizes`)."""
    return int(config.train.batch_sizes[data_type])


# ----------------------------------------------------------------------------------------------
# Training data


def _class_texts(exp) -> list[str]:
    """Training classes as concept texts (name, or "name, definition")."""
    defs = None
    if exp.config.data.use_definitions:
        by_name = {c["name"]: c.get("def") for c in exp.train_data.categories}
        if all(by_name.get(n) for n in exp.train_classes):
            defs = [by_name[n] for n in exp.train_classes]
    return unified.concept_texts(exp.train_classes, defs, defs is not None)


def _flip_words(text: str) -> str:
    """A mirrored image's phrase: "left" and "right" swapped."""
    return glip_method.swap_left_right(text, [])[0]


def _box_extra(exp, kind: str, negative_pool: list[str]):
    """Per-image hook adding concepts and box targets (detection or grounding records)."""
    d = exp.config.data
    k, num_neg = int(d.max_concepts), int(d.num_negatives)
    class_texts = _class_texts(exp) if kind == "detection" else None
    tokenizer, lock = exp.tokenizer, WorkerLock()  # HF tokenizers: one call at a time

    def extra(example, record, rng):
        if kind == "detection":
            texts, targets, ok = unified.detection_concepts(
                example["labels"], example["box_mask"], class_texts, rng, max_concepts=k,
                num_negatives=num_neg)
        else:
            spans = aligned_tokens_positive(record, int(d.max_boxes))
            caption = record["caption"]
            texts, targets, ok = unified.grounding_concepts(
                caption, spans, example["box_mask"], rng, negative_pool, max_concepts=k,
                num_negatives=num_neg)
            if bool(example["flipped"]):
                texts = [_flip_words(t) for t in texts]
        with lock:
            out = unified.encode_concepts(tokenizer, texts, k)
        return dict(out, box_concepts=targets, box_valid=ok)

    return extra


def _box_loader(exp, kind, records, cat_map, negative_pool, num_epochs):
    config = exp.config
    per_process = batch_size(config, kind) // jax.process_count()
    return make_detection_loader(
        records, batch_size=per_process, image_size=config.data.image_size,
        max_boxes=config.data.max_boxes, cat_id_to_index=cat_map, train=True, seed=config.seed,
        hflip=config.data.hflip, num_epochs=num_epochs, shard_index=jax.process_index(),
        shard_count=jax.process_count(), extra=_box_extra(exp, kind, negative_pool),
        on_bad_image=config.data.get("on_bad_image", "error"),
        **resize_options(config.data, train=True), **loader_options(config.data),
    )


def _image_text_loader(exp, num_epochs):
    config = exp.config
    it = config.image_text
    records = image_text_data.image_text_records(config)
    parser = captions_lib.load_parser(it.concept_parser)
    k = int(it.concepts_per_caption)
    tokenizer, lock = exp.tokenizer, WorkerLock()

    def tokenize(caption: str) -> dict:
        texts = unified.image_text_concepts(caption, max_concepts=k, parser=parser,
                                            include_caption=bool(it.include_caption))
        with lock:
            return unified.encode_concepts(tokenizer, texts, k)

    return make_caption_loader(
        records, batch_size=batch_size(config, "image_text") // jax.process_count(),
        image_size=int(it.image_size), tokenize=tokenize, train=True, seed=config.seed,
        hflip=bool(it.hflip), num_epochs=num_epochs, shard_index=jax.process_index(),
        shard_count=jax.process_count(), on_bad_image=config.data.get("on_bad_image", "error"),
        **loader_options(config.data),
    )


def negative_dictionary(exp, grounding_records) -> list[str]:
    """The concept dictionary grounding negatives are sampled from (`data.negative_dictionary`):
    the grounding corpus's distinct box phrases, and with "captions" also the training class
    names and the image-text captions' frequent noun phrases (`image_text_data.concept_pool`).
    """
    config = exp.config
    kind = config.data.negative_dictionary
    if kind not in ("grounding", "captions"):
        raise ValueError(f"config.data.negative_dictionary={kind!r}: use 'grounding' or "
                         "'captions'.")
    pool = {unified.phrase_text(r["caption"], s) for r in grounding_records
            for s in r["tokens_positive"] if s}
    if kind == "captions":
        pool |= {" ".join(n.lower().split()) for n in exp.train_classes}
        records = image_text_data.image_text_records(config)
        pool |= set(image_text_data.concept_pool(config, records))
    return sorted(pool)


def make_train_loader(exp, *, num_epochs=None) -> unified.MixedLoader:
    """One loader per scheduled data type, drawn in `config.train.schedule` order."""
    config = exp.config
    kinds = data_types(config)
    loaders = {}
    if "detection" in kinds:
        loaders["detection"] = _box_loader(exp, "detection", exp.train_data.records,
                                           exp.train_cat_id_to_index, [], num_epochs)
    if "grounding" in kinds:
        records = glip_method.grounding_train_records(config)
        if not records:
            raise ValueError("config.train.schedule draws 'grounding' but there are no grounding "
                             "records (config.data.grounding_train / grounding_copies); remove "
                             "it from the schedule or give grounding data.")
        pool = negative_dictionary(exp, records)
        loaders["grounding"] = _box_loader(exp, "grounding", records,
                                           {glip_method._NO_CLASS: glip_method._NO_CLASS},
                                           pool, num_epochs)
    if "image_text" in kinds:
        loaders["image_text"] = _image_text_loader(exp, num_epochs)
    return unified.MixedLoader(loaders, config.train.schedule)


def train_constants(exp, variables) -> dict:
    """Nothing: every image brings its own concepts."""
    return {}


# ----------------------------------------------------------------------------------------------
# Losses


def train_loss(model, params, model_state, batch, constants, rng, config,
               data_type: str = "detection"):
    """The loss of one batch of `data_type` (see the module docstring); returns (loss, metrics)
    with metric names prefixed by the data type."""
    del constants
    m = config.model
    variables = {"params": params, **model_state}
    out = model.apply(variables, batch["image"], batch["concept_ids"], batch["concept_mask"],
                      deterministic=False, rngs={"dropout": rng})
    anchors_, per_level = anchors(config, batch["image"].shape[1])
    if anchors_.shape[0] != out["region_emb"].shape[1]:
        raise ValueError(f"the model gives {out['region_emb'].shape[1]} anchors but the anchor "
                         f"generator {anchors_.shape[0]}; config.model.strides must list the "
                         "FPN levels.")
    if data_type == "image_text":
        boxes = glip_method.decode_boxes(out["box_deltas"], jnp.asarray(anchors_),
                                         batch["image_hw"])
        terms = losses.image_text_loss(
            out["region_emb"], boxes, out["concept_emb"], batch["concept_valid"],
            batch["valid"], num_proposals=m.num_proposals, nms_threshold=m.proposal_nms,
            pre_nms_topk=m.proposal_pre_nms_topk, aggregation=m.set_similarity,
            tau_t=m.tau_t, temperature=m.cts_temperature)
        loss = m.cts_weight * terms["cts"]
        kept = jnp.sum(terms["proposal_valid"]) / batch["image"].shape[0]
        return loss, {"loss": loss, "image_text/cts": terms["cts"],
                      "image_text/proposals_per_image": kept}
    terms = losses.concept_atss_loss(
        anchors_, per_level, out["logits"], out["box_deltas"], out["centerness"],
        batch["boxes"], batch["box_mask"] & batch["box_valid"], batch["box_concepts"],
        batch["concept_valid"], alpha=m.focal_alpha, gamma=m.focal_gamma, topk=m.atss_topk,
        reg_weight=m.reg_loss_weight, center_weight=m.center_loss_weight)
    if data_type == "detection":
        loss = terms["align"] + terms["reg"] + terms["center"]
    else:  # grounding: L_align only
        loss = terms["align"]
    metrics = {"loss": loss, f"{data_type}/align": terms["align"],
               f"{data_type}/num_pos_per_image": terms["num_pos"] / batch["image"].shape[0]}
    if data_type == "detection":
        metrics.update({"detection/reg": terms["reg"], "detection/center": terms["center"]})
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Inference


def vocabulary_texts(exp) -> list[str]:
    """The evaluation vocabulary as concept texts (enriched when definitions are known)."""
    v = exp.eval_vocab
    return unified.concept_texts(v.class_names, v.definitions,
                                 bool(exp.config.data.use_definitions) and bool(v.definitions)
                                 and all(v.definitions))


def encode_vocabulary(exp, variables, texts: list[str]) -> jnp.ndarray:
    """Concept texts -> normalised embeddings [K, D] (the text tower run in chunks)."""
    ids, mask = exp.tokenizer.encode(texts)
    fn = jax.jit(lambda v, i, k: exp.model.apply(v, i, k,
                                                 method=DetCLIPv2Detector.encode_concepts))
    parts = [fn(variables, jnp.asarray(ids[s:s + _CONCEPTS_PER_CALL]),
                jnp.asarray(mask[s:s + _CONCEPTS_PER_CALL]))
             for s in range(0, len(texts), _CONCEPTS_PER_CALL)]
    return jnp.concatenate(parts, axis=0)


def eval_queries(exp, variables) -> dict:
    """{"concept_emb": [K, D]} of the evaluation vocabulary (computed once)."""
    return {"concept_emb": encode_vocabulary(exp, variables, vocabulary_texts(exp))}


def _image_detections(boxes, scores, e):
    """One image: boxes [A,4], scores [A,K] -> class-aware NMS'ed top `max_detections`."""
    a, k = scores.shape
    top, idx = jax.lax.top_k(scores.reshape(-1), min(int(e.pre_nms_topk), a * k))
    cand_boxes, cand_classes = boxes[idx // k], (idx % k).astype(jnp.int32)
    keep, ok = batched_nms(cand_boxes, top, cand_classes, float(e.nms_threshold),
                           int(e.max_detections), valid=top > float(e.score_threshold))
    return {"boxes": cand_boxes[keep], "scores": jnp.where(ok, top[keep], 0.0),
            "classes": cand_classes[keep], "valid": ok}


def predict(model, variables, images, image_hw, queries, config):
    """images [N,S,S,3], image_hw [N,2], queries from `eval_queries` -> boxes [N,D,4] (input
    pixels, clipped), scores [N,D], classes [N,D], valid [N,D]; D = config.eval.max_detections."""
    out = model.apply(variables, images, method=DetCLIPv2Detector.regions)
    logits = model.apply(variables, out["region_emb"], queries["concept_emb"],
                         method=DetCLIPv2Detector.align_logits)
    scores = jnp.sqrt(jax.nn.sigmoid(logits) * jax.nn.sigmoid(out["centerness"])[..., None])
    anchors_ = jnp.asarray(anchors(config, images.shape[1])[0])
    boxes = glip_method.decode_boxes(out["box_deltas"], anchors_, image_hw)
    return jax.vmap(lambda b, s: _image_detections(b, s, config.eval))(boxes, scores)


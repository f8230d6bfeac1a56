"""GLIP: detection as phrase grounding. Model construction, the training loss, chunked inference.

Training: every image gets its own prompt. A detection record gets GLIP's detection prompt (its
classes plus sampled negative class names, shuffled, joined by ". "); a phrase-grounding record
(one carrying `caption` and per-box `tokens_positive`) uses its caption. Either way the target is
a box x token positive map, and the loss is GLIP's ATSS loss (token focal loss, GIoU, centerness).

Inference: the evaluation vocabulary is split into prompts that fit the context length
(`vocabulary_chunks`); the text tower runs once per chunk (`eval_queries`), the image tower once
per image, and fusion + head once per (image, chunk) under `lax.map`. Each chunk's class scores
(mean of the class's token sigmoids, times the centerness, square-rooted) give its top
`eval.pre_nms_topk` candidates; the chunks' candidates are concatenated and a class-aware NMS
keeps `eval.max_detections`. Since a class lives in exactly one chunk, this equals running NMS
per chunk and merging.

Shapes: N images, S input side, A anchors (one per FPN location), L tokens, M padded boxes,
C chunks, Kc classes per chunk, P phrases.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.data import grounding as grounding_data
from ovd_jax.data import transforms
from ovd_jax.data.pipeline import WorkerLock
from ovd_jax.losses import glip as glip_losses
from ovd_jax.methods.base import compute_dtype, detection_train_loader, tower_options
from ovd_jax.models import bert as bert_lib
from ovd_jax.models import clip_resnet, swin
from ovd_jax.models.dyhead import DyConv
from ovd_jax.models.fpn import FPN
from ovd_jax.models.fusion import VLFuse
from ovd_jax.models.glip import GLIPDetector
from ovd_jax.ops import anchors as anchor_ops
from ovd_jax.ops import boxes as box_ops
from ovd_jax.ops.nms import batched_nms
from ovd_jax.text import grounding as gtext
from ovd_jax.training import sharding as shd

DEVICE_KEYS = ("image", "boxes", "box_mask", "box_valid", "image_hw", "token_ids", "token_mask",
               "box_positive_map")

# Swin-L as GLIP-L uses it (swin_large_patch4_window12_384_22k): not a torchvision preset.
_SWIN_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12,
               stochastic_depth_prob=0.4)


# ----------------------------------------------------------------------------------------------
# Model


def _backbone(m, dtype):
    kw = dict(m.backbone_overrides.to_dict()) if m.backbone_overrides else {}
    if m.backbone in ("swin_t", "swin_s", "swin_b", "swin_l"):
        # GLIP's detection backbone: an output LayerNorm per stage, shifts kept when the window
        # covers the map, no classifier.
        base = dict(num_classes=0, out_norms=(True,) * 4, skip_shift_if_window_covers=False,
                    remat=m.remat, dtype=dtype)
        if m.backbone == "swin_l":
            return swin.SwinTransformer(**{**_SWIN_L, **base, **kw})
        if m.backbone == "swin_t":
            base["stochastic_depth_prob"] = 0.2
        return swin.swin(m.backbone, **{**base, **kw})
    kw = {**tower_options(m, "remat_policy", "attention_impl"), **kw}
    return clip_resnet.clip_resnet(m.backbone, dtype=dtype, remat=m.remat, **kw)


def build_model(config, *, text_vocab_size: int, eot_token_id: int | None) -> GLIPDetector:
    """The detector described by `config.model` (random init). `text_vocab_size` sets BERT's
    embedding rows when it differs from the config's (the synthetic WordPiece vocabulary)."""
    del eot_token_id  # BERT reads every token; there is no EOT pooling
    if not config.text.trainable:
        raise ValueError("config.text.trainable=False does not apply to GLIP (its text stream "
                         "is fused with the image); freeze the language tower with "
                         "config.optim.frozen=('language_backbone',) instead.")
    m = config.model
    dtype = compute_dtype(config)
    bert_kw = m.bert.to_dict()
    bert_kw["vocab_size"] = int(text_vocab_size)
    if int(config.text.context_length) > bert_kw["max_position_embeddings"]:
        raise ValueError(
            f"config.text.context_length={config.text.context_length} exceeds the BERT position "
            f"table ({bert_kw['max_position_embeddings']}); lower it or raise "
            "config.model.bert.max_position_embeddings.")
    bert_cfg = bert_lib.BertConfig(**bert_kw)
    n = int(m.num_fusion_layers)
    dt = dict(dtype=dtype)
    fuse, lang = (), ()
    if m.early_fusion:
        fuse = tuple(
            VLFuse(embed_dim=m.fusion_embed_dim, num_heads=m.fusion_heads,
                   dropout=m.fusion_dropout, drop_path=m.fusion_drop_path,
                   init_values=1.0 / max(n, 1), **dt)
            for _ in range(n)
        )
        lang = tuple(bert_lib.BertLayer(bert_cfg, **dt) for _ in range(n))
    dyconv = tuple(
        DyConv(out_channels=m.channels, use_gn=m.dyhead_use_gn, gn_groups=m.gn_groups,
               use_dyrelu=m.dyhead_use_dyrelu, use_deform=m.dyhead_use_deform,
               use_dyfuse=m.dyhead_use_dyfuse, coarser_offsets=m.dyhead_coarser_offsets, **dt)
        for _ in range(n)
    )
    n_in = len(m.backbone_levels)
    fpn = FPN(out_channels=m.channels, num_inputs=n_in, num_extra_levels=len(m.strides) - n_in,
              p6_from="p5", drop_block_prob=m.fpn_drop_block_prob, **dt)
    return GLIPDetector(
        backbone=_backbone(m, dtype),
        fpn=fpn,
        language_backbone=bert_lib.BertEncoder(
            bert_cfg, remat=m.remat, **tower_options(m, "remat_policy", "scan_layers"),
            **dt),
        fuse=fuse, lang_layers=lang, dyconv=dyconv,
        backbone_levels=tuple(m.backbone_levels), num_levels=len(m.strides),
        channels=int(m.channels), text_dim=bert_cfg.hidden_size,
        log_scale_init=float(m.log_scale_init), **dt,
    )


def level_shapes(config) -> list[tuple[int, int]]:
    """(H, W) of every FPN level for a square input of `config.data.image_size`.

    Backbone levels are S / stride (S must be a multiple of the largest backbone stride); the
    extra levels are stride-2 convolutions with SAME padding, i.e. ceil of half the previous.
    """
    s = int(config.data.image_size)
    strides = [int(v) for v in config.model.strides]
    n_backbone = len(config.model.backbone_levels)
    top = strides[n_backbone - 1]
    if s % top:
        raise ValueError(f"config.data.image_size={s} must be a multiple of {top} (the coarsest "
                         "backbone stride).")
    shapes = [(s // st, s // st) for st in strides[:n_backbone]]
    for _ in strides[n_backbone:]:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def anchors(config) -> tuple[np.ndarray, list[int]]:
    """ATSS anchors: ([A, 4] input pixels, per-level counts). One square anchor of side
    anchor_scale x stride per location, centred on the location's cell (upstream centres them
    at (stride - 1) / 2 in its "+1" pixel convention, the same point)."""
    m = config.model
    shapes = level_shapes(config)
    strides = [int(v) for v in m.strides]
    sizes = [[float(m.anchor_scale) * st] for st in strides]
    a = anchor_ops.generate_anchors(shapes, strides, sizes, (1.0,), offset=0.5)
    return a, [h * w for h, w in shapes]


def init_args(config):
    """Dummy inputs for `model.init` (one image, one prompt)."""
    s, length = int(config.data.image_size), int(config.text.context_length)
    return (jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, length), jnp.int32),
            jnp.ones((1, length), bool))


def device_keys(config) -> tuple[str, ...]:
    return DEVICE_KEYS


# ----------------------------------------------------------------------------------------------
# Training data: detection prompts + phrase grounding


def swap_left_right(caption: str, spans_per_box: list) -> tuple[str, list]:
    """A mirrored image's caption: the words "left" and "right" swapped, every [start, end)
    character span moved to index the new text (the two words differ in length).

    spans_per_box: per box a list of [start, end] spans, or None (kept as None).
    """
    edits = [(mt.start(), mt.end(), "right" if mt.group(0) == "left" else "left")
             for mt in re.finditer(r"\b(left|right)\b", caption)]
    if not edits:
        return caption, spans_per_box
    # new_at[i]: where character boundary i of the old caption lands in the new one.
    new_at = np.arange(len(caption) + 1)
    pieces, last, shift = [], 0, 0
    for start, end, word in edits:
        pieces += [caption[last:start], word]
        new_at[start:end + 1] = start + shift  # a boundary inside the word snaps to its start
        shift += len(word) - (end - start)
        new_at[end:] = np.arange(end, len(caption) + 1) + shift
        last = end
    pieces.append(caption[last:])

    def move(sp):
        return [int(new_at[int(sp[0])]), int(new_at[int(sp[1])])]

    new_spans = [None if spans is None else [move(sp) for sp in spans] for spans in spans_per_box]
    return "".join(pieces), new_spans


def _synthetic_grounding(config, split: str) -> tuple[str, str]:
    """(grounding json, image folder) of the synthetic set's `split`, found next to the
    instances file the experiment resolved; ("", "") when the file is absent."""
    d = config.data
    instances, images = ((d.train_instances, d.train_images) if split == "train"
                         else (d.val_instances, d.val_images))
    path = os.path.join(os.path.dirname(instances), f"grounding_{split}.json")
    return (path, images) if os.path.isfile(path) else ("", "")


def grounding_train_records(config) -> list[dict]:
    """Phrase-grounding training records (`caption`, per-box `tokens_positive`): the files in
    `config.data.grounding_train` (MDETR .json or ODVG grounding .jsonl, with
    `grounding_images`), or, for the synthetic set when none are given, its own
    grounding_train.json. Empty when `data.grounding_copies` is 0."""
    d = config.data
    if int(d.grounding_copies) <= 0:
        return []
    files, dirs = tuple(d.grounding_train), tuple(d.grounding_images)
    if not files and d.synthetic:
        path, images = _synthetic_grounding(config, "train")
        files, dirs = ((path,), (images,)) if path else ((), ())
    if len(files) != len(dirs):
        raise ValueError(f"config.data.grounding_train has {len(files)} files but "
                         f"config.data.grounding_images {len(dirs)} folders; give one image "
                         "folder per grounding file.")
    records = []
    for f, im in zip(files, dirs):
        # MDETR's flattened .json, or an ODVG grounding (`vg`) .jsonl file.
        load = grounding_data.load_odvg if f.endswith(".jsonl") else grounding_data.load_grounding
        for r in load(f, im).records:
            # Grounding boxes carry no class of the detection vocabulary: their targets are
            # caption tokens. A placeholder id keeps the detection pipeline's label lookup happy.
            records.append(dict(r, category_ids=np.full(len(r["boxes"]), _NO_CLASS, np.int64)))
    return records * int(d.grounding_copies)


# Category id given to grounding boxes (labels are unused by GLIP's loss).
_NO_CLASS = -1


def _prompt_extra(exp):
    """The loader's per-image hook: prompt tokens and the box x token map (see module doc)."""
    config = exp.config
    length, max_boxes = int(config.text.context_length), int(config.data.max_boxes)
    names = list(exp.train_classes)
    tokenizer = exp.tokenizer
    num_neg = int(config.data.num_negatives)
    # HF fast tokenizers are not safe to call from several grain threads at once.
    lock = WorkerLock()  # pickles: the hook may run in grain worker processes

    def extra(example, record, rng):
        with lock:
            if record.get("caption") is not None:
                keep = np.flatnonzero(~np.asarray(record["iscrowd"], bool))[:max_boxes]
                spans = [record["tokens_positive"][i] for i in keep]
                caption = record["caption"]
                if bool(example["flipped"]):
                    caption, spans = swap_left_right(caption, spans)
                out = gtext.grounding_targets(caption, spans, tokenizer, length, max_boxes)
            else:
                out = gtext.detection_prompt(example["labels"], names, rng, tokenizer, length,
                                             max_boxes, num_negatives=num_neg)
        return {k: np.asarray(out[k]) for k in
                ("token_ids", "token_mask", "box_positive_map", "box_valid")}

    return extra


def make_train_loader(exp, *, num_epochs=None):
    """Detection records (GLIP detection prompts) mixed with phrase-grounding records."""
    records = list(exp.train_data.records)
    grounding = grounding_train_records(exp.config)
    if grounding:
        records += grounding
        cat_map = {**exp.train_cat_id_to_index, _NO_CLASS: _NO_CLASS}
        exp = dataclasses.replace(exp, train_cat_id_to_index=cat_map)
    return detection_train_loader(exp, num_epochs=num_epochs, extra=_prompt_extra(exp),
                                  records=records)


def train_constants(exp, variables) -> dict:
    """Nothing: every image brings its own prompt."""
    return {}


def train_loss(model, params, model_state, batch, constants, rng, config):
    """GLIP's ATSS loss for one batch.

    batch: image [N,S,S,3], boxes [N,M,4], box_mask / box_valid [N,M], image_hw [N,2],
    token_ids [N,L], token_mask [N,L], box_positive_map [N,M,L].
    """
    del constants
    m = config.model
    variables = {"params": params, **model_state}
    out = model.apply(variables, batch["image"], batch["token_ids"], batch["token_mask"],
                      deterministic=False, rngs={"dropout": rng})
    anchors_, per_level = anchors(config)
    if anchors_.shape[0] != out["logits"].shape[1]:
        raise ValueError(f"the model gives {out['logits'].shape[1]} anchors but the anchor "
                         f"generator {anchors_.shape[0]}; config.model.strides must list the "
                         "FPN levels.")
    valid = batch["box_mask"] & batch["box_valid"]
    terms = glip_losses.glip_atss_loss(
        anchors_, per_level, out["logits"], out["box_deltas"], out["centerness"],
        batch["boxes"], valid, batch["box_positive_map"], batch["token_mask"],
        alpha=m.focal_alpha, gamma=m.focal_gamma, topk=m.atss_topk,
        giou_weight=m.box_loss_weight, centerness_weight=m.centerness_loss_weight,
    )
    loss = m.cls_loss_weight * terms["cls"] + terms["box"] + terms["centerness"]
    n = batch["image"].shape[0]
    metrics = {"loss": loss, "cls": terms["cls"], "box": terms["box"],
               "centerness": terms["centerness"], "num_pos_per_image": terms["num_pos"] / n}
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Inference


def eval_queries(exp, variables) -> dict:
    """The evaluation vocabulary as prompt chunks with their BERT features (computed once).

    Returns text [C,L,D], token_mask [C,L], class_token_map [C,Kc,L], class_index [C,Kc].
    """
    config = exp.config
    chunks = gtext.vocabulary_chunks(
        list(exp.eval_vocab.class_names), exp.tokenizer, int(config.text.context_length),
        int(config.data.eval_chunk_size) or None,
    )
    return encode_chunks(exp.model, variables, chunks)


def encode_chunks(model, variables, chunks: dict) -> dict:
    """`vocabulary_chunks` output -> queries for `predict` (BERT run on every chunk)."""
    ids, mask = jnp.asarray(chunks["token_ids"]), jnp.asarray(chunks["token_mask"])
    text = jax.jit(
        lambda v, i, k: model.apply(v, i, k, method=GLIPDetector.encode_text)
    )(variables, ids, mask)
    return {"text": text, "token_mask": mask,
            "class_token_map": jnp.asarray(chunks["class_token_map"]),
            "class_index": jnp.asarray(chunks["class_index"])}


def decode_boxes(box_deltas, anchors_, image_hw):
    """[N,A,4] deltas -> [N,A,4] boxes in input pixels, clipped to each image's (h, w)."""
    coder = box_ops.BoxCoder(tuple(glip_losses.BOX_WEIGHTS))
    boxes = coder.decode(box_deltas, jnp.broadcast_to(anchors_, box_deltas.shape))
    return box_ops.clip_boxes(boxes, image_hw[:, None, 0], image_hw[:, None, 1])


def _chunk_detections(boxes, scores, class_index, e):
    """One image, one chunk: boxes [A,4], scores [A,Kc], class_index [Kc] (-1 = padding) ->
    class-aware NMS'ed top `max_detections` (boxes, scores, classes, valid)."""
    a, kc = scores.shape
    flat = jnp.where(class_index[None, :] >= 0, scores, -jnp.inf).reshape(-1)
    k = min(int(e.pre_nms_topk), a * kc)
    top, idx = jax.lax.top_k(flat, k)
    cand_boxes = boxes[idx // kc]
    cand_classes = class_index[idx % kc]
    ok = top > float(e.score_threshold)
    keep, keep_valid = batched_nms(cand_boxes, top, cand_classes, float(e.nms_threshold),
                                   int(e.max_detections), valid=ok)
    return (cand_boxes[keep], jnp.where(keep_valid, top[keep], 0.0), cand_classes[keep],
            keep_valid)


def merge_detections(boxes, scores, classes, valid, max_detections: int) -> dict:
    """Per-chunk detections [C,N,D,...] -> the best `max_detections` over chunks per image.

    Classes are disjoint across chunks, so class-aware NMS has nothing left to remove between
    chunks: the merge is a top-k by score.
    """
    c, n, d = scores.shape
    flat = lambda x: jnp.moveaxis(x, 0, 1).reshape(n, c * d, *x.shape[3:])  # noqa: E731
    boxes, scores, classes, valid = flat(boxes), flat(scores), flat(classes), flat(valid)
    k = min(int(max_detections), c * d)
    top, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
    take = lambda x: jnp.take_along_axis(x, idx.reshape(n, k, *([1] * (x.ndim - 2))), axis=1)  # noqa: E731
    kept = jnp.isfinite(top)
    return {"boxes": take(boxes), "scores": jnp.where(kept, top, 0.0),
            "classes": take(classes), "valid": kept}


def predict(model, variables, images, image_hw, queries, config):
    """Batched chunked inference. images [N,S,S,3], image_hw [N,2], queries from `eval_queries`.

    Returns boxes [N,D,4] (input pixels, clipped), scores [N,D], classes [N,D] (vocabulary
    index), valid [N,D]; D = config.eval.max_detections.
    """
    e = config.eval
    n = images.shape[0]
    levels = model.apply(variables, images, method=GLIPDetector.visual_features)
    anchors_ = jnp.asarray(anchors(config)[0])

    def one_chunk(q):
        text = jnp.broadcast_to(q["text"][None], (n, *q["text"].shape))
        mask = jnp.broadcast_to(q["token_mask"][None], (n, q["token_mask"].shape[0]))
        out = model.apply(variables, levels, text, mask, method=GLIPDetector.head)
        scores = glip_losses.glip_scores(out["logits"], out["centerness"], q["class_token_map"])
        boxes = decode_boxes(out["box_deltas"], anchors_, image_hw)
        return jax.vmap(lambda b, s: _chunk_detections(b, s, q["class_index"], e))(boxes, scores)

    per_chunk = jax.lax.map(one_chunk, queries)
    return merge_detections(*per_chunk, int(e.max_detections))


# ----------------------------------------------------------------------------------------------
# Phrase grounding: free text -> noun phrases -> one box per phrase; recall@1


# Words that end a noun phrase in the fallback chunker (conjunctions, prepositions, auxiliary
# verbs, pronouns) and determiners (which end one and are left out of the next).
_BREAK_WORDS = frozenset("""
and or but nor with without on in at of to from by for near under over behind above below beside
besides between among next into onto upon off out up down around through across along against
is are was were be being been am has have had do does did can could will would while who whom
whose which where when that there here it its they them he him she her we us you i me as than
then so very not no also just like
""".split())
_DETERMINERS = frozenset("""
a an the this these those some any each every his their my your our its one
""".split())


def noun_phrases(caption: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the noun phrases in `caption`, in order.

    Uses spaCy's noun chunks when spaCy and its `en_core_web_sm` model are installed. Otherwise
    a plain chunker (no parser, so no part-of-speech tags): a phrase is a maximal run of words
    with no punctuation, determiner, conjunction, preposition, auxiliary verb or pronoun
    (`_BREAK_WORDS`, `_DETERMINERS`) inside; other verbs stay inside phrases.
    "a red circle, a blue star and a green square on a grey background" -> "red circle",
    "blue star", "green square", "grey background".
    """
    try:
        import spacy  # noqa: PLC0415

        nlp = spacy.load("en_core_web_sm")
    except (ImportError, OSError):
        nlp = None
    if nlp is not None:
        return [(c.start_char, c.end_char) for c in nlp(caption).noun_chunks]
    spans, start, end = [], None, None
    for mt in re.finditer(r"[A-Za-z0-9][A-Za-z0-9'-]*|[^\sA-Za-z0-9]", caption):
        word = mt.group(0).lower()
        if word in _BREAK_WORDS or word in _DETERMINERS or not word[0].isalnum():
            if start is not None:
                spans.append((start, end))
            start = None
            continue
        if start is None:
            start = mt.start()
        end = mt.end()
    if start is not None:
        spans.append((start, end))
    return spans


def _phrase_boxes(model, variables, images, image_hw, token_ids, token_mask, phrase_map,
                  config):
    """images [N,S,S,3], token_ids / token_mask [N,L], phrase_map [N,P,L] (rows average their
    tokens) -> each phrase's best box [N,P,4] (input pixels) and its score [N,P]."""
    out = model.apply(variables, images, token_ids, token_mask)
    scores = glip_losses.glip_scores(out["logits"], out["centerness"], phrase_map)  # [N,A,P]
    boxes = decode_boxes(out["box_deltas"], jnp.asarray(anchors(config)[0]), image_hw)
    best = jnp.argmax(scores, axis=1)  # [N,P]
    return (jnp.take_along_axis(boxes, best[..., None], axis=1),
            jnp.take_along_axis(scores, best[:, None, :], axis=1)[:, 0])


def _phrase_inputs(tokenizer, caption, spans_per_phrase, length, max_phrases):
    """Caption + per-phrase spans -> (token_ids [L], token_mask [L], phrase_map [P,L] row-mean,
    phrase_ok [P]); a phrase cut by the context length gets ok=False."""
    t = gtext.grounding_targets(caption, spans_per_phrase, tokenizer, length, max_phrases)
    rows = t["box_positive_map"]
    rows = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1.0)
    return t["token_ids"], t["token_mask"], rows.astype(np.float32), t["box_valid"]


def ground_caption(exp, variables, image, caption: str, phrases=None) -> list[dict]:
    """Phrase grounding of free text on one image.

    image: uint8 [H, W, 3] (or a path); caption: text; phrases: optional [start, end) spans
    (default: `noun_phrases(caption)`). Returns one dict per phrase: text, span, box [4]
    (x1,y1,x2,y2 in the ORIGINAL image's pixels) and score.
    """
    config = exp.config
    spans = list(phrases) if phrases is not None else noun_phrases(caption)
    if not spans:
        raise ValueError(f"ground_caption: found no noun phrase in {caption!r}; pass phrases= "
                         "as [start, end) character spans.")
    record = {"image": image, "image_id": 0}
    if isinstance(image, str):
        record = {"path": image, "image_id": 0}
    from PIL import Image  # noqa: PLC0415

    w, h = (Image.open(image).size if isinstance(image, str) else
            (np.asarray(image).shape[1], np.asarray(image).shape[0]))
    record.update(height=h, width=w)
    example, _ = transforms.image_example(record, image_size=int(config.data.image_size),
                                          flip=False)
    ids, mask, pmap, ok = _phrase_inputs(exp.tokenizer, caption, [[list(s)] for s in spans],
                                         int(config.text.context_length), len(spans))
    boxes, scores = jax.jit(
        lambda v, im, hw, i, k, p: _phrase_boxes(exp.model, v, im, hw, i, k, p, config)
    )(variables, example["image"][None], example["image_hw"][None], ids[None], mask[None],
      pmap[None])
    boxes = np.asarray(boxes[0]) / float(example["scale"])
    return [{"text": caption[s:e], "span": (s, e), "box": boxes[i].tolist(),
             "score": float(scores[0, i]) if ok[i] else 0.0}
            for i, (s, e) in enumerate(spans)]


def _phrases_of(record) -> tuple[list, list]:
    """A grounding record's distinct phrases (their span lists) and each phrase's GT box ids."""
    keys, boxes_of = [], {}
    for b, spans in enumerate(record["tokens_positive"]):
        key = tuple(tuple(int(v) for v in sp) for sp in spans)
        if key not in boxes_of:
            keys.append(key)
            boxes_of[key] = []
        boxes_of[key].append(b)
    return [[list(sp) for sp in k] for k in keys], [boxes_of[k] for k in keys]


def _best_iou(box, gts) -> float:
    """Largest IoU of one box [4] with boxes [G, 4] (x1y1x2y2)."""
    iw = np.clip(np.minimum(box[2], gts[:, 2]) - np.maximum(box[0], gts[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], gts[:, 3]) - np.maximum(box[1], gts[:, 1]), 0, None)
    inter = iw * ih
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return float(np.max(inter / np.maximum(area(box) + area(gts) - inter, 1e-9)))


def grounding_recall(exp, variables, mesh, records, *, iou_threshold: float = 0.5,
                     progress: bool = False) -> float:
    """Recall@1 of phrase grounding (Flickr30k Entities protocol): a phrase is a hit when its
    best-scoring box overlaps one of the phrase's ground-truth boxes with IoU >= 0.5. Phrases
    the context length cuts count as misses."""
    config = exp.config
    size, length = int(config.data.image_size), int(config.text.context_length)
    bs = int(config.eval.batch_size)
    max_p = max(len(_phrases_of(r)[0]) for r in records)
    rules = shd.rules_tuple(config.sharding.rules)
    fn = jax.jit(lambda v, im, hw, i, k, p: _phrase_boxes(exp.model, v, im, hw, i, k, p,
                                                          config))
    hits = total = 0
    with mesh, nn.logical_axis_rules(rules):
        for start in range(0, len(records), bs):
            chunk = records[start:start + bs]
            rows = []
            for r in chunk:
                ex, _ = transforms.image_example(r, image_size=size, flip=False)
                phrases, _ = _phrases_of(r)
                ids, mask, pmap, ok = _phrase_inputs(exp.tokenizer, r["caption"], phrases,
                                                     length, max_p)
                rows.append((ex, ids, mask, pmap, ok))
            while len(rows) < bs:  # pad the last batch (padding rows are ignored below)
                rows.append(rows[-1])
            batch = {
                "image": np.stack([x[0]["image"] for x in rows]),
                "hw": np.stack([x[0]["image_hw"] for x in rows]),
                "ids": np.stack([x[1] for x in rows]), "mask": np.stack([x[2] for x in rows]),
                "pmap": np.stack([x[3] for x in rows]),
            }
            b = shd.shard_batch(batch, mesh)
            boxes, _ = fn(variables, b["image"], b["hw"], b["ids"], b["mask"], b["pmap"])
            boxes = np.asarray(jax.device_get(boxes))
            for i, r in enumerate(chunk):
                ex, ok = rows[i][0], rows[i][4]
                gt = np.asarray(r["boxes"], np.float32) * float(ex["scale"])
                for p, box_ids in enumerate(_phrases_of(r)[1]):
                    total += 1
                    if ok[p]:
                        hits += int(_best_iou(boxes[i, p], gt[box_ids]) >= iou_threshold)
    return hits / max(total, 1)


def _grounding_val_source(config) -> tuple[str, str]:
    d = config.data
    if d.get("grounding_val"):
        return d.grounding_val, d.grounding_val_images
    if d.synthetic:
        return _synthetic_grounding(config, "val")
    return "", ""


def extra_metrics(exp, variables, mesh) -> dict:
    """`grounding_recall@1` on the grounding validation file (config.data.grounding_val, or the
    synthetic set's); {} when there is none."""
    path, images = _grounding_val_source(exp.config)
    if not path:
        return {}
    records = grounding_data.load_grounding(path, images).records
    return {"grounding_recall@1": grounding_recall(exp, variables, mesh, records)}

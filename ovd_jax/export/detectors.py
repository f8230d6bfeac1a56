"""The inference functions an artifact exports, per method (this module needs flax).

Every method is reduced to two pure functions of arrays, with the parameters as an argument so
that one compiled program serves any vocabulary:

    encode_queries(params, tokens, mask) -> query embeddings
    detect(params, images, image_hw, queries) -> {boxes, scores, classes, valid}
    regions(params, images, image_hw) -> {boxes, embeddings, valid}   (where the method has
        text-independent region embeddings: RegionCLIP, DetCLIPv2)

and a query kind that says how the (flax-free) runtime turns free-text queries into `tokens`
and `queries` (ovd_jax/export/queries.py):

* "concepts" (RegionCLIP, DetCLIPv2): tokens [Q, T, L] (T prompt templates per query), encode
  -> embeddings [Q, D]; detect takes queries {"emb": [K, D], "valid": [K] bool}, K padded to a
  multiple of `QUERY_BUCKET` and the padding masked out, so detections equal `predict` on the
  unpadded vocabulary.
* "chunks" (GLIP): tokens [C, L] prompt chunks (several queries per prompt), encode -> text
  features [C, L, D]; detect takes the chunks' features, token masks, class-token maps
  [C, Kc, L] and class indices [C, Kc] (-1 = padding), which GLIP's `predict` already ignores.

Adding a method: give it a `Spec` in `SPECS` built from its own model pieces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ovd_jax.losses import regionclip as rc_losses
from ovd_jax.methods import detclipv2 as detclipv2_method
from ovd_jax.methods import glip as glip_method
from ovd_jax.methods import regionclip as regionclip_method
from ovd_jax.models.detclipv2 import DetCLIPv2Detector
from ovd_jax.models.glip import GLIPDetector
from ovd_jax.models.regionclip import RegionCLIPDetector
from ovd_jax.ops import boxes as box_ops

# Vocabularies are padded to a multiple of this many queries: detect's query dimension is
# symbolic in multiples of it (a multiple keeps the NMS size comparisons decidable at export).
QUERY_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one method is exported.

    kind: "concepts" or "chunks" (see the module docstring).
    encode: (model, config) -> encode_queries(params, tokens, mask).
    detect: (model, config) -> detect(params, images, image_hw, queries).
    constants: (config) -> dict of extra arrays the functions read under params["constants"]
      (e.g. an offline RPN), or None.
    regions: (model, config) -> regions(params, images, image_hw) -> {boxes [N,R,4] input px,
      embeddings [N,R,D] L2-normalised, valid [N,R]}: the class-agnostic regions and their
      embeddings, to score against any query embedding later; None when the method has no
      text-independent region embedding (GLIP's boxes come out of image-text fusion).
    prompts: "concepts" kind: (config) -> (templates, clean_names): each query is put in every
      template, after the training-time name clean-up when clean_names.
    """

    kind: str
    encode: Callable
    detect: Callable
    constants: Callable | None = None
    regions: Callable | None = None
    prompts: Callable | None = None


def _variables(params):
    return params["model"]


# ------------------------------------------------------------------------------------------
# RegionCLIP


def _regionclip_encode(model, config):
    templates = len(config.text.templates)

    def encode(params, tokens, mask):
        del mask  # CLIP's causal text tower reads up to the end token
        q, t, length = tokens.shape
        if t != templates:
            raise ValueError(f"tokens carry {t} templates per query, the model {templates}.")
        feats = model.apply(_variables(params), tokens.reshape(q * t, length),
                            method=RegionCLIPDetector.encode_text)
        return rc_losses.concept_embeddings(feats, templates)

    return encode


def _regionclip_forward(model, config, params, images, image_hw):
    """The detector up to its refined boxes: (region embeddings [N, P, D], refined boxes
    [N, P, 4] clipped to each image, proposal logits [N, P], proposal validity [N, P])."""
    variables = _variables(params)
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    offline = params.get("constants", {}).get("offline_rpn")
    proposals, prop_logits, valid, _, _ = regionclip_method._proposals(  # noqa: SLF001
        model, variables, res4, images, image_hw, offline, config, train=False)
    emb, deltas = regionclip_method.region_features(model, variables, res4, proposals,
                                                    regionclip_method.inference_rois_per_chunk(config))
    boxes = box_ops.BoxCoder(weights=tuple(config.model.box_reg_weights)).decode(deltas,
                                                                                 proposals)
    boxes = box_ops.clip_boxes(boxes, image_hw[:, None, 0], image_hw[:, None, 1])
    return emb, boxes, prop_logits, valid


def _regionclip_regions(model, config):
    """Proposals refined by the class-agnostic box head, with their region embeddings."""

    def regions(params, images, image_hw):
        emb, boxes, _, valid = _regionclip_forward(model, config, params, images, image_hw)
        return {"boxes": boxes, "embeddings": emb, "valid": valid}

    return regions


def _regionclip_detect(model, config):
    """`regionclip.predict` with a query mask: padded concepts get a logit of -inf, so the
    softmax over [background, concepts] and the per-class NMS see the real vocabulary only."""
    m, e = config.model, config.eval

    def detect(params, images, image_hw, queries):
        region_emb, boxes, prop_logits, prop_valid = _regionclip_forward(
            model, config, params, images, image_hw)
        logits = rc_losses.region_logits(region_emb, queries["emb"], m.temperature)
        keep = jnp.concatenate([jnp.ones((1,), bool), queries["valid"]])
        logits = jnp.where(keep, logits, -jnp.inf)
        probs = jax.nn.softmax(logits, -1)[..., 1:]
        if m.score == "sqrt_objectness":
            probs = jnp.sqrt(probs * jax.nn.sigmoid(prop_logits)[..., None])
        elif m.score != "softmax":
            raise ValueError(f"config.model.score={m.score!r}: use 'softmax' or "
                             "'sqrt_objectness'")
        return jax.vmap(lambda b, p, v: regionclip_method.per_class_nms(b, p, v, e))(
            boxes, probs, prop_valid)

    return detect


def _regionclip_constants(config):
    if not config.model.offline_rpn:
        return {}
    from ovd_jax.methods import regionclip_offline  # noqa: PLC0415

    return {"offline_rpn": regionclip_offline.load(config)[1]}


# ------------------------------------------------------------------------------------------
# DetCLIPv2


def _detclipv2_encode(model, config):
    def encode(params, tokens, mask):
        emb = model.apply(_variables(params), tokens, mask,
                          method=DetCLIPv2Detector.encode_concepts)  # [Q, T, D], normalised
        # One text per query (T = 1) is what `detclipv2.encode_vocabulary` computes.
        return emb[:, 0] if emb.shape[1] == 1 else rc_losses.normalize(emb.mean(axis=1))

    return encode


def _detclipv2_regions(model, config):
    """Every anchor's decoded box and region embedding (dense)."""

    def regions(params, images, image_hw):
        out = model.apply(_variables(params), images, method=DetCLIPv2Detector.regions)
        anchors_ = jnp.asarray(detclipv2_method.anchors(config, images.shape[1])[0])
        boxes = glip_method.decode_boxes(out["box_deltas"], anchors_, image_hw)
        return {"boxes": boxes, "embeddings": out["region_emb"],
                "valid": jnp.ones(boxes.shape[:2], bool)}

    return regions


def _detclipv2_detect(model, config):
    """`detclipv2.predict` with padded concepts scored -inf (never candidates)."""

    def detect(params, images, image_hw, queries):
        variables = _variables(params)
        out = model.apply(variables, images, method=DetCLIPv2Detector.regions)
        logits = model.apply(variables, out["region_emb"], queries["emb"],
                             method=DetCLIPv2Detector.align_logits)
        scores = jnp.sqrt(jax.nn.sigmoid(logits) * jax.nn.sigmoid(out["centerness"])[..., None])
        scores = jnp.where(queries["valid"], scores, -jnp.inf)
        anchors_ = jnp.asarray(detclipv2_method.anchors(config, images.shape[1])[0])
        boxes = glip_method.decode_boxes(out["box_deltas"], anchors_, image_hw)
        return jax.vmap(lambda b, s: detclipv2_method._image_detections(  # noqa: SLF001
            b, s, config.eval))(boxes, scores)

    return detect


# ------------------------------------------------------------------------------------------
# GLIP


def _glip_encode(model, config):
    def encode(params, tokens, mask):
        return model.apply(_variables(params), tokens, mask, method=GLIPDetector.encode_text)

    return encode


def _glip_detect(model, config):
    def detect(params, images, image_hw, queries):
        return glip_method.predict(model, _variables(params), images, image_hw, queries, config)

    return detect


SPECS: dict[str, Spec] = {
    # RegionCLIP: the run's prompt templates, averaged (prompt ensembling).
    "regionclip": Spec("concepts", _regionclip_encode, _regionclip_detect, _regionclip_constants,
                       _regionclip_regions,
                       prompts=lambda config: (list(config.text.templates), True)),
    # DetCLIPv2: each concept's text once, as written (it may carry a definition).
    "detclipv2": Spec("concepts", _detclipv2_encode, _detclipv2_detect,
                      regions=_detclipv2_regions, prompts=lambda config: (["{}"], False)),
    "glip": Spec("chunks", _glip_encode, _glip_detect),
}


def get_spec(method: str) -> Spec:
    if method not in SPECS:
        raise ValueError(
            f"config.method={method!r} cannot be exported yet; exportable methods: "
            f"{sorted(SPECS)} (the CLIP teacher and RegionCLIP pretraining have no standalone "
            "detector: export the RegionCLIP detector trained from them).")
    return SPECS[method]

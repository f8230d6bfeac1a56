"""CLIP teacher stage (`config.method = "clip"`): image-caption contrastive training.

The stand-in for OpenAI CLIP on machines without its weights: the detector's CLIP towers (a
ModifiedResNet with its attention pool, the text transformer) learn from image-text pairs with
CLIP's symmetric InfoNCE and learnable temperature (`logit_scale`, init log(1/0.07), capped at
log 100). The image embedding (`config.clip.image_pooling`):

* "attention_pool": CLIP's own path, stem..res4, res5 and the attention pool on the full map;
* "global_box": the region path on one whole-image box (RoIAlign of res4 to the pooler grid,
  res5, attention pool), i.e. RegionCLIP's "global box" feature. At CLIP's native size (224 px,
  a 14 x 14 res4 map, pooler 14) the two nearly coincide; on the CPU demo's 128 px inputs (an
  8 x 8 map resampled to 6 x 6) it trains the attention pool on the grid regions are read at.

The RegionCLIP pretraining stage then reads the same towers on regions.

`config.clip.train_rpn`: the teacher run also trains a class-agnostic RPN head on the base
boxes of the detection training split, on *stop-gradient* res4 features, so the CLIP towers see
no box supervision. It serves the pretraining stage as its frozen offline proposal network
(upstream uses a separately trained Mask R-CNN RPN; `config.model.offline_rpn` still selects
such a separate run). Real recipes start from converted CLIP weights instead of this stage.

Evaluation is zero-shot: proposals from that RPN, each region scored against the template-
ensembled class embeddings (`config.model.score`, "sqrt_objectness" in the recipes).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ovd_jax.data import image_text
from ovd_jax.losses import common as loss_common
from ovd_jax.losses import regionclip_pretrain as pt_losses
from ovd_jax.methods import regionclip, regionclip_pretrain
from ovd_jax.methods.base import detection_train_loader
from ovd_jax.models.layers import l2_normalize
from ovd_jax.models.regionclip import RegionCLIPDetector
from ovd_jax.ops import boxes as box_ops
from ovd_jax.ops import matchers

IMAGE_TEXT_KEYS = ("image", "valid", "caption_tokens")
RPN_KEYS = ("det_image", "det_boxes", "det_box_mask")


class CLIPTeacher(RegionCLIPDetector):
    """The RegionCLIP detector's towers (and optional RPN head) plus CLIP's `logit_scale`."""

    logit_scale_init: float = float(np.log(1 / 0.07))

    def setup(self):
        super().setup()
        self.logit_scale = self.param(
            "logit_scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init), ()),
            (), jnp.float32)

    def encode_image(self, images: jnp.ndarray) -> jnp.ndarray:
        """CLIP's image embedding: images [N,H,W,3] -> [N, D] float32, L2-normalised."""
        x = self.vision.attnpool(self.vision.res5(self.backbone(images)))
        return l2_normalize(x.astype(jnp.float32))

    def __call__(self, images, boxes, token_ids):
        return (*super().__call__(images, boxes, token_ids), self.logit_scale)


def build_model(config, *, text_vocab_size: int, eot_token_id: int | None) -> CLIPTeacher:
    """The detector of `config.model` with CLIP's temperature; an RPN head only with
    `config.clip.train_rpn`."""
    det = regionclip.build_model(config, text_vocab_size=text_vocab_size,
                                 eot_token_id=eot_token_id)
    fields = {f.name: getattr(det, f.name) for f in dataclasses.fields(det)
              if f.init and f.name not in ("parent", "name")}
    if not config.clip.train_rpn:
        fields["num_anchors"] = 0
    return CLIPTeacher(**fields, logit_scale_init=float(config.clip.logit_scale_init))


init_args = regionclip.init_args


def device_keys(config) -> tuple[str, ...]:
    return IMAGE_TEXT_KEYS + (RPN_KEYS if config.clip.train_rpn else ())


def make_train_loader(exp, *, num_epochs=None):
    """Image-text batches (`config.image_text.batch_size`); with `clip.train_rpn` zipped with
    detection batches (`config.train.batch_size`, keys prefixed "det_")."""
    config = exp.config
    records = image_text.image_text_records(config)
    captions = image_text.caption_loader(
        config, exp.tokenizer, records, num_epochs=num_epochs,
        batch_size=int(config.image_text.batch_size or config.train.batch_size))
    if not config.clip.train_rpn:
        return image_text.ZipLoader(**{"": captions})
    return image_text.ZipLoader(**{"": captions, "det": detection_train_loader(exp)})


def train_constants(exp, variables) -> dict:
    return {}


def _rpn_targets(key, anchors_, gt_boxes, gt_valid, m):
    """One image: sampled anchors (fg, bg) [A] and regression targets [A, 4] (detectron2's
    RPN labelling: IoU 0.3 / 0.7, low-quality matches allowed, balanced sampling)."""
    iou = box_ops.box_iou(gt_boxes, anchors_)
    matched, labels = matchers.iou_matcher(
        iou, gt_valid, thresholds=tuple(m.rpn_iou_thresholds), labels=(0, -1, 1),
        allow_low_quality_matches=True)
    fg, bg = matchers.sample_balanced(key, labels, m.rpn_batch_size_per_image,
                                      m.rpn_positive_fraction)
    return fg, bg, box_ops.BoxCoder().encode(anchors_, gt_boxes[matched])


def image_embeddings(model, variables, images, config) -> jnp.ndarray:
    """images [N,H,W,3] -> [N, D] normalised embeddings by `config.clip.image_pooling`."""
    how = config.clip.image_pooling
    if how == "attention_pool":
        return model.apply(variables, images, method=CLIPTeacher.encode_image)
    if how != "global_box":
        raise ValueError(f"config.clip.image_pooling={how!r}: use 'attention_pool' or "
                         "'global_box'.")
    n, h, w = images.shape[:3]
    box = jnp.broadcast_to(jnp.asarray([0.0, 0.0, w, h], jnp.float32), (n, 1, 4))
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    emb, _ = model.apply(variables, res4, box, method=RegionCLIPDetector.region_features)
    return emb[:, 0]


def train_loss(model, params, model_state, batch, constants, rng, config):
    """CLIP loss over the image-text batch (+ the RPN losses on the detection batch).

    batch: image [B,S,S,3], valid [B], caption_tokens [B,L]; with `clip.train_rpn` also
    det_image [N,S,S,3], det_boxes [N,M,4], det_box_mask [N,M].
    """
    variables = {"params": params, **model_state}
    img = image_embeddings(model, variables, batch["image"], config)
    txt = l2_normalize(model.apply(variables, batch["caption_tokens"],
                                   method=RegionCLIPDetector.encode_text))
    log_scale = jnp.minimum(params["logit_scale"], float(config.clip.max_logit_scale))
    clip_loss = pt_losses.image_text_contrastive(img, txt, temperature=jnp.exp(-log_scale),
                                                 valid=batch["valid"])
    metrics = {"clip_loss": clip_loss, "logit_scale": jnp.exp(log_scale)}
    loss = clip_loss
    if config.clip.train_rpn:
        m = config.model
        res4 = jax.lax.stop_gradient(
            model.apply(variables, batch["det_image"], method=RegionCLIPDetector.backbone))
        objectness, deltas = model.apply(variables, res4, method=RegionCLIPDetector.rpn)
        anchors_ = jnp.asarray(regionclip.anchors(config))
        n = objectness.shape[0]
        fg, bg, targets = jax.vmap(lambda k, b, v: _rpn_targets(k, anchors_, b, v, m))(
            jax.random.split(rng, n), batch["det_boxes"], batch["det_box_mask"])
        norm = float(n * m.rpn_batch_size_per_image)
        rpn_cls = jnp.sum(jnp.where(fg | bg, loss_common.sigmoid_bce(
            objectness, fg.astype(jnp.float32)), 0.0)) / norm
        targets = jnp.where(fg[..., None], targets, 0.0)  # unmatched targets may be inf
        rpn_box = jnp.sum(jnp.where(fg, loss_common.l1(deltas, targets), 0.0)) / norm
        loss = loss + m.rpn_loss_weight * (rpn_cls + rpn_box)
        metrics.update(rpn_cls=rpn_cls, rpn_box=rpn_box)
    metrics["loss"] = loss
    return loss, metrics


def eval_queries(exp, variables) -> dict:
    """{"concepts": [K, D] template-ensembled embeddings of the evaluation vocabulary} (+ the
    offline RPN's variables with `config.model.offline_rpn`)."""
    return regionclip.eval_queries(exp, variables)


def predict(model, variables, images, image_hw, queries, config):
    """Zero-shot detection: this model's RPN (or the offline RPN) proposes, the CLIP region
    embeddings classify (see `regionclip_pretrain.zero_shot_detections`)."""
    if config.model.offline_rpn:
        from ovd_jax.methods import regionclip_offline  # noqa: PLC0415

        props = regionclip_offline.proposals(config, queries["offline_rpn"], images, image_hw)
    else:
        props = regionclip_pretrain.rpn_proposals(
            model, variables, images, image_hw, regionclip.anchors(config),
            min_size=float(config.model.get("rpn_min_box_size", 0.0)),
            **regionclip_pretrain.proposal_settings(config, train=False))
    return regionclip_pretrain.zero_shot_detections(model, variables, images, image_hw, props,
                                                    queries["concepts"], config)


classify_boxes = regionclip.classify_boxes

"""Config blocks shared by the ATSS-head recipes, `configs/glip.py` and `configs/detclipv2.py`.

Both detect with a Swin / CLIP-ResNet backbone, an FPN on P3..P7, one square ATSS anchor per
location and a BERT text tower, train with GLIP's AdamW schedule and evaluate with ATSS's
inference thresholds. Each builder fills one block; the recipes add their own fields on top.
"""

from __future__ import annotations

import ml_collections

from configs import common

# BERT-base uncased (HF `bert-base-uncased` config.json).
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                 layer_norm_eps=1e-12, hidden_act="gelu", hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1)


def atss_model(backbone: str) -> ml_collections.ConfigDict:
    """The model fields both recipes share: backbone, FPN P3..P7, ATSS anchors, BERT-base text
    tower, focal-loss constants, rematerialisation and checkpoint. Returns a new ConfigDict that
    the recipe extends with its head (fusion layers or concept alignment) and loss weights."""
    m = ml_collections.ConfigDict()
    # "swin_t" | "swin_l" (ovd_jax.models.swin) or a CLIP ResNet preset ("RN50", "tiny", ...).
    m.backbone = backbone
    m.backbone_overrides = ml_collections.ConfigDict()
    m.backbone_levels = ("res3", "res4", "res5")
    # FPN: output width and strides of its levels (P3..P7: two extra levels on top of P5).
    m.channels = 256
    m.strides = (8, 16, 32, 64, 128)
    # ATSS anchors: one square anchor of side anchor_scale x stride per location, top-k 9 per
    # level as positive candidates.
    m.anchor_scale = 8.0
    m.atss_topk = 9
    # Language tower: a BertConfig (fields of ovd_jax.models.bert.BertConfig).
    m.bert = ml_collections.ConfigDict(BERT_BASE)
    # Sigmoid focal loss on the region-token / region-concept logits.
    m.focal_alpha = 0.25
    m.focal_gamma = 2.0
    m.remat = False
    # Throughput switches (the defaults compute exactly what the plain model does):
    # remat_policy: "none" | "full" | "dots" | "dots_no_batch" | "nothing_saveable"
    #   (ovd_jax.models.remat; remat=True is "full");
    # attention_impl: "auto" (cuDNN fused attention on NVIDIA GPUs with bf16/fp16 compute, else
    #   XLA) | "xla" | "cudnn";
    # scan_layers: scan the CLIP text transformer / BERT layers (stacked layer parameters).
    m.remat_policy = "none"
    m.attention_impl = "auto"
    m.scan_layers = False
    # A checkpoint directory written by `python -m ovd_jax.convert` (empty: random init).
    m.init_checkpoint = ""
    return m


def pretraining_optimizer(o: ml_collections.ConfigDict, *, text_tower: str,
                          weight_decay: float) -> None:
    """Sets GLIP's pretraining optimiser on `o` (config.optim), which DetCLIPv2 also uses: AdamW
    at lr 1e-4 with the text tower (parameter-path prefix `text_tower`) at 0.1x, 2,000 warmup
    steps, gradient-norm clipping 1.0; `weight_decay` is the recipe's own."""
    o.name = "adamw"
    o.learning_rate = 1e-4
    o.lr_multipliers = ((text_tower, 0.1),)
    o.weight_decay = weight_decay
    o.warmup_steps = 2000
    o.grad_clip_norm = 1.0


def atss_eval(e: ml_collections.ConfigDict) -> None:
    """Sets ATSS's inference settings on `e` (config.eval): scores >= 0.05 (INFERENCE_TH), the
    top 1,000 per image before NMS at IoU 0.6 (NMS_TH), 100 detections per image."""
    e.score_threshold = 0.05
    e.nms_threshold = 0.6
    e.pre_nms_topk = 1000
    e.max_detections = 100


def lvis_minival(c: ml_collections.ConfigDict) -> None:
    """Evaluates `c` zero-shot on LVIS v1 minival (1,203 classes, LVIS AP, 300 detections per
    image); the training data stays the recipe's."""
    c.data.kind = "lvis"
    c.data.val_instances = "data/lvis/lvis_v1_minival.json"
    c.data.val_images = "data/coco"
    c.eval.metric = "lvis"
    c.eval.max_detections = 300


# ---------------------------------------------------------------------------------------------
# Small sizes for the CPU demos (configs/demo.py:glip / :detclipv2) and the smoke variants.


def synthetic_grounding(d: ml_collections.ConfigDict) -> None:
    """Points the grounding fields of `d` (config.data) at the synthetic set's own
    grounding_train.json / grounding_val.json (empty paths), one copy per epoch."""
    d.grounding_train = ()
    d.grounding_images = ()
    d.grounding_copies = 1
    d.grounding_val = ""
    d.grounding_val_images = ""


def synthetic_vocab_text(t: ml_collections.ConfigDict, *, context_length: int) -> None:
    """Sets `t` (config.text) to a trainable WordPiece text tower over the synthetic set's
    vocab.txt, identity template, `context_length` tokens."""
    t.tokenizer = "wordpiece"
    t.vocab_file = ""
    t.context_length = context_length
    t.templates = ("{}",)
    t.trainable = True


def tiny_backbone(m: ml_collections.ConfigDict, *, channels: int) -> None:
    """Sets `m` (config.model) to the tiny CLIP ResNet (width 8) with a `channels`-wide FPN on
    P3..P5 (strides 8, 16, 32)."""
    m.backbone = "tiny"
    m.backbone_overrides = ml_collections.ConfigDict({"width": 8})
    m.channels = channels
    m.strides = (8, 16, 32)
    # Several channels per group: with one channel per group GroupNorm cancels the preceding
    # conv's bias exactly, leaving it a gradient of pure rounding noise.
    m.gn_groups = max(1, channels // 4)


def small_bert(*, hidden_size: int, num_layers: int, num_heads: int,
               dropout: float) -> ml_collections.ConfigDict:
    """A BERT config of `num_layers` layers `hidden_size` wide (MLP 2x, 64 positions) with
    `num_heads` heads and `dropout` on hidden states and attention; the rest is BERT-base's."""
    return ml_collections.ConfigDict(dict(
        BERT_BASE, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=2 * hidden_size,
        max_position_embeddings=64, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    ))


def demo_optimizer(o: ml_collections.ConfigDict) -> None:
    """Sets the CPU demos' optimiser on `o` (config.optim): AdamW lr 2e-3 on every tower, 50
    warmup steps, weight decay 1e-4, gradient-norm clipping 5.0."""
    o.name = "adamw"
    o.learning_rate = 2e-3
    o.lr_multipliers = ()
    o.warmup_steps = 50
    o.weight_decay = 1e-4
    o.grad_clip_norm = 5.0


def demo_eval(e: ml_collections.ConfigDict) -> None:
    """Sets the CPU demos' evaluation on `e` (config.eval): every score, the top 300 per image
    before NMS at IoU 0.6, 50 detections per image."""
    e.score_threshold = 0.0
    e.nms_threshold = 0.6
    e.pre_nms_topk = 300
    e.max_detections = 50


def smoke_eval(e: ml_collections.ConfigDict) -> None:
    """Sets the smoke variants' evaluation on `e` (config.eval): common.smoke_eval's, keeping
    every score and the top 100 per image before NMS."""
    common.smoke_eval(e)
    e.score_threshold = 0.0
    e.pre_nms_topk = 100

"""DetCLIPv2 recipes: ATSS + concept embeddings, trained jointly on detection, grounding and
image-text pairs (word-region set-similarity contrastive learning).

    configs/detclipv2.py:detclipv2_t   Swin-T + BERT-base text encoder (default)
    configs/detclipv2.py:detclipv2_l   Swin-L
    ...,lvis                           evaluate zero-shot on LVIS minival (1,203 classes)
    ...,smoke                          tiny model + synthetic data, a few CPU steps (tests)
    configs/demo.py:detclipv2          the CPU demo on the built-in synthetic set
    configs/demo.py:detclipv2,no_image_text   the same without image-text pairs

Data mixture (the paper's): Objects365 detection, GoldG grounding (Flickr30k entities +
GQA/VG, COCO images removed, MDETR's files) and CC3M + CC12M image-text pairs. Detection and
grounding batches are high resolution and small, image-text batches low resolution (320) and
large; each training step draws one data type (`train.schedule`, cyclic). No official code
exists: docs/detclipv2.md lists every value, which ones the paper gives and which are ours.
Data paths follow the datasets' usual layout; override them on the command line.
"""

from __future__ import annotations

import math

import ml_collections

from configs import atss_blocks, common, glip, regionclip


def detclipv2_model(backbone: str = "swin_t") -> ml_collections.ConfigDict:
    """DetCLIPv2's model block: the shared ATSS detector (configs/atss_blocks.py) plus ATSS head
    towers, concept pooling, region-concept alignment and the image-text contrastive loss."""
    m = atss_blocks.atss_model(backbone)
    # Head towers: num_convs x (3x3 conv, GroupNorm, ReLU) per branch, as vanilla ATSS; plus the
    # modulated deformable conv at the start of the classification branch (offsets from the
    # regression tower).
    m.num_convs = 4
    m.gn_groups = 32
    m.deform_cls = True
    # Concepts pooled over the text tower's tokens ("mean") or read at [CLS] ("first").
    m.text_pooling = "mean"
    # Alignment logits = cos(region, concept) * scale + bias0; scale learnable, initial value.
    m.logit_scale_init = 10.0
    # L_align is the concept-level sigmoid focal loss; alpha (L_reg, GIoU) and beta (L_center)
    # weights.
    m.reg_loss_weight = 2.0
    m.center_loss_weight = 1.0
    # Image-text pairs: lambda L_cts with temperature tau; proposals = top `num_proposals` after
    # NMS of the `proposal_pre_nms_topk` anchors with the highest objectness (max similarity to
    # any concept of the batch); set similarity "max" or "softmax" (weights softmax(s / tau_t)).
    m.cts_weight = 1.0
    m.cts_temperature = 0.05
    m.set_similarity = "max"
    m.tau_t = 0.1
    m.num_proposals = 100
    m.proposal_nms = 0.5
    m.proposal_pre_nms_topk = 1000
    return m


def detclipv2_text() -> ml_collections.ConfigDict:
    t = glip.glip_text()
    # One text sequence per concept ("name, definition"), not one long prompt.
    t.context_length = 48
    t.templates = ("{}",)
    return t


def detclipv2_data() -> ml_collections.ConfigDict:
    d = glip.glip_data()
    d.image_size = regionclip.CANVAS
    # Detection / grounding resolution: shorter side 800, longer side <= 1333 (ATSS's).
    d.min_size, d.max_size = 800, 1333
    d.train_min_sizes = ()
    # Concepts per detection / grounding image: positives plus up to num_negatives sampled
    # negatives, at most max_concepts; detection concepts are "name, definition".
    d.max_concepts = 100
    d.num_negatives = 85
    d.use_definitions = True
    # Grounding negatives come from a concept dictionary: "grounding" (the grounding corpus's
    # box phrases) or "captions" (those, the training class names and the image-text captions'
    # frequent noun phrases, see image_text.concepts_file / min_concept_count).
    d.negative_dictionary = "captions"
    return d


def image_text_data() -> ml_collections.ConfigDict:
    """The image-text pairs: CC12M from TFDS at low resolution (square, long side 320). The
    concept pool is the dictionary grounding negatives are drawn from (data.negative_dictionary
    = "captions")."""
    it = common.image_text_pairs(source="tfds", tfds_name="cc12m", image_size=320)
    # Concepts per caption: its noun phrases (spaCy noun chunks when installed), at most this
    # many; `include_caption` adds the caption itself as one more concept.
    it.concepts_per_caption = 16
    it.include_caption = False
    return it


def _batch_sizes(t: ml_collections.ConfigDict, *, detection: int, grounding: int,
                 image_text: int) -> None:
    """Sets the global batch of each data type on `t` (config.train); `t.batch_size` (the
    evaluation and sharding reference) is the detection batch."""
    t.batch_sizes = ml_collections.ConfigDict(
        {"detection": detection, "grounding": grounding, "image_text": image_text})
    t.batch_size = detection


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = common.parse_arg(arg, ("detclipv2_t", "detclipv2_l", "lvis", "smoke"))
    if {"detclipv2_t", "detclipv2_l"} <= variants:
        raise ValueError("pick one of detclipv2_t / detclipv2_l.")
    c = common.base_config()
    c.method = "detclipv2"
    c.dtype = "bfloat16"
    c.model = detclipv2_model("swin_l" if "detclipv2_l" in variants else "swin_t")
    c.text = detclipv2_text()
    c.data = detclipv2_data()
    c.data.image_transfer = "uint8"  # full-size: normalise on the device (4x less host->device)
    c.image_text = image_text_data()
    # AdamW lr 1e-4 (text encoder 1e-5), warmup 2,000, clipping 1.0.
    atss_blocks.pretraining_optimizer(c.optim, text_tower="text_encoder", weight_decay=0.05)
    t = c.train
    # Global batch per data type; every step draws one type, cyclically.
    _batch_sizes(t, detection=128, grounding=128, image_text=1024)
    t.schedule = ("detection", "grounding", "image_text")
    t.steps = 300_000
    t.checkpoint_every = 5000
    c.eval.batch_size = 8
    atss_blocks.atss_eval(c.eval)
    if "detclipv2_l" in variants:
        t.steps = 600_000
    if "lvis" in variants:
        atss_blocks.lvis_minival(c)
        c.eval.score_threshold = 0.0
    if "smoke" in variants:
        apply_smoke(c)
    return c


def _small_model(m: ml_collections.ConfigDict, *, channels: int, bert_layers: int,
                 num_convs: int, num_proposals: int, proposal_pre_nms_topk: int) -> None:
    """Shrinks `m` (config.model): the tiny backbone with a `channels`-wide FPN, a BERT of
    `bert_layers` layers as wide as the FPN (16-wide heads, no dropout), `num_convs` convs per
    head tower and `num_proposals` of `proposal_pre_nms_topk` image-text proposals."""
    atss_blocks.tiny_backbone(m, channels=channels)
    m.bert = atss_blocks.small_bert(hidden_size=channels, num_layers=bert_layers,
                                    num_heads=max(1, channels // 16), dropout=0.0)
    m.num_convs = num_convs
    m.num_proposals = num_proposals
    m.proposal_pre_nms_topk = proposal_pre_nms_topk


def _synthetic(c: ml_collections.ConfigDict) -> None:
    """Every input from the built-in synthetic set (detection, grounding, image-text captions,
    WordPiece vocab of 16-token concepts), float32, one learning rate for all towers."""
    d = c.data
    d.kind = "coco"
    d.synthetic = True
    d.min_size, d.max_size, d.train_min_sizes = 0, 0, ()
    d.split_file = ""
    d.split = ""
    atss_blocks.synthetic_grounding(d)
    it = c.image_text
    it.source = "synthetic"
    it.concept_parser = "fallback"
    it.concepts_per_caption = 4
    atss_blocks.synthetic_vocab_text(c.text, context_length=16)
    c.dtype = "float32"
    c.optim.lr_multipliers = ()


def apply_smoke(c: ml_collections.ConfigDict) -> None:
    """Tiny DetCLIPv2 on a tiny synthetic set: one step of each data type, then evaluation."""
    _synthetic(c)
    common.smoke_synthetic_data(c.data)
    c.data.max_concepts = 4
    c.data.num_negatives = 2
    c.image_text.image_size = 32
    _small_model(c.model, channels=16, bert_layers=1, num_convs=1, num_proposals=4,
                 proposal_pre_nms_topk=32)
    c.optim.learning_rate = 1e-3
    common.smoke_train(c)
    t = c.train
    _batch_sizes(t, detection=8, grounding=8, image_text=16)
    # One step of each data type; log each.
    t.steps = t.checkpoint_every = 3
    t.log_every = 1
    atss_blocks.smoke_eval(c.eval)


def demo_config(c: ml_collections.ConfigDict, *, no_image_text: bool = False,
                smoke: bool = False) -> ml_collections.ConfigDict:
    """Turns `configs/demo.py`'s config (synthetic data, loop settings) into a small DetCLIPv2
    that learns the synthetic set on a CPU, including the caption-only concepts that only the
    image-text split teaches (docs/detclipv2.md). `no_image_text` drops the image-text steps
    and keeps every detection / grounding step (the ablation of the image-text pairs)."""
    c.method = "detclipv2"
    c.model = detclipv2_model("tiny")
    c.text = detclipv2_text()
    data = c.data
    c.data = detclipv2_data()
    for key in ("root", "synthetic_seed", "synthetic_num_train", "synthetic_num_val",
                "synthetic_image_size", "hflip"):
        c.data[key] = data[key]
    c.data.image_size = 128
    c.data.max_boxes = 8
    c.image_text = image_text_data()
    _synthetic(c)
    d = c.data
    d.max_concepts = 8
    d.num_negatives = 6
    c.image_text.image_size = 96
    _small_model(c.model, channels=64, bert_layers=2, num_convs=2, num_proposals=16,
                 proposal_pre_nms_topk=200)
    atss_blocks.demo_optimizer(c.optim)
    t = c.train
    _batch_sizes(t, detection=16, grounding=16, image_text=32)
    t.schedule = ("detection", "grounding", "image_text")
    # 1500 steps = 500 detection + 500 grounding + 500 image-text batches.
    t.steps = 1500
    t.log_every = 50
    t.checkpoint_every = 1000
    if no_image_text:
        # No caption data at all: grounding negatives come from the grounding phrases only.
        d.negative_dictionary = "grounding"
        kept = [k for k in t.schedule if k != "image_text"]
        t.steps = int(math.ceil(t.steps * len(kept) / len(t.schedule)))
        t.schedule = tuple(kept)
    atss_blocks.demo_eval(c.eval)
    if smoke:
        apply_smoke(c)
        if no_image_text:
            c.train.schedule = ("detection", "grounding")
    return c

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

from configs import common, glip, regionclip


def detclipv2_model(backbone: str = "swin_t") -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    # "swin_t" | "swin_l" (ovd_jax.models.swin) or a CLIP ResNet preset ("RN50", "tiny", ...).
    m.backbone = backbone
    m.backbone_overrides = ml_collections.ConfigDict()
    m.backbone_levels = ("res3", "res4", "res5")
    # FPN P3..P7 (ATSS): width and strides of its levels.
    m.channels = 256
    m.strides = (8, 16, 32, 64, 128)
    # ATSS: one square anchor of side anchor_scale x stride per location, top-k 9 per level.
    m.anchor_scale = 8.0
    m.atss_topk = 9
    # Head towers: num_convs x (3x3 conv, GroupNorm, ReLU) per branch, as vanilla ATSS; plus the
    # modulated deformable conv at the start of the classification branch (offsets from the
    # regression tower).
    m.num_convs = 4
    m.gn_groups = 32
    m.deform_cls = True
    # Text encoder (fields of ovd_jax.models.bert.BertConfig); concepts pooled over tokens
    # ("mean") or read at [CLS] ("first").
    m.bert = ml_collections.ConfigDict(glip.BERT_BASE)
    m.text_pooling = "mean"
    # Alignment logits = cos(region, concept) * scale + bias0; scale learnable, initial value.
    m.logit_scale_init = 10.0
    # L_align: concept-level sigmoid focal loss; alpha (L_reg, GIoU) and beta (L_center) weights.
    m.focal_alpha = 0.25
    m.focal_gamma = 2.0
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
    m.remat = False
    m.init_checkpoint = ""
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
    """Where the image-text pairs come from (ovd_jax/data/image_text.py sources)."""
    it = ml_collections.ConfigDict()
    it.source = "tfds"  # "synthetic", "coco_captions" or "tfds"
    it.captions_json = ""
    it.images = ""
    it.tfds_name = "cc12m"
    it.tfds_split = "train"
    it.tfds_data_dir = ""
    it.image_key = "image"
    it.caption_key = "caption"
    it.id_key = ""
    it.hflip = False  # flipping would contradict captions that say left / right
    # Low resolution (square, long side resized) for image-text batches.
    it.image_size = 320
    # Concepts per caption: its noun phrases (spaCy noun chunks when installed), at most this
    # many; `include_caption` adds the caption itself as one more concept.
    it.concepts_per_caption = 16
    it.concept_parser = "auto"
    it.include_caption = False
    # The concept dictionary grounding negatives are drawn from (data.negative_dictionary =
    # "captions"): a file with one concept per line, or the captions' noun phrases seen at least
    # min_concept_count times in the first max_caption_scan images (at most max_concepts).
    it.concepts_file = ""
    it.min_concept_count = 2
    it.max_concepts = 0
    it.max_caption_scan = 100_000
    return it


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
    c.image_text = image_text_data()
    o = c.optim
    o.name = "adamw"
    o.learning_rate = 1e-4
    o.lr_multipliers = (("text_encoder", 0.1),)
    o.weight_decay = 0.05
    o.warmup_steps = 2000
    o.grad_clip_norm = 1.0
    t = c.train
    # Global batch per data type; every step draws one type, cyclically.
    t.batch_sizes = ml_collections.ConfigDict(
        {"detection": 128, "grounding": 128, "image_text": 1024})
    t.batch_size = t.batch_sizes.detection
    t.schedule = ("detection", "grounding", "image_text")
    t.steps = 300_000
    t.checkpoint_every = 5000
    c.eval.batch_size = 8
    c.eval.score_threshold = 0.05
    c.eval.nms_threshold = 0.6
    c.eval.pre_nms_topk = 1000
    c.eval.max_detections = 100
    if "detclipv2_l" in variants:
        t.steps = 600_000
    if "lvis" in variants:
        c.data.kind = "lvis"
        c.data.val_instances = "data/lvis/lvis_v1_minival.json"
        c.data.val_images = "data/coco"
        c.eval.metric = "lvis"
        c.eval.max_detections = 300
        c.eval.score_threshold = 0.0
    if "smoke" in variants:
        apply_smoke(c)
    return c


def _small_model(c: ml_collections.ConfigDict, *, channels: int, bert_hidden: int,
                 bert_layers: int) -> None:
    m = c.model
    m.backbone = "tiny"
    m.backbone_overrides = ml_collections.ConfigDict({"width": 8})
    m.channels = channels
    m.strides = (8, 16, 32)
    # Several channels per group: with one channel per group GroupNorm cancels the preceding
    # conv's bias exactly, leaving it a gradient of pure rounding noise.
    m.gn_groups = max(1, channels // 4)
    m.bert = ml_collections.ConfigDict(dict(
        glip.BERT_BASE, hidden_size=bert_hidden, num_hidden_layers=bert_layers,
        num_attention_heads=max(1, bert_hidden // 16), intermediate_size=2 * bert_hidden,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def _synthetic(c: ml_collections.ConfigDict) -> None:
    d = c.data
    d.kind = "coco"
    d.synthetic = True
    d.min_size, d.max_size, d.train_min_sizes = 0, 0, ()
    d.split_file = ""
    d.split = ""
    d.grounding_train = ()
    d.grounding_images = ()
    d.grounding_val = ""
    d.grounding_val_images = ""
    d.grounding_copies = 1
    it = c.image_text
    it.source = "synthetic"
    it.concept_parser = "fallback"
    t = c.text
    t.tokenizer = "wordpiece"
    t.vocab_file = ""
    t.templates = ("{}",)
    t.trainable = True
    c.dtype = "float32"
    c.optim.lr_multipliers = ()


def apply_smoke(c: ml_collections.ConfigDict) -> None:
    """Tiny DetCLIPv2 on a tiny synthetic set: one step of each data type, then evaluation."""
    _synthetic(c)
    d = c.data
    d.root = "data_cache/synthetic_smoke"
    d.synthetic_num_train = 16
    d.synthetic_num_val = 8
    d.synthetic_image_size = 64
    d.image_size = 64
    d.max_boxes = 4
    d.max_concepts = 4
    d.num_negatives = 2
    c.image_text.image_size = 32
    c.image_text.concepts_per_caption = 4
    c.text.context_length = 16
    _small_model(c, channels=16, bert_hidden=16, bert_layers=1)
    m = c.model
    m.num_convs = 1
    m.num_proposals = 4
    m.proposal_pre_nms_topk = 32
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 1
    t = c.train
    t.batch_sizes = ml_collections.ConfigDict(
        {"detection": 8, "grounding": 8, "image_text": 16})
    t.batch_size = 8
    t.steps = 3
    t.log_every = 1
    t.checkpoint_every = 3
    c.eval.batch_size = 8
    c.eval.score_threshold = 0.0
    c.eval.pre_nms_topk = 100
    c.eval.max_detections = 20
    c.eval.num_visualizations = 1


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
    c.image_text.concepts_per_caption = 4
    c.text.context_length = 16
    _small_model(c, channels=64, bert_hidden=64, bert_layers=2)
    m = c.model
    m.num_convs = 2
    m.num_proposals = 16
    m.proposal_pre_nms_topk = 200
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 5.0
    t = c.train
    t.batch_sizes = ml_collections.ConfigDict(
        {"detection": 16, "grounding": 16, "image_text": 32})
    t.batch_size = 16
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
    c.eval.score_threshold = 0.0
    c.eval.nms_threshold = 0.6
    c.eval.pre_nms_topk = 300
    c.eval.max_detections = 50
    if smoke:
        apply_smoke(c)
        if no_image_text:
            c.train.schedule = ("detection", "grounding")
    return c

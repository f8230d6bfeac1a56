"""RegionCLIP recipes: the transfer detector (region embeddings vs frozen concept embeddings).

    configs/regionclip.py:coco_ovd   CLIP RN50 C4 detector, COCO OVD 48 base / 17 novel (default)
    configs/regionclip.py:lvis       CLIP RN50 C4 detector, LVIS v1 with the rare classes held out
    ...,rn50x4                       the RN50x4 towers (pooler 18, 9x9 attention-pool grid)
    ...,rpn                          the proposal model: joint RPN, trained on the base classes
    ...,pretrain                     region-text pretraining (configs/regionclip_pretrain.py)
    ...,smoke                        tiny model + synthetic data, a few CPU steps (tests)

The values follow microsoft/RegionCLIP's CLIP_fast_rcnn_R_50_C4_ovd.yaml (COCO) and
CLIP_fast_rcnn_R_50_C4.yaml (LVIS) with detectron2's defaults; docs/regionclip.md has the
table of every setting and what still differs. Two inputs must exist before training:

* `model.init_checkpoint`: converted RegionCLIP pretrained weights, e.g.
  `python -m ovd_jax.convert --format regionclip --input regionclip_pretrained-cc_rn50.pth
  --output ckpt/regionclip_rn50` (RN50x4: `..._rn50x4.pth` -> ckpt/regionclip_rn50x4).
* `model.offline_rpn`: the workdir of a proposal model trained on the base classes, e.g.
  `python train.py --config=configs/regionclip.py:coco_ovd,rpn --workdir=runs/rpn_coco48`
  (upstream uses a Mask R-CNN RPN trained on the base classes). `--config.model.offline_rpn=`
  trains the joint RPN instead.

Data paths follow the datasets' usual layout; override them on the command line, e.g.
`--config.data.train_instances=/data/coco/annotations/instances_train2017.json`.
"""

from __future__ import annotations

import ml_collections

from configs import common, regionclip_pretrain
from ovd_jax.text.prompts import CLIP_IMAGENET_TEMPLATES

# A short list for text towers trained from scratch (the demo) and smoke runs.
SHORT_TEMPLATES = ("a {}.", "a photo of a {}.", "there is a {} in the scene.")

# detectron2 ResizeShortestEdge settings of both recipes, and the static canvas (1333 -> 1344).
TEST_MIN_SIZE = 800
MAX_SIZE = 1333
TRAIN_MIN_SIZES = (640, 672, 704, 736, 768, 800)
CANVAS = -(-MAX_SIZE // 32) * 32


def regionclip_model(vision: str = "RN50", text: str = "RN50") -> ml_collections.ConfigDict:
    """The detector's settings with defaults for a small tower trained from scratch (the demo);
    `get_config` sets the upstream values (`upstream_model`)."""
    m = ml_collections.ConfigDict()
    m.vision = vision  # preset name of ovd_jax.models.clip_resnet.clip_resnet
    m.text = text  # preset name of ovd_jax.models.clip_text.clip_text
    m.vision_overrides = ml_collections.ConfigDict()  # e.g. width, layers, output_dim
    m.text_overrides = ml_collections.ConfigDict()
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
    # detectron2 FREEZE_AT (0 none, 1 stem, 2 stem + res2) and FrozenBN (batch-norm affine
    # parameters frozen, as in every detectron2 ResNet); both off for towers trained from scratch.
    m.freeze_at = 0
    m.frozen_bn = False
    # Proposals: "" = the detector's own RPN, trained jointly; else the workdir of a RegionCLIP
    # run whose backbone + RPN serve frozen (upstream: an offline RPN trained on base classes).
    m.offline_rpn = ""
    # RPN on the stride-16 res4 map (RegionCLIP's C4 detector).
    m.anchor_sizes = (32, 64, 128, 256, 512)
    m.anchor_aspect_ratios = (0.5, 1.0, 2.0)
    m.rpn_channels = 1024
    m.rpn_iou_thresholds = (0.3, 0.7)
    m.rpn_batch_size_per_image = 256
    m.rpn_positive_fraction = 0.5
    m.rpn_pre_nms_topk_train = 2000
    m.rpn_post_nms_topk_train = 512
    m.rpn_pre_nms_topk_test = 1000
    m.rpn_post_nms_topk_test = 1000
    m.rpn_nms_threshold = 0.7
    m.rpn_min_box_size = 0.0
    m.rpn_loss_weight = 1.0
    # RoI head: RoIAlign 14x14 (aligned) -> CLIP res5 -> AttentionPool2d.
    m.pooler_resolution = 14
    m.pooler_sampling_ratio = 2
    m.roi_batch_size_per_image = 512
    m.roi_positive_fraction = 0.25
    m.roi_iou_threshold = 0.5
    m.box_reg_weights = (10.0, 10.0, 5.0, 5.0)
    # Region-concept logits = cos / temperature; background logit fixed at 0.
    m.temperature = 0.01
    # "focal_scaled": w * CE * (1 - p_t)^focal_gamma, plain mean over RoIs (upstream
    # FOCAL_SCALED_LOSS, COCO); "weighted_ce": sum(w * CE) / sum(w) (LVIS). w = background_weight
    # on background RoIs, 1 otherwise.
    m.cls_loss = "focal_scaled"
    m.focal_gamma = 0.5
    m.background_weight = 0.2
    m.box_loss_weight = 1.0
    # Inference score: "softmax" (class probability) or "sqrt_objectness":
    # sqrt(class_prob * sigmoid(rpn_logit)) (upstream MULTIPLY_RPN_SCORE, with the raw logit).
    m.score = "softmax"
    # A checkpoint directory written by `python -m ovd_jax.convert` to start from (empty: random).
    m.init_checkpoint = ""
    return m


def upstream_model(m: ml_collections.ConfigDict) -> None:
    """detectron2 / RegionCLIP values that differ from the demo-friendly defaults."""
    m.freeze_at = 2
    m.frozen_bn = True
    m.offline_rpn = "runs/rpn_coco48"
    m.rpn_pre_nms_topk_train = 12000
    m.rpn_post_nms_topk_train = 2000
    m.rpn_pre_nms_topk_test = 6000
    m.rpn_post_nms_topk_test = 1000
    m.init_checkpoint = "ckpt/regionclip_rn50"


def regionclip_text() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.tokenizer = "clip"  # "clip" (BPE) or "wordpiece" (BERT vocab.txt)
    t.vocab_file = ""  # empty: the open-clip-torch BPE file / the synthetic set's vocab.txt
    t.context_length = 77
    t.templates = SHORT_TEMPLATES
    # Train the text tower jointly (False: concept embeddings are computed once, frozen).
    t.trainable = False
    return t


def coco_data() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.kind = "coco"  # "coco", "lvis" or "tfds"
    d.synthetic = False
    d.root = "data_cache/synthetic"
    d.synthetic_seed = 0
    d.synthetic_num_train = 600
    d.synthetic_num_val = 150
    d.synthetic_image_size = 128
    common.input_throughput(d)
    # A missing / unreadable image: "error" stops with its name; "skip" drops it from training
    # (an evaluation batch pads its slot), logs each file once and counts them.
    d.on_bad_image = "error"
    d.train_instances = "data/coco/annotations/instances_train2017.json"
    d.train_images = "data/coco/train2017"
    d.val_instances = "data/coco/annotations/instances_val2017.json"
    d.val_images = "data/coco/val2017"
    d.tfds_name = ""  # e.g. "coco/2017" with data.kind = "tfds"
    d.tfds_data_dir = ""
    d.tfds_train_split = "train"
    d.tfds_val_split = "validation"
    # Base/novel split: a JSON {"base": [...], "novel": [...]}; empty: category flags / LVIS 'r'.
    d.split_file = ""
    # Or a built-in split by name ("coco_48_17": OVR-CNN's COCO split, 65 of the 80 classes).
    d.split = ""
    # Class names to train on (default: the split's base classes) and to evaluate on (default:
    # every category of the evaluation set). Names must match the JSON categories.
    d.train_classes = ()
    d.eval_classes = ()
    # Training annotations outside the training vocabulary (novel / LVIS rare classes): False
    # is an error, True removes them with a logged count (a warning for novel ones).
    d.drop_non_base_annotations = False
    # The static square canvas S (a multiple of 32). Alone: the long side is resized to S.
    d.image_size = 800
    # detectron2 ResizeShortestEdge instead (0 = off): shorter side min_size (training: one of
    # train_min_sizes per image), longer side <= max_size, padded onto the S x S canvas.
    d.min_size = 0
    d.max_size = 0
    d.train_min_sizes = ()
    # Repeat-factor sampling threshold t (LVIS 0.001; 0 = uniform sampling).
    d.repeat_factor_threshold = 0.0
    d.max_boxes = 100
    d.hflip = True
    return d


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = common.parse_arg(arg, ("coco_ovd", "lvis", "rn50x4", "rpn", "pretrain", "smoke"))
    if {"coco_ovd", "lvis"} <= variants:
        raise ValueError("pick one dataset variant: 'coco_ovd' or 'lvis'.")
    c = common.base_config()
    c.method = "regionclip"
    c.model = regionclip_model()
    upstream_model(c.model)
    c.text = regionclip_text()
    c.text.templates = CLIP_IMAGENET_TEMPLATES
    c.data = coco_data()
    d = c.data
    d.split = "coco_48_17"
    d.drop_non_base_annotations = True
    d.image_size = CANVAS
    d.min_size, d.max_size, d.train_min_sizes = TEST_MIN_SIZE, MAX_SIZE, TRAIN_MIN_SIZES
    d.image_transfer = "uint8"  # full-size: normalise on the device (4x less host->device)

    # detectron2 SGD + WarmupMultiStepLR (no gradient clipping); AdamW: optim.name=adamw.
    o = c.optim
    o.name = "sgd"
    o.learning_rate = 0.002
    o.momentum = 0.9
    o.weight_decay = 1e-4
    o.schedule = "multistep"
    o.milestones = (60_000, 80_000)
    o.gamma = 0.1
    o.warmup_steps = 5000
    o.warmup_factor = 0.001
    o.grad_clip_norm = 0.0
    c.train.steps = 90_000
    c.train.batch_size = 16
    c.train.log_every = 20
    c.train.checkpoint_every = 5000
    c.eval.batch_size = 8
    c.eval.score_threshold = 0.001
    c.eval.nms_threshold = 0.5
    c.eval.max_detections = 100
    c.eval.pre_nms_topk = 0  # no cut before the per-class NMS, as upstream
    # 8 images x 1,000 proposals through the RN50 RoI head at once would keep 136 GB of
    # temporaries on the CPU backend (~17 MB per RoI); 32 per image keep 4.3 GB at batch 8 and
    # are faster than all at once on a CPU (docs/regionclip.md).
    c.eval.rois_per_chunk = 32
    if "lvis" in variants:
        d.kind = "lvis"
        d.split = ""  # LVIS: rare classes are novel (category frequency "r")
        d.train_instances = "data/lvis/lvis_v1_train.json"
        d.train_images = "data/coco"  # holds train2017/ and val2017/, as LVIS v1 uses both
        d.val_instances = "data/lvis/lvis_v1_val.json"
        d.val_images = "data/coco"
        d.max_boxes = 300
        d.repeat_factor_threshold = 0.001
        c.model.offline_rpn = "runs/rpn_lvis866"
        c.model.background_weight = 0.8
        c.model.cls_loss = "weighted_ce"
        c.model.score = "sqrt_objectness"
        o.milestones = (120_000, 160_000)
        c.train.steps = 180_000
        c.eval.metric = "lvis"
        c.eval.max_detections = 300
        c.eval.score_threshold = 0.02
    if "rn50x4" in variants:
        c.model.vision = c.model.text = "RN50x4"
        c.model.pooler_resolution = 18  # 9x9 res5 grid = the RN50x4 attention pool's (288/32)
        c.model.rpn_channels = 1280  # res4 width of RN50x4
        c.model.init_checkpoint = "ckpt/regionclip_rn50x4"
    if "rpn" in variants:
        c.model.offline_rpn = ""  # the joint RPN: this run becomes the offline proposal model
    if "smoke" in variants:
        apply_smoke(c)
    if "pretrain" in variants:  # region-text pretraining (configs/regionclip_pretrain.py)
        return regionclip_pretrain.regionclip_pretrain(c, smoke="smoke" in variants)
    return c


def apply_smoke(c: ml_collections.ConfigDict) -> None:
    """Tiny model on a tiny synthetic set: trains a few steps and evaluates on CPU in seconds.

    Keeps the recipe's losses, optimiser kind, freezing and text mode; shrinks sizes, uses the
    joint RPN and random init (no checkpoint files needed)."""
    d = c.data
    common.smoke_synthetic_data(d)
    if d.min_size:  # keep the shortest-edge path, at smoke scale
        d.min_size, d.max_size, d.train_min_sizes = 48, 64, (40, 48)
    c.text.tokenizer = "wordpiece"
    c.text.vocab_file = ""
    c.text.context_length = 8
    c.text.templates = ("a {}.", "a photo of a {}.")
    c.model.vision = "tiny"
    c.model.text = "tiny"
    c.model.offline_rpn = ""
    c.model.init_checkpoint = ""
    c.model.anchor_sizes = (16, 32)
    c.model.rpn_channels = 32
    c.model.rpn_batch_size_per_image = 32
    c.model.rpn_pre_nms_topk_train = 64
    c.model.rpn_post_nms_topk_train = 16
    c.model.rpn_pre_nms_topk_test = 64
    c.model.rpn_post_nms_topk_test = 16
    c.model.roi_batch_size_per_image = 16
    c.model.pooler_resolution = 4
    common.smoke_train(c)
    c.optim.milestones = tuple(m for m in (2, 3) if c.optim.milestones)
    common.smoke_eval(c.eval)

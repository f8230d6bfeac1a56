"""RegionCLIP recipes: the transfer detector (region embeddings vs frozen concept embeddings).

    configs/regionclip.py:coco_ovd   CLIP RN50 C4 detector, COCO OVD 48 base / 17 novel
    configs/regionclip.py:lvis       CLIP RN50 C4 detector, LVIS with rare classes held out
    ...,smoke                        tiny model + synthetic data, a few CPU steps (tests)

Data paths point at the real datasets' layout; override them on the command line, e.g.
`--config.data.train_instances=/data/coco/annotations/instances_train2017_base.json`.
"""

from __future__ import annotations

import ml_collections

from configs import common

# The 81 templates of CLIP's ImageNet prompt ensemble are used by RegionCLIP for concept
# embeddings; the demo uses a short list because its text tower is trained from scratch.
SHORT_TEMPLATES = ("a {}.", "a photo of a {}.", "there is a {} in the scene.")


def regionclip_model(vision: str = "RN50", text: str = "RN50") -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.vision = vision  # preset name of ovd_jax.models.clip_resnet.clip_resnet
    m.text = text  # preset name of ovd_jax.models.clip_text.clip_text
    m.vision_overrides = ml_collections.ConfigDict()  # e.g. width, layers, output_dim
    m.text_overrides = ml_collections.ConfigDict()
    m.remat = False
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
    m.focal_gamma = 0.5
    m.background_weight = 0.2
    m.box_loss_weight = 1.0
    # Inference score: "softmax" (transfer detector) or "sqrt_objectness" (zero-shot:
    # sqrt(class_prob * sigmoid(rpn_logit)); upstream uses the raw logit and drops negatives).
    m.score = "softmax"
    # A checkpoint directory written by `python -m ovd_jax.convert` to start from (empty: random).
    m.init_checkpoint = ""
    return m


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
    d.train_instances = "data/coco/annotations/instances_train2017.json"
    d.train_images = "data/coco/train2017"
    d.val_instances = "data/coco/annotations/instances_val2017.json"
    d.val_images = "data/coco/val2017"
    d.tfds_name = ""  # e.g. "coco/2017" with data.kind = "tfds"
    d.tfds_data_dir = ""
    # Base/novel split: a JSON {"base": [...], "novel": [...]}; empty: category flags / LVIS 'r'.
    d.split_file = ""
    # Class names to train on (default: the split's base classes) and to evaluate on (default:
    # every category of the evaluation set). Names must match the JSON categories.
    d.train_classes = ()
    d.eval_classes = ()
    d.image_size = 800
    d.max_boxes = 100
    d.hflip = True
    return d


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = common.parse_arg(arg, ("coco_ovd", "lvis", "smoke"))
    c = common.base_config()
    c.method = "regionclip"
    c.model = regionclip_model()
    c.text = regionclip_text()
    c.data = coco_data()
    c.optim.learning_rate = 2e-4
    c.train.steps = 90_000
    c.train.batch_size = 16
    if "lvis" in variants:
        c.data.kind = "lvis"
        c.data.train_instances = "data/lvis/lvis_v1_train.json"
        c.data.train_images = "data/coco"
        c.data.val_instances = "data/lvis/lvis_v1_val.json"
        c.data.val_images = "data/coco"
        c.data.max_boxes = 300
        c.model.background_weight = 0.8
        c.eval.metric = "lvis"
        c.eval.max_detections = 300
    if "smoke" in variants:
        apply_smoke(c)
    return c


def apply_smoke(c: ml_collections.ConfigDict) -> None:
    """Tiny model on a tiny synthetic set: trains a few steps and evaluates on CPU in seconds."""
    c.data.kind = "coco"
    c.data.synthetic = True
    c.data.root = "data_cache/synthetic_smoke"
    c.data.synthetic_num_train = 16
    c.data.synthetic_num_val = 8
    c.data.synthetic_image_size = 64
    c.data.image_size = 64
    c.data.max_boxes = 4
    c.data.split_file = ""
    c.text.tokenizer = "wordpiece"
    c.text.vocab_file = ""
    c.text.context_length = 8
    c.text.templates = ("a {}.",)
    c.text.trainable = True
    c.model.vision = "tiny"
    c.model.text = "tiny"
    c.model.anchor_sizes = (16, 32)
    c.model.rpn_channels = 32
    c.model.rpn_batch_size_per_image = 32
    c.model.rpn_pre_nms_topk_train = 64
    c.model.rpn_post_nms_topk_train = 16
    c.model.rpn_pre_nms_topk_test = 64
    c.model.rpn_post_nms_topk_test = 16
    c.model.roi_batch_size_per_image = 16
    c.model.pooler_resolution = 4
    c.train.steps = 4
    c.train.batch_size = 8
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.optim.warmup_steps = 1
    c.eval.batch_size = 8
    c.eval.max_detections = 20
    c.eval.num_visualizations = 1

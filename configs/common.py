"""Pieces shared by every recipe: optimiser, mesh/sharding rules, training-loop and eval settings,
and blocks several recipes build alike (image-text pairs; the smoke variants' data, loop, eval).

Each recipe file (`demo.py`, `regionclip.py`, ...) builds on these and exposes `get_config(arg)`.
`arg` is a comma-separated list of variant names; `smoke` is accepted by every recipe and shrinks
model and data so the recipe trains a few steps and evaluates on a CPU in under a minute.
"""

from __future__ import annotations

import ml_collections

# Logical parameter axes (see ovd_jax/models/layers.py) -> mesh axes. Data parallel by default:
# with mesh (data=-1, fsdp=1, model=1) every rule resolves to replication; raising `fsdp` shards
# the wide 'embed' / 'conv_in' dimensions, raising `model` shards heads, MLP and output channels.
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("conv_out", "model"),
    ("vocab", "model"),
    ("norm", None),
    ("pos", None),
)


def parse_arg(arg: str | None, known: tuple[str, ...]) -> set[str]:
    """Splits a `get_config` argument like 'coco_ovd,smoke' and rejects unknown variant names."""
    parts = {p.strip() for p in (arg or "").split(",") if p.strip()}
    unknown = parts - set(known)
    if unknown:
        raise ValueError(
            f"unknown config variant(s) {sorted(unknown)}; this recipe accepts {sorted(known)} "
            "(comma-separated, e.g. 'configs/demo.py:smoke')."
        )
    return parts


def base_config() -> ml_collections.ConfigDict:
    """Settings every recipe has; recipes fill `method`, `data`, `model`, `text` and `loss`."""
    c = ml_collections.ConfigDict()
    c.method = ""
    c.seed = 0
    # Compute dtype of the model ("float32" or "bfloat16"); parameters stay float32.
    c.dtype = "float32"

    c.mesh = ml_collections.ConfigDict()
    # (data, fsdp, model); -1 takes all remaining devices.
    c.mesh.shape = (-1, 1, 1)
    c.mesh.axes = ("data", "fsdp", "model")
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = DEFAULT_SHARDING_RULES
    # Parameters with fewer elements are replicated; a mesh axis is also skipped on any
    # dimension it does not divide (ovd_jax/training/sharding.py: fit_spec).
    c.sharding.min_shard_size = 1 << 14

    c.optim = ml_collections.ConfigDict()
    # "adamw" or "sgd" (momentum, coupled weight decay); see ovd_jax/training/optimizer.py.
    c.optim.name = "adamw"
    c.optim.learning_rate = 1e-3
    # "cosine" (warmup from 0, cosine to 0) or "multistep" (detectron2 WarmupMultiStepLR:
    # warmup from warmup_factor * lr, then x gamma at each of `milestones`).
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.warmup_factor = 0.001
    c.optim.milestones = ()
    c.optim.gamma = 0.1
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 5.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.momentum = 0.9
    # Parameter-path prefixes (joined with '/') that receive no updates, e.g. a frozen teacher.
    c.optim.frozen = ()
    # Multipliers of the learning rate for parameter-path prefixes, e.g. (("text_encoder", 0.1),).
    c.optim.lr_multipliers = ()
    # With model.init_checkpoint set: learning-rate multiplier of the towers copied from it.
    c.optim.pretrained_lr_multiplier = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.eval_at_end = True
    # Batch per step over all processes; must divide by the data-parallel mesh size.
    c.train.batch_size = 16
    # Gradient accumulation: each step averages the gradients of this many micro-batches of its
    # batch (one update per step; activations of one micro-batch at a time).
    c.train.grad_accum_steps = 1
    # A step whose loss or gradients are NaN/Inf is never applied. 0: stop at the first one
    # (naming the step, its image ids and the non-finite loss terms); N: skip up to N of them
    # over the whole run (each logged, counted in the metric train/nonfinite_skipped).
    c.train.skip_nonfinite = 0
    # Resuming from a checkpoint trained with another config.model.*, config.text.*, input size
    # or training classes is refused; True continues anyway (the differences are logged).
    c.train.allow_config_change = False

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16
    c.eval.max_detections = 100
    c.eval.score_threshold = 0.001
    c.eval.nms_threshold = 0.5
    c.eval.pre_nms_topk = 1000
    # RegionCLIP at inference: each image's proposals go through the RoI head (res5 + attention
    # pool) this many at a time (N x rois_per_chunk RoIs per step); 0 = all at once. Bounds
    # memory: the RN50 head keeps ~17 MB of temporaries per RoI on the CPU backend.
    c.eval.rois_per_chunk = 0
    # "coco" or "lvis" (lvis uses 300 detections per image).
    c.eval.metric = "coco"
    c.eval.num_visualizations = 4
    return c


def image_text_pairs(*, source: str, tfds_name: str, image_size: int
                     ) -> ml_collections.ConfigDict:
    """The image-text block (config.image_text) of the recipes trained on caption pairs: where
    the pairs come from (ovd_jax/data/image_text.py sources) and how the concept pool is built.
    `source`, `tfds_name` and `image_size` (input side; 0: data.image_size) are the recipe's."""
    it = ml_collections.ConfigDict()
    it.source = source  # "synthetic", "coco_captions" or "tfds"
    it.captions_json = ""  # coco_captions: a COCO captions JSON ...
    it.images = ""  # ... and its image folder
    it.tfds_name = tfds_name  # tfds: a prepared array_record dataset, e.g. a CC3M build
    it.tfds_split = "train"
    it.tfds_data_dir = ""
    it.image_key = "image"
    it.caption_key = "caption"
    it.id_key = ""
    it.hflip = False  # flipping would contradict captions that say left / right
    it.image_size = image_size
    # Concept pool: a file with one concept per line, or (empty) the captions' noun phrases
    # seen >= min_concept_count times in the first max_caption_scan images' captions (at most
    # max_concepts; 0: no cap).
    it.concepts_file = ""
    it.concept_parser = "auto"  # "auto" (spaCy if installed, else fallback), "spacy", "fallback"
    it.min_concept_count = 2
    it.max_concepts = 0
    it.max_caption_scan = 100_000
    return it


def input_throughput(d: ml_collections.ConfigDict) -> None:
    """Sets the input-pipeline throughput keys of `d` (config.data) to their defaults, which
    reproduce the host-normalised, single-process pipeline exactly."""
    # "float32": images normalised on the host; "uint8": the resized uint8 pixels go to the
    # device (a quarter of the bytes) and are normalised inside the jitted step / evaluation.
    d.image_transfer = "float32"
    # Batches the training loop places on the devices ahead of the step (0: none).
    d.device_prefetch = 2
    # grain worker processes decoding / augmenting (0: threads of the training process only;
    # N > 0 gives the same batches).
    d.num_workers = 0


def smoke_synthetic_data(d: ml_collections.ConfigDict) -> None:
    """Points `d` (config.data) at the smoke variants' tiny synthetic set: 16 training and 8
    validation images of 64 px on a 64 px canvas, at most 4 boxes, no base/novel split file."""
    d.kind = "coco"
    d.synthetic = True
    d.root = "data_cache/synthetic_smoke"
    d.synthetic_num_train = 16
    d.synthetic_num_val = 8
    d.synthetic_image_size = 64
    d.image_size = 64
    d.max_boxes = 4
    d.split_file = ""
    d.split = ""
    d.image_transfer = "float32"  # the smoke numbers stay those of the host-normalised path


def smoke_train(c: ml_collections.ConfigDict) -> None:
    """Sets the smoke variants' loop on `c`: 4 steps of 8 images, logging and checkpointing
    every 2 steps, one warmup step."""
    c.train.steps = 4
    c.train.batch_size = 8
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.optim.warmup_steps = 1


def smoke_eval(e: ml_collections.ConfigDict) -> None:
    """Sets the smoke variants' evaluation on `e` (config.eval): batches of 8, 20 detections per
    image, one visualisation."""
    e.batch_size = 8
    e.max_detections = 20
    e.num_visualizations = 1

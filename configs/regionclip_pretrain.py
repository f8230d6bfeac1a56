"""RegionCLIP region-text pretraining recipes: the CLIP teacher stage and the pretraining stage.

    configs/demo.py:teacher        CLIP teacher on the synthetic image-text split (+ proposal RPN)
    configs/demo.py:pretrain       region-text pretraining from it (--config.model.teacher=DIR)
    configs/regionclip.py:pretrain RN50 student from OpenAI CLIP RN50, CC3M-style pairs
    ...,smoke                      tiny sizes for tests

The demo chain (docs/regionclip_pretraining.md):

    python train.py --config=configs/demo.py:teacher  --workdir=runs/teacher
    python train.py --config=configs/demo.py:pretrain --workdir=runs/pretrain \
        --config.model.teacher=runs/teacher
    python train.py --config=configs/demo.py --workdir=runs/transfer \
        --config.model.init_checkpoint=runs/pretrain

This module holds the functions; `configs/demo.py` and `configs/regionclip.py` dispatch to them.
"""

from __future__ import annotations

import ml_collections

from configs import common


def image_text_data() -> ml_collections.ConfigDict:
    """The pretraining stages' image-text pairs and concept pool (ovd_jax/data/image_text.py):
    the synthetic set's captions by default, images at data.image_size."""
    it = common.image_text_pairs(source="synthetic", tfds_name="", image_size=0)
    it.batch_size = 0  # image-text batch size (0: config.train.batch_size)
    return it


def clip_settings() -> ml_collections.ConfigDict:
    """The CLIP teacher stage (method "clip")."""
    cl = ml_collections.ConfigDict()
    cl.logit_scale_init = 2.6592600369644  # log(1 / 0.07), CLIP's initial temperature
    cl.max_logit_scale = 4.605170185988092  # log(100), CLIP's cap
    # Image embedding: "attention_pool" (CLIP's) or "global_box" (the region head on one
    # whole-image box; see ovd_jax/methods/clip.py).
    cl.image_pooling = "attention_pool"
    # Train a class-agnostic RPN head on the detection split's base boxes (stop-gradient res4)
    # to serve the pretraining stage as its frozen proposal network.
    cl.train_rpn = True
    return cl


def pretrain_settings() -> ml_collections.ConfigDict:
    """Region-text pretraining (method "regionclip_pretrain"); upstream values as defaults
    (configs/pretrain/RegionCLIP_RN50.yaml and PretrainFastRCNN)."""
    p = ml_collections.ConfigDict()
    p.proposals_per_image = 300  # PRETRAIN_RPN_REGIONS: offline RPN post-NMS top-k
    p.proposal_pre_nms_topk = 6000  # detectron2 RPN PRE_NMS_TOPK_TEST
    p.proposal_nms_threshold = 0.5  # OFFLINE_RPN_NMS_THRESH
    p.regions_per_image = 100  # PRETRAIN_SAMPLE_REGIONS, drawn at random among the proposals
    p.temperature = 0.01  # CLSS_TEMP: student logits (all three losses)
    p.teacher_temperature = 0.01  # s_temp of get_psuedo_concept_labels
    p.concept_threshold = 0.1  # CONCEPT_THRES
    p.use_region_concept = True
    p.region_concept_weight = 1.0
    p.use_distillation = True
    p.distillation_weight = 1.0
    p.use_image_text = True  # PRETRAIN_IMG_TXT_LEVEL
    p.image_text_weight = 1.0
    return p


def demo_teacher(c: ml_collections.ConfigDict, *, smoke: bool) -> ml_collections.ConfigDict:
    """`configs/demo.py:teacher`: CLIP towers (those of the demo detector) trained on the
    synthetic image-text split, plus the proposal RPN on the detection split's base boxes."""
    c.method = "clip"
    c.image_text = image_text_data()
    c.image_text.batch_size = 64
    # Image-text pairs at the detector's 128 px (image_text.image_size 0; a lower size, as
    # CLIP's 224 px for RegionCLIP's 800 px student, is a config choice).
    c.image_text.image_size = 0
    c.clip = clip_settings()
    # 128 px inputs give an 8 x 8 res4 map, regions are read on 6 x 6: train on that grid.
    c.clip.image_pooling = "global_box"
    c.text.trainable = True
    c.model.score = "sqrt_objectness"
    c.model.teacher = ""
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.1  # CLIP's
    c.train.steps = 600
    c.train.batch_size = 16  # detection images per step for the RPN
    c.train.checkpoint_every = 600
    if smoke:
        _smoke(c)
        c.image_text.batch_size = 8
        c.image_text.image_size = 0
    return c


def demo_pretrain(c: ml_collections.ConfigDict, *, smoke: bool) -> ml_collections.ConfigDict:
    """`configs/demo.py:pretrain`: region-text pretraining of the demo towers from the teacher
    (`--config.model.teacher=runs/teacher`), proposals from the teacher run's RPN."""
    c.method = "regionclip_pretrain"
    c.image_text = image_text_data()
    c.pretrain = pretrain_settings()
    c.pretrain.proposals_per_image = 64
    c.pretrain.proposal_pre_nms_topk = 256
    c.pretrain.regions_per_image = 32
    c.text.trainable = False
    c.model.teacher = ""
    c.model.score = "sqrt_objectness"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 30
    c.train.steps = 400
    c.train.batch_size = 32
    c.train.checkpoint_every = 400
    if smoke:
        _smoke(c)
        _smoke_regions(c.pretrain)
    return c


def regionclip_pretrain(c: ml_collections.ConfigDict, *, smoke: bool
                        ) -> ml_collections.ConfigDict:
    """`configs/regionclip.py:pretrain`: the RN50 student initialised from, and distilled from,
    converted OpenAI CLIP RN50 weights (`python -m ovd_jax.convert --format openai_clip --input
    RN50.pt --output ckpt/clip_rn50`), on image-text pairs (a TFDS CC3M build), proposals from an
    offline RPN run (`model.offline_rpn`, as the transfer recipe's), concepts from a file
    (`image_text.concepts_file`). Zero-shot evaluation on the recipe's detection validation set.

    `c` is the (already smoke-shrunk, with `smoke`) transfer recipe; its detection training
    files are not read for training by this method (it evaluates zero-shot only).
    """
    c.method = "regionclip_pretrain"
    c.image_text = image_text_data()
    c.pretrain = pretrain_settings()
    c.text.trainable = False
    c.model.init_checkpoint = ""  # the student starts from the teacher
    c.model.score = "sqrt_objectness"
    if smoke:
        _smoke(c)
        _smoke_regions(c.pretrain)
        c.model.teacher = ""
        return c
    c.model.teacher = "ckpt/clip_rn50"
    c.image_text.source = "tfds"
    c.image_text.tfds_name = "cc3m"
    c.image_text.concepts_file = "data/concepts/concepts.txt"
    # The training side of the detection config is built but unused: point it at the
    # validation file so no training annotations are needed.
    c.data.train_instances, c.data.train_images = c.data.val_instances, c.data.val_images
    # Image-text batches are resized long side = data.image_size (no shortest-edge resize).
    c.data.min_size = c.data.max_size = 0
    c.data.train_min_sizes = ()
    c.data.image_size = 800
    # configs/pretrain/RegionCLIP_RN50.yaml: 96 images, lr 0.002 (x0.1 at 300k, 525k), 600k
    # steps, gradient-norm clipping 5.
    o = c.optim
    o.name = "sgd"
    o.learning_rate = 0.002
    o.schedule = "multistep"
    o.milestones = (300_000, 525_000)
    o.grad_clip_norm = 5.0
    c.train.steps = 600_000
    c.train.batch_size = 96
    return c


def _smoke(c: ml_collections.ConfigDict) -> None:
    """Seconds on a CPU; captions need a longer context than the smoke prompts."""
    c.text.context_length = 24
    common.smoke_train(c)


def _smoke_regions(p: ml_collections.ConfigDict) -> None:
    """Smoke sizes of the pretraining block `p` (config.pretrain): 16 proposals per image from
    the top 64 before NMS, 8 of them sampled as regions."""
    p.proposals_per_image = 16
    p.proposal_pre_nms_topk = 64
    p.regions_per_image = 8

"""The embedded default: RegionCLIP-style transfer detector on the built-in synthetic set.

`python train.py --config=configs/demo.py --workdir=runs/demo` generates the synthetic
open-vocabulary dataset (colour x shape categories, some combinations held out as novel) if it is
absent, trains a small CLIP-style detector on the base classes for a few minutes on a CPU, and
evaluates on all classes, reporting base and novel AP50. `configs/demo.py:smoke` is the tiny
variant the tests run.
"""

from __future__ import annotations

from configs import common, detclipv2, glip, regionclip, regionclip_pretrain


def get_config(arg: str | None = None):
    variants = common.parse_arg(arg, ("smoke", "glip", "teacher", "pretrain", "detclipv2",
                                      "no_image_text"))
    c = common.base_config()
    c.method = "regionclip"
    c.model = regionclip.regionclip_model(vision="tiny", text="tiny")
    c.text = regionclip.regionclip_text()
    c.data = regionclip.coco_data()

    c.data.synthetic = True
    c.data.root = "data_cache/synthetic"
    c.data.image_size = 128
    c.data.max_boxes = 8
    c.text.tokenizer = "wordpiece"  # a vocab.txt written with the synthetic set
    # 24 fits the image-text captions of the pretraining stages, whose text tower the transfer
    # loads; prompts are shorter, and the padding after their end token changes nothing.
    c.text.context_length = 24
    c.text.templates = ("a {}.", "a photo of a {}.")
    c.text.trainable = True

    m = c.model
    # A narrow tower (res4 128 channels) keeps a step near 0.4 s on a 2-core CPU.
    m.vision_overrides.width = 8
    m.anchor_sizes = (16, 32, 64)
    m.rpn_channels = 64
    m.rpn_batch_size_per_image = 64
    m.rpn_pre_nms_topk_train = 256
    m.rpn_post_nms_topk_train = 64
    m.rpn_pre_nms_topk_test = 256
    m.rpn_post_nms_topk_test = 64
    m.roi_batch_size_per_image = 32
    m.pooler_resolution = 6
    # The attention pool's 3x3 grid (= pooler 6 / 2), stated so that a run started from a
    # pretraining workdir (model.init_checkpoint) builds the same tower as one from scratch.
    m.vision_overrides.input_resolution = 96
    m.pooler_sampling_ratio = 1

    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 1e-4
    c.train.steps = 800
    c.train.batch_size = 16
    c.train.log_every = 50
    c.train.checkpoint_every = 400
    c.eval.batch_size = 32
    c.eval.max_detections = 50
    if "glip" in variants:  # GLIP on the same data (configs/glip.py:demo_config)
        return glip.demo_config(c, smoke="smoke" in variants)
    if "detclipv2" in variants:  # DetCLIPv2 on the same data (configs/detclipv2.py:demo_config)
        return detclipv2.demo_config(c, no_image_text="no_image_text" in variants,
                                     smoke="smoke" in variants)
    if "no_image_text" in variants:
        raise ValueError("'no_image_text' is a variant of 'detclipv2' (configs/demo.py:"
                         "detclipv2,no_image_text).")
    if "smoke" in variants:
        regionclip.apply_smoke(c)
        c.model.vision_overrides.input_resolution = 64  # pooler 4 -> 2x2 grid
    # RegionCLIP pretraining stages (configs/regionclip_pretrain.py).
    if "teacher" in variants:
        return regionclip_pretrain.demo_teacher(c, smoke="smoke" in variants)
    if "pretrain" in variants:
        return regionclip_pretrain.demo_pretrain(c, smoke="smoke" in variants)
    return c

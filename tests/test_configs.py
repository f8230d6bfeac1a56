"""Every recipe (and its smoke variant) builds, and its model initialises under eval_shape."""

import glob
import importlib
import os

import jax
import pytest
from helpers import REPO

from ovd_jax import methods

RECIPES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
    # Helper modules of a recipe (e.g. regionclip_pretrain.py) have no get_config.
    and "def get_config(" in open(p, encoding="utf-8").read()
)
# Variants each recipe accepts besides 'smoke' (all are exercised).
VARIANTS = {"demo": [""], "regionclip": ["coco_ovd", "lvis", "rn50x4", "lvis,rn50x4",
                                         "coco_ovd,rpn"]}
VARIANTS["demo"] += ["detclipv2", "detclipv2,no_image_text"]
VARIANTS["detclipv2"] = ["detclipv2_t", "detclipv2_l", "detclipv2_t,lvis"]
VARIANTS["demo"] += ["glip", "teacher", "pretrain"]
VARIANTS["regionclip"] += ["pretrain"]
VARIANTS["glip"] = ["glip_t", "glip_l", "glip_t,lvis"]


def _cases():
    for name in RECIPES:
        for v in VARIANTS.get(name, [""]):
            yield name, v
            yield name, ",".join(x for x in (v, "smoke") if x)


@pytest.mark.parametrize("recipe,arg", list(_cases()))
def test_config_builds_and_model_initialises(recipe, arg):
    config = importlib.import_module(f"configs.{recipe}").get_config(arg)
    method = methods.get(config.method)
    vocab = 49408 if config.text.tokenizer == "clip" else 128
    model = method.build_model(config, text_vocab_size=vocab, eot_token_id=None)
    args = method.init_args(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    n_params = sum(x.size for x in jax.tree.leaves(shapes["params"]))
    assert n_params > 10_000, (recipe, arg, n_params)


def test_every_recipe_is_covered():
    assert set(RECIPES) <= set(VARIANTS), f"add variants for {set(RECIPES) - set(VARIANTS)}"


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown config variant"):
        importlib.import_module("configs.demo").get_config("smoek")


def test_regionclip_recipe_values():
    """The RegionCLIP recipes carry upstream's settings (CLIP_fast_rcnn_R_50_C4_ovd.yaml,
    CLIP_fast_rcnn_R_50_C4.yaml and detectron2's defaults), not only a model that builds."""
    from ovd_jax.text.prompts import CLIP_IMAGENET_TEMPLATES

    rc = importlib.import_module("configs.regionclip")
    coco, lvis_c, x4 = (rc.get_config(v) for v in ("coco_ovd", "lvis", "rn50x4"))
    assert rc.get_config("").to_dict() == coco.to_dict()  # coco_ovd is the default
    for c in (coco, lvis_c, x4):
        assert c.method == "regionclip" and c.text.templates == CLIP_IMAGENET_TEMPLATES
        assert len(c.text.templates) == 81 and not c.text.trainable
        d, m, o = c.data, c.model, c.optim
        assert (d.min_size, d.max_size) == (800, 1333) and d.image_size == 1344
        assert tuple(d.train_min_sizes) == (640, 672, 704, 736, 768, 800)
        assert (o.name, o.learning_rate, o.momentum, o.weight_decay) == ("sgd", 0.002, 0.9, 1e-4)
        assert (o.schedule, o.warmup_steps, o.warmup_factor, o.gamma) == (
            "multistep", 5000, 0.001, 0.1)
        assert o.grad_clip_norm == 0 and c.train.batch_size == 16
        assert m.freeze_at == 2 and m.frozen_bn and m.init_checkpoint and m.offline_rpn
        assert (m.rpn_pre_nms_topk_train, m.rpn_post_nms_topk_train) == (12000, 2000)
        assert (m.rpn_pre_nms_topk_test, m.rpn_post_nms_topk_test) == (6000, 1000)
        assert (m.rpn_batch_size_per_image, m.roi_batch_size_per_image) == (256, 512)
        assert (m.temperature, m.roi_positive_fraction, m.pooler_sampling_ratio) == (0.01, 0.25, 2)
        assert c.eval.nms_threshold == 0.5 and c.eval.pre_nms_topk == 0
    assert coco.data.split == "coco_48_17" and coco.data.drop_non_base_annotations
    assert tuple(coco.optim.milestones) == (60_000, 80_000) and coco.train.steps == 90_000
    assert (coco.model.cls_loss, coco.model.focal_gamma, coco.model.background_weight) == (
        "focal_scaled", 0.5, 0.2)
    assert (coco.model.score, coco.eval.score_threshold, coco.eval.max_detections) == (
        "softmax", 0.001, 100)
    assert coco.model.pooler_resolution == 14 and coco.model.vision == "RN50"
    assert lvis_c.data.kind == "lvis" and lvis_c.data.repeat_factor_threshold == 0.001
    assert lvis_c.data.drop_non_base_annotations and lvis_c.train.steps == 180_000
    assert tuple(lvis_c.optim.milestones) == (120_000, 160_000)
    assert (lvis_c.model.cls_loss, lvis_c.model.background_weight, lvis_c.model.score) == (
        "weighted_ce", 0.8, "sqrt_objectness")
    assert (lvis_c.eval.metric, lvis_c.eval.max_detections, lvis_c.eval.score_threshold) == (
        "lvis", 300, 0.02)
    assert (x4.model.vision, x4.model.text, x4.model.pooler_resolution) == ("RN50x4", "RN50x4", 18)
    assert rc.get_config("coco_ovd,rpn").model.offline_rpn == ""
    with pytest.raises(ValueError, match="one dataset variant"):
        rc.get_config("coco_ovd,lvis")


def test_regionclip_attention_pool_grid_is_never_interpolated():
    rc = importlib.import_module("configs.regionclip")
    method = methods.get("regionclip")
    c = rc.get_config("rn50x4")
    assert method.vision_tower(c).input_resolution // 32 == 9  # 18 / 2, RN50x4's own grid
    c.model.pooler_resolution = 14
    with pytest.raises(ValueError, match="pooler_resolution=18"):
        method.vision_tower(c)

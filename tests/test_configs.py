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
)
# Variants each recipe accepts besides 'smoke' (all are exercised).
VARIANTS = {"demo": [""], "regionclip": ["coco_ovd", "lvis"]}


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

"""Pieces every method module shares: compute dtype and the plain detection train loader."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ovd_jax.data.pipeline import loader_options, make_detection_loader, resize_options

# What a plain detection batch carries to the device (ids, scales and flips stay on the host).
DETECTION_KEYS = ("image", "boxes", "labels", "box_mask", "image_hw")


def compute_dtype(config):
    """`config.dtype` ("float32" | "bfloat16") as a jnp dtype."""
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    except KeyError:
        raise ValueError(f"config.dtype={config.dtype!r}: use 'float32' or 'bfloat16'.") from None


# Tower throughput switches of config.model and the values that compute the plain towers.
_TOWER_OPTIONS = {"remat_policy": "none", "attention_impl": "auto", "scan_layers": False}


def tower_options(model_config, *names) -> dict:
    """The switches `names` ("remat_policy", "attention_impl", "scan_layers") of `config.model`
    as tower keyword arguments; a config written before a switch existed gets its default."""
    return {n: model_config.get(n, _TOWER_OPTIONS[n]) for n in names}


def detection_train_loader(exp, *, num_epochs=None, extra=None, records=None):
    """The training split as shuffled, flipped detection batches (see `make_detection_loader`).

    `extra(example, record, rng) -> dict` adds method-specific per-image arrays (e.g. a GLIP
    prompt and its positive map) to each example. `records` replaces the training records
    (e.g. filtered, or repeated by a sampler). Each process reads its own slice.
    """
    config = exp.config
    per_process = int(config.train.batch_size) // jax.process_count()
    return make_detection_loader(
        exp.train_data.records if records is None else records, batch_size=per_process,
        image_size=config.data.image_size,
        max_boxes=config.data.max_boxes, cat_id_to_index=exp.train_cat_id_to_index, train=True,
        seed=config.seed, hflip=config.data.hflip, num_epochs=num_epochs,
        shard_index=jax.process_index(), shard_count=jax.process_count(), extra=extra,
        on_bad_image=config.data.get("on_bad_image", "error"),
        **resize_options(config.data, train=True), **loader_options(config.data),
    )

"""Frozen sub-trees get exactly zero updates (weight decay included); others move."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ovd_jax.training.optimizer import make_optimizer


def _config(trainable_text: bool):
    c = ml_collections.ConfigDict()
    c.optim = dict(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, grad_clip_norm=5.0,
                   b1=0.9, b2=0.999, frozen=("vision/stem",), lr_multipliers=(("rpn", 0.0),))
    c.train = dict(steps=10)
    c.text = dict(trainable=trainable_text)
    return c


def test_frozen_text_and_prefixes_do_not_move(rng):
    params = {
        "text": {"w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)},
        "text_extra": {"w": jnp.ones((3, 3))},
        "vision": {"stem": {"w": jnp.ones((3, 3))}, "res5": {"w": jnp.ones((3, 3))}},
        "rpn": {"w": jnp.ones((3, 3))},
    }
    grads = jax.tree.map(jnp.ones_like, params)
    for trainable in (False, True):
        tx = make_optimizer(_config(trainable), params)
        updates, _ = tx.update(grads, tx.init(params), params)
        # step 0 of a warmup-free schedule has the full learning rate
        assert np.all(np.asarray(updates["vision"]["stem"]["w"]) == 0)
        assert np.all(np.asarray(updates["rpn"]["w"]) == 0)  # lr multiplier 0
        assert np.all(np.asarray(updates["vision"]["res5"]["w"]) != 0)
        # 'text_extra' is not under the 'text' prefix: it always trains.
        assert np.all(np.asarray(updates["text_extra"]["w"]) != 0)
        text_moved = np.any(np.asarray(updates["text"]["w"]) != 0)
        assert text_moved == trainable


def test_pretrained_lr_multiplier_scales_loaded_towers_only(rng):
    """With model.init_checkpoint set, the copied towers ('vision', 'text') take
    pretrained_lr_multiplier x the step they take without it; other parameters are untouched by
    the setting, and without an init_checkpoint it has no effect."""
    params = {"vision": {"w": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)},
              "box_head": {"w": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    for checkpoint, expected in (("runs/pretrain", 0.25), ("", 1.0)):
        c = _config(True)
        c.optim.weight_decay = 0.0
        c.optim.frozen = ()
        c.optim.lr_multipliers = ()
        c.optim.pretrained_lr_multiplier = 0.25
        c.model = dict(init_checkpoint=checkpoint)
        tx = make_optimizer(c, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        # The same step without the multiplier: the vision update shrinks by exactly it.
        plain = make_optimizer(_plain(c), params)
        reference, _ = plain.update(grads, plain.init(params), params)
        ratio = np.abs(np.asarray(updates["vision"]["w"])) / np.abs(
            np.asarray(reference["vision"]["w"]))
        np.testing.assert_allclose(ratio, expected, rtol=1e-5)
        head = np.asarray(updates["box_head"]["w"])
        assert np.all(head != 0)


def _plain(c):
    p = ml_collections.ConfigDict(c.to_dict())
    p.optim.pretrained_lr_multiplier = 1.0
    return p

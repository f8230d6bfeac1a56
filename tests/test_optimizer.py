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

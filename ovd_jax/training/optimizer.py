"""Optimizers and learning-rate schedules from `config.optim`, with frozen and slowed sub-trees.

`optim.name`:
  * "adamw": AdamW (decoupled weight decay on matrices and conv kernels only);
  * "sgd": SGD with momentum and coupled L2 weight decay on every trainable parameter, as torch /
    detectron2 do (d = g + wd * p; m = momentum * m + d; p -= lr * m).
`optim.schedule`:
  * "cosine": linear warmup from 0, then cosine decay to 0 at `train.steps`;
  * "multistep": detectron2's WarmupMultiStepLR: linear warmup from `warmup_factor * lr` to `lr`
    over `warmup_steps`, then `lr * gamma^k` with k the number of `milestones` <= step.
`optim.grad_clip_norm` > 0 clips the global gradient norm first.

`optim.lr_multipliers` scales the learning rate of path prefixes; with `model.init_checkpoint`
set, `optim.pretrained_lr_multiplier` scales that of the towers copied from it ('vision',
'text'). Frozen parameters ('/'-joined paths matching `optim.frozen`, the method's
`frozen_params(config)`, and the text tower when `text.trainable` is False) get zero updates,
weight decay included.
A pattern is a path prefix ending at a component boundary, or a glob (`*`, `?`, `[..]`).
"""

from __future__ import annotations

import fnmatch

import flax
import jax
import jax.numpy as jnp
import optax


def _frozen_patterns(config) -> tuple[str, ...]:
    frozen = tuple(config.optim.frozen)
    if "text" in config and not config.text.trainable:
        frozen += ("text",)
    method = config.get("method") if hasattr(config, "get") else None
    if method:
        from ovd_jax import methods  # noqa: PLC0415 (methods import models; keep this light)

        extra = getattr(methods.get(method), "frozen_params", None)
        if extra is not None:
            frozen += tuple(extra(config))
    return frozen


def matches(joined: str, pattern: str) -> bool:
    """Whether the '/'-joined parameter path falls under `pattern` (prefix or glob)."""
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(joined, pattern) or fnmatch.fnmatchcase(
            joined, pattern.rstrip("/") + "/*")
    return joined == pattern or joined.startswith(pattern.rstrip("/") + "/")


def _path_labels(params, config) -> dict:
    """Labels each parameter 'frozen', 'lr_x<mult>' or 'default' from its '/'-joined path.

    A frozen text tower (`config.text.trainable=False`) is frozen here too: with zero gradients
    weight decay would still move it.
    """
    frozen = _frozen_patterns(config)
    mults = tuple((p, float(m)) for p, m in config.optim.lr_multipliers)
    pretrained_mult = float(config.optim.get("pretrained_lr_multiplier", 1.0))
    if pretrained_mult != 1.0 and config.get("model", {}).get("init_checkpoint"):
        # Towers copied from model.init_checkpoint fine-tune slower (explicit prefixes win).
        from ovd_jax.training.pretrained import TOWERS  # noqa: PLC0415

        mults += tuple((tower, pretrained_mult) for tower in TOWERS)

    def label(path: tuple[str, ...]) -> str:
        joined = "/".join(path)
        if any(matches(joined, p) for p in frozen):
            return "frozen"
        for prefix, mult in mults:
            if matches(joined, prefix):
                return f"lr_x{mult}"
        return "default"

    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: label(k) for k in flat})


def _decay_mask(params):
    """AdamW: weight decay on matrices and conv kernels only, not on biases, norms or 1-D."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def learning_rate_schedule(config) -> optax.Schedule:
    """The step -> learning rate function of `config.optim` (see the module docstring)."""
    o = config.optim
    kind = o.get("schedule", "cosine")
    peak = float(o.learning_rate)
    warmup = int(o.warmup_steps)
    if kind == "cosine":
        total = max(int(config.train.steps), warmup + 1)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total,
            end_value=0.0,
        )
    if kind == "multistep":
        milestones = tuple(int(m) for m in o.milestones)
        if list(milestones) != sorted(milestones):
            raise ValueError(f"config.optim.milestones={milestones} must be increasing.")
        gamma, factor = float(o.gamma), float(o.warmup_factor)

        def schedule(step):
            step = jnp.asarray(step, jnp.float32)
            k = sum((step >= m).astype(jnp.float32) for m in milestones) if milestones else 0.0
            ramp = factor + (1.0 - factor) * step / max(warmup, 1)
            warm = jnp.where(step < warmup, ramp, 1.0)
            return peak * warm * jnp.asarray(gamma, jnp.float32) ** k

        return schedule
    raise ValueError(f"config.optim.schedule={kind!r}: use 'cosine' or 'multistep'.")


def _base_optimizer(config, scale: float) -> optax.GradientTransformation:
    o = config.optim
    schedule = learning_rate_schedule(config)

    def lr(step):
        return schedule(step) * scale

    name = o.get("name", "adamw")
    if name == "adamw":
        return optax.adamw(lr, b1=float(o.b1), b2=float(o.b2), weight_decay=float(o.weight_decay),
                           mask=_decay_mask)
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(float(o.weight_decay)),
            optax.sgd(lr, momentum=float(o.momentum) or None, nesterov=False),
        )
    raise ValueError(f"config.optim.name={name!r}: use 'adamw' or 'sgd'.")


def make_optimizer(config, params) -> optax.GradientTransformation:
    """Builds the optimizer for `params` (the unboxed parameter tree) from `config.optim`."""
    o = config.optim
    labels = _path_labels(params, config)
    used = set(jax.tree.leaves(labels))
    transforms = {"default": _base_optimizer(config, 1.0), "frozen": optax.set_to_zero()}
    for label in used:
        if label.startswith("lr_x"):
            transforms[label] = _base_optimizer(config, float(label[4:]))
    chain = []
    if o.grad_clip_norm and o.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(float(o.grad_clip_norm)))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain)

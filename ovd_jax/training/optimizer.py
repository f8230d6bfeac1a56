"""AdamW with linear warmup + cosine decay, global-norm clipping, frozen and slowed sub-trees."""

from __future__ import annotations

import flax
import jax
import optax


def _path_labels(params, config) -> dict:
    """Labels each parameter 'frozen', 'lr_x<mult>' or 'default' from its '/'-joined path.

    A frozen text tower (`config.text.trainable=False`) is frozen here too: with zero gradients
    AdamW's weight decay would still shrink it.
    """
    frozen = tuple(config.optim.frozen)
    if "text" in config and not config.text.trainable:
        frozen += ("text",)
    mults = tuple((p, float(m)) for p, m in config.optim.lr_multipliers)

    def under(joined: str, prefix: str) -> bool:
        return joined == prefix or joined.startswith(prefix.rstrip("/") + "/")

    def label(path: tuple[str, ...]) -> str:
        joined = "/".join(path)
        if any(under(joined, p) for p in frozen):
            return "frozen"
        for prefix, mult in mults:
            if under(joined, prefix):
                return f"lr_x{mult}"
        return "default"

    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: label(k) for k in flat})


def _decay_mask(params):
    """Weight decay on matrices and conv kernels only, not on biases, norms or embeddings' 1-D."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def learning_rate_schedule(config) -> optax.Schedule:
    o = config.optim
    total = max(int(config.train.steps), int(o.warmup_steps) + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(o.learning_rate),
        warmup_steps=int(o.warmup_steps),
        decay_steps=total,
        end_value=0.0,
    )


def make_optimizer(config, params) -> optax.GradientTransformation:
    """Builds the optimizer for `params` (the unboxed parameter tree) from `config.optim`."""
    o = config.optim

    def adamw(scale: float) -> optax.GradientTransformation:
        schedule = learning_rate_schedule(config)
        return optax.adamw(
            lambda step: schedule(step) * scale,
            b1=float(o.b1),
            b2=float(o.b2),
            weight_decay=float(o.weight_decay),
            mask=_decay_mask,
        )

    labels = _path_labels(params, config)
    used = set(jax.tree.leaves(labels))
    transforms = {"default": adamw(1.0), "frozen": optax.set_to_zero()}
    for label in used:
        if label.startswith("lr_x"):
            transforms[label] = adamw(float(label[4:]))
    chain = []
    if o.grad_clip_norm and o.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(float(o.grad_clip_norm)))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain)

"""Creating the sharded train state and the pure, jitted train step."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ovd_jax.data import device_image
from ovd_jax.methods.base import compute_dtype
from ovd_jax.training import sharding as shd
from ovd_jax.training.optimizer import learning_rate_schedule, make_optimizer
from ovd_jax.training.pretrained import merge_pretrained_towers
from ovd_jax.training.state import TrainState


def _unbox(tree):
    return nn.meta.unbox(tree)


def create_train_state(exp, mesh, key):
    """Initialises parameters directly in their shardings and builds the optimizer state.

    Returns (state, state_shardings, tx).
    """
    config = exp.config
    rules = shd.rules_tuple(config.sharding.rules)
    args = exp.method.init_args(config)
    abstract = jax.eval_shape(exp.model.init, key, *args)
    var_shardings = shd.tree_shardings(abstract, mesh, rules, shd.min_shard_size(config))

    def init(k, *a):
        # Unboxed outside a mesh context: the boxes then add no sharding constraints of the raw
        # rules (which may not divide a shape); `var_shardings` (fitted) places the result.
        return _unbox(exp.model.init(k, *a))

    variables = jax.jit(init, out_shardings=var_shardings)(key, *args)
    if config.model.get("init_checkpoint"):
        variables = merge_pretrained_towers(variables, config.model.init_checkpoint)
    params = variables.pop("params")
    tx = make_optimizer(config, params)
    # Moments, traces: each with its parameter's sharding; counts replicated.
    opt_shardings = shd.like_params(tx, jax.eval_shape(tx.init, params),
                                    var_shardings["params"], mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                       opt_state=opt_state)
    state_shardings = TrainState(
        step=shd.replicated(mesh),
        params=var_shardings["params"],
        model_state={k: v for k, v in var_shardings.items() if k != "params"},
        opt_state=opt_shardings,
    )
    # Committed to the mesh so the first and later steps see the same input shardings.
    state = jax.device_put(state, state_shardings)
    return state, state_shardings, tx


def data_types(exp) -> tuple:
    """The method's data types, each trained by its own compiled step: `(None,)` for a
    single-type method, else its `data_types(config)` (e.g. DetCLIPv2's detection, grounding
    and image-text batches, which differ in batch size, resolution and keys)."""
    fn = getattr(exp.method, "data_types", None)
    return (None,) if fn is None else tuple(fn(exp.config))


def global_batch_size(exp, data_type=None) -> int:
    """Global batch size of one data type (`config.train.batch_size` for single-type methods)."""
    if data_type is None:
        return int(exp.config.train.batch_size)
    return int(exp.method.batch_size(exp.config, data_type))


def _typed(data_type):
    return {} if data_type is None else {"data_type": data_type}


def input_keys(exp, data_type=None) -> tuple[str, ...]:
    """The batch keys a step (of `data_type`) takes from the host: the method's `device_keys`
    plus, with `config.data.image_transfer="uint8"`, each image's `<key>_hw` for its on-device
    normalisation."""
    keys = exp.method.device_keys(exp.config, **_typed(data_type))
    return device_image.transfer_keys(keys, exp.config.data.get("image_transfer", "float32"))


def _keep_if(ok, new, old):
    """`new` where the scalar bool `ok`, else `old` (leafwise; dtypes of `old`)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o).astype(o.dtype), new, old)


def micro_batches(batch: dict, accum: int, mesh=None) -> dict:
    """Splits every array of `batch` ([B, ...]) into `accum` micro-batches: [accum, B/accum,
    ...]. Row r goes to micro-batch r % accum, so with the batch axis split over the devices in
    contiguous blocks, each device's rows are shared evenly among the micro-batches and no row
    changes device. With `mesh`, the micro-batch axis stays sharded over the batch axes."""

    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {accum} micro-batches "
                             "(config.train.grad_accum_steps); make the batch size a multiple.")
        x = jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0)
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, PartitionSpec(None, shd.BATCH_AXES)))
        return x

    return jax.tree.map(split, batch)


def accumulated_value_and_grad(loss_fn, params, batch: dict, rng, accum: int, mesh=None):
    """`((loss, metrics), grads)` of `loss_fn(params, batch, rng) -> (loss, metrics)`, averaged
    over `accum` micro-batches (`micro_batches`) evaluated one after another with `lax.scan`, so
    only one micro-batch's activations are live at a time. Micro-batch i draws its randomness
    from `fold_in(rng, i)`. `accum == 1` is plain `value_and_grad` on the whole batch with `rng`.
    Metrics (scalars) are averaged like the loss."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        return grad_fn(params, batch, rng)
    micro = micro_batches(batch, accum, mesh)

    def body(carry, xs):
        i, mb = xs
        out = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(lambda a, b: a + (b / accum).astype(a.dtype), carry, out), None

    # Integer metrics (e.g. counts) are averaged in float32.
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype if jnp.issubdtype(
                             s.dtype, jnp.floating) else jnp.float32),
                         jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro),
                                        rng))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    return total


def make_train_step(exp, tx, mesh, state_shardings, constants, data_type=None):
    """Returns a jitted `step(state, batch, key) -> (state, metrics)`.

    `metrics` holds the method's loss terms, `grad_norm`, `learning_rate` and `nonfinite`
    (int32 1 when the loss, gradients or update held a NaN/Inf: that update was not
    applied).

    The step is a pure function; the state is donated. `key` is the run's root key: the step
    folds in the step number, so a resumed run draws exactly the same randomness.
    `constants` is the method's `train_constants(exp, variables)`: passed to the compiled step
    as a replicated argument (not closed over, so large ones are not baked into the program).
    `data_type` (methods with `data_types`): the step of that type's batches; the method's
    `device_keys` and `train_loss` receive it. `config.train.grad_accum_steps` = k > 1 averages
    the loss and gradients of k micro-batches of the batch (`accumulated_value_and_grad`): one
    update per step, 1/k of the activation memory. `step.jitted` is the underlying jitted
    function. With `config.data.image_transfer="uint8"` the batch's images arrive as uint8 and
    are normalised inside the step (`device_image.normalize_batch`, in the compute dtype).
    """
    config = exp.config
    rules = shd.rules_tuple(config.sharding.rules)
    schedule = learning_rate_schedule(config)
    keys = tuple(exp.method.device_keys(config, **_typed(data_type)))
    transferred = input_keys(exp, data_type)
    dtype = compute_dtype(config)
    constants = jax.device_put(constants, shd.replicated(mesh))

    accum = int(config.train.get("grad_accum_steps", 1))
    per_device = global_batch_size(exp, data_type) // max(shd.data_parallel_size(mesh), 1)
    if accum < 1 or per_device % accum:
        raise ValueError(
            f"config.train.grad_accum_steps={accum} must be >= 1 and divide the batch on each "
            f"data-parallel device ({per_device} = {global_batch_size(exp, data_type)} / "
            f"{shd.data_parallel_size(mesh)} devices); change it or the batch size."
        )

    def step(state: TrainState, batch, consts, key):
        rng = jax.random.fold_in(key, state.step)
        # uint8 images -> normalised (a no-op for the float32 pipeline's images).
        batch = device_image.normalize_batch(batch, keys=keys, dtype=dtype)

        def loss_fn(params, b, r):
            return exp.method.train_loss(
                exp.model, params, state.model_state, b, consts, r, config,
                **_typed(data_type),
            )

        (loss, metrics), grads = accumulated_value_and_grad(loss_fn, state.params, batch, rng,
                                                            accum, mesh)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        # A NaN/Inf loss, gradient or update is never applied: the old parameters and optimizer
        # state are kept (the loop reports the step, and stops or skips it: config.train.
        # skip_nonfinite). The step counter still advances, so step == batches consumed and the
        # learning-rate schedule, rng and data position stay those of an uninterrupted run.
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optax.global_norm(updates)))
        params, opt_state = _keep_if(finite, (params, opt_state), (state.params, state.opt_state))
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state.step),
                       nonfinite=(~finite).astype(jnp.int32))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    batch_shardings = {k: shd.batch_sharding(mesh) for k in transferred}
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, shd.replicated(mesh),
                      shd.replicated(mesh)),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )

    @functools.wraps(step)
    def run(state, batch, key):
        with mesh, nn.logical_axis_rules(rules):
            return jitted(state, batch, constants, key)

    run.jitted = jitted
    return run


def device_batch(exp, batch: dict, mesh, data_type=None) -> dict:
    """The keys the method's step (of `data_type`) reads (`input_keys`), as global arrays
    sharded over the batch axes."""
    keys = input_keys(exp, data_type)
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"the training batch lacks {missing} that config.method="
                         f"{exp.config.method!r} needs; its loader must produce them.")
    return shd.shard_batch({k: batch[k] for k in keys}, mesh)

"""RegionCLIP's optimisation as detectron2 runs it: SGD with momentum and coupled weight decay
(vs torch.optim.SGD), WarmupMultiStepLR (vs fvcore's definition), FREEZE_AT 2 + FrozenBN."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import smoke_config

from ovd_jax.methods import regionclip as rc
from ovd_jax.training.optimizer import _path_labels, learning_rate_schedule, make_optimizer


def d2_lr(it, base, warmup, factor, milestones, gamma):
    """fvcore WarmupParamScheduler(MultiStepParamScheduler) x base lr, as detectron2 builds it."""
    mult = gamma ** sum(it >= m for m in milestones)
    if it < warmup:
        alpha = it / warmup
        return base * (factor * (1 - alpha) + alpha) * mult
    return base * mult


def test_multistep_schedule_matches_detectron2():
    c = smoke_config("unused", "regionclip", "coco_ovd")
    sched = learning_rate_schedule(c)
    for it in (0, 1, 2500, 4999, 5000, 5001, 59_999, 60_000, 79_999, 80_000, 89_999):
        want = d2_lr(it, 0.002, 5000, 0.001, (60_000, 80_000), 0.1)
        assert np.isclose(float(sched(it)), want, rtol=1e-5), (it, float(sched(it)), want)


def test_sgd_matches_torch(seed, rng):
    torch = pytest.importorskip("torch")
    c = smoke_config("unused", "regionclip", "coco_ovd")
    c.optim.warmup_steps, c.optim.milestones = 3, (5,)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    c.model.freeze_at, c.model.frozen_bn = 0, False
    tx = make_optimizer(c, params)
    state = tx.init(params)
    tp = [torch.nn.Parameter(torch.tensor(np.asarray(params[k]))) for k in ("w", "b")]
    opt = torch.optim.SGD(tp, lr=0.002, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: d2_lr(it, 1.0, 3, 0.001, (5,), 0.1))
    for _ in range(8):
        g = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
        updates, state = tx.update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for p, k in zip(tp, ("w", "b")):
            p.grad = torch.tensor(np.asarray(g[k]))
        opt.step()
        sched.step()
    for p, k in zip(tp, ("w", "b")):
        np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), rtol=1e-5,
                                   atol=1e-7, err_msg=f"OVD_TEST_SEED={seed}")


def test_freeze_at_2_and_frozen_bn_labels():
    c = smoke_config("unused", "regionclip", "coco_ovd,smoke")
    model = rc.build_model(c, text_vocab_size=32, eot_token_id=None)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *rc.init_args(c))
    params = flax.core.meta.unbox(shapes["params"])
    labels = {"/".join(k): v for k, v in
              flax.traverse_util.flatten_dict(_path_labels(params, c)).items()}
    frozen = {k for k, v in labels.items() if v == "frozen"}
    for k in labels:
        stem = k.split("/")[1] in {"conv1", "conv2", "conv3", "bn1", "bn2", "bn3"}
        res2 = k.startswith("vision/layer1_")
        bn = "/bn" in k or "downsample_bn" in k
        text = k.startswith("text/")  # frozen text tower: concept embeddings computed once
        assert (k in frozen) == (k.startswith("vision/") and (stem or res2 or bn) or text), k
    assert "vision/layer4_0/conv1/kernel" not in frozen
    assert "vision/attn_pool/positional_embedding" not in frozen

"""Swin tower + importer vs torchvision's Swin (random weights, fresh each run)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.swin_transformer import SwinTransformer as TorchSwin

from ovd_jax.convert.swin import load_swin
from ovd_jax.models.swin import swin


def _torch_forward(ref, x_nhwc):
    """torchvision logits and the stage outputs features[1,3,5,7] (NHWC, before merging)."""
    with torch.no_grad():
        h = torch.tensor(x_nhwc).permute(0, 3, 1, 2)
        logits = ref(h).numpy()
        stages = []
        for i, m in enumerate(ref.features):
            h = m(h)
            if i % 2 == 1:
                stages.append(h.numpy())
    return logits, stages


def _rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _both(model):
    return jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method="features")))


def test_torchvision_swin_t(seed, rng, tmp_path):
    torch.manual_seed(seed)
    ref = torchvision.models.swin_t().eval()
    ckpt = tmp_path / "swin_t.pth"
    torch.save(ref.state_dict(), ckpt)
    model, variables = load_swin(ckpt, "swin_t")
    assert (model.window_size, model.num_classes) == (7, 1000)
    f = _both(model)
    # 64x64: stage maps 16/8/4/2 (shifted windows in stages 1-2, window covers stages 3-4);
    # 72x100: odd maps (18x25, 9x13, 5x7, 3x4) exercise window padding and merge padding.
    for hw in [(64, 64), (72, 100)]:
        x = rng.normal(size=(2, *hw, 3)).astype(np.float32)
        logits, feats = f(variables, x)
        t_logits, t_stages = _torch_forward(ref, x)
        err = _rel(logits, t_logits)
        assert err <= 1e-5, f"logits rel err {err:.2e} at {hw} (seed={seed})"
        for i, t in enumerate(t_stages):
            ours = feats[f"res{i + 2}"]
            assert ours.shape == t.shape, (hw, i, ours.shape, t.shape)
            err = _rel(ours, t)
            assert err <= 1e-4, f"res{i + 2} rel err {err:.2e} at {hw} (seed={seed})"


def _tiny_torch(seed):
    torch.manual_seed(seed)
    return TorchSwin(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2, 2],
                     num_heads=[2, 2, 4, 4], window_size=[4, 4], num_classes=10).eval()


def _official_key(tv_key):
    """torchvision key → official Microsoft/GLIP key (written independently of the importer)."""
    parts = tv_key.split(".")
    if parts[0] != "features":
        return tv_key
    k = int(parts[1])
    if k == 0:
        return {"0": "patch_embed.proj", "2": "patch_embed.norm"}[parts[2]] + "." + parts[3]
    if k % 2 == 0:
        return f"layers.{k // 2 - 1}.downsample." + ".".join(parts[2:])
    rest = ".".join(parts[3:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
    return f"layers.{(k - 1) // 2}.blocks.{parts[2]}.{rest}"


def test_glip_detection_layout(seed, rng, tmp_path):
    """GLIP backbone layout: module.backbone.body.* in {"model": ...}, output norms norm1..3 (GLIP's
    RetinaNet-style Swin has no norm0), no classifier. 160 px keeps every map larger than the
    window, where the official detection and torchvision shift rules agree."""
    ref = _tiny_torch(seed)
    sd = {f"module.backbone.body.{_official_key(k)}": v for k, v in ref.state_dict().items()
          if not k.startswith(("norm.", "head."))}
    norms = {}
    for i, c in [(1, 32), (2, 64), (3, 128)]:
        norms[i] = torch.nn.LayerNorm(c)
        with torch.no_grad():
            norms[i].weight.normal_(1.0, 0.2)
            norms[i].bias.normal_(0.0, 0.2)
        sd[f"module.backbone.body.norm{i}.weight"] = norms[i].weight.detach().clone()
        sd[f"module.backbone.body.norm{i}.bias"] = norms[i].bias.detach().clone()
    sd["module.backbone.fpn.fpn_inner2.weight"] = torch.zeros(8, 32, 1, 1)
    torch.save({"model": sd}, tmp_path / "glip.pth")
    model, variables = load_swin(tmp_path / "glip.pth", "swin_tiny_test")
    assert model.num_classes == 0 and tuple(model.out_norms) == (False, True, True, True)
    assert not model.skip_shift_if_window_covers
    x = rng.normal(size=(1, 160, 192, 3)).astype(np.float32)
    feats = jax.jit(lambda v, x: model.apply(v, x, method="features"))(variables, x)
    _, t_stages = _torch_forward(ref, x)
    with torch.no_grad():
        for i in (1, 2, 3):
            t_stages[i] = norms[i](torch.tensor(t_stages[i])).numpy()
    for i, t in enumerate(t_stages):
        err = _rel(feats[f"res{i + 2}"], t)
        assert err <= 1e-4, f"res{i + 2} rel err {err:.2e} (seed={seed})"
    with pytest.raises(ValueError, match="no head"):
        model.apply(variables, x)


def test_bad_inputs(seed, tmp_path):
    torch.save(_tiny_torch(seed).state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="shape-mismatched"):
        load_swin(tmp_path / "tiny.pth", "swin_t")
    with pytest.raises(ValueError, match="unknown arch"):
        load_swin(tmp_path / "tiny.pth", "swin_xl")
    with pytest.raises(ValueError, match="not a file"):
        load_swin(tmp_path / "missing.pth", "swin_t")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="0 Swin patch embeddings"):
        load_swin(tmp_path / "other.pth", "swin_t")


def test_stochastic_depth_axes_and_remat(seed):
    # One stage (a shifted and an unshifted block) keeps compile time low.
    small = dict(depths=(2,), num_heads=(2,), out_norms=(False,))
    model = swin("swin_tiny_test", stochastic_depth_prob=0.5, **small)
    x = jax.random.normal(jax.random.PRNGKey(seed), (4, 12, 12, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    boxed = jax.tree_util.tree_leaves(
        variables["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert boxed and all(isinstance(v, nn.Partitioned) for v in boxed)
    variables = nn.unbox(variables)

    @jax.jit
    def forwards(v, key):
        train = lambda m, k: m.apply(v, x, deterministic=False, rngs={"dropout": k})
        no_drop = swin("swin_tiny_test", stochastic_depth_prob=0.0, **small)
        return (model.apply(v, x), train(model, key), train(model, key + 1), train(no_drop, key))

    eval_out, train_a, train_b, train_no_drop = forwards(variables, jax.random.PRNGKey(seed))
    assert not np.allclose(train_a, eval_out) and not np.allclose(train_a, train_b)
    np.testing.assert_allclose(train_no_drop, eval_out, atol=1e-6)

    @jax.jit
    def grads(v):
        def loss(v, remat):
            return (swin("swin_tiny_test", remat=remat, **small).apply(v, x) ** 2).sum()

        return jax.grad(loss)(v, False), jax.grad(loss)(v, True)

    g0, g1 = grads(variables)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           g0, g1)
    bf16 = jax.jit(swin("swin_tiny_test", dtype=jnp.bfloat16, **small).apply)(variables, x)
    assert bf16.dtype == jnp.bfloat16
    assert _rel(bf16.astype(jnp.float32), np.asarray(eval_out)) < 0.1

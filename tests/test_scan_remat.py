"""remat_policy and scan_layers: same function, different program.

Remat: gradients under each policy equal the plain gradients, and the traced gradient program
holds a checkpoint with exactly the policy asked for (a no-op remat has none). Scan: a scanned
tower fed the stacked per-layer parameters (`stack_layers`) computes what the per-layer tower
does; layouts round-trip exactly; checkpoints in either layout load into either model.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import DEFAULT_SHARDING_RULES
from ovd_jax.convert.common import save_checkpoint
from ovd_jax.models import bert as bert_lib
from ovd_jax.models.clip_resnet import clip_resnet
from ovd_jax.models.clip_text import clip_text
from ovd_jax.models.clip_transformer import Transformer
from ovd_jax.models.clip_vit import clip_vit
from ovd_jax.models.remat import REMAT_POLICIES, checkpoint_policy, resolve_remat_policy
from ovd_jax.models.scan_layout import match_layer_layout, stack_layers, unstack_layers
from ovd_jax.training import sharding as shd
from ovd_jax.training.pretrained import merge_pretrained_towers

POLICIES = [p for p in REMAT_POLICIES if p != "none"]
BERT_CFG = bert_lib.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                               num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=16)


def _checkpoints(jaxpr) -> list:
    """Policies of every checkpoint (remat) equation in a closed jaxpr, sub-jaxprs included."""
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            # jax 0.10 names the primitive "remat2"; accept "checkpoint" spellings too.
            if "remat" in eqn.primitive.name or "checkpoint" in eqn.primitive.name:
                found.append(eqn.params.get("policy"))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return found


def _f32(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def _assert_trees_close(a, b, tol, seed):
    """Leaf-wise allclose, the absolute tolerance scaled by each reference leaf's magnitude."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        y = np.asarray(y)
        scale = max(1.0, float(np.abs(y).max()))
        np.testing.assert_allclose(np.asarray(x), y, rtol=tol, atol=tol * scale,
                                   err_msg=f"{jax.tree_util.keystr(path)} seed {seed}")


def _towers(seed):
    """(name, make(**kw) -> module, inputs tuple) for the CLIP transformer, ResNet and BERT."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)
    # The ResNet's res5 stage (its remat'd bottlenecks) on a width-8 res4 map.
    res4 = jnp.asarray(rng.standard_normal((1, 4, 4, 128)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 50, (2, 6)), jnp.int32)
    mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [4]]))
    return [
        ("transformer", lambda **kw: Transformer(2, 2, **kw), (x,)),
        ("resnet", lambda **kw: clip_resnet("tiny", width=8, input_resolution=32, **kw), (res4,)),
        ("bert", lambda **kw: bert_lib.BertEncoder(BERT_CFG, **kw), (ids, mask)),
    ]


def _method(module):
    return "res5" if hasattr(module, "res5") else "__call__"


def _scalar(module, inputs, state=None):
    """A weighted sum of the output as a function of the params; `state`: the other
    collections (batch_stats)."""
    def loss(params):
        out = module.apply({"params": params, **(state or {})}, *inputs, method=_method(module))
        if isinstance(out, dict):
            out = out["last_hidden_state"]
        # A fixed non-uniform weighting: sum(out**2) is constant after BERT's final LayerNorm.
        return jnp.sum(out * jnp.sin(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape))
    return loss


# Every policy on the CLIP transformer; one each on the (slower to compile) ResNet and BERT.
@pytest.mark.parametrize("tower, policies", [("transformer", POLICIES), ("resnet", ["dots"]),
                                             ("bert", ["dots_no_batch"])])
def test_remat_policies_same_gradients_different_program(seed, tower, policies):
    name, make, inputs = next(t for t in _towers(seed) if t[0] == tower)
    plain = make()
    variables = dict(plain.init(jax.random.PRNGKey(seed), *inputs, method=_method(plain)))
    params = variables.pop("params")
    ref = jax.jit(jax.grad(_scalar(plain, inputs, variables)))(params)
    assert _checkpoints(jax.make_jaxpr(jax.grad(_scalar(plain, inputs, variables)))(params)) == []
    for policy in policies:
        module = make(remat_policy=policy)
        fn = jax.grad(_scalar(module, inputs, variables))
        _assert_trees_close(jax.jit(fn)(params), ref, 1e-5, seed)
        found = _checkpoints(jax.make_jaxpr(fn)(params))
        assert found, f"{name}: remat_policy={policy!r} left no checkpoint in the program"
        assert all(p is checkpoint_policy(policy) for p in found), (policy, found)
    # The older boolean still means "full".
    fn = jax.grad(_scalar(make(remat=True), inputs, variables))
    found = _checkpoints(jax.make_jaxpr(fn)(params))
    assert found and all(p is None for p in found)


def test_unknown_remat_policy_lists_choices():
    assert resolve_remat_policy(True, "none") == "full"
    assert resolve_remat_policy(True, "dots") == "dots"
    with pytest.raises(ValueError, match="remat_policy='dotz'.*'dots_no_batch'"):
        resolve_remat_policy(False, "dotz")
    with pytest.raises(ValueError, match="remat_policy='dotz'"):
        Transformer(1, 2, remat_policy="dotz").init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 8)))


def test_stack_unstack_round_trip(seed):
    rng = np.random.default_rng(seed)
    layer = lambda: {"attn": {"w": rng.standard_normal((3, 4))}, "b": rng.standard_normal(4)}  # noqa: E731
    tree = {"text": {"transformer": {f"resblocks_{i}": layer() for i in range(3)},
                     "ln_final": {"scale": rng.standard_normal(4)}},
            "vision": {"layer1_0": {"w": rng.standard_normal(2)}}}
    stacked = stack_layers(tree)
    blocks = stacked["text"]["transformer"]
    assert list(blocks) == ["resblocks"] and blocks["resblocks"]["attn"]["w"].shape == (3, 3, 4)
    assert stacked["vision"] == tree["vision"]  # ResNet's layer1_0 is not a layer stack
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert np.array_equal(a, b)
    # Driven by a reference tree, in both directions.
    assert jax.tree.structure(match_layer_layout(tree, stacked)) == jax.tree.structure(stacked)
    assert jax.tree.structure(match_layer_layout(stacked, tree)) == jax.tree.structure(tree)
    with pytest.raises(ValueError, match="resblocks_0..resblocks_1"):
        stack_layers({"resblocks_0": {"w": 1.0}, "resblocks_2": {"w": 1.0}})


def _text_and_vit(seed):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, 100, (2, 9)), jnp.int32)
    img = jnp.asarray(rng.standard_normal((1, 32, 32, 3)), jnp.float32)
    return [
        (lambda **kw: clip_text("tiny", vocab_size=100, context_length=12, **kw), ids),
        (lambda **kw: clip_vit("tiny", input_resolution=32, **kw), img),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["text", "vit"])
def test_scanned_clip_towers_match_per_layer(seed, which):
    make, inputs = _text_and_vit(seed)[which]
    plain, scanned = make(), make(scan_layers=True)
    params = plain.init(jax.random.PRNGKey(seed), inputs)["params"]
    stacked = stack_layers(jax.device_get(params))
    # The scanned module's own parameter tree has exactly the stacked layout and shapes.
    own = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), inputs)["params"]
    assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda a: a.shape,
                                                           flax.linen.meta.unbox(own))
    ref = plain.apply({"params": params}, inputs)
    got = scanned.apply({"params": stacked}, inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5,
                               err_msg=f"seed {seed}")
    tokens = scanned.apply({"params": stacked}, inputs, method="encode_tokens" if which == 0
                           else "tokens")
    tokens_ref = plain.apply({"params": params}, inputs, method="encode_tokens" if which == 0
                             else "tokens")
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(tokens_ref), rtol=1e-5,
                               atol=1e-5, err_msg=f"seed {seed}")


def test_scanned_bert_matches_per_layer(seed):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, 50, (2, 7)), jnp.int32)
    mask = jnp.asarray(np.arange(7)[None] < np.array([[7], [3]]))
    plain = bert_lib.BertEncoder(BERT_CFG)
    params = plain.init(jax.random.PRNGKey(seed), ids, mask)["params"]
    stacked = stack_layers(jax.device_get(params), "layer")
    assert stacked["layer"]["query"]["kernel"].shape == (3, 16, 16)
    ref = plain.apply({"params": params}, ids, mask)
    got = bert_lib.BertEncoder(BERT_CFG, scan_layers=True).apply({"params": stacked}, ids, mask)
    assert len(got["hidden_states"]) == len(ref["hidden_states"]) == 4
    for a, b in zip(got["hidden_states"], ref["hidden_states"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                                   err_msg=f"seed {seed}")


def test_scan_with_remat_jit_grad(seed, policy="dots"):
    make, ids = _text_and_vit(seed)[0]
    plain = make()
    params = plain.init(jax.random.PRNGKey(seed), ids)["params"]
    ref = jax.jit(jax.grad(_scalar(plain, (ids,))))(params)
    scanned = make(scan_layers=True, remat_policy=policy)
    fn = jax.grad(_scalar(scanned, (ids,)))
    got = jax.jit(fn)(stack_layers(jax.device_get(params)))
    _assert_trees_close(_f32(got), _f32(stack_layers(jax.device_get(ref))), 1e-5, seed)
    found = _checkpoints(jax.make_jaxpr(fn)(stack_layers(jax.device_get(params))))
    assert found and all(p is checkpoint_policy(policy) for p in found)


def test_scanned_params_shard_without_splitting_layers(seed):
    make, ids = _text_and_vit(seed)[0]
    abstract = jax.eval_shape(make(scan_layers=True).init, jax.random.PRNGKey(0), ids)
    box = abstract["params"]["transformer"]["resblocks"]["c_fc"]["kernel"]
    assert box.names == ("layers", "embed", "mlp")
    mesh = shd.make_mesh((1, 2, 4))
    shardings = shd.tree_shardings(abstract, mesh, DEFAULT_SHARDING_RULES)
    spec = shardings["params"]["transformer"]["resblocks"]["c_fc"]["kernel"].spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "model")


def test_per_layer_checkpoint_loads_into_scanned_model(seed, tmp_path):
    make, ids = _text_and_vit(seed)[0]
    plain = make()
    per_layer = {"params": {"text": flax.linen.meta.unbox(
        plain.init(jax.random.PRNGKey(seed), ids)["params"])}}
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), {"type": "clip"}, per_layer)
    scanned = make(scan_layers=True)
    init = {"params": {"text": flax.linen.meta.unbox(
        scanned.init(jax.random.PRNGKey(seed + 1), ids)["params"])}}
    merged = merge_pretrained_towers(init, ckpt, names=("text",))
    expected = stack_layers(jax.device_get(per_layer))
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    ref = plain.apply({"params": per_layer["params"]["text"]}, ids)
    got = scanned.apply({"params": merged["params"]["text"]}, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # And back: a scanned checkpoint into the per-layer model.
    ckpt2 = save_checkpoint(str(tmp_path / "ckpt2"), {"type": "clip"}, merged)
    back = merge_pretrained_towers(per_layer, ckpt2, names=("text",))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(per_layer)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("arg, tower", [("smoke", "text"), ("glip,smoke", "language_backbone"),
                                        ("detclipv2,smoke", "text_encoder")])
def test_config_switches_reach_the_towers(arg, tower):
    import configs.demo  # noqa: PLC0415
    from ovd_jax import methods  # noqa: PLC0415

    config = configs.demo.get_config(arg)
    config.model.scan_layers = True
    config.model.remat_policy = "dots"
    config.model.attention_impl = "xla"
    method = methods.get(config.method)
    vocab = 49408 if config.text.tokenizer == "clip" else 128
    model = method.build_model(config, text_vocab_size=vocab, eot_token_id=None)
    text = getattr(model, tower)
    assert (text.scan_layers, text.remat_policy) == (True, "dots")
    if tower == "text":
        assert text.attention_impl == "xla"
        assert (model.vision.remat_policy, model.vision.attention_impl) == ("dots", "xla")
        shapes = jax.eval_shape(model.init, jax.random.key(0), *method.init_args(config))
        stack = shapes["params"]["text"]["transformer"]
        assert list(stack) == ["resblocks"]
        assert stack["resblocks"]["c_fc"]["kernel"].names[0] == "layers"

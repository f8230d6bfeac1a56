"""attention_impl: the dispatch rule, the fused-kernel call's argument mapping and the errors.

The cuDNN kernel itself needs an NVIDIA GPU; on CPU its branch is checked by running the very
same `jax.nn.dot_product_attention` call with implementation="xla" (same BTNH layout, mask
conversion and token padding) against the einsum reference path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovd_jax.models import attention
from ovd_jax.models.attention import (
    MultiHeadAttention,
    attention_backend,
    causal_mask,
    einsum_attention,
    fused_attention,
)


def _qkv(rng, b, tq, tk, heads, d, dtype=jnp.float32):
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, d)), dtype) for t in (tq, tk, tk))
    return q, k, v


def _key_mask(rng, b, tk):
    """[B, 1, 1, Tk] boolean key-padding mask with at least one real key per row."""
    lengths = rng.integers(1, tk + 1, size=b)
    return jnp.asarray(np.arange(tk)[None] < lengths[:, None])[:, None, None, :]


@pytest.mark.parametrize("case", ["causal_odd", "keymask", "cross_one_query", "bias_and_mask"])
def test_fused_call_mapping_matches_einsum(seed, case):
    rng = np.random.default_rng(seed)
    mask = bias = None
    if case == "causal_odd":  # CLIP text: causal [1, 1, L, L] mask, odd L -> padded to even
        q, k, v = _qkv(rng, 2, 7, 7, 2, 8)
        mask = causal_mask(7)
    elif case == "keymask":  # BERT-style padding mask [B, 1, 1, S]
        q, k, v = _qkv(rng, 3, 5, 5, 2, 16)
        mask = _key_mask(rng, 3, 5)
    elif case == "cross_one_query":  # CLIP attention pool: 1 query over 1 + h*w tokens
        q, k, v = _qkv(rng, 2, 1, 10, 2, 8)
    else:
        q, k, v = _qkv(rng, 2, 5, 9, 2, 8)
        mask = _key_mask(rng, 2, 9)
        bias = jnp.asarray(rng.standard_normal((1, 2, 5, 9)), jnp.float32)
    ref = einsum_attention(q, k, v, mask, bias)
    got = fused_attention(q, k, v, mask, bias, implementation="xla")
    assert got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5,
                               err_msg=f"seed {seed}")
    # Forcing a larger multiple pads queries and keys further; the result must not change.
    padded = fused_attention(q, k, v, mask, bias, implementation="xla", seq_multiple=8)
    np.testing.assert_allclose(np.asarray(padded), np.asarray(ref), atol=1e-5, rtol=1e-5,
                               err_msg=f"seed {seed}")


@pytest.mark.parametrize(
    "impl, platform, dtype, head_dim, rank, has_bias, expected",
    [
        ("auto", "cpu", jnp.bfloat16, 64, 4, False, "xla"),
        ("auto", "tpu", jnp.bfloat16, 64, 4, False, "xla"),
        ("auto", "gpu", jnp.bfloat16, 64, 4, False, "xla"),  # ROCm / pre-Ampere NVIDIA
        ("auto", "cuda", jnp.float32, 64, 4, False, "xla"),
        ("auto", "cuda", jnp.bfloat16, 64, 4, False, "cudnn"),
        ("auto", "cuda", jnp.float16, 128, 4, False, "cudnn"),
        ("auto", "cuda", jnp.bfloat16, 8, 4, False, "cudnn"),
        ("auto", "cuda", jnp.bfloat16, 12, 4, False, "xla"),  # not a multiple of 8
        ("auto", "cuda", jnp.bfloat16, 136, 4, False, "xla"),  # > 128
        ("auto", "cuda", jnp.bfloat16, 64, 5, False, "xla"),
        ("auto", "cuda", jnp.bfloat16, 64, 4, True, "xla"),
        ("xla", "cuda", jnp.bfloat16, 64, 4, False, "xla"),
        ("cudnn", "cuda", jnp.bfloat16, 64, 4, False, "cudnn"),
        ("cudnn", "cuda", jnp.bfloat16, 64, 4, True, "cudnn"),
    ],
)
def test_dispatch_table(impl, platform, dtype, head_dim, rank, has_bias, expected):
    path, reason = attention_backend(impl, platform=platform, dtype=dtype, head_dim=head_dim,
                                     rank=rank, has_bias=has_bias)
    assert path == expected, reason
    assert reason


@pytest.mark.parametrize(
    "platform, dtype, head_dim, words",
    [("cpu", jnp.bfloat16, 64, "backend 'cpu'"), ("cuda", jnp.float32, 64, "float32"),
     ("cuda", jnp.bfloat16, 20, "head dim 20")],
)
def test_forced_cudnn_names_the_problem(platform, dtype, head_dim, words):
    with pytest.raises(ValueError, match="attention_impl='cudnn'") as err:
        attention_backend("cudnn", platform=platform, dtype=dtype, head_dim=head_dim)
    assert words in str(err.value)


def test_unknown_impl_lists_choices():
    with pytest.raises(ValueError, match="attention_impl='flash'.*'auto', 'xla', 'cudnn'"):
        attention_backend("flash", platform="cpu", dtype=jnp.float32, head_dim=8)


def _module_inputs(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, 7, 32)), dtype)
    return x, causal_mask(7)


def test_module_cudnn_on_cpu_raises(seed):
    x, mask = _module_inputs(seed, jnp.bfloat16)
    mod = MultiHeadAttention(num_heads=2, attention_impl="cudnn", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run here"):
        mod.init(jax.random.PRNGKey(0), x, mask=mask)


def test_module_auto_on_cpu_is_the_xla_path(seed):
    x, mask = _module_inputs(seed)
    auto = MultiHeadAttention(num_heads=2)
    variables = auto.init(jax.random.PRNGKey(seed), x, mask=mask)
    y_auto = auto.apply(variables, x, mask=mask)
    y_xla = MultiHeadAttention(num_heads=2, attention_impl="xla").apply(variables, x, mask=mask)
    assert bool((y_auto == y_xla).all())


def test_module_fused_branch_wiring(seed, monkeypatch):
    """With the backend reported as a cuDNN GPU, bf16 compute takes the fused branch (its
    kernel swapped for the XLA implementation of the same call) and matches the einsum path."""
    calls = []

    def fake_fused(q, k, v, mask=None, bias=None, **kw):
        calls.append(q.shape)
        return fused_attention(q, k, v, mask, bias, implementation="xla")

    x, mask = _module_inputs(seed, jnp.bfloat16)
    ref_mod = MultiHeadAttention(num_heads=2, attention_impl="xla", dtype=jnp.bfloat16)
    variables = ref_mod.init(jax.random.PRNGKey(seed), x, mask=mask)
    ref = ref_mod.apply(variables, x, mask=mask)
    monkeypatch.setattr(attention, "current_platform", lambda: "cuda")
    monkeypatch.setattr(attention, "fused_attention", fake_fused)
    got = MultiHeadAttention(num_heads=2, dtype=jnp.bfloat16).apply(variables, x, mask=mask)
    assert calls == [(2, 7, 2, 16)]
    assert got.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               atol=3e-2, rtol=3e-2, err_msg=f"seed {seed}")
    # float32 compute stays on the einsum path even on a cuDNN GPU.
    calls.clear()
    MultiHeadAttention(num_heads=2).apply(jax.tree.map(lambda a: a, variables),
                                          x.astype(jnp.float32), mask=mask)
    assert calls == []

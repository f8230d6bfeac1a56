"""Multi-head dot-product attention shared by the transformer towers (CLIP, BERT, Swin).

One module with separate q/k/v/out projections (named `q_proj`, `k_proj`, `v_proj`, `out_proj`),
so that checkpoints from OpenAI/open_clip (fused `in_proj_weight`), Hugging Face (separate
projections) and CLIP's AttentionPool2d (`c_proj` output of another width) all map onto the same
parameter tree by a reshape in the importer.

The attention core runs either as XLA einsums (softmax in float32; the reference path, used on
CPU/TPU and for float32 compute) or, on NVIDIA GPUs with half-precision compute, as cuDNN's
fused flash-attention kernel through `jax.nn.dot_product_attention`. `attention_backend` makes
that choice from static facts (backend, dtype, head size) so it can be tested anywhere.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovd_jax.models.layers import Dtype, dense

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# cuDNN flash attention (jax 0.10 / 0.11): q/k/v in fp16 or bf16, head dim a multiple of 8 and
# at most 128 (256 on Hopper; 128 keeps one rule for every supported GPU).
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128
# With a bias (a boolean mask becomes one inside jax) the kernel's backward pass wants even
# query/key lengths, so masked calls pad both to this multiple and mask the padded keys.
CUDNN_MASKED_SEQ_MULTIPLE = 2


def causal_mask(length: int) -> jnp.ndarray:
    """Boolean [1, 1, length, length] mask, True where query i may attend to key j (j <= i)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def current_platform() -> str:
    """'cuda' on an NVIDIA GPU backend with compute capability >= 8.0 (what cuDNN's flash
    attention needs), 'gpu' on other GPUs (ROCm, older NVIDIA), else jax's backend name
    ('cpu', 'tpu')."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    device = jax.local_devices(backend="gpu")[0]
    capability = getattr(device, "compute_capability", None)
    if "cuda" not in str(getattr(device.client, "platform_version", "")).lower():
        return "gpu"
    try:
        major = int(str(capability).split(".")[0])
    except ValueError:
        return "gpu"
    return "cuda" if major >= 8 else "gpu"


def attention_backend(impl: str, *, platform: str, dtype, head_dim: int, rank: int = 4,
                      has_bias: bool = False) -> tuple[str, str]:
    """Which attention core a call uses: returns (path, reason), path "xla" or "cudnn".

    Args:
      impl: the `attention_impl` setting: "auto" (cuDNN when every condition below holds, else
        XLA), "xla" (always the einsum path) or "cudnn" (the fused kernel or an error).
      platform: `current_platform()`: "cuda" (NVIDIA, compute capability >= 8.0), "gpu",
        "cpu", "tpu".
      dtype: dtype of the projected q/k/v (the module's compute dtype).
      head_dim: per-head width.
      rank: rank of the projected q ([B, T, heads, head_dim] is 4).
      has_bias: whether an additive float bias is given (a boolean mask is always fine).

    Raises ValueError for an unknown `impl`, and for impl="cudnn" when a condition fails (the
    message names `attention_impl` and the failed condition).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is unknown; choose one of {ATTENTION_IMPLS}.")
    if impl == "xla":
        return "xla", "attention_impl='xla'"
    problems = []
    if platform != "cuda":
        problems.append(f"backend {platform!r} is not an NVIDIA GPU with compute capability "
                        ">= 8.0")
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        problems.append(f"compute dtype {jnp.dtype(dtype).name} is not bfloat16/float16")
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        problems.append(f"head dim {head_dim} is not a multiple of 8 <= {CUDNN_MAX_HEAD_DIM}")
    if rank != 4:
        problems.append(f"q has rank {rank}, not [batch, tokens, heads, head_dim]")
    if has_bias and impl == "auto":
        # jax folds the bias into the kernel, but its gradient is exported only for biases
        # shared across the batch; auto keeps the exact einsum path for any bias.
        problems.append("an additive bias is given")
    if not problems:
        return "cudnn", "fused cuDNN attention"
    reason = "; ".join(problems)
    if impl == "cudnn":
        raise ValueError(f"attention_impl='cudnn' cannot run here: {reason}. Use "
                         "attention_impl='auto' (falls back to XLA) or 'xla'.")
    return "xla", reason


def einsum_attention(q, k, v, mask=None, bias=None, dtype: Dtype = jnp.float32):
    """The XLA attention core: q [..., Tq, heads, d], k/v [..., Tk, heads, d], optional
    boolean `mask` / additive `bias` broadcastable to [..., heads, Tq, Tk]. Logits and softmax
    in float32, weights cast to `dtype`; returns [..., Tq, heads, d]."""
    head_dim = q.shape[-1]
    # Scores and softmax in float32: bf16 logits lose the small differences that matter.
    logits = jnp.einsum(
        "...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32
    ) * (head_dim**-0.5)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("...hqk,...khd->...qhd", weights, v)


def _to_4d(x, tq: int, tk: int):
    """A mask/bias broadcastable to [B, heads, Tq, Tk] as a 4-D array with full Tq, Tk dims."""
    x = jnp.asarray(x)
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    return jnp.broadcast_to(x, x.shape[:2] + (tq, tk))


def fused_attention(q, k, v, mask=None, bias=None, *, implementation: str = "cudnn",
                    seq_multiple: int | None = None):
    """`jax.nn.dot_product_attention` on our layout: q [B, Tq, heads, d], k/v [B, Tk, heads, d]
    (BTNH, the kernel's native layout), optional boolean `mask` / float `bias` broadcastable to
    [B, heads, Tq, Tk]. Returns [B, Tq, heads, d] in q's dtype.

    Tq and Tk are padded up to `seq_multiple` (default: CUDNN_MASKED_SEQ_MULTIPLE when a mask or
    bias is given, else no padding); padded keys are masked out and padded query rows dropped,
    so the result equals the unpadded attention. `implementation="xla"` runs the same mapping on
    any backend (how tests check the cuDNN call's arguments on CPU).
    """
    tq, tk = q.shape[1], k.shape[1]
    if seq_multiple is None:
        masked = mask is not None or bias is not None
        seq_multiple = CUDNN_MASKED_SEQ_MULTIPLE if masked else 1
    pad_q, pad_k = (-tq) % seq_multiple, (-tk) % seq_multiple
    if mask is not None:
        mask = _to_4d(mask, tq, tk).astype(bool)
    if bias is not None:
        bias = _to_4d(bias, tq, tk).astype(q.dtype)
    if pad_q or pad_k:
        q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
        if mask is None:
            mask = jnp.ones((1, 1, tq, tk), bool)
        # Padded keys take no weight; padded query rows keep one real key so no row is empty.
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, pad_k)), constant_values=False)
        mask = mask.at[:, :, tq:, 0].set(True)
        if bias is not None:
            bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad_q), (0, pad_k)))
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=q.shape[-1] ** -0.5,
        implementation=implementation,
    )
    return out[:, :tq]


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention.

    Attributes:
      num_heads: number of heads; the q/k/v width must be divisible by it.
      qkv_features: width of the fused q/k/v projections (defaults to the query input width).
      out_features: width of the output projection (defaults to the query input width).
      use_bias: whether the projections have biases.
      attention_impl: "auto" (cuDNN's fused kernel on NVIDIA GPUs when dtype/head size allow,
        else the XLA einsums), "xla" or "cudnn" (see `attention_backend`).
      dtype / param_dtype: compute and storage dtypes.

    Call with `x_q` [B, Tq, Dq], optional `x_kv` [B, Tk, Dkv] (self-attention when None), an
    optional boolean `mask` broadcastable to [B, heads, Tq, Tk] (True = attend) and an optional
    additive float `bias` of the same broadcast shape. Returns [B, Tq, out_features].
    Softmax is computed in float32 whatever `dtype` is.
    """

    num_heads: int
    qkv_features: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_q, x_kv=None, mask=None, bias=None):
        x_kv = x_q if x_kv is None else x_kv
        features = self.qkv_features or x_q.shape[-1]
        if features % self.num_heads:
            raise ValueError(
                f"MultiHeadAttention: width {features} is not divisible by num_heads="
                f"{self.num_heads}; pick a head count that divides the width."
            )
        head_dim = features // self.num_heads
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(x, name):
            y = dense(features, ("embed", "heads"), name=name, **kw)(x)
            return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

        q = proj(x_q, "q_proj")
        k = proj(x_kv, "k_proj")
        v = proj(x_kv, "v_proj")
        platform = "cpu" if self.attention_impl == "xla" else current_platform()
        path, _ = attention_backend(self.attention_impl, platform=platform, dtype=q.dtype,
                                    head_dim=head_dim, rank=q.ndim, has_bias=bias is not None)
        if path == "cudnn":
            out = fused_attention(q, k, v, mask, bias).astype(self.dtype)
        else:
            out = einsum_attention(q, k, v, mask, bias, self.dtype)
        out = out.reshape(*out.shape[:-2], features)
        return dense(
            self.out_features or x_q.shape[-1], ("heads", "embed"), name="out_proj", **kw
        )(out)

"""CLIP's text tower in Flax: token + position embeddings, a causal pre-LN transformer, the
final LayerNorm, and a linear projection of the end-of-text token's state."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ovd_jax.models.attention import causal_mask
from ovd_jax.models.clip_transformer import Transformer
from ovd_jax.models.layers import Dtype, layer_norm


class TextTransformer(nn.Module):
    """CLIP text encoder.

    Attributes:
      vocab_size, context_length: token vocabulary and maximum sequence length.
      width, heads, layers: transformer size.
      output_dim: width of the projected text embedding.
      eot_token_id: None pools at the argmax of the token ids (OpenAI: the EOT token has the
        largest id); otherwise pools at the first position whose id equals `eot_token_id` (for
        WordPiece vocabularies, where [SEP] is not the largest id). A row without that id pools
        at position 0.
      act: 'quick_gelu' (OpenAI) or 'gelu'.
      remat: rematerialise each block in the backward pass.
      remat_policy, scan_layers, attention_impl: passed to the `Transformer` (remat policy name,
        scanned layer stack, attention core); the defaults keep the per-layer reference path.

    `__call__(token_ids[N, L] int32) -> [N, output_dim]` (unnormalised), with L <= context_length.
    `encode_tokens(token_ids) -> [N, L, width]`: the final LayerNorm'd token states.
    """

    vocab_size: int
    context_length: int
    width: int
    heads: int
    layers: int
    output_dim: int
    eot_token_id: int | None = None
    act: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embedding = nn.Embed(
            self.vocab_size, self.width,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")),
            **kw,
        )
        self.positional_embedding = self.param(
            "positional_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), ("pos", "embed")),
            (self.context_length, self.width), self.param_dtype,
        )
        self.transformer = Transformer(
            self.layers, self.heads, self.act, self.remat, remat_policy=self.remat_policy,
            scan_layers=self.scan_layers, attention_impl=self.attention_impl, **kw)
        self.ln_final = layer_norm(**kw)
        self.text_projection = self.param(
            "text_projection",
            nn.with_logical_partitioning(nn.initializers.normal(self.width**-0.5),
                                         ("embed", None)),
            (self.width, self.output_dim), self.param_dtype,
        )

    def encode_tokens(self, token_ids):
        """[N, L] int token ids -> [N, L, width] final LayerNorm'd states (causal attention)."""
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be [N, L], got shape {token_ids.shape}.")
        length = token_ids.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"token_ids has length {length} > context_length {self.context_length}; "
                "tokenize with context_length <= the model's."
            )
        x = self.token_embedding(token_ids.astype(jnp.int32))
        x = x + self.positional_embedding[:length].astype(self.dtype)[None]
        x = self.transformer(x, causal_mask(length))
        return self.ln_final(x)

    def pool_index(self, token_ids):
        """[N, L] -> [N] index of the end-of-text token used for pooling."""
        if self.eot_token_id is None:
            return jnp.argmax(token_ids, axis=-1)
        return jnp.argmax(token_ids == self.eot_token_id, axis=-1)

    def __call__(self, token_ids):
        """[N, L] token ids -> [N, output_dim] projected EOT embedding (unnormalised)."""
        x = self.encode_tokens(token_ids)
        idx = self.pool_index(token_ids)
        pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        return pooled @ self.text_projection.astype(self.dtype)


# (width, heads, layers, output_dim) of the text towers released with each image tower.
_PRESETS = {
    "RN50": (512, 8, 12, 1024),
    "RN101": (512, 8, 12, 512),
    "RN50x4": (640, 10, 12, 640),
    "RN50x16": (768, 12, 12, 768),
    "RN50x64": (1024, 16, 12, 1024),
    "ViT-B-32": (512, 8, 12, 512),
    "ViT-B-16": (512, 8, 12, 512),
    "ViT-L-14": (768, 12, 12, 768),
    "ViT-L-14-336": (768, 12, 12, 768),
    "tiny": (64, 2, 2, 64),
}


def canonical_name(name: str) -> str:
    """'ViT-B/32' -> 'ViT-B-32', 'ViT-L/14@336px' -> 'ViT-L-14-336' (OpenAI vs open_clip names)."""
    return name.replace("@336px", "-336").replace("/", "-")


def clip_text(name: str, **kw) -> TextTransformer:
    """A TextTransformer preset matching the image presets ('RN50', ..., 'ViT-L/14@336px',
    'tiny'); vocab 49408 and context 77 unless overridden through keyword arguments."""
    key = canonical_name(name)
    if key not in _PRESETS:
        raise ValueError(f"Unknown CLIP text preset {name!r}; choose one of {list(_PRESETS)}.")
    width, heads, layers, out = _PRESETS[key]
    cfg = dict(vocab_size=49408, context_length=77, width=width, heads=heads, layers=layers,
               output_dim=out)
    cfg.update(kw)
    return TextTransformer(**cfg)

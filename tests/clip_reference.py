"""Reference CLIP models for the CLIP tests: small open_clip models with random weights."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every floating parameter and buffer with seeded random values (batch-norm
    statistics included, so frozen BN is exercised), scaled to keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if not p.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


def small_open_clip_rn(seed: int, quick_gelu: bool = True, image_size: int = 64):
    """open_clip `CLIP` with a reduced ModifiedResNet (width 16, blocks 1,2,1,1) and a 2-layer
    text tower of width 128 (2 heads = width/64, as OpenAI's build_model assumes)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(
        64,
        CLIPVisionCfg(layers=(1, 2, 1, 1), width=16, image_size=image_size),
        CLIPTextCfg(context_length=16, vocab_size=500, width=128, heads=2, layers=2),
        quick_gelu=quick_gelu,
    )
    return randomize_(model, seed)


def random_token_ids(rng: np.random.Generator, n: int, length: int, vocab: int,
                     eot: int) -> np.ndarray:
    """[n, length] ids: SOT-free random tokens in [1, vocab-2], one `eot` per row, zeros after."""
    ids = rng.integers(1, vocab - 2, (n, length))
    for i in range(n):
        end = int(rng.integers(1, length))
        ids[i, end] = eot
        ids[i, end + 1:] = 0
    return ids


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())

"""Forward+backward throughput of our CLIP image towers vs the PyTorch peers, in the same run.

  ViT-B/16: `ovd_jax.models.clip_vit.clip_vit("ViT-B/16")` vs HF `transformers.CLIPVisionModel`
  RN50:     `ovd_jax.models.clip_resnet.clip_resnet("RN50")` vs open_clip's RN50 `.visual`

Both sides: random weights, float32 parameters with bfloat16 compute (torch: autocast; `--dtype
float32` turns it off on both sides, which is the fair setting on CPUs without bf16 units), loss =
mean of the squared image embedding, gradients w.r.t. all parameters (no optimizer update), batch
norm statistics frozen (ours: FrozenBatchNorm; torch: eval mode), synthetic NHWC/NCHW images.

FLOPs per image come from XLA's cost analysis of our compiled forward pass, times 3 for
forward+backward (the usual MFU convention); MFU = achieved FLOP/s / the device's peak bf16 dense
FLOP/s (a table of known GPUs, or `--peak-tflops`). On CPU there is no meaningful peak unless you
pass one.

    python benchmarks/towers.py                      # GPU: batch 256 (ViT) / 256 (RN50)
    python benchmarks/towers.py --batch 2 --steps 2 --out benchmarks/results_towers_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s by device-name fragment (vendor datasheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12,
             "V5E": 197e12, "V5 LITE": 197e12, "V4": 275e12}


def device_peak(kind: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    upper = kind.upper()
    for key, peak in PEAK_BF16.items():
        if key in upper:
            return peak
    return None


def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def time_jax(name: str, size: int, batch: int, steps: int, warmup: int, dtype):
    """Returns (images/s, forward FLOPs per image or None)."""
    if name == "ViT-B/16":
        from ovd_jax.models.clip_vit import clip_vit

        model = clip_vit("ViT-B/16", dtype=dtype)
    else:
        from ovd_jax.models.clip_resnet import clip_resnet

        model = clip_resnet("RN50", dtype=dtype)
    import flax.linen as nn

    x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), x))
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}  # frozen 'batch_stats'

    def loss(p, x):
        out = model.apply({"params": p, **rest}, x)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    step = jax.jit(jax.grad(loss))
    fwd = jax.jit(lambda p, x: model.apply({"params": p, **rest}, x))
    flops = _cost_flops(fwd.lower(params, x[:1]).compile())
    for _ in range(warmup):
        jax.block_until_ready(step(params, x))
    t0 = time.perf_counter()
    for _ in range(steps):
        g = step(params, x)
    jax.block_until_ready(g)
    return batch * steps / (time.perf_counter() - t0), flops


def time_torch(name: str, size: int, batch: int, steps: int, warmup: int, bf16: bool):
    """Returns images/s of the PyTorch peer (eager)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "ViT-B/16":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, patch_size=16, image_size=size)
        model = CLIPVisionModel(cfg)
        embed = lambda x: model(pixel_values=x).pooler_output
    else:
        import open_clip

        model = open_clip.create_model("RN50", pretrained=None, force_image_size=size).visual
        embed = model
    model = model.to(dev).eval()  # eval: frozen BN statistics, like our FrozenBatchNorm
    x = torch.randn(batch, 3, size, size, device=dev)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            out = embed(x)
        out.float().square().mean().backward()

    for _ in range(warmup):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    on_gpu = jax.default_backend() == "gpu"
    ap.add_argument("--batch", type=int, default=256 if on_gpu else 2)
    ap.add_argument("--steps", type=int, default=20 if on_gpu else 2)
    ap.add_argument("--warmup", type=int, default=3 if on_gpu else 1)
    ap.add_argument("--size", type=int, default=224, help="image side (a multiple of 32)")
    ap.add_argument("--models", default="ViT-B/16,RN50")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args()

    import torch

    kind = jax.devices()[0].device_kind
    torch_dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = device_peak(kind, args.peak_tflops)
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown"
    header = (
        f"Device: JAX {jax.__version__} on {jax.default_backend()} ({kind}); torch "
        f"{torch.__version__} on {torch_dev}; host {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} JAX device(s). Batch {args.batch}, {args.size}px, "
        f"{args.steps} timed steps after {args.warmup} warm-up; {args.dtype} compute, fp32 params, "
        f"forward+backward (no optimizer). Peak bf16: {peak_text}.\n"
    )
    rows = ["| tower | ours img/s | peer | peer img/s | ours / peer | GFLOP/img (fwd+bwd) "
            "| ours TFLOP/s | ours MFU | peer MFU |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        ours, fwd_flops = time_jax(name, args.size, args.batch, args.steps, args.warmup,
                                   jnp.dtype(args.dtype))
        peer_name = "HF CLIPVisionModel" if name == "ViT-B/16" else "open_clip RN50.visual"
        theirs = time_torch(name, args.size, args.batch, args.steps, args.warmup,
                            args.dtype == "bfloat16")
        flops = 3 * fwd_flops if fwd_flops else None
        fmt = lambda v, f: f.format(v) if v is not None else "n/a"
        tflops = ours * flops / 1e12 if flops else None
        mfu = ours * flops / peak if (flops and peak) else None
        peer_mfu = theirs * flops / peak if (flops and peak) else None
        rows.append(
            f"| {name} | {ours:.2f} | {peer_name} | {theirs:.2f} | {ours / theirs:.2f} | "
            f"{fmt(flops and flops / 1e9, '{:.1f}')} | {fmt(tflops, '{:.3f}')} | "
            f"{fmt(mfu, '{:.1%}')} | {fmt(peer_mfu, '{:.1%}')} |"
        )
        print(rows[-1], flush=True)
    text = header + "\n" + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()

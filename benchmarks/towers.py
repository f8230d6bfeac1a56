"""Forward+backward throughput of our CLIP image towers vs the PyTorch peers, in the same run.

  ViT-B/16: `ovd_jax.models.clip_vit.clip_vit("ViT-B/16")` vs HF `transformers.CLIPVisionModel`
  RN50:     `ovd_jax.models.clip_resnet.clip_resnet("RN50")` vs open_clip's RN50 `.visual`

Both sides: random weights, float32 parameters with bfloat16 compute (torch: autocast; `--dtype
float32` turns it off on both sides, which is the fair setting on CPUs without bf16 units), loss =
mean of the squared image embedding, gradients w.r.t. all parameters (no optimizer update), batch
norm statistics frozen (ours: FrozenBatchNorm; torch: eval mode), synthetic NHWC/NCHW images.

One measurement is `--steps` timed steps after the warm-up; each tower is measured `--repeats`
times, ours and the peer alternating, so a change of machine load hits both sides of a repeat
alike. The table shows the median (min-max) over repeats, and the ratio as the median (range) of
the per-repeat ratios.

FLOPs per image come from XLA's cost analysis of our compiled forward pass, times 3 for
forward+backward (the usual MFU convention); MFU = achieved FLOP/s / the device's peak bf16 dense
FLOP/s (a table of known GPUs, or `--peak-tflops`). On CPU there is no meaningful peak unless you
pass one.

    python benchmarks/towers.py                      # GPU: batch 256 (ViT) / 256 (RN50)
    python benchmarks/towers.py --batch 2 --steps 2 --dtype float32 --repeats 5 \\
        --out benchmarks/results_towers_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import _bench

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


def jax_step(name: str, size: int, batch: int, dtype):
    """Returns (one forward+backward step: () -> None, blocking; forward FLOPs/image or None)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    if name == "ViT-B/16":
        from ovd_jax.models.clip_vit import clip_vit

        model = clip_vit("ViT-B/16", dtype=dtype)
    else:
        from ovd_jax.models.clip_resnet import clip_resnet

        model = clip_resnet("RN50", dtype=dtype)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), x))
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}  # frozen 'batch_stats'

    def loss(p, x):
        out = model.apply({"params": p, **rest}, x)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    grad = jax.jit(jax.grad(loss))
    fwd = jax.jit(lambda p, x: model.apply({"params": p, **rest}, x))
    flops = _cost_flops(fwd.lower(params, x[:1]).compile())
    return lambda: jax.block_until_ready(grad(params, x)), flops


def torch_step(name: str, size: int, batch: int, bf16: bool):
    """One forward+backward step of the PyTorch peer (eager): () -> None, synchronised."""
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
        if dev == "cuda":
            torch.cuda.synchronize()

    return step


def images_per_s(step, batch: int, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="default 256 on GPU, 2 on CPU")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per measurement (default 20 on GPU, 2 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 on GPU, 1 on CPU")
    _bench.add_repeat_args(ap)
    ap.add_argument("--size", type=int, default=224, help="image side (a multiple of 32)")
    ap.add_argument("--models", default="ViT-B/16,RN50")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    _bench.check_repeats(args.repeats)
    return args


def main(argv=None):
    args = parse_args(argv)
    load_before = _bench.load_average()
    import jax
    import jax.numpy as jnp
    import torch

    on_gpu = jax.default_backend() == "gpu"
    batch = args.batch or (256 if on_gpu else 2)
    steps = args.steps or (20 if on_gpu else 2)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    kind = jax.devices()[0].device_kind
    torch_dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = device_peak(kind, args.peak_tflops)
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown"

    results = []
    for name in args.models.split(","):
        ours_step, fwd_flops = jax_step(name, args.size, batch, jnp.dtype(args.dtype))
        peer_step = torch_step(name, args.size, batch, args.dtype == "bfloat16")
        for _ in range(warmup):
            ours_step()
            peer_step()
        ours, theirs = [], []
        for rep in range(args.repeats):
            ours.append(images_per_s(ours_step, batch, steps))
            theirs.append(images_per_s(peer_step, batch, steps))
            print(f"{name} repeat {rep + 1}/{args.repeats}: ours {ours[-1]:.3g} img/s, "
                  f"peer {theirs[-1]:.3g} img/s", flush=True)
        results.append((name, ours, theirs, 3 * fwd_flops if fwd_flops else None))

    header = (
        f"`{_bench.command_line()}`\n\n"
        f"JAX {jax.__version__} on {jax.default_backend()} ({kind}), {jax.device_count()} JAX "
        f"device(s); torch {torch.__version__} on {torch_dev}; {_bench.machine(load_before)}. "
        f"Batch {batch}, {args.size}px, {args.dtype} compute, fp32 params, forward+backward "
        f"(no optimizer); each figure: median (min-max) over {args.repeats} repeats of {steps} "
        f"timed steps, after {warmup} warm-up. Peak bf16: {peak_text}.\n"
    )
    rows = ["| tower | ours img/s | peer | peer img/s | ours / peer | GFLOP/img (fwd+bwd) "
            "| ours TFLOP/s | ours MFU | peer MFU |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: f.format(v) if v is not None else "n/a"
    for name, ours, theirs, flops in results:
        o, t = statistics.median(ours), statistics.median(theirs)
        peer_name = "HF CLIPVisionModel" if name == "ViT-B/16" else "open_clip RN50.visual"
        tflops = o * flops / 1e12 if flops else None
        mfu = o * flops / peak if (flops and peak) else None
        peer_mfu = t * flops / peak if (flops and peak) else None
        rows.append(
            f"| {name} | {_bench.median_range(ours)} | {peer_name} | "
            f"{_bench.median_range(theirs)} | "
            f"{_bench.median_range([a / b for a, b in zip(ours, theirs)])} | "
            f"{fmt(flops and flops / 1e9, '{:.1f}')} | {fmt(tflops, '{:.3f}')} | "
            f"{fmt(mfu, '{:.1%}')} | {fmt(peer_mfu, '{:.1%}')} |"
        )
    text = header + "\n" + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()

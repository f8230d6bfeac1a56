"""Training-step throughput in one run: our JAX steps vs the PyTorch peers, and the input pipeline.

Cases (each skipped with a note when its dependency is missing):
  vit      ViT-B/16 224² AdamW step (bf16 compute, float32 parameters), ours
           (`ovd_jax.models.clip_vit`, jitted, state donated) vs HF `transformers.CLIPVisionModel`
           eager and with `torch.compile`; images/s and MFU (6 x forward FLOPs per image).
  rc50     The RegionCLIP RN50-C4 detector's full train step (`configs/regionclip.py`: RPN, RoI
           sampling, RoIAlign, res5 + attention pool, losses) at 800x1333 through
           `ovd_jax.training.train_step`, the code path train.py runs.
  glipt    The GLIP-T train step (`configs/glip.py`), the same way.
  pipeline The grain training pipeline's images/s on synthetic PNGs (`--pipeline_size` px,
           decoded, flipped, resized, normalised, box targets) with 0, 1 and 2 grain worker
           processes (`config.data.num_workers`; 0 = reader threads of the training process
           only), each with 1 and 2 reader threads.

    python benchmarks/train_step.py                       # GPU: every case at full size
    python benchmarks/train_step.py --tiny                # seconds-long CPU smoke of the script
    python benchmarks/train_step.py --cases vit --batch 256 --out benchmarks/results_step.md

Every measurement runs `--steps` steps after a warm-up step (compilation excluded) and is
repeated `--repeats` times; the table shows the median and range, and names the device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402  (makes ovd_jax importable from a fresh clone)

# Dense bf16 peaks (FLOP/s) for the MFU column; --peak_tflops overrides.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V5E": 197e12, "V4": 275e12}


def _peak(kind: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in kind.upper().replace(" ", "")), None)


def _time(step, repeats: int, steps: int, batch: int) -> list[float]:
    """Images/s of `repeats` runs of `steps` calls of the blocking `step()` after a warm-up."""
    step()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - t0))
    return rates


def vit_jax(batch: int, size: int, dtype: str):
    """(blocking AdamW step of our ViT-B/16, forward FLOPs per image or None)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from ovd_jax.models.clip_vit import clip_vit

    model = clip_vit("ViT-B/16", dtype=jnp.dtype(dtype))
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), x[:1]))["params"]
    tx = optax.adamw(1e-4, weight_decay=0.05)
    state = (params, tx.init(params))

    def loss(p, images):
        out = model.apply({"params": p}, images.astype(model.dtype))
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    def update(state, images):
        p, opt = state
        grads = jax.grad(loss)(p, images)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    step = jax.jit(update, donate_argnums=0)
    fwd = jax.jit(lambda p, im: model.apply({"params": p}, im)).lower(params, x[:1]).compile()
    cost = fwd.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    holder = [state]

    def run():
        holder[0] = step(holder[0], x)
        jax.block_until_ready(holder[0])

    return run, flops


def vit_torch(batch: int, size: int, bf16: bool, compiled: bool):
    """Blocking AdamW step of HF `CLIPVisionModel` (ViT-B/16), eager or `torch.compile`d."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, patch_size=16, image_size=size)
    model = CLIPVisionModel(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=dev == "cuda")
    x = torch.randn(batch, 3, size, size, device=dev)

    def fwd_bwd():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            out = model(pixel_values=x).pooler_output
        out.float().square().mean().backward()

    body = torch.compile(fwd_bwd) if compiled else fwd_bwd

    def run():
        opt.zero_grad(set_to_none=True)
        body()
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    return run


def detector_step(config_name: str, arg: str, batch: int, tiny: bool):
    """Blocking train step of a detector recipe via ovd_jax.training.train_step (one process)."""
    import importlib

    import jax

    from ovd_jax.training import sharding as shd
    from ovd_jax.training import train_step as ts
    from ovd_jax.training.experiment import build_experiment
    from ovd_jax.training.loop import make_train_loader

    config = importlib.import_module(f"configs.{config_name}").get_config(
        ",".join(a for a in (arg, "smoke" if tiny else "") if a))
    config.data.synthetic = True  # speed does not depend on the pixels
    config.train.batch_size = batch
    config.model.init_checkpoint = ""
    exp = build_experiment(config)
    mesh = shd.make_mesh((-1, 1, 1))
    state, shardings, tx = ts.create_train_state(exp, mesh, jax.random.key(0))
    constants = exp.method.train_constants(exp, state.variables())
    kind = ts.data_types(exp)[0]
    step = ts.make_train_step(exp, tx, mesh, shardings, constants, kind)
    batch_arrays = ts.device_batch(exp, next(iter(make_train_loader(exp))), mesh, kind)
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], batch_arrays, jax.random.key(1))
        jax.block_until_ready(metrics)

    return run


def pipeline_rates(workers: int, threads: int, batches: int, repeats: int,
                   size: int) -> list[float]:
    """Images/s of the synthetic detection pipeline (PNG decode, flip, resize onto a `size`
    canvas, normalise, box targets; 64 images of `size` x `size` px) read by `workers` grain
    worker processes (0: the calling process) with `threads` reader threads each; worker
    start-up (the first batch) is not timed."""
    import tempfile

    from configs import demo
    from ovd_jax.data.pipeline import make_detection_loader
    from ovd_jax.training.experiment import build_experiment

    config = demo.get_config("smoke")
    config.data.root = os.path.join(tempfile.gettempdir(), f"ovd_bench_syn{size}")
    config.data.synthetic_image_size = config.data.image_size = size
    config.data.synthetic_num_train = 64
    exp = build_experiment(config)
    rates = []
    for _ in range(repeats):
        loader = make_detection_loader(
            exp.train_data.records, batch_size=8, image_size=config.data.image_size,
            max_boxes=config.data.max_boxes, cat_id_to_index=exp.train_data.cat_id_to_index,
            train=True, seed=0, num_threads=threads, num_workers=workers)
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(8 * batches / (time.perf_counter() - t0))
        if hasattr(it, "close"):  # stops the worker processes
            it.close()
    return rates


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="vit,rc50,glipt,pipeline")
    ap.add_argument("--batch", type=int, default=256, help="ViT batch (default 256)")
    ap.add_argument("--det_batch", type=int, default=8, help="detector batch (default 8)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak_tflops", type=float, default=None)
    ap.add_argument("--pipeline_size", type=int, default=512,
                    help="pipeline case: synthetic image and canvas side in px (default 512)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes and smoke configs: checks the script runs (CPU, seconds)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    _bench.add_repeat_args(ap, repeats=3)
    return ap.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    _bench.check_repeats(args.repeats)
    if args.tiny:
        args.batch, args.size, args.det_batch, args.steps = 2, 32, 8, 1
    load = _bench.load_average()
    import jax

    device = jax.devices()[0].device_kind
    peak = _peak(device, args.peak_tflops)
    rows = []
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]

    def row(name, rates, flops=None, batch=None):
        mfu = (f"{100 * 6 * flops * _median(rates) / peak:.1f}%" if flops and peak else "n/a")
        rows.append(f"| {name} | {_bench.median_range(rates)} | {mfu} |")

    if "vit" in cases:
        run, flops = vit_jax(args.batch, args.size, args.dtype)
        row(f"ViT-B/16 {args.size}² b{args.batch} ours (JAX)",
            _time(run, args.repeats, args.steps, args.batch), flops)
        for compiled in (False, True):
            name = f"ViT-B/16 HF CLIPVisionModel {'torch.compile' if compiled else 'eager'}"
            try:
                step = vit_torch(args.batch, args.size, args.dtype == "bfloat16", compiled)
                row(name, _time(step, args.repeats, args.steps, args.batch), flops)
            except Exception as e:  # noqa: BLE001 - a missing/broken peer is reported, not fatal
                rows.append(f"| {name} | skipped: {type(e).__name__}: {str(e)[:80]} | |")
    for key, recipe, arg, name in (("rc50", "regionclip", "coco_ovd", "RegionCLIP RN50-C4"),
                                   ("glipt", "glip", "", "GLIP-T")):
        if key in cases:
            try:
                run = detector_step(recipe, arg, args.det_batch, args.tiny)
                row(f"{name} train step b{args.det_batch}",
                    _time(run, args.repeats, args.steps, args.det_batch))
            except Exception as e:  # noqa: BLE001
                rows.append(f"| {name} | skipped: {type(e).__name__}: {str(e)[:80]} | |")
    if "pipeline" in cases:
        px = 64 if args.tiny else args.pipeline_size
        for workers in (0, 1, 2):
            for threads in (1, 2):
                row(f"grain pipeline {px} px, {workers} worker "
                    f"processes x {threads} reader threads",
                    pipeline_rates(workers, threads, 2 if args.tiny else 20, args.repeats,
                                   px))
    table = "\n".join([
        f"Device: {device}; {_bench.machine(load)}", "", f"`{_bench.command_line()}`", "",
        "| case | images/s median (range) | MFU |", "|---|---|---|", *rows])
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    return table


def _median(values):
    import statistics

    return statistics.median(values)


if __name__ == "__main__":
    main()

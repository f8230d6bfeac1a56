"""Detection ops, ours (JAX, jitted) vs torchvision in the same process.

    python benchmarks/ops.py                          # full shapes (meant for a GPU box)
    python benchmarks/ops.py --small --repeats 5      # reduced shapes for a CPU

Cases: RoIAlign at RegionCLIP's C4 shape (1x50x84x1024, 1000 RoIs, 14x14, sampling 2) and an FPN
shape (P2-P5 of an 800x1344 padded image, 256 channels, 1000 RoIs, 7x7, detectron2-style pooler:
one torchvision roi_align per level); NMS on 2,000 and 10,000 boxes; deform_conv2d 3x3 with mask
at a DyHead shape (2x256x100x168). torchvision runs on CUDA when torch sees a GPU.

One measurement of a case is the median time of `--iters` calls after a warm-up call; each case
is measured `--repeats` times, ours and torchvision alternating, so a change of machine load hits
both sides of a repeat alike. The table shows the median over repeats and the min-max range, and
the speed-up as the median (range) of the per-repeat ratios. For RoIAlign the memory-bandwidth
floor is the time to write the float32 output at the copy bandwidth (read + write bytes per
second of a jitted JAX copy, measured in this run); the feature reads mostly hit cache and are
left out of the floor. Prints a markdown table; `--out` writes it to a file (default
benchmarks/results_ops_<platform>.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import _bench


def time_jax(fn, *args, iters):
    """Median milliseconds of `iters` calls of a jitted `fn` (after one warm-up call)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def time_torch(fn, *args, iters, cuda):
    """Median milliseconds of `iters` calls of `fn` under no_grad (after one warm-up call)."""
    import torch

    with torch.no_grad():
        fn(*args)
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn(*args)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def copy_bandwidth(iters):
    """Bytes/s of a jitted read+write copy of a 256 MiB (16 MiB on CPU) float32 array."""
    import jax
    import jax.numpy as jnp

    n = (64 if jax.default_backend() != "cpu" else 4) * 2**20
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    ms = time_jax(f, x, iters=iters)
    return 2 * x.nbytes / (ms / 1e3)


def rois(rng, n, img_h, img_w, min_size=8.0, max_size=400.0):
    import numpy as np

    xy = rng.uniform(0, 1, (n, 2)) * [img_w, img_h]
    wh = np.exp(rng.uniform(np.log(min_size), np.log(max_size), (n, 2)))
    return np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(np.float32)


def build_cases(small: bool, tdev):
    """[(name, ours: () -> array, torchvision: () -> tensor, floor bytes or None)]: each
    callable runs one case on prepared inputs; `floor bytes` is the float32 output size."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torchvision

    from ovd_jax.ops import deform_conv, multilevel_roi_align, nms, roi_align

    rng = np.random.default_rng(0)
    cases = []

    # RoIAlign C4 (RegionCLIP).
    h, w, c, r, stride = (25, 42, 256, 200, 16) if small else (50, 84, 1024, 1000, 16)
    feats = rng.standard_normal((1, h, w, c)).astype(np.float32)
    b = rois(rng, r, h * stride, w * stride)
    jf, jb = jnp.asarray(feats), jnp.asarray(b[None])
    c4 = jax.jit(lambda f, bb: roi_align(f, bb, 14, 1.0 / stride, 2, True))
    tf = torch.tensor(feats).permute(0, 3, 1, 2).contiguous().to(tdev)
    tb = torch.cat([torch.zeros(r, 1), torch.tensor(b)], 1).to(tdev)
    cases.append((
        f"RoIAlign C4 1x{h}x{w}x{c}, {r} RoIs, 14x14, s2",
        lambda: c4(jf, jb),
        lambda: torchvision.ops.roi_align(tf, tb, 14, 1.0 / stride, 2, True),
        r * 14 * 14 * c * 4,
    ))

    # RoIAlign FPN (P2-P5).
    img_h, img_w, cf, rf = (256, 384, 64, 200) if small else (800, 1344, 256, 1000)
    strides = [4, 8, 16, 32]
    fl = [rng.standard_normal((1, img_h // s, img_w // s, cf)).astype(np.float32)
          for s in strides]
    bf = rois(rng, rf, img_h, img_w, 16, 600)
    jfl, jbf = [jnp.asarray(f) for f in fl], jnp.asarray(bf[None])
    fpn = jax.jit(lambda f, bb: multilevel_roi_align(f, bb, 7, strides, 2))
    tfl = [torch.tensor(f).permute(0, 3, 1, 2).contiguous().to(tdev) for f in fl]
    tbf = torch.cat([torch.zeros(rf, 1), torch.tensor(bf)], 1).to(tdev)

    def tv_pooler():
        # detectron2 ROIPooler: level rule, then one roi_align per level.
        size = torch.sqrt((tbf[:, 3] - tbf[:, 1]) * (tbf[:, 4] - tbf[:, 2]))
        lvl = torch.floor(4 + torch.log2(size / 224 + 1e-8)).clamp(2, 5).long() - 2
        out = torch.zeros(rf, cf, 7, 7, device=tdev)
        for i, s in enumerate(strides):
            idx = torch.nonzero(lvl == i).squeeze(1)
            out[idx] = torchvision.ops.roi_align(tfl[i], tbf[idx], 7, 1.0 / s, 2, True)
        return out

    cases.append((f"RoIAlign FPN P2-P5 of {img_h}x{img_w}, C={cf}, {rf} RoIs, 7x7",
                  lambda: fpn(jfl, jbf), tv_pooler, rf * 49 * cf * 4))

    # NMS.
    for n in [500, 2000] if small else [2000, 10000]:
        bx = rois(rng, n, 800, 1333, 10, 300)
        sc = rng.random(n).astype(np.float32)
        ours = jax.jit(lambda bb, ss, n=n: nms(bb, ss, 0.7, n))
        jbx, jsc = jnp.asarray(bx), jnp.asarray(sc)
        tbx, tsc = torch.tensor(bx).to(tdev), torch.tensor(sc).to(tdev)
        cases.append((f"NMS {n} boxes, IoU 0.7",
                      lambda ours=ours, jbx=jbx, jsc=jsc: ours(jbx, jsc),
                      lambda tbx=tbx, tsc=tsc: torchvision.ops.nms(tbx, tsc, 0.7), None))

    # Deformable conv (DyHead spatial attention).
    n, c, h, w = (1, 64, 25, 42) if small else (2, 256, 100, 168)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    off = rng.standard_normal((n, h, w, 18)).astype(np.float32)
    mask = rng.random((n, h, w, 9)).astype(np.float32)
    kern = (rng.standard_normal((3, 3, c, c)) * 0.05).astype(np.float32)
    dc = jax.jit(lambda a, o, m, k: deform_conv.deform_conv2d(a, o, m, k, 1, 1, 1))
    jargs = [jnp.asarray(v) for v in (x, off, mask, kern)]

    def nchw(a):
        return torch.tensor(a).permute(0, 3, 1, 2).contiguous().to(tdev)

    tx, toff, tm = nchw(x), nchw(off), nchw(mask)
    tw = torch.tensor(kern).permute(3, 2, 0, 1).contiguous().to(tdev)
    cases.append((f"deform_conv2d 3x3 + mask, {n}x{c}x{h}x{w}", lambda: dc(*jargs),
                  lambda: torchvision.ops.deform_conv2d(tx, toff, tw, None, 1, 1, 1, tm), None))
    return cases


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="reduced shapes (CPU run)")
    ap.add_argument("--iters", type=int, default=None,
                    help="calls per measurement, median taken (default 20 on GPU, 5 on CPU)")
    _bench.add_repeat_args(ap)
    ap.add_argument("--out", default=None, help="markdown file for the table")
    args = ap.parse_args(argv)
    _bench.check_repeats(args.repeats)
    return args


def main(argv=None):
    args = parse_args(argv)
    load_before = _bench.load_average()
    import jax
    import torch
    import torchvision

    backend = jax.default_backend()
    cuda = torch.cuda.is_available()
    tdev = torch.device("cuda" if cuda else "cpu")
    iters = args.iters or (20 if backend != "cpu" else 5)
    cases = build_cases(args.small, tdev)
    ours_ms = {name: [] for name, *_ in cases}
    tv_ms = {name: [] for name, *_ in cases}
    bandwidth = []
    for rep in range(args.repeats):
        bandwidth.append(copy_bandwidth(iters))
        for name, ours, theirs, _ in cases:
            ours_ms[name].append(time_jax(ours, iters=iters))
            tv_ms[name].append(time_torch(theirs, iters=iters, cuda=cuda))
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    bw = statistics.median(bandwidth)

    jdev = jax.devices()[0].device_kind
    lines = [
        f"`{_bench.command_line()}`",
        "",
        f"Ops ({'--small' if args.small else 'full'} shapes): JAX {jax.__version__} on {backend} "
        f"({jdev}), torchvision {torchvision.__version__} on {tdev.type}; "
        f"{_bench.machine(load_before)}. Each figure: median (min-max) over {args.repeats} "
        f"repeats of the median of {iters} calls; copy bandwidth {bw / 1e9:.1f} GB/s.",
        "",
        "| case | ours ms | torchvision ms | speed-up (tv / ours) | bandwidth floor ms "
        "| ours / floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, _, _, floor_bytes in cases:
        o, t = ours_ms[name], tv_ms[name]
        ratios = [tv / ou for tv, ou in zip(t, o)]
        floor = floor_bytes / bw * 1e3 if floor_bytes else None
        lines.append(
            f"| {name} | {_bench.median_range(o)} | {_bench.median_range(t)} | "
            f"{_bench.median_range(ratios)}x | {f'{floor:.3g}' if floor else '-'} | "
            f"{f'{statistics.median(o) / floor:.2f}' if floor else '-'} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    out = args.out or os.path.join(_bench.ROOT, "benchmarks", f"results_ops_{backend}.md")
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

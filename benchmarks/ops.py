"""Detection ops, ours (JAX, jitted) vs torchvision in the same process.

    python benchmarks/ops.py            # full shapes (meant for a GPU box; torch CUDA if present)
    python benchmarks/ops.py --small    # reduced shapes for a CPU smoke run

Cases: RoIAlign at RegionCLIP's C4 shape (1x50x84x1024, 1000 RoIs, 14x14, sampling 2) and an FPN
shape (P2-P5 of an 800x1344 padded image, 256 channels, 1000 RoIs, 7x7, detectron2-style pooler:
one torchvision roi_align per level); NMS on 2,000 and 10,000 boxes; deform_conv2d 3x3 with mask
at a DyHead shape (2x256x100x168). For RoIAlign the memory-bandwidth floor is the time to write
the float32 output at the copy bandwidth (read + write bytes per second of a jitted JAX copy,
measured in this run); the feature reads mostly hit cache and are left out of the floor.
Prints a markdown table; `--out` writes it to a file (default
benchmarks/results_ops_<platform>.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ovd_jax.ops import deform_conv, multilevel_roi_align, nms, roi_align  # noqa: E402


def time_jax(fn, *args, iters):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def time_torch(fn, *args, iters, cuda):
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
    n = (64 if jax.default_backend() != "cpu" else 4) * 2**20
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    ms = time_jax(f, x, iters=iters)
    return 2 * x.nbytes / (ms / 1e3)


def rois(rng, n, img_h, img_w, min_size=8.0, max_size=400.0):
    xy = rng.uniform(0, 1, (n, 2)) * [img_w, img_h]
    wh = np.exp(rng.uniform(np.log(min_size), np.log(max_size), (n, 2)))
    return np.concatenate([xy - wh / 2, xy + wh / 2], 1).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="reduced shapes (CPU smoke run)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None, help="markdown file for the table")
    args = ap.parse_args()
    small = args.small
    backend = jax.default_backend()
    cuda = torch.cuda.is_available()
    tdev = torch.device("cuda" if cuda else "cpu")
    iters = args.iters or (20 if backend != "cpu" else 5)
    rng = np.random.default_rng(0)
    rows = []
    bw = copy_bandwidth(iters)

    # RoIAlign C4 (RegionCLIP).
    if small:
        h, w, c, r, stride = 25, 42, 256, 200, 16
    else:
        h, w, c, r, stride = 50, 84, 1024, 1000, 16
    feats = rng.standard_normal((1, h, w, c)).astype(np.float32)
    b = rois(rng, r, h * stride, w * stride)
    jf, jb = jnp.asarray(feats), jnp.asarray(b[None])
    ours = jax.jit(lambda f, bb: roi_align(f, bb, 14, 1.0 / stride, 2, True))
    t_ours = time_jax(ours, jf, jb, iters=iters)
    tf = torch.tensor(feats).permute(0, 3, 1, 2).contiguous().to(tdev)
    tb = torch.cat([torch.zeros(r, 1), torch.tensor(b)], 1).to(tdev)
    t_tv = time_torch(
        lambda: torchvision.ops.roi_align(tf, tb, 14, 1.0 / stride, 2, True), iters=iters,
        cuda=cuda,
    )
    floor = r * 14 * 14 * c * 4 / bw * 1e3
    rows.append((f"RoIAlign C4 1x{h}x{w}x{c}, {r} RoIs, 14x14, s2", t_ours, t_tv, floor))

    # RoIAlign FPN (P2-P5).
    if small:
        img_h, img_w, c, r = 256, 384, 64, 200
    else:
        img_h, img_w, c, r = 800, 1344, 256, 1000
    strides = [4, 8, 16, 32]
    fl = [rng.standard_normal((1, img_h // s, img_w // s, c)).astype(np.float32) for s in strides]
    b = rois(rng, r, img_h, img_w, 16, 600)
    jfl = [jnp.asarray(f) for f in fl]
    ours = jax.jit(lambda f, bb: multilevel_roi_align(f, bb, 7, strides, 2))
    t_ours = time_jax(ours, jfl, jnp.asarray(b[None]), iters=iters)
    tfl = [torch.tensor(f).permute(0, 3, 1, 2).contiguous().to(tdev) for f in fl]
    tb = torch.cat([torch.zeros(r, 1), torch.tensor(b)], 1).to(tdev)

    def tv_pooler():
        # detectron2 ROIPooler: level rule, then one roi_align per level.
        size = torch.sqrt((tb[:, 3] - tb[:, 1]) * (tb[:, 4] - tb[:, 2]))
        lvl = torch.floor(4 + torch.log2(size / 224 + 1e-8)).clamp(2, 5).long() - 2
        out = torch.zeros(r, c, 7, 7, device=tdev)
        for i, s in enumerate(strides):
            idx = torch.nonzero(lvl == i).squeeze(1)
            out[idx] = torchvision.ops.roi_align(tfl[i], tb[idx], 7, 1.0 / s, 2, True)
        return out

    t_tv = time_torch(tv_pooler, iters=iters, cuda=cuda)
    floor = r * 49 * c * 4 / bw * 1e3
    rows.append((f"RoIAlign FPN P2-P5 of {img_h}x{img_w}, C={c}, {r} RoIs, 7x7", t_ours, t_tv,
                 floor))

    # NMS.
    for n in ([500, 2000] if small else [2000, 10000]):
        bx = rois(rng, n, 800, 1333, 10, 300)
        sc = rng.random(n).astype(np.float32)
        ours = jax.jit(lambda bb, ss, n=n: nms(bb, ss, 0.7, n))
        t_ours = time_jax(ours, jnp.asarray(bx), jnp.asarray(sc), iters=iters)
        tbx, tsc = torch.tensor(bx).to(tdev), torch.tensor(sc).to(tdev)
        t_tv = time_torch(torchvision.ops.nms, tbx, tsc, 0.7, iters=iters, cuda=cuda)
        rows.append((f"NMS {n} boxes, IoU 0.7", t_ours, t_tv, None))

    # Deformable conv (DyHead spatial attention).
    n, c, h, w = (1, 64, 25, 42) if small else (2, 256, 100, 168)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    off = rng.standard_normal((n, h, w, 18)).astype(np.float32)
    mask = rng.random((n, h, w, 9)).astype(np.float32)
    kern = (rng.standard_normal((3, 3, c, c)) * 0.05).astype(np.float32)
    ours = jax.jit(lambda a, o, m, k: deform_conv.deform_conv2d(a, o, m, k, 1, 1, 1))
    t_ours = time_jax(ours, *(jnp.asarray(v) for v in (x, off, mask, kern)), iters=iters)

    def t(a):
        return torch.tensor(a).permute(0, 3, 1, 2).contiguous().to(tdev)

    tx, toff, tm = t(x), t(off), t(mask)
    tw = torch.tensor(kern).permute(3, 2, 0, 1).contiguous().to(tdev)
    t_tv = time_torch(
        lambda: torchvision.ops.deform_conv2d(tx, toff, tw, None, 1, 1, 1, tm), iters=iters,
        cuda=cuda,
    )
    rows.append((f"deform_conv2d 3x3 + mask, {n}x{c}x{h}x{w}", t_ours, t_tv, None))

    jdev = jax.devices()[0].device_kind
    lines = [
        f"Ops benchmark ({'--small' if small else 'full'} shapes): JAX {jax.__version__} on "
        f"{backend} ({jdev}), torchvision {torchvision.__version__} on {tdev.type}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible; "
        f"median of {iters}; copy bandwidth {bw / 1e9:.1f} GB/s.",
        "",
        "| case | ours ms | torchvision ms | speed-up (tv / ours) | bandwidth floor ms "
        "| ours / floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, o, tv, fl_ms in rows:
        fl_s = f"{fl_ms:.3f}" if fl_ms is not None else "-"
        ratio = f"{o / fl_ms:.2f}" if fl_ms is not None else "-"
        lines.append(f"| {name} | {o:.3f} | {tv:.3f} | {tv / o:.2f}x | {fl_s} | {ratio} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = args.out or os.path.join(os.path.dirname(__file__), f"results_ops_{backend}.md")
    with open(out, "w") as fh:
        fh.write(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Images per second of detect: the exported artifact vs the in-process flax model.

Both run the same host code (ovd_jax/export/runtime.py: resize + normalise + pad, the call,
boxes mapped back); only the compiled program differs (jax.export-deserialised vs jitted from
the flax module). Default case, as the issue asks: RegionCLIP RN50 (configs/regionclip.py, COCO
recipe: shortest edge 800, longest 1333 on a 1344 canvas), 1,203 queries with its 81 prompt
templates, 800x1333 uint8 images, batch 1 and 8. Weights are random (speed does not depend on
them); queries are synthetic names. The COCO recipe's offline RPN needs a trained run to load,
so proposals come from the detector's own RPN (one backbone pass per image instead of two).

    python benchmarks/detect.py [--repeats 5] [--batches 1,8] [--out results_detect_cpu.md]
    python benchmarks/detect.py --tiny          # seconds-long smoke run of the script
    python benchmarks/detect.py --templates 1 --calls 1 --repeats 3   # the CPU table itself

On a GPU host it runs on the GPU (the device is named in the table). Each repeat times
`--calls` detect calls after one warm-up call (compilation excluded; reported separately).
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time

import _bench
import jax
import numpy as np


def build(recipe: str, arg: str, tiny: bool, templates: int = 0):
    """(config, model, variables, tokenizer) with random weights; no dataset needed.
    `templates` > 0 keeps the recipe's first `templates` prompt templates (query encoding
    only: the detect program takes the [queries, D] embeddings whatever made them)."""
    from flax.core import meta  # noqa: PLC0415

    from ovd_jax import methods  # noqa: PLC0415
    from ovd_jax.training import experiment  # noqa: PLC0415

    if tiny:
        config = importlib.import_module("configs.demo").get_config("smoke")
        config.data.root = os.path.join(tempfile.gettempdir(), "ovd_bench_synthetic")
    else:
        config = importlib.import_module(f"configs.{recipe}").get_config(arg or None)
    with config.unlocked():
        config.model.init_checkpoint = ""  # random towers: timing only
        if templates:
            config.text.templates = tuple(config.text.templates)[:templates]
        if config.model.get("offline_rpn"):
            # Random weights have no offline-RPN run to load: the detector's own RPN on its
            # res4 map proposes instead. An offline RPN adds its backbone's res4 pass per image.
            config.model.offline_rpn = ""
    vocab = experiment.resolve_data_paths(config)
    tok = experiment.build_tokenizer(config, vocab)
    method = methods.get(config.method)
    model = method.build_model(config, text_vocab_size=tok.vocab_size,
                               eot_token_id=tok.eot_token_id)
    variables = jax.jit(model.init)(jax.random.key(0), *method.init_args(config))
    variables = jax.tree.map(np.asarray, jax.device_get(meta.unbox(variables)))
    return config, model, variables, tok


def detectors(config, model, variables, tok, workdir: str):
    """{"artifact": Detector, "in-process": Detector} and the artifact's load time / size."""
    from ovd_jax.export import artifact, runtime  # noqa: PLC0415

    platform = runtime.current_platform()
    start = time.perf_counter()
    artifact.write_artifact(workdir, config, model, variables, platforms=(platform,))
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    exported = runtime.load_artifact(workdir, cache_dir="")
    load_s = time.perf_counter() - start
    spec_manifest = exported.manifest
    encode, detect, _ = artifact.functions(model, config)
    inproc = runtime.Detector(spec_manifest, jax.device_put(artifact.export_params(config,
                                                                                    variables)),
                              encode, detect, tok, "")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(workdir) for f in fs)
    return {"artifact": exported, "in-process": inproc}, {"export_s": export_s,
                                                          "load_s": load_s, "size": size}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="regionclip", help="configs/<recipe>.py")
    p.add_argument("--arg", default="", help="the recipe's variant string")
    p.add_argument("--queries", type=int, default=1203)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--calls", type=int, default=3, help="timed calls per repeat")
    p.add_argument("--templates", type=int, default=0,
                   help="encode queries with the recipe's first N prompt templates (default: "
                        "all; 1 makes a CPU run's one-off query encoding 81x cheaper, detection "
                        "speed is unchanged)")
    p.add_argument("--tiny", action="store_true",
                   help="demo smoke model, 16 queries, 96x128 images, 1 repeat: checks the script")
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    _bench.add_repeat_args(p, repeats=3)
    args = p.parse_args()
    _bench.check_repeats(args.repeats)
    if args.tiny:
        args.queries, args.height, args.width, args.repeats, args.calls = 16, 96, 128, 1, 1
    load_before = _bench.load_average()
    config, model, variables, tok = build(args.recipe, args.arg, args.tiny, args.templates)
    names = [f"object kind {i}" for i in range(args.queries)]
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dets, info = detectors(config, model, variables, tok, os.path.join(tmp, "artifact"))
        encode_s = {}
        for name, det in dets.items():
            start = time.perf_counter()
            queries = det.encode(names)
            encode_s[name] = time.perf_counter() - start
            dets[name] = (det, queries)
        for b in batches:
            images = [rng.integers(0, 256, (args.height, args.width, 3), np.uint8)
                      for _ in range(b)]
            rates, compile_s = {n: [] for n in dets}, {}
            for name, (det, queries) in dets.items():
                start = time.perf_counter()
                det.detect(images, queries)  # warm-up: compiles for this batch size
                compile_s[name] = time.perf_counter() - start
            for _ in range(args.repeats):
                for name, (det, queries) in dets.items():  # alternate: same load for both
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        det.detect(images, queries)
                    rates[name].append(b * args.calls / (time.perf_counter() - start))
            ratio = [a / i for a, i in zip(rates["artifact"], rates["in-process"])]
            rows.append((b, _bench.median_range(rates["artifact"]),
                         _bench.median_range(rates["in-process"]), _bench.median_range(ratio),
                         f"{compile_s['artifact']:.1f} / {compile_s['in-process']:.1f}"))
    device = jax.devices()[0]
    what = "demo smoke model (--tiny)" if args.tiny else f"configs/{args.recipe}.py:{args.arg}"
    lines = [
        f"# detect: artifact vs in-process ({what})",
        "",
        f"Device: {device.platform} {getattr(device, 'device_kind', '')}; host: "
        f"{_bench.machine(load_before)}.",
        f"Input {args.height}x{args.width} uint8 -> canvas {config.data.image_size}, "
        f"{args.queries} queries x {len(config.text.templates)} templates; {args.calls} calls "
        f"per repeat, {args.repeats} repeats (median (min-max)); proposals from the detector's "
        "own RPN.",
        f"Artifact: {info['size'] / 2**20:.1f} MiB, exported in {info['export_s']:.1f} s, "
        f"loaded in {info['load_s']:.2f} s; query encoding {encode_s['artifact']:.1f} s "
        f"(artifact) / {encode_s['in-process']:.1f} s (in-process).",
        "",
        "| batch | artifact images/s | in-process images/s | ratio | first call s (art / in) |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {b} | {a} | {i} | {r} | {c} |" for b, a, i, r, c in rows],
        "",
        f"`{_bench.command_line()}`",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

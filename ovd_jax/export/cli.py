"""The two entry points: `export.py` (needs flax) and `detect.py` (flax only with --workdir).

Both parse with argparse and turn every expected failure (ValueError, including
runtime.ArtifactError) into one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _fail(message: str) -> SystemExit:
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(1)


# ------------------------------------------------------------------------------------------
# export.py


def export_main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="export.py", description=(
        "Export a trained detector to a self-contained artifact folder (jax.export programs, "
        "safetensors parameters, tokenizer files, manifest)."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training run (newest checkpoint is exported)")
    src.add_argument("--checkpoint", help="one checkpoint, e.g. runs/demo/checkpoints/800")
    p.add_argument("--config", help="config.json of the run (default: the run's own)")
    p.add_argument("--out", required=True, help="artifact folder to write (replaced atomically)")
    p.add_argument("--platforms", default="cpu,cuda",
                   help="comma-separated jax.export platforms: cpu, cuda, rocm, tpu")
    args = p.parse_args(argv)
    try:
        import ml_collections  # noqa: PLC0415

        from ovd_jax.export import artifact  # noqa: PLC0415

        config = None
        if args.config:
            with open(args.config, encoding="utf-8") as f:
                config = ml_collections.ConfigDict(json.load(f))
        platforms = tuple(s.strip() for s in args.platforms.split(",") if s.strip())
        bad = [s for s in platforms if s not in ("cpu", "cuda", "rocm", "tpu")]
        if bad or not platforms:
            raise ValueError(f"--platforms={args.platforms!r}: use a comma-separated subset of "
                             "cpu, cuda, rocm, tpu.")
        start = time.perf_counter()
        manifest = artifact.export_run(args.out, workdir=args.workdir, checkpoint=args.checkpoint,
                                       config=config, platforms=platforms)
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from e
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {args.out}: {manifest['method']} for {', '.join(manifest['platforms'])}, "
          f"{size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s")
    return manifest


# ------------------------------------------------------------------------------------------
# detect.py


def list_images(path: str) -> list[str]:
    """An image file, or the image files of a folder (sorted by name, not recursive)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"--image {path!r} is neither an image file nor a folder.")
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"folder {path!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
    return [os.path.join(path, f) for f in files]


def read_queries(spec: str) -> list[str]:
    """--queries value: "a, b, c", or "@file.txt" with one query a line."""
    from ovd_jax.export import queries as qlib  # noqa: PLC0415

    if spec.startswith("@"):
        try:
            with open(spec[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read the query file {spec[1:]!r}: {e}") from e
        return qlib.parse_queries(text, one_per_line=True)
    return qlib.parse_queries(spec)


def _progress(total: int):
    try:
        from tqdm import tqdm  # noqa: PLC0415

        return tqdm(total=total, unit="img", desc="detect", dynamic_ncols=True)
    except ImportError:  # tqdm is optional at run time
        return None


def format_table(rows: list[dict]) -> str:
    """Rows of {"image", "query", "score", "box"} -> a fixed-width text table."""
    head = f"{'image':<28} {'query':<24} {'score':>6}  box (x1, y1, x2, y2)"
    lines = [head, "-" * len(head)]
    for r in rows:
        box = ", ".join(f"{v:.1f}" for v in r["box"])
        lines.append(f"{r['image'][-28:]:<28} {r['query'][:24]:<24} {r['score']:6.3f}  ({box})")
    if not rows:
        lines.append("(no detection above the threshold)")
    return "\n".join(lines)


def run_detect(detector, images: list[str], names: list[str], out: str, *,
               threshold: float, batch: int, visualize: bool = True,
               progress: bool = True) -> dict:
    """Detects `names` in `images`, writing into `out` (only complete files, after success):
    detections.json (COCO results), index.json (image and category ids), annotated PNGs.
    Returns {"results": [...], "rows": [...], "images_per_s": float}."""
    from ovd_jax import visualize as vis  # noqa: PLC0415
    from ovd_jax.export import runtime  # noqa: PLC0415

    if batch < 1:
        raise ValueError(f"--batch={batch} must be >= 1.")
    queries = detector.encode(names)
    stage = f"{os.path.abspath(out)}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    try:
        bar = _progress(len(images)) if progress else None
        results, rows, index = [], [], []
        start = time.perf_counter()
        for s in range(0, len(images), batch):
            paths = images[s:s + batch]
            arrays = [runtime.read_image(p) for p in paths]
            for k, (path, image, det) in enumerate(
                    zip(paths, arrays, detector.detect(arrays, queries, threshold))):
                image_id = s + k + 1
                name = os.path.basename(path)
                index.append({"id": image_id, "file_name": name, "height": image.shape[0],
                              "width": image.shape[1]})
                for b, sc, c in zip(det["boxes"], det["scores"], det["classes"]):
                    box = [float(v) for v in b]
                    results.append({"image_id": image_id, "category_id": int(c) + 1,
                                    "bbox": [round(box[0], 2), round(box[1], 2),
                                             round(box[2] - box[0], 2),
                                             round(box[3] - box[1], 2)],
                                    "score": round(float(sc), 5)})
                    rows.append({"image": name, "query": names[int(c)], "score": float(sc),
                                 "box": box})
                if visualize:
                    upscale = max(1, 384 // max(image.shape[:2]))
                    img = vis.draw_detections(image, det["boxes"], det["scores"],
                                              det["classes"], names, score_threshold=threshold,
                                              upscale=upscale)
                    img.save(os.path.join(stage, f"{image_id:05d}_{os.path.splitext(name)[0]}"
                                                 ".png"))
            if bar is not None:
                bar.update(len(paths))
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        with open(os.path.join(stage, "detections.json"), "w", encoding="utf-8") as f:
            json.dump(results, f)
        with open(os.path.join(stage, "index.json"), "w", encoding="utf-8") as f:
            json.dump({"images": index,
                       "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
                       "threshold": threshold}, f, indent=1)
        os.makedirs(out, exist_ok=True)
        for f in sorted(os.listdir(stage)):
            os.replace(os.path.join(stage, f), os.path.join(out, f))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"results": results, "rows": rows, "images_per_s": len(images) / max(elapsed, 1e-9)}


def detect_main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="detect.py", description=(
        "Detect free-text queries in your images with an exported artifact (no flax needed) "
        "or a training run."))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", help="folder written by export.py")
    src.add_argument("--workdir", help="training run (runs the flax model in-process)")
    p.add_argument("--image", required=True, help="an image file or a folder of images")
    p.add_argument("--queries", required=True,
                   help='comma-separated queries "a, b, c", or @file.txt (one a line)')
    p.add_argument("--threshold", type=float, default=0.3, help="minimum score kept")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cache_dir", default=None,
                   help="query-embedding cache (default: <artifact>/query_cache; '' = none)")
    p.add_argument("--no_visualize", action="store_true", help="skip the annotated PNGs")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        names = read_queries(args.queries)
        images = list_images(args.image)
        start = time.perf_counter()
        if args.artifact:
            from ovd_jax.export import runtime  # noqa: PLC0415

            detector = runtime.load_artifact(args.artifact, cache_dir=args.cache_dir)
        else:
            from ovd_jax.export import artifact  # noqa: PLC0415 (imports flax)

            detector = artifact.inprocess_detector(args.workdir, cache_dir=args.cache_dir or "")
        load_s = time.perf_counter() - start
        out = run_detect(detector, images, names, args.out, threshold=args.threshold,
                         batch=args.batch, visualize=not args.no_visualize,
                         progress=not args.no_progress)
    except ValueError as e:
        raise _fail(str(e)) from e
    print(format_table(out["rows"]))
    print(f"{len(images)} image(s), {len(out['results'])} detection(s); loaded in {load_s:.2f} s,"
          f" {out['images_per_s']:.2f} images/s; wrote {args.out}/detections.json")
    return out

"""Model-mode evaluation: batched jitted inference -> COCO results JSON -> COCO/LVIS metrics.

Detections are mapped back to original-image pixels (divide by the resize scale) and to the
dataset's category ids. Base/novel AP50 come from the evaluation vocabulary's split.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from ovd_jax import visualize
from ovd_jax.data import device_image
from ovd_jax.data.pipeline import loader_options, make_detection_loader, resize_options
from ovd_jax.data.transforms import decode_image
from ovd_jax.evaluation import coco_eval, gt_boxes_protocol, ovd
from ovd_jax.evaluation.metrics_only import write_json_atomic
from ovd_jax.methods.base import compute_dtype
from ovd_jax.training import sharding as shd

HEADLINE = ("AP", "AP50", "base_AP50", "novel_AP50")


def _model_images(images, image_hw, config):
    """The model's input images inside jit: uint8 batches (`config.data.image_transfer=
    "uint8"`) normalised on the device; float32 ones as they are."""
    batch = {"image": images, "image_hw": image_hw}
    return device_image.normalize_batch(batch, dtype=compute_dtype(config))["image"]


def _eval_loader(exp, mesh):
    config = exp.config
    eval_bs = int(config.eval.batch_size)
    if eval_bs % shd.data_parallel_size(mesh):
        raise ValueError(
            f"config.eval.batch_size={eval_bs} must be a multiple of the data-parallel size "
            f"{shd.data_parallel_size(mesh)}"
        )
    loader = make_detection_loader(
        exp.val_data.records, batch_size=eval_bs, image_size=config.data.image_size,
        max_boxes=config.data.max_boxes, cat_id_to_index=exp.val_data.cat_id_to_index,
        train=False, seed=config.seed, shard_index=jax.process_index(),
        shard_count=jax.process_count(), drop_remainder=False,
        on_bad_image=config.data.get("on_bad_image", "error"),
        **resize_options(config.data, train=False), **loader_options(config.data),
    )
    return loader, -(-len(exp.val_data.records) // eval_bs)


def predict_dataset(exp, variables, mesh, *, progress: bool = True) -> list[dict]:
    """Runs the detector over the validation set; returns COCO-format result dicts."""
    config = exp.config
    rules = shd.rules_tuple(config.sharding.rules)
    loader, total = _eval_loader(exp, mesh)
    method, model = exp.method, exp.model
    with mesh, nn.logical_axis_rules(rules):
        concepts = exp.method.eval_queries(exp, variables)
        # Inputs arrive already sharded (images over the batch axes), so jit follows them.
        predict = jax.jit(lambda v, im, hw, c: method.predict(
            model, v, _model_images(im, hw, config), hw, c, config))
        cat_ids = np.asarray(exp.eval_vocab.cat_ids)
        results = []
        for batch in tqdm(loader, total=total, desc="eval", disable=not progress, leave=False):
            sharded = shd.shard_batch({"image": batch["image"], "hw": batch["image_hw"]}, mesh)
            out = predict(variables, sharded["image"], sharded["hw"], concepts)
            # This process's rows (the global arrays span other processes' devices too).
            results.extend(_to_coco(batch, shd.to_local(out, mesh), cat_ids))
    return _gather_by_record(exp, results)


def _gather_by_record(exp, rows: list[dict]) -> list[dict]:
    """Every process's result rows (each with an "image_id"), in validation-record order: what
    one process evaluating the whole set produces. A collective under multi-process."""
    if jax.process_count() == 1:
        return rows
    merged = [r for part in shd.gather_objects(rows) for r in part]
    position = {rec["image_id"]: i for i, rec in enumerate(exp.val_data.records)}
    merged.sort(key=lambda r: position[r["image_id"]])  # stable: an image's order is kept
    return merged


def _to_coco(batch: dict, out: dict, cat_ids: np.ndarray) -> list[dict]:
    results = []
    valid_images = batch.get("valid", np.ones(len(batch["image_id"]), bool))
    for i in range(len(batch["image_id"])):
        if not valid_images[i]:
            continue
        scale = float(batch["scale"][i])
        keep = out["valid"][i]
        boxes = out["boxes"][i][keep] / scale
        for b, s, c in zip(boxes, out["scores"][i][keep], out["classes"][i][keep]):
            results.append({
                "image_id": int(batch["image_id"][i]),
                "category_id": int(cat_ids[int(c)]),
                "bbox": [round(float(b[0]), 3), round(float(b[1]), 3),
                         round(float(b[2] - b[0]), 3), round(float(b[3] - b[1]), 3)],
                "score": round(float(s), 5),
            })
    return results


def compute_metrics(exp, results: list[dict]) -> dict:
    """COCO (or LVIS) metrics plus base/novel/all AP50 of the evaluation vocabulary."""
    config = exp.config
    gt = exp.val_data.gt
    if config.eval.metric == "lvis":
        from ovd_jax.evaluation import lvis_eval  # noqa: PLC0415

        metrics = lvis_eval.evaluate_lvis(gt, results)
    elif config.eval.metric == "coco":
        metrics = coco_eval.evaluate_coco(gt, results)
    else:
        raise ValueError(f"config.eval.metric={config.eval.metric!r}: use 'coco' or 'lvis'.")
    vocab = exp.eval_vocab
    base_ids = [vocab.cat_ids[i] for i in vocab.base_indices]
    novel_ids = [vocab.cat_ids[i] for i in vocab.novel_indices]
    caption_only_ids = [vocab.cat_ids[i] for i in vocab.caption_only_indices]
    metrics.update(ovd.ovd_split_metrics(metrics["per_category"], base_ids, novel_ids,
                                         caption_only_ids=caption_only_ids))
    return metrics


def write_visualizations(exp, results: list[dict], out_dir: str, count: int) -> list[str]:
    """Annotated PNGs for the first `count` validation images; returns their paths."""
    if count <= 0 or jax.process_index() != 0:
        return []
    os.makedirs(out_dir, exist_ok=True)
    id_to_index = {c: i for i, c in enumerate(exp.eval_vocab.cat_ids)}
    paths = []
    for rec in exp.val_data.records[:count]:
        dets = [r for r in results if r["image_id"] == rec["image_id"]]
        boxes = np.asarray([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                             d["bbox"][1] + d["bbox"][3]] for d in dets]).reshape(-1, 4)
        # File records carry a path, TFDS records their encoded bytes.
        image = Image.fromarray(decode_image(rec["image"] if "image" in rec else rec["path"]))
        scale = max(1, 384 // max(image.size))
        img = visualize.draw_detections(
            image, boxes, np.asarray([d["score"] for d in dets]),
            np.asarray([id_to_index[d["category_id"]] for d in dets], np.int64),
            exp.eval_vocab.class_names, ground_truth=rec["boxes"], upscale=scale,
        )
        path = os.path.join(out_dir, f"detections_{rec['image_id']}.png")
        img.save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
        paths.append(path)
    return paths


def evaluate(exp, variables, mesh, out_dir: str, *, progress: bool = True) -> dict:
    """Predicts, writes `detections.json` and `metrics.json` (atomically) under `out_dir`."""
    results = predict_dataset(exp, variables, mesh, progress=progress)
    metrics = compute_metrics(exp, results)
    # Method-specific numbers (e.g. GLIP's phrase-grounding recall) go into the same file.
    extra = getattr(exp.method, "extra_metrics", None)
    if extra is not None:
        metrics.update(extra(exp, variables, mesh))
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(results, os.path.join(out_dir, "detections.json"))
        write_json_atomic(metrics, os.path.join(out_dir, "metrics.json"))
        write_visualizations(exp, results, out_dir, int(exp.config.eval.num_visualizations))
    return metrics


def evaluate_gt_boxes(exp, variables, mesh, out_dir: str, *, progress: bool = True) -> dict:
    """RegionCLIP's zero-shot protocol with ground-truth boxes: every (non-crowd) GT box is
    classified against the evaluation vocabulary; reports top-1/top-5 region accuracy and the AP
    of the resulting detections. Writes `<out_dir>/metrics_gt_boxes.json`."""
    if exp.config.data.eval_classes:
        raise ValueError("the GT-box protocol scores every dataset category; unset "
                         "config.data.eval_classes.")
    config = exp.config
    rules = shd.rules_tuple(config.sharding.rules)
    loader, total = _eval_loader(exp, mesh)
    rows = []  # one per valid image: its GT boxes (x, y, w, h), labels and class scores
    with mesh, nn.logical_axis_rules(rules):
        concepts = exp.method.eval_queries(exp, variables)
        if not hasattr(exp.method, "classify_boxes"):
            raise ValueError(f"--protocol=gt_boxes needs region classification, which "
                             f"config.method={config.method!r} does not provide.")
        classify = jax.jit(
            lambda v, im, hw, b, c: exp.method.classify_boxes(
                exp.model, v, _model_images(im, hw, config), b, c, config)
        )
        for batch in tqdm(loader, total=total, desc="gt boxes", disable=not progress,
                          leave=False):
            sharded = shd.shard_batch({"image": batch["image"], "hw": batch["image_hw"],
                                       "boxes": batch["boxes"]}, mesh)
            probs = shd.to_local(classify(variables, sharded["image"], sharded["hw"],
                                          sharded["boxes"], concepts), mesh)
            for i in range(len(batch["image_id"])):
                if not batch["valid"][i]:
                    continue
                m = batch["box_mask"][i]
                b = batch["boxes"][i][m] / float(batch["scale"][i])
                rows.append({"image_id": int(batch["image_id"][i]),
                             "boxes": np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1),
                             "labels": batch["labels"][i][m], "scores": probs[i][m]})
    rows = _gather_arrays_by_record(exp, rows)
    rows_images = [r["image_id"] for r in rows for _ in range(len(r["labels"]))]
    rows_boxes, rows_cls, rows_scores = ([r[k] for r in rows] for k in ("boxes", "labels",
                                                                         "scores"))
    metrics = gt_boxes_protocol.zero_shot_gt_box_metrics(
        exp.val_data.gt, rows_images, np.concatenate(rows_cls), np.concatenate(rows_scores),
        boxes=np.concatenate(rows_boxes), category_ids=list(exp.eval_vocab.cat_ids),
    )
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(metrics, os.path.join(out_dir, "metrics_gt_boxes.json"))
    return metrics


def _gather_arrays_by_record(exp, rows: list[dict]) -> list[dict]:
    """`_gather_by_record` for rows holding numpy arrays (sent as [values, dtype, shape])."""
    if jax.process_count() == 1:
        return rows
    sent = [{k: ([v.ravel().tolist(), v.dtype.str, v.shape] if isinstance(v, np.ndarray)
                 else v) for k, v in r.items()} for r in rows]
    return [{k: (np.asarray(v[0], np.dtype(v[1])).reshape(v[2]) if isinstance(v, list) else v)
             for k, v in r.items()} for r in _gather_by_record(exp, sent)]


def format_headline(metrics: dict) -> str:
    """A small table of the headline numbers."""
    names = ("AP", "AP50", "AP75", "base_AP50", "novel_AP50", "caption_only_AP50", "all_AP50")
    keys = [k for k in names if k in metrics]
    head = " | ".join(f"{k:>10}" for k in keys)
    row = " | ".join(f"{metrics[k]:10.4f}" for k in keys)
    return f"{head}\n{'-' * len(head)}\n{row}"

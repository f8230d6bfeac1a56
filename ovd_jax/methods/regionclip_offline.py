"""RegionCLIP's frozen offline RPN: proposals from a separately trained, frozen backbone + RPN.

Upstream's transfer detector takes its proposals from a Mask R-CNN trained on the base classes,
run frozen and in inference mode, during training and test alike. Here the proposal model is a
RegionCLIP run of this codebase trained with the joint RPN (`config.model.offline_rpn = ""`)
on the base classes: `config.model.offline_rpn = <its workdir>` loads that run's `config.json`
and newest checkpoint, keeps its CLIP res4 backbone, frozen batch-norm statistics and RPN head,
and runs them frozen. Its parameters travel as a train constant / evaluation query (replicated
arrays), so the detector's own parameter tree and optimizer never see them.
"""

from __future__ import annotations

import functools
import json
import os

import flax
import jax
import ml_collections
import numpy as np

from ovd_jax.methods.base import compute_dtype
from ovd_jax.models.regionclip import RegionCLIPDetector
from ovd_jax.models.rpn import select_proposals
from ovd_jax.ops import anchors as anchor_ops

RES4_STRIDE = 16
# Parameter / statistic sub-trees the proposal model needs (the res4 backbone and the RPN head).
_KEEP = ("vision/conv", "vision/bn", "vision/layer1_", "vision/layer2_", "vision/layer3_",
         "rpn_head/")


def _needed(path: tuple[str, ...]) -> bool:
    joined = "/".join(path)
    return any(joined.startswith(p) for p in _KEEP)


@functools.lru_cache(maxsize=4)
def _load(workdir: str, step_dir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(the run's config, its variables restricted to backbone + RPN as numpy arrays)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415 (heavy; only offline-RPN runs need it)

    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        run_config = ml_collections.ConfigDict(json.load(f))
    restored = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    variables = {"params": restored["params"], **restored["model_state"]}
    out = {}
    for collection, tree in variables.items():
        flat = flax.traverse_util.flatten_dict(tree)
        kept = {k: np.asarray(v) for k, v in flat.items() if _needed(k)}
        if kept:
            out[collection] = flax.traverse_util.unflatten_dict(kept)
    return run_config, out


def _newest_step_dir(workdir: str) -> str:
    ckpt = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []
    if not steps:
        raise ValueError(
            f"config.model.offline_rpn={workdir!r} holds no finished checkpoint under "
            "checkpoints/; point it at the workdir of a RegionCLIP run trained with the joint "
            "RPN on the base classes (config.model.offline_rpn='')."
        )
    return os.path.join(ckpt, str(steps[-1]))


def load(config) -> tuple[ml_collections.ConfigDict, dict]:
    """(the proposal run's config, its backbone + RPN variables) for `config.model.offline_rpn`.

    Raises ValueError when the directory is not a finished RegionCLIP run with its own RPN.
    """
    workdir = os.path.abspath(str(config.model.offline_rpn))
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise ValueError(
            f"config.model.offline_rpn={workdir!r} holds no config.json; point it at the workdir "
            "of a RegionCLIP training run with the joint RPN (config.model.offline_rpn='')."
        )
    run_config, variables = _load(workdir, _newest_step_dir(workdir))
    if run_config.get("method") != "regionclip" or run_config.model.get("offline_rpn"):
        raise ValueError(
            f"config.model.offline_rpn={workdir!r} is not a RegionCLIP run with its own RPN "
            f"(method {run_config.get('method')!r}, offline_rpn "
            f"{run_config.model.get('offline_rpn')!r}); train one with offline_rpn=''."
        )
    if "rpn_head" not in variables.get("params", {}):
        raise ValueError(f"the checkpoint of config.model.offline_rpn={workdir!r} has no "
                         "'rpn_head' parameters.")
    return run_config, variables


@functools.lru_cache(maxsize=8)
def _model(run_config_json: str, dtype_name: str) -> tuple[RegionCLIPDetector, np.ndarray]:
    """The proposal model (no text tower, no gradients) and its anchors' config tuple."""
    from ovd_jax.methods.regionclip import vision_tower  # noqa: PLC0415 (cycle)

    run_config = ml_collections.ConfigDict(json.loads(run_config_json))
    with run_config.unlocked():
        run_config.dtype = dtype_name
    m = run_config.model
    model = RegionCLIPDetector(
        vision=vision_tower(run_config), text=None,
        num_anchors=len(m.anchor_sizes) * len(m.anchor_aspect_ratios),
        rpn_channels=int(m.rpn_channels), dtype=compute_dtype(run_config),
    )
    return model, (tuple(m.anchor_sizes), tuple(m.anchor_aspect_ratios))


def proposals(config, variables, images, image_hw):
    """Frozen proposals for a batch: images [N,S,S,3], image_hw [N,2] -> (boxes [N,P,4],
    logits [N,P], valid [N,P]) with P = `config.model.rpn_post_nms_topk_test`; the detector
    config's test-time counts and NMS threshold apply in training too (upstream runs its
    offline RPN in inference mode)."""
    m = config.model
    run_config, _ = load(config)  # cached: the config only; the arrays are `variables`
    model, (sizes, ratios) = _model(run_config.to_json(), str(config.dtype))
    s = images.shape[1]
    anchors = jax.numpy.asarray(anchor_ops.generate_anchors(
        [(s // RES4_STRIDE, images.shape[2] // RES4_STRIDE)], [RES4_STRIDE], [sizes], ratios))
    variables = jax.lax.stop_gradient(variables)
    res4 = model.apply(variables, images, method=RegionCLIPDetector.backbone)
    objectness, deltas = model.apply(variables, res4, method=RegionCLIPDetector.rpn)
    return jax.vmap(
        lambda o, d, hw: select_proposals(
            anchors, o, d, hw, pre_nms_topk=m.rpn_pre_nms_topk_test,
            post_nms_topk=m.rpn_post_nms_topk_test, nms_threshold=m.rpn_nms_threshold,
            min_size=m.rpn_min_box_size,
        )
    )(objectness, deltas, image_hw)

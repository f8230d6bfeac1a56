"""Pretrained weights for a detector or a teacher: converted checkpoints and training workdirs.

Two sources are accepted wherever a path names pretrained weights (`config.model.
init_checkpoint`, `config.model.teacher`):

* a converted checkpoint folder (`python -m ovd_jax.convert ...`: `config.json` +
  `variables.msgpack`), e.g. OpenAI CLIP or RegionCLIP weights;
* a training workdir of this codebase (`<dir>/checkpoints/<step>/` + `<dir>/config.json`), e.g.
  the CLIP teacher or the region-text pretraining run; its newest checkpoint is read (or a
  `<dir>/checkpoints/<step>` folder for a given step).

Detector, CLIP and teacher parameter trees hold the towers under the same names ('vision',
'text'), so `merge_pretrained_towers` copies those subtrees over and leaves every other
parameter (RPN, box head) at its initialisation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax
import jax
import numpy as np

from ovd_jax.models.scan_layout import match_layer_layout

TOWERS = ("vision", "text")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Loaded weights. `variables`: {'params': ..., 'batch_stats': ..., ...} as numpy;
    `kind`: "converted" or "workdir"; `config`: the workdir's training config (a dict) or the
    converted checkpoint's model description; `step`: the checkpoint step (workdirs)."""

    variables: dict
    kind: str
    config: dict
    path: str
    step: int | None = None


def _step_dir(path: str) -> tuple[str, str, int]:
    """(workdir, step folder, step) of a workdir, its checkpoints/ folder, or one step."""
    path = os.path.abspath(path)
    if os.path.basename(path).isdigit():
        step = int(os.path.basename(path))
        return os.path.dirname(os.path.dirname(path)), path, step
    ckpt = path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []
    if not steps:
        raise ValueError(f"{path} holds no finished checkpoint under checkpoints/; train that run "
                         "first (or point at a converted checkpoint folder).")
    return os.path.dirname(ckpt), os.path.join(ckpt, str(steps[-1])), steps[-1]


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, stamp: int) -> Pretrained:
    del stamp  # part of the cache key only: a newer checkpoint invalidates the entry
    from ovd_jax.convert.common import VARIABLES_FILE, load_checkpoint  # noqa: PLC0415

    if os.path.isfile(os.path.join(path, VARIABLES_FILE)):
        model_config, variables = load_checkpoint(path)
        return Pretrained(variables, "converted", model_config, path)
    import orbax.checkpoint as ocp  # noqa: PLC0415 (heavy)

    workdir, step_dir, step = _step_dir(path)
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{workdir} has checkpoints but no config.json; it is not a training "
                         "workdir of this codebase.")
    with open(config_path, encoding="utf-8") as f:
        run_config = json.load(f)
    restored = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    variables = {"params": restored["params"], **restored.get("model_state", {})}
    variables = jax.tree.map(np.asarray, variables)
    return Pretrained(variables, "workdir", run_config, workdir, step)


def load_pretrained(path: str) -> Pretrained:
    """Loads a converted checkpoint folder or a training workdir (see module docstring).

    Raises ValueError naming the path when it is neither.
    """
    path = os.path.abspath(str(path))
    if not os.path.isdir(path):
        raise ValueError(f"pretrained weights {path!r} do not exist; give a training workdir or "
                         "a folder written by `python -m ovd_jax.convert`.")
    # A new checkpoint step changes checkpoints/' mtime: the cache entry is then not reused.
    ckpt = os.path.join(path, "checkpoints")
    stamp = os.stat(ckpt if os.path.isdir(ckpt) else path).st_mtime_ns
    return _load_cached(path, stamp)


def describe_source(pretrained: Pretrained) -> str:
    """A few words on where weights came from, e.g. 'training workdir, step 800, method
    regionclip' or 'converted CLIP checkpoint (resnet)'."""
    if pretrained.kind == "workdir":
        method = pretrained.config.get("method")
        return f"training workdir, step {pretrained.step}" + (f", method {method}"
                                                               if method else "")
    cfg = pretrained.config
    kind = cfg.get("type") or ("clip" if "vision" in cfg and "text" in cfg else None)
    detail = cfg.get("variant") or cfg.get("arch") or (cfg.get("vision") or {}).get("type")
    text = f"converted {kind.upper() if kind == 'clip' else kind or 'unknown'} checkpoint"
    return text + (f" ({detail})" if detail else "")


def towers(variables: dict, names=TOWERS) -> dict:
    """The subtrees `names` of every collection (collections without them are dropped)."""
    out = {}
    for collection, tree in variables.items():
        kept = {k: v for k, v in tree.items() if k in names}
        if kept:
            out[collection] = kept
    return out


def merge_pretrained_towers(variables: dict, checkpoint: str, names=None) -> dict:
    """Returns `variables` with the `names` subtrees of every collection replaced by those of
    `checkpoint` (a converted checkpoint folder or a training workdir), placed with the same
    shardings. `names` defaults to the "towers" a converted checkpoint's config.json lists (a
    GLIP import lists the whole detector), else TOWERS. Raises ValueError listing missing /
    shape-mismatched keys, or when none of the subtrees exists in the model. On success prints
    one line (process 0): the source, how many arrays / parameters were loaded, and which
    subtrees keep their initialisation."""
    pretrained = load_pretrained(checkpoint)
    loaded = pretrained.variables
    if names is None:
        names = TOWERS
        if pretrained.kind == "converted" and pretrained.config.get("towers"):
            names = tuple(pretrained.config["towers"])
    problems, merged, copied, copied_params, kept, used = [], {}, 0, 0, set(), 0
    for collection, tree in variables.items():
        flat = flax.traverse_util.flatten_dict(tree)
        # A checkpoint's layer stacks are converted to the model's layout (per-layer modules vs
        # scan_layers' stacked ones), so either loads into either.
        src = flax.traverse_util.flatten_dict(
            match_layer_layout(loaded.get(collection, {}), tree))
        used += sum(1 for key in src if key[0] in names)
        for key, value in flat.items():
            if key[0] not in names:
                kept.add(key[0])
                continue
            if key not in src:
                problems.append(f"missing {collection}/{'/'.join(key)}")
            elif tuple(np.shape(src[key])) != tuple(value.shape):
                problems.append(
                    f"shape {collection}/{'/'.join(key)}: checkpoint {np.shape(src[key])}, "
                    f"model {tuple(value.shape)}"
                )
            else:
                flat[key] = jax.device_put(np.asarray(src[key], value.dtype), value.sharding)
                copied += 1
                copied_params += int(np.size(value)) if collection == "params" else 0
        merged[collection] = flax.traverse_util.unflatten_dict(flat)
    if not copied and not problems:
        raise ValueError(f"pretrained weights {checkpoint} hold none of the model's "
                         f"{'/'.join(names)} subtrees; convert the weights for this method "
                         "(e.g. --format glip for GLIP) or point at the right checkpoint.")
    if problems:
        raise ValueError(
            f"pretrained weights {checkpoint} do not fit the model's {'/'.join(names)} towers "
            f"({len(problems)} problems, e.g. {problems[:5]}); build the model with the "
            "checkpoint's architecture (config.model.vision / text and their overrides, "
            "config.text.context_length)."
        )
    if jax.process_index() == 0:
        # One start-up line (printed, as the entry points log at WARNING only): what was loaded.
        unused = used - copied
        print(f"init_checkpoint {checkpoint} ({describe_source(pretrained)}): loaded "
              f"{copied} arrays ({copied_params / 1e6:.2f}M parameters) into "
              f"{'/'.join(n for n in names if any(n in t for t in merged.values()))}; "
              f"0 missing, 0 shape-mismatched, {unused} checkpoint arrays in those subtrees "
              f"unused; kept at initialisation: {', '.join(sorted(kept)) or 'nothing'}.",
              flush=True)
    return merged

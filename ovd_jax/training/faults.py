"""Faults the training loop reports: non-finite steps, and resuming with an incompatible config.

Non-finite steps. The compiled step (train_step.py) never applies an update whose loss or
gradients hold a NaN/Inf: it keeps the old parameters and optimizer state and returns
`metrics["nonfinite"] = 1`. The loop fetches metrics every `log_every` steps (and before every
checkpoint) and hands them to `NonFiniteGuard`, which logs each skipped step with its image ids
and stops the run (a `NonFiniteError`) once more than `config.train.skip_nonfinite` were skipped.

Config changes. A checkpoint's meta holds the config and training classes it was written with;
`config_differences` compares the keys that change what the parameters mean (`RESUME_KEYS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging

# Dotted config prefixes that must match to resume: the model, the text side (tokenizer,
# vocabulary, prompts, context length) and the input resolution.
RESUME_KEYS = ("model.", "text.", "data.image_size", "data.min_size", "data.max_size")
# Keys under those prefixes that only matter when a run starts (the weights are restored anyway)
# or that change memory use but not the computation.
RESUME_IGNORED = ("model.init_checkpoint", "model.remat", "model.remat_policy",
                  "model.attention_impl")
# Metrics of the step itself rather than of the loss; never named as the non-finite terms.
_NOT_TERMS = ("nonfinite", "learning_rate")


class NonFiniteError(FloatingPointError, ValueError):
    """A NaN/Inf loss or gradient that training cannot skip. Also a ValueError, so train.py
    prints it as one `error: ...` line with exit code 1 (see ovd_jax/training/cli.py)."""


def nonfinite_terms(metrics: Mapping) -> list[str]:
    """Names of the scalar entries of one step's host `metrics` that are NaN or infinite."""
    bad = []
    for k, v in metrics.items():
        if k in _NOT_TERMS or np.ndim(v) != 0:
            continue
        if not math.isfinite(float(np.asarray(v))):
            bad.append(f"{k}={float(np.asarray(v))}")
    return bad


def _ids_text(image_ids) -> str:
    if image_ids is None:
        return "(the batch carries no image ids)"
    ids = [int(i) for i in np.asarray(image_ids).reshape(-1) if int(i) >= 0]
    return f"image ids {ids}" + (" (this process's share of the batch)" if ids else "")


def describe(step: int, metrics: Mapping, image_ids) -> str:
    """One sentence: the step, the non-finite terms and the batch's image ids."""
    terms = nonfinite_terms(metrics) or ["the parameter update"]
    return (f"step {step} is not finite ({', '.join(terms)}) on the batch of "
            f"{_ids_text(image_ids)}")


class NonFiniteGuard:
    """Counts non-finite (hence skipped) steps and stops training past `limit` of them.

    `skipped` starts at the count a resumed run had already used (kept in the checkpoint meta).
    """

    def __init__(self, limit: int, skipped: int = 0):
        if limit < 0:
            raise ValueError(f"config.train.skip_nonfinite={limit} must be >= 0 (0 stops at the "
                             "first non-finite step).")
        self.limit = int(limit)
        self.skipped = int(skipped)

    def check(self, records: Sequence[tuple[int, Mapping, object]], newest_ckpt: int | None):
        """`records`: (step, host metrics, image ids or None) of the steps fetched since the last
        call, in order. Logs each non-finite step; raises NonFiniteError at the first one past the
        limit, naming it (the steps after it were computed but are never checkpointed)."""
        for step, metrics, image_ids in records:
            if not int(np.asarray(metrics.get("nonfinite", 0))):
                continue
            what = describe(step, metrics, image_ids)
            if self.skipped < self.limit:
                self.skipped += 1
                logging.warning("%s; update skipped (%d of config.train.skip_nonfinite=%d)",
                                what, self.skipped, self.limit)
                continue
            where = ("no checkpoint was written yet" if newest_ckpt is None else
                     f"the newest checkpoint (step {newest_ckpt}) holds the last finite state")
            raise NonFiniteError(
                f"training stopped: {what}. The update was not applied and {where}. Lower "
                "config.optim.learning_rate, check these images, or set "
                f"config.train.skip_nonfinite (now {self.limit}) to skip a few such steps."
            )


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in (tree or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _matters(key: str) -> bool:
    if any(key == k or key.startswith(k + ".") for k in RESUME_IGNORED):
        return False
    return any(key.startswith(p) if p.endswith(".") else key == p for p in RESUME_KEYS)


def config_differences(saved: Mapping, current: Mapping, saved_classes=None,
                       current_classes=None) -> list[str]:
    """The resume-relevant keys whose values differ, as `key: saved -> current` strings.

    `saved` / `current`: configs as JSON-like dicts (`json.loads(config.to_json_best_effort())`);
    `*_classes`: the training vocabularies (skipped when `saved_classes` is None: old meta).
    """
    a, b = _flatten(saved), _flatten(current)
    missing = object()
    diffs = []
    for key in sorted(k for k in set(a) | set(b) if _matters(k)):
        old, new = a.get(key, missing), b.get(key, missing)
        if old != new:
            diffs.append(f"{key}: {'(absent)' if old is missing else repr(old)} -> "
                         f"{'(absent)' if new is missing else repr(new)}")
    if saved_classes is not None and list(saved_classes) != list(current_classes or []):
        old, new = list(saved_classes), list(current_classes or [])
        gone, added = [c for c in old if c not in new], [c for c in new if c not in old]
        detail = f"removed {gone[:10]}, added {added[:10]}" if gone or added else "reordered"
        diffs.append(f"train classes ({len(old)} -> {len(new)}): {detail}")
    return diffs


def check_resume_config(meta: Mapping, current_config: Mapping, current_classes, *,
                        where: str, allow_change: bool) -> list[str]:
    """Refuses (ValueError) to resume from the checkpoint `where` whose meta records a config
    that differs from `current_config` on `RESUME_KEYS` or in its training classes, unless
    `allow_change` (then the differences are logged). Returns the differences."""
    if "config" not in meta:  # written before configs were recorded: nothing to compare
        return []
    diffs = config_differences(meta["config"], current_config, meta.get("train_classes"),
                               current_classes)
    if not diffs:
        return []
    listed = "; ".join(diffs)
    if not allow_change:
        raise ValueError(
            f"checkpoint {where} was trained with another model or data configuration "
            f"({listed}); resume with the "
            "config it was trained with, use a fresh --workdir, or set "
            "config.train.allow_config_change=True to continue with the change deliberately."
        )
    logging.warning("resuming from %s with a changed config "
                    "(config.train.allow_config_change=True): %s", where, listed)
    return diffs

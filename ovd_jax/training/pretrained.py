"""Starting a detector from converted CLIP weights (`python -m ovd_jax.convert ...` output).

The detector's parameter tree holds the CLIP towers under the same names as `ovd_jax.models.
clip.CLIP` ('vision', 'text'), so a converted checkpoint's subtrees are copied over; every other
parameter (RPN, box head) keeps its random initialisation.
"""

from __future__ import annotations

import flax
import jax
import numpy as np

TOWERS = ("vision", "text")


def merge_pretrained_towers(variables: dict, checkpoint_dir: str) -> dict:
    """Returns `variables` with the 'vision'/'text' subtrees of every collection replaced by the
    checkpoint's. Raises ValueError listing missing / shape-mismatched keys."""
    from ovd_jax.convert.common import load_checkpoint  # noqa: PLC0415 (torch-free, but heavy)

    _, loaded = load_checkpoint(checkpoint_dir)
    problems, merged = [], {}
    for collection, tree in variables.items():
        flat = flax.traverse_util.flatten_dict(tree)
        src = flax.traverse_util.flatten_dict(loaded.get(collection, {}))
        for key, value in flat.items():
            if key[0] not in TOWERS:
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
        merged[collection] = flax.traverse_util.unflatten_dict(flat)
    if problems:
        raise ValueError(
            f"config.model.init_checkpoint={checkpoint_dir} does not fit the detector's CLIP "
            f"towers ({len(problems)} problems, e.g. {problems[:5]}); set config.model.vision / "
            "config.model.text to the checkpoint's architecture."
        )
    return merged

"""Checkpoint importers: OpenAI CLIP, Hugging Face CLIP, open_clip, RegionCLIP, GLIP (and
BERT/Swin).

Python API: `load_clip(path) -> (CLIP, variables)`, `convert_clip(path, out_dir)`,
`save_checkpoint(dir, config, variables)` / `load_checkpoint(dir)`. CLI: `python -m
ovd_jax.convert --format ... --input PATH --output DIR`.
"""

from ovd_jax.convert.bert import load_bert
from ovd_jax.convert.clip import convert_clip, load_clip, load_clip_checkpoint
from ovd_jax.convert.common import (
    CheckpointMismatchError,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from ovd_jax.convert.glip import load_glip
from ovd_jax.convert.swin import load_swin

__all__ = [
    "CheckpointMismatchError",
    "convert_clip",
    "load_glip",
    "load_checkpoint",
    "load_clip",
    "load_clip_checkpoint",
    "load_bert",
    "load_swin",
    "read_state_dict",
    "save_checkpoint",
]

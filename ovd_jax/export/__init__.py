"""Checkpoint export and inference without the training code.

`artifact` (needs flax) writes an artifact folder from a trained run; `runtime` loads and runs
one with jax, numpy, safetensors, Pillow and the tokenizer only; `queries` turns free-text
queries into token arrays; `detectors` holds the per-method inference functions that are
exported. docs/export.md describes the format.
"""

"""One module per training objective; `config.method` picks one through `get`.

Each method module provides `build_model(config, *, text_vocab_size, eot_token_id)`,
`init_args(config, num_prompts)`, `train_loss(model, params, model_state, batch,
concept_tokens, rng, config) -> (loss, metrics)`, `concept_embeddings(model, variables, tokens,
num_templates)` and `predict(model, variables, images, image_hw, concepts, config)`.
"""

from __future__ import annotations

from types import ModuleType

from ovd_jax.methods import regionclip

METHODS: dict[str, ModuleType] = {"regionclip": regionclip}


def get(name: str) -> ModuleType:
    if name not in METHODS:
        raise ValueError(f"config.method={name!r} is not one of {sorted(METHODS)}.")
    return METHODS[name]

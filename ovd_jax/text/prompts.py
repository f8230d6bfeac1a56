"""Prompt templates and concept-prompt tokenisation (prompt ensembling happens on features)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# CLIP's 80-template ImageNet ensemble is what RegionCLIP averages over; this is a shorter list
# of the same kind for small text towers and quick runs.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a {}.", "there is a {} in the scene.")


def concept_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Concept-major prompts: [name0/template0, name0/template1, ..., name1/template0, ...]."""
    if not class_names:
        raise ValueError(
            "the vocabulary is empty: set config.data.train_classes / config.data.eval_classes "
            "or give the dataset at least one category."
        )
    if not templates:
        raise ValueError("config.text.templates is empty: give at least one template like 'a {}.'")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"prompt template {t!r} in config.text.templates has no '{{}}' slot")
    return [t.format(name) for name in class_names for t in templates]


def tokenize_concepts(
    tokenizer, class_names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """Token ids [K * T, L] int32 for every (class, template) prompt, concept-major."""
    return np.asarray(tokenizer(concept_prompts(class_names, templates)), np.int32)

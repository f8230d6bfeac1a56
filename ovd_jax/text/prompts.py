"""Prompt templates and concept-prompt tokenisation (prompt ensembling happens on features).

RegionCLIP embeds every concept with 81 templates: CLIP's 80 ImageNet templates plus the bare
"{}." , and averages the text features over the templates before normalising them. Class names
are cleaned the same way RegionCLIP cleans them before templating (LVIS "baby_buggy" ->
"baby buggy", "bow_(weapon)" -> "bow weapon").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# A short list for small text towers trained from scratch (the demo) and quick runs.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a {}.", "there is a {} in the scene.")

# RegionCLIP's concept-embedding ensemble, in its order: the bare name, then CLIP's 80
# ImageNet templates (the order only matters for bit-exact averaging, not for the result).
CLIP_IMAGENET_TEMPLATES = (
    "{}.",
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


def prompt_name(name: str) -> str:
    """A category name as it goes into a prompt: '_' and '+' become spaces, ',', '(' and ')'
    are dropped, runs of spaces collapse (LVIS 'bow_(weapon)' -> 'bow weapon')."""
    for old, new in (("_", " "), ("+", " "), (",", ""), ("(", ""), (")", "")):
        name = name.replace(old, new)
    return " ".join(name.split())


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
    return [t.format(prompt_name(name)) for name in class_names for t in templates]


def tokenize_concepts(
    tokenizer, class_names: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """Token ids [K * T, L] int32 for every (class, template) prompt, concept-major."""
    return np.asarray(tokenizer(concept_prompts(class_names, templates)), np.int32)

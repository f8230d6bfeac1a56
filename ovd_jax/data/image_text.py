"""Image-text pairs for CLIP-style and region-text pretraining, chosen by `config.image_text`.

Sources (`config.image_text.source`):

    "synthetic"      the synthetic set's image-text split (`annotations/captions_imagetext.json`
                     under `config.data.root`; generated with the detection splits)
    "coco_captions"  any COCO-captions JSON (`captions_json`) + image folder (`images`)
    "tfds"           a prepared TFDS array_record dataset (`tfds_name`, `tfds_split`, ...),
                     e.g. CC3M: images + one caption each

`caption_loader` turns them into grain batches of `image` [B,S,S,3] (S =
`image_text.image_size`, default `data.image_size`), `image_hw`, `valid` and `caption_tokens`
[B,L] (one random caption of the image per visit); `concept_pool` gives the
pretraining concepts (a file, one per line, or the captions' frequent noun phrases);
`ZipLoader` runs two loaders side by side (e.g. image-text pairs and detection images for a
teacher that also trains a proposal network).
"""

from __future__ import annotations

import jax

from ovd_jax.data import captions as captions_lib
from ovd_jax.data import synthetic
from ovd_jax.data.pipeline import (
    WorkerLock,
    close_iterator,
    loader_options,
    make_caption_loader,
)

SOURCES = ("synthetic", "coco_captions", "tfds")


def image_text_records(config):
    """The caption records of `config.image_text` (a list, or a lazy sequence for TFDS)."""
    it = config.image_text
    if it.source == "synthetic":
        if not config.data.synthetic:
            raise ValueError("config.image_text.source='synthetic' reads the synthetic set's "
                             "image-text split: set config.data.synthetic=True, or use "
                             "source='coco_captions' / 'tfds'.")
        paths = synthetic.dataset_paths(config.data.root)
        return captions_lib.load_coco_captions(paths.imagetext_captions, paths.imagetext_images)
    if it.source == "coco_captions":
        if not it.captions_json or not it.images:
            raise ValueError("config.image_text.source='coco_captions' needs "
                             "config.image_text.captions_json and config.image_text.images.")
        return captions_lib.load_coco_captions(it.captions_json, it.images)
    if it.source == "tfds":
        from ovd_jax.data.tfds_source import load_tfds_captions  # noqa: PLC0415 (optional)

        if not it.tfds_name:
            raise ValueError("config.image_text.source='tfds' needs config.image_text.tfds_name.")
        return load_tfds_captions(
            it.tfds_name, split=it.tfds_split, data_dir=it.tfds_data_dir or None,
            image_key=it.image_key, caption_key=it.caption_key, id_key=it.id_key or None,
        )
    raise ValueError(f"config.image_text.source={it.source!r}: use one of {SOURCES}.")


def concept_pool(config, records) -> list[str]:
    """The region-text pretraining concepts: `config.image_text.concepts_file` (one per line)
    when set, else the noun phrases of the first `max_caption_scan` records' captions that
    occur at least `min_concept_count` times (at most `max_concepts`, most frequent first)."""
    it = config.image_text
    if it.concepts_file:
        return captions_lib.load_concept_file(it.concepts_file)
    n = min(len(records), int(it.max_caption_scan)) if it.max_caption_scan else len(records)
    texts = [c for i in range(n) for c in records[i]["captions"]]
    parser = captions_lib.load_parser(it.concept_parser)
    return captions_lib.concept_pool_from_captions(
        texts, parser=parser, min_count=int(it.min_concept_count),
        max_concepts=int(it.max_concepts),
    )


def caption_loader(config, tokenizer, records, *, batch_size: int, num_epochs=None):
    """Shuffled training batches of image + `caption_tokens` [B, context_length] int32 (one
    random caption per visit); `batch_size` is the global batch, each process reads its share."""
    per_process = int(batch_size) // jax.process_count()
    lock = WorkerLock()  # grain reads with threads; one tokenizer call at a time

    def tokenize(text: str) -> dict:
        with lock:
            return {"caption_tokens": tokenizer([text])[0]}

    return make_caption_loader(
        records, batch_size=per_process,
        image_size=int(config.image_text.image_size or config.data.image_size), tokenize=tokenize,
        train=True, seed=config.seed, hflip=bool(config.image_text.hflip),
        num_epochs=num_epochs, shard_index=jax.process_index(),
        shard_count=jax.process_count(), on_bad_image=config.data.get("on_bad_image", "error"),
        **loader_options(config.data),
    )


class ZipLoader:
    """Iterates several loaders in lock-step; each batch is the union of theirs, the keys of
    loader `name` prefixed with `name` + "_" (an empty name keeps them). The iterator has
    `get_state` / `set_state` (a dict of the parts' states), so a run resumes exactly."""

    def __init__(self, **loaders):
        self._loaders = loaders

    def __iter__(self):
        return _ZipIterator({k: iter(v) for k, v in self._loaders.items()})


class _ZipIterator:
    def __init__(self, iterators: dict):
        self._its = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        out = {}
        for name, it in self._its.items():
            prefix = f"{name}_" if name else ""
            out.update({prefix + k: v for k, v in next(it).items()})
        return out

    def get_state(self) -> dict:
        return {name: it.get_state() for name, it in self._its.items()}

    def close(self) -> None:
        """Closes every part that can be closed (grain worker processes)."""
        for it in self._its.values():
            close_iterator(it)

    def set_state(self, state: dict) -> None:
        missing = set(self._its) - set(state)
        if missing:
            raise ValueError(f"the saved data-iterator state lacks the parts {sorted(missing)}; "
                             "it was written by another training configuration.")
        for name, it in self._its.items():
            it.set_state(state[name])

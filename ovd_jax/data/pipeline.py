"""grain input pipelines: detection records -> fixed-shape numpy batches.

Batch keys (B = batch_size, S = image_size, M = max_boxes):

    image     float32 [B,S,S,3]  long side resized to S (or shortest-edge resize with min_size /
                                 max_size), padded bottom/right, CLIP-normalised; with
                                 image_transfer="uint8": uint8, not normalised, zero padding
                                 (`device_image.normalize_images` normalises it on the device)
    boxes     float32 [B,M,4]    x1,y1,x2,y2 in input pixels (= original px * scale, after flip)
    labels    int32   [B,M]      contiguous class index (cat_id_to_index), -1 for padding
    box_mask  bool    [B,M]      True for real boxes (crowd regions are never targets)
    image_id  int32   [B]        dataset image id; -1 for eval padding entries
    scale     float32 [B]        input px = original px * scale
    image_hw  int32   [B,2]      resized, unpadded (h, w)
    orig_hw   int32   [B,2]      original (h, w)
    flipped   bool    [B]        whether the image was mirrored (original x = W - x)
    valid     bool    [B]        False only for eval padding entries

`make_caption_loader` yields the image keys above (no box keys) plus whatever fixed-shape arrays
the caller's `tokenize(caption)` returns (e.g. `input_ids`, `attention_mask`), for image-text
pretraining (RegionCLIP / DetCLIPv2).

Determinism: the order and the flips depend only on (seed, position in the global stream), so
the same seed gives the same batches whatever the number of processes (each reads its block of
every global batch), and the iterator's `get_state()`/`set_state()` resume exactly.
`num_workers` > 0 decodes and augments in grain worker processes (`ovd_jax.data.workers`) and
yields the same batches as `num_workers=0`.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ovd_jax.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    SKIPPED_IMAGES,
    BadImageError,
    check_bad_image_policy,
    check_image_transfer,
    detection_example,
    image_example,
    padding_example,
)

if TYPE_CHECKING:
    import grain


class WorkerLock:
    """A `threading.Lock` (context manager) that pickles, as a fresh unlocked lock: per-example
    hooks that guard a tokenizer with one can then run in grain worker processes."""

    def __init__(self):
        self._lock = threading.Lock()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._lock = threading.Lock()


def loader_options(data_config) -> dict:
    """`image_transfer` and `num_workers` loader kwargs from a config's `data` block
    (`config.data.image_transfer`, `config.data.num_workers`; defaults "float32" and 0)."""
    workers = data_config.get("num_workers", 0)
    if int(workers) != workers or workers < 0:
        raise ValueError(f"config.data.num_workers={workers!r} must be an int >= 0 (0: read in "
                         "threads of the training process; N: N grain worker processes).")
    return {"image_transfer": check_image_transfer(data_config.get("image_transfer", "float32")),
            "num_workers": int(workers)}



def close_iterator(iterator) -> None:
    """Calls `iterator.close()` where it has one: grain iterators with worker processes
    (`config.data.num_workers`) and the multi-loader iterators built on them."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()

def _check_args(who, records, shard_index, shard_count, **sizes):
    if len(records) == 0:
        raise ValueError(f"{who} got no records; check the dataset paths (config.data) - the "
                         "annotation file lists no images.")
    for name, value in (*sizes.items(), ("shard_count", shard_count)):
        if int(value) != value or value < 1:
            raise ValueError(f"{who}: {name}={value!r} must be a positive int.")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"{who}: shard_index={shard_index} must be in "
                         f"[0, shard_count={shard_count}) (use jax.process_index()).")


# Placeholder record for eval padding (grain skips None elements in `map`, so not None).
_PAD = {"padding": True}


class _PaddedShard(Sequence):
    """Records shard_index, shard_index + shard_count, ... then `_PAD` up to a length that is the
    same for every shard and a multiple of the batch size (lazy: records are indexed on use)."""

    def __init__(self, records: Sequence, shard_index: int, shard_count: int, batch_size: int):
        self._records, self._start, self._step = records, shard_index, shard_count
        self._real = len(range(shard_index, len(records), shard_count))
        per_shard = math.ceil(len(records) / shard_count)
        self._len = math.ceil(per_shard / batch_size) * batch_size

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        if not 0 <= i < self._len:
            raise IndexError(i)
        return self._records[self._start + i * self._step] if i < self._real else _PAD


def _train_example(index, record, *, seed, make):
    # Randomness is a function of (seed, position in the global stream) only, so it is
    # reproduced exactly after a restart from a saved iterator state, and an image is augmented
    # the same way whatever the number of processes.
    return make(record, np.random.default_rng([seed, 0, index]))


class _BlockIndices(Sequence):
    """Global stream positions of one process: block `shard_index` (of `batch_size` positions)
    of every global batch of `batch_size * shard_count`. The processes' batches, concatenated in
    process order, are then exactly the global batches a single process would read."""

    def __init__(self, length: int, batch_size: int, shard_index: int, shard_count: int):
        self._len = length // shard_count
        self._b, self._i, self._p = batch_size, shard_index, shard_count

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, t: int) -> int:
        if not 0 <= t < self._len:
            raise IndexError(t)
        return (t // self._b) * self._b * self._p + self._i * self._b + t % self._b


def _take(dataset, index):
    return dataset[index]


def _eval_example(record, *, make, pad):
    example = None if record is _PAD else make(record, None)
    return pad() if example is None else example  # None: a skipped bad image


def _skippable(make_example, record, on_bad_image, *args, **kw):
    """make_example(record, ...), or None (grain drops it) for a bad image under 'skip'."""
    try:
        return make_example(record, *args, **kw)
    except BadImageError as e:
        if on_bad_image != "skip":
            raise
        SKIPPED_IMAGES.add(record.get("path") or f"image_id {record.get('image_id')}", e)
        return None


def _make_loader(records, *, make, pad, batch_size, train, seed, num_epochs, shard_index,
                 shard_count, drop_remainder, num_threads, prefetch_buffer_size, num_workers=0):
    """Shared pipeline: `make(record, rng or None) -> example`, `pad() -> padding example`;
    `num_workers` > 0 runs it in that many grain worker processes (same batches)."""
    import grain  # imported here: it takes seconds, and readers/generator do not need it

    if not isinstance(records, Sequence):
        records = list(records)  # grain needs random access; lazy Sequences stay lazy
    if train:
        ds = grain.MapDataset.source(records).shuffle(seed=seed)
        if num_epochs is not None:
            if int(num_epochs) != num_epochs or num_epochs < 1:
                raise ValueError(f"num_epochs={num_epochs!r} must be a positive int or None.")
            ds = ds.repeat(num_epochs)
            # Equal-length shards: multi-host steps must agree on the number of batches.
            unit = shard_count * batch_size if shard_count > 1 else 1
            total = (len(ds) // unit) * unit
            if total // shard_count < (batch_size if drop_remainder else 1):
                raise ValueError(
                    f"{len(records)} images x {num_epochs} epochs over {shard_count} shards give "
                    f"no full batch of {batch_size}; lower batch_size or raise num_epochs."
                )
            ds = ds[:total]
        else:
            ds = ds.repeat(None)
        # Augment by global position, then shard after the global shuffle (every epoch is
        # reshuffled across all hosts): each process reads its block of every global batch.
        ds = ds.map_with_index(functools.partial(_train_example, seed=seed, make=make))
        if shard_count > 1:
            blocks = _BlockIndices(len(ds), batch_size, shard_index, shard_count)
            ds = grain.MapDataset.source(blocks).map(functools.partial(_take, ds))
    else:
        shard = _PaddedShard(records, shard_index, shard_count, batch_size)
        ds = grain.MapDataset.source(shard).map(
            functools.partial(_eval_example, make=make, pad=pad))
        drop_remainder = False  # the padded shard length is a multiple of batch_size
    read = grain.ReadOptions(
        num_threads=num_threads,
        prefetch_buffer_size=prefetch_buffer_size or 2 * batch_size,
    )
    if num_workers:
        from ovd_jax.data.workers import prefetch_in_workers  # noqa: PLC0415 (imports grain)

        return prefetch_in_workers(ds, read, batch_size=batch_size,
                                   drop_remainder=drop_remainder, num_workers=num_workers)
    return ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder)


def _detection(record, rng, *, hflip, extra=None, min_size=None, on_bad_image="error", **kw):
    flip = rng is not None and bool(hflip) and rng.random() < 0.5
    if isinstance(min_size, tuple):
        # Multi-scale training (detectron2 MIN_SIZE_TRAIN_SAMPLING "choice"); drawn after the
        # flip so the flip stream is the same as without it.
        min_size = min_size[int(rng.integers(len(min_size)))] if rng is not None else min_size[-1]
    example = _skippable(detection_example, record, on_bad_image, flip=flip, min_size=min_size,
                         **kw)
    if example is None:
        return None
    if extra is not None:
        added = extra(example, record, rng)
        clash = set(added) & set(example)
        if clash:
            raise ValueError(f"make_detection_loader: extra() returned keys {sorted(clash)} that "
                             "clash with the detection keys; rename them.")
        example.update(added)
    return example


def make_detection_loader(
    records: Sequence[dict],
    *,
    batch_size: int,
    image_size: int,
    max_boxes: int,
    cat_id_to_index: dict[int, int],
    train: bool,
    seed: int,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    hflip: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
    truncate: bool = False,
    num_threads: int = 4,
    prefetch_buffer_size: int | None = None,
    extra=None,
    min_size: int | Sequence[int] | None = None,
    max_size: int | None = None,
    on_bad_image: str = "error",
    image_transfer: str = "float32",
    num_workers: int = 0,
) -> grain.IterDataset:
    """Builds the detection input pipeline (iterate it; the iterator has get_state/set_state).

    Args:
      records: `DetectionDataset.records` (or TFDS-source records carrying `image`).
      batch_size: per-process batch size B.
      image_size: input side S.
      max_boxes: boxes per image M (`config.data.max_boxes`); more is a ValueError unless
        `truncate=True`.
      cat_id_to_index: category id -> class index for `labels`.
      train: True: global shuffle reshuffled every epoch, random horizontal flips (`hflip`),
        `num_epochs` passes (None = forever), incomplete last batch dropped if
        `drop_remainder`. False: one pass in record order, no flip, and the last batch padded
        with `valid=False`, `image_id=-1` entries so every image is seen exactly once.
      seed: shuffle/flip seed (same seed -> same batches).
      mean, std: per-channel normalisation in 0-255 units (default CLIP's).
      shard_index, shard_count: this process's slice (`jax.process_index()`,
        `jax.process_count()`); every shard yields the same number of batches.
      num_threads, prefetch_buffer_size: grain read threads and prefetched examples
        (default 2 batches).
      extra: optional `(example, record, rng) -> dict` of further fixed-shape arrays per image
        (rng is None in evaluation); training only, since evaluation padding has no record.
      min_size, max_size: detectron2's shortest-edge resize instead of long side = image_size:
        shorter side = min_size (a sequence: one drawn per training image), longer side at
        most max_size (<= image_size, the canvas). See `resize_options`.
      on_bad_image: "error" stops at a missing, corrupt or wrongly sized image file with its
        name; "skip" leaves it out (training) or pads it (evaluation: counted as an image with
        no detections), logs each file once and counts it in `transforms.SKIPPED_IMAGES`.
      image_transfer: "float32" (normalised on the host) or "uint8" (resized pixels, zero
        padding, normalised on the device by `device_image.normalize_images`).
      num_workers: 0 reads in `num_threads` threads of this process; N > 0 in N grain worker
        processes (each with `num_threads` threads), giving the same batches. Everything the
        pipeline holds (records, `extra`) must then pickle.
    """
    if extra is not None and not train:
        raise ValueError("make_detection_loader: extra= is for training pipelines only.")
    _check_args("make_detection_loader", records, shard_index, shard_count,
                batch_size=batch_size, image_size=image_size, max_boxes=max_boxes)
    if min_size is not None and not isinstance(min_size, int | np.integer):
        min_size = tuple(int(v) for v in min_size)
        if not min_size or (not train and len(min_size) > 1):
            raise ValueError(f"make_detection_loader: min_size={min_size} must be one size for "
                             "evaluation (a non-empty sequence is for training).")
    make = functools.partial(
        _detection, hflip=hflip, extra=extra, image_size=image_size, max_boxes=max_boxes,
        cat_id_to_index=cat_id_to_index, mean=mean, std=std, truncate=truncate,
        min_size=min_size, max_size=max_size, on_bad_image=check_bad_image_policy(on_bad_image),
        image_transfer=check_image_transfer(image_transfer),
    )
    pad = functools.partial(padding_example, image_size, max_boxes, image_transfer)
    return _make_loader(
        records, make=make, pad=pad, batch_size=batch_size, train=train, seed=seed,
        num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
        drop_remainder=drop_remainder, num_threads=num_threads,
        prefetch_buffer_size=prefetch_buffer_size, num_workers=num_workers,
    )


def resize_options(data_config, *, train: bool) -> dict:
    """`make_detection_loader` resize kwargs from a config's `data` block.

    Empty (long side = `data.image_size`) unless `data.min_size` is set; then shortest-edge
    resizing with `data.max_size`, and in training a choice among `data.train_min_sizes`
    (falling back to `data.min_size`). `data.image_size` stays the static square canvas.
    """
    if not data_config.get("min_size"):
        return {}
    sizes = tuple(data_config.get("train_min_sizes") or ()) if train else ()
    return {"min_size": sizes or int(data_config.min_size), "max_size": int(data_config.max_size)}


_IMAGE_KEYS = ("image", "image_id", "scale", "image_hw", "orig_hw", "flipped", "valid")


def _caption(record, rng, *, tokenize, hflip, on_bad_image="error", **kw):
    flip = rng is not None and bool(hflip) and rng.random() < 0.5
    captions = record["captions"]
    # Train: a random caption per visit; eval: the first one (deterministic).
    text = captions[int(rng.integers(len(captions)))] if rng is not None else captions[0]
    made = _skippable(image_example, record, on_bad_image, flip=flip, **kw)
    return None if made is None else _merge_text(made[0], tokenize(text))


def _caption_pad(*, tokenize, image_size, image_transfer="float32"):
    pad = padding_example(image_size, 1, image_transfer)
    example = {k: pad[k] for k in _IMAGE_KEYS}
    text = {k: np.zeros_like(np.asarray(v)) for k, v in tokenize("").items()}
    return _merge_text(example, text)


def _merge_text(example, text):
    clash = set(text) & set(example)
    if clash:
        raise ValueError(f"make_caption_loader: tokenize() returned keys {sorted(clash)} that "
                         "clash with the image keys; rename them.")
    example.update({k: np.asarray(v) for k, v in text.items()})
    return example


def make_caption_loader(
    records: Sequence[dict],
    *,
    batch_size: int,
    image_size: int,
    tokenize,
    train: bool,
    seed: int,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    hflip: bool = False,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
    num_threads: int = 4,
    prefetch_buffer_size: int | None = None,
    on_bad_image: str = "error",
    image_transfer: str = "float32",
    num_workers: int = 0,
) -> grain.IterDataset:
    """Image-caption batches: the image keys of `make_detection_loader` plus `tokenize`'s output.

    Args:
      records: `load_coco_captions` records (each with a non-empty `captions` list).
      tokenize: `str -> dict[str, np.ndarray]` of fixed shapes (e.g. input_ids int32 [L] padded
        to the text tower's length). Eval padding entries get zeros of the same shapes.
      hflip: off by default, since flipping breaks captions that say "left"/"right".
      Other arguments as in `make_detection_loader` (train: one random caption per visit;
      eval: the first caption of every image, exactly once, padded last batch; on_bad_image,
      image_transfer and num_workers as there).
    """
    _check_args("make_caption_loader", records, shard_index, shard_count,
                batch_size=batch_size, image_size=image_size)
    make = functools.partial(_caption, tokenize=tokenize, hflip=hflip, image_size=image_size,
                             mean=mean, std=std,
                             on_bad_image=check_bad_image_policy(on_bad_image),
                             image_transfer=check_image_transfer(image_transfer))
    pad = functools.partial(_caption_pad, tokenize=tokenize, image_size=image_size,
                            image_transfer=image_transfer)
    return _make_loader(
        records, make=make, pad=pad, batch_size=batch_size, train=train, seed=seed,
        num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count,
        drop_remainder=drop_remainder, num_threads=num_threads,
        prefetch_buffer_size=prefetch_buffer_size, num_workers=num_workers,
    )

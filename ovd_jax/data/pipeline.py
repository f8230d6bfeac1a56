"""grain input pipelines: detection records -> fixed-shape numpy batches.

Batch keys (B = batch_size, S = image_size, M = max_boxes):

    image     float32 [B,S,S,3]  long side resized to S, padded bottom/right, CLIP-normalised
    boxes     float32 [B,M,4]    x1,y1,x2,y2 in input pixels (= original px * scale, after flip)
    labels    int32   [B,M]      contiguous class index (cat_id_to_index), -1 for padding
    box_mask  bool    [B,M]      True for real boxes (crowd regions are never targets)
    image_id  int32   [B]        dataset image id; -1 for eval padding entries
    scale     float32 [B]        input px = original px * scale
    image_hw  int32   [B,2]      resized, unpadded (h, w)
    orig_hw   int32   [B,2]      original (h, w)
    flipped   bool    [B]        whether the image was mirrored (original x = W - x)
    valid     bool    [B]        False only for eval padding entries

Determinism: the order and the flips depend only on (seed, shard, position), so the same seed
gives the same batches, and the iterator's `get_state()`/`set_state()` resume exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import grain
import numpy as np

from ovd_jax.data.transforms import CLIP_MEAN, CLIP_STD, detection_example, padding_example


def _check_args(records, batch_size, image_size, max_boxes, shard_index, shard_count):
    if len(records) == 0:
        raise ValueError("make_detection_loader got no records; check the dataset paths "
                         "(config.data) - the annotation file lists no images.")
    for name, value in (("batch_size", batch_size), ("image_size", image_size),
                        ("max_boxes", max_boxes), ("shard_count", shard_count)):
        if int(value) != value or value < 1:
            raise ValueError(f"make_detection_loader: {name}={value!r} must be a positive int.")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"make_detection_loader: shard_index={shard_index} must be in "
                         f"[0, shard_count={shard_count}) (use jax.process_index()).")


def _train_example(index, record, *, seed, shard_index, hflip, **kw):
    # The flip is a function of (seed, shard, position in this shard's stream) only, so it is
    # reproduced exactly after a restart from a saved iterator state.
    flip = bool(hflip) and np.random.default_rng([seed, shard_index, index]).random() < 0.5
    return detection_example(record, flip=flip, **kw)


# Placeholder record for eval padding (grain skips None elements in `map`, so not None).
_PAD = {"padding": True}


def _eval_example(record, *, image_size, max_boxes, **kw):
    if record is _PAD:
        return padding_example(image_size, max_boxes)
    return detection_example(record, image_size=image_size, max_boxes=max_boxes, flip=False, **kw)


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
    """
    _check_args(records, batch_size, image_size, max_boxes, shard_index, shard_count)
    records = list(records)
    kw = dict(image_size=image_size, max_boxes=max_boxes, cat_id_to_index=cat_id_to_index,
              mean=mean, std=std, truncate=truncate)
    if train:
        ds = grain.MapDataset.source(records).shuffle(seed=seed)
        if num_epochs is not None:
            if int(num_epochs) != num_epochs or num_epochs < 1:
                raise ValueError(f"num_epochs={num_epochs!r} must be a positive int or None.")
            ds = ds.repeat(num_epochs)
            # Equal-length shards: multi-host steps must agree on the number of batches.
            total = (len(ds) // shard_count) * shard_count
            if total // shard_count < (batch_size if drop_remainder else 1):
                raise ValueError(
                    f"{len(records)} images x {num_epochs} epochs over {shard_count} shards give "
                    f"no full batch of {batch_size}; lower batch_size or raise num_epochs."
                )
            ds = ds[:total]
        else:
            ds = ds.repeat(None)
        # Shard after the global shuffle: every epoch is reshuffled across all hosts.
        ds = ds[shard_index::shard_count]
        ds = ds.map_with_index(functools.partial(
            _train_example, seed=seed, shard_index=shard_index, hflip=hflip, **kw))
    else:
        shard = records[shard_index::shard_count]
        per_shard = math.ceil(len(records) / shard_count)
        per_shard = math.ceil(per_shard / batch_size) * batch_size
        shard = shard + [_PAD] * (per_shard - len(shard))
        ds = grain.MapDataset.source(shard).map(functools.partial(_eval_example, **kw))
        drop_remainder = False  # per_shard is a multiple of batch_size already
    read = grain.ReadOptions(
        num_threads=num_threads,
        prefetch_buffer_size=prefetch_buffer_size or 2 * batch_size,
    )
    return ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder)

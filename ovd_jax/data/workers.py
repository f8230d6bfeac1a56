"""grain worker processes (`config.data.num_workers`) that give the same batches as none.

grain's `mp_prefetch` splits a pipeline among N processes by slicing the element dataset
(worker w reads elements w, w+N, ...) and batches inside each worker, which would change the
composition of every batch with N. `BatchSlicedDataset` instead gives worker w the elements of
whole batches w, w+N, ... (it implements grain's in-place slicing hook, `set_slice`), and grain
interleaves the workers' outputs round-robin, so the batch stream is exactly the single-process
one: same batches, same order, whatever N (as long as no image is skipped by
`on_bad_image="skip"`, which pulls the next image of the same worker rather than of the global
stream). Imported only when workers are used (grain takes seconds to import).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
from absl import flags


class _BatchElements(Sequence):
    """Element positions of whole batches `worker`, `worker + count`, ... of a stream of
    `length` elements cut into batches of `batch_size` (the last one partial unless
    `drop_remainder`)."""

    def __init__(self, length: int, batch_size: int, worker: int, count: int,
                 drop_remainder: bool):
        self._b, self._w, self._n = batch_size, worker, count
        num_batches = length // batch_size if drop_remainder else -(-length // batch_size)
        mine = len(range(worker, num_batches, count))
        self._len = mine * batch_size
        last = num_batches - 1
        if not drop_remainder and length % batch_size and last >= worker \
                and (last - worker) % count == 0:
            self._len -= batch_size - length % batch_size  # this worker has the partial batch

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, j: int) -> int:
        if not 0 <= j < self._len:
            raise IndexError(j)
        batch = self._w + self._n * (j // self._b)
        return batch * self._b + j % self._b


def _take(dataset, index):
    return dataset[index]


class BatchSlicedDataset(grain.IterDataset):
    """`elements.to_iter_dataset(read_options).batch(batch_size, drop_remainder)`, which
    grain's `mp_prefetch` slices by whole batches (see the module docstring).

    Args:
      elements: a `grain.MapDataset` of examples (None entries are skipped).
      read_options: `grain.ReadOptions` of each process's reader threads.
      batch_size, drop_remainder: as in `IterDataset.batch`.
    """

    def __init__(self, elements: grain.MapDataset, read_options: grain.ReadOptions,
                 batch_size: int, drop_remainder: bool):
        super().__init__()
        self._elements, self._read = elements, read_options
        self._batch_size, self._drop = int(batch_size), bool(drop_remainder)
        self._slice = None

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain's hook, called in worker w of N with slice(w, None, N)."""
        if sequential_slice or sl.stop is not None:
            raise ValueError("BatchSlicedDataset supports only grain's strided worker slices "
                             "(mp_prefetch without sequential_slice).")
        self._slice = sl

    def __iter__(self):
        elements = self._elements
        if self._slice is not None:
            positions = _BatchElements(len(elements), self._batch_size, self._slice.start or 0,
                                       self._slice.step or 1, self._drop)
            elements = grain.MapDataset.source(positions).map(
                functools.partial(_take, elements))
        batched = elements.to_iter_dataset(self._read).batch(self._batch_size,
                                                              drop_remainder=self._drop)
        return batched.__iter__()

    def __str__(self) -> str:
        return f"BatchSlicedDataset(batch_size={self._batch_size}, slice={self._slice})"


def prefetch_in_workers(elements, read_options, *, batch_size: int, drop_remainder: bool,
                        num_workers: int, buffer_size: int = 2) -> grain.IterDataset:
    """Batches of `elements` made in `num_workers` (>= 1) grain worker processes, identical
    to `elements.to_iter_dataset(read_options).batch(...)`. Everything in `elements` must
    pickle (cloudpickle): the workers are spawned."""
    if not flags.FLAGS.is_parsed():
        # grain's worker start reads its absl flags; outside an absl app (tests, notebooks,
        # benchmarks) nothing parsed them, so take their defaults.
        flags.FLAGS.mark_as_parsed()
    ds = BatchSlicedDataset(elements, read_options, batch_size, drop_remainder)
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers),
                                                       per_worker_buffer_size=buffer_size))

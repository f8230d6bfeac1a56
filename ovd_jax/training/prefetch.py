"""Device prefetch: the next batches are read and placed on the mesh while the step runs.

`DevicePrefetcher(iterator, put, size)` runs a background thread that takes a batch from the
host iterator, records the iterator's state right after it (so a checkpoint written after
consuming that batch resumes exactly at the next one, however many batches are already read
ahead), calls `put(batch)` (the host -> device copy) and queues up to `size` such items.
`size = 0` does the same work in the caller's thread, one batch at a time.

An error in the thread (a bad image, a wrong batch) is raised in the consumer's thread as the
same exception object (its message and traceback). Closing the prefetcher (or leaving its `with`
block, also by an exception or after SIGTERM stopped the loop) stops the thread.
"""

from __future__ import annotations

import copy
import queue
import threading

_END = object()  # the host iterator is exhausted


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class DevicePrefetcher:
    """Iterator of `(host_batch, put(host_batch), data_state)` read `size` batches ahead.

    Args:
      iterator: the host batch iterator (with `get_state()`, e.g. a grain dataset iterator).
      put: `host_batch -> device batch` (e.g. `train_step.device_batch`); runs in the thread.
      size: how many batches to hold ahead (>= 0; 0: no thread).

    `data_state` is a copy of `iterator.get_state()` taken right after that batch was read:
    what a checkpoint saved after consuming the batch must store.
    """

    def __init__(self, iterator, put, size: int):
        if int(size) != size or size < 0:
            raise ValueError(f"config.data.device_prefetch={size!r} must be an int >= 0 "
                             "(batches placed on the devices ahead of the step; 0: off).")
        self._it, self._put, self._size = iterator, put, int(size)
        self._stop = threading.Event()
        self._thread = None
        self._done = False
        if self._size:
            self._queue = queue.Queue(maxsize=self._size)
            self._thread = threading.Thread(target=self._produce, name="device_prefetch",
                                            daemon=True)
            self._thread.start()

    def _read(self):
        batch = next(self._it)
        state = copy.deepcopy(self._it.get_state())
        return batch, self._put(batch), state

    def _offer(self, item) -> bool:
        """Queues `item` unless stopped meanwhile; returns whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        try:
            while not self._stop.is_set():
                if not self._offer(self._read()):
                    return
        except StopIteration:
            self._offer(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._offer(_Failed(e))

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._thread is None:
            return self._read()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the device-prefetch thread stopped without a batch or "
                                       "an error") from None
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.error
        return item

    def close(self, timeout: float = 10.0) -> None:
        """Stops the thread (it finishes the batch it is reading, then exits)."""
        self._stop.set()
        if self._thread is None:
            return
        while True:  # unblock a producer waiting for room in the queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

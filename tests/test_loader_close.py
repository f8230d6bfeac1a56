"""Data iterators made of several loaders close every part (grain worker processes with
`config.data.num_workers`), and training closes its iterator however it ends."""

import pytest

from ovd_jax.data.image_text import ZipLoader
from ovd_jax.data.unified import MixedLoader
from ovd_jax.training import loop


class _Part:
    """A loader whose iterators count batches and record `close` (some have no close)."""

    def __init__(self, closable: bool):
        self.closed, self.closable = 0, closable

    def __iter__(self):
        part = self

        class It:
            def __next__(self):
                return {"x": 1}

            def get_state(self):
                return {}

        it = It()
        if self.closable:
            def close():
                part.closed += 1
            it.close = close
        return it


@pytest.mark.parametrize("make", [
    lambda parts: ZipLoader(a=parts[0], b=parts[1], c=parts[2]),
    lambda parts: MixedLoader({"a": parts[0], "b": parts[1], "c": parts[2]}, ("a", "b", "c")),
])
def test_multi_loader_iterator_closes_every_closable_part(make):
    parts = [_Part(True), _Part(False), _Part(True)]
    it = iter(make(parts))
    next(it)
    it.close()
    assert [p.closed for p in parts] == [1, 0, 1]


def test_training_iterator_closed_when_the_loop_raises():
    part = _Part(True)
    it = iter(part)
    with pytest.raises(RuntimeError, match="step failed"):
        with loop._closing(it):  # noqa: SLF001
            raise RuntimeError("step failed")
    assert part.closed == 1
    with loop._closing(iter(_Part(False))):  # noqa: SLF001  (no close: nothing to do)
        pass

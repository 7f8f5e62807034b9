from __future__ import annotations

import mmap

import numpy as np
import pytest

from sinks import ArraySpec, MemorySink, _prefault
from sinks._prefault import PREFAULT_MIN_BYTES, allocate_zeroed
from sinks.testing import sample_array, stream


def _memory_owner(array: np.ndarray) -> object:
    owner: object = array
    while isinstance(owner, np.ndarray):
        owner = owner.base
    # np.frombuffer keeps a memoryview of the mapping as the array's base.
    return owner.obj if isinstance(owner, memoryview) else owner


def test_allocate_zeroed_large_array_mapped() -> None:
    array, prefaulter = allocate_zeroed((PREFAULT_MIN_BYTES // 8,), np.dtype("<f8"))
    try:
        assert isinstance(_memory_owner(array), mmap.mmap)
        assert array.flags.writeable
        assert array.flags.aligned
        assert array.flags.c_contiguous
        assert not array[:: 4096 // 8].any()
    finally:
        if prefaulter is not None:
            prefaulter.stop()


def test_allocate_zeroed_small_array_has_no_thread() -> None:
    array, prefaulter = allocate_zeroed((16, 16), np.dtype("<u2"))

    assert prefaulter is None
    assert array.shape == (16, 16)


def test_prefaulter_stop_is_idempotent() -> None:
    _, prefaulter = allocate_zeroed((PREFAULT_MIN_BYTES,), np.dtype("u1"))
    if prefaulter is None:
        pytest.skip("this platform has no madvise")

    prefaulter.stop()
    prefaulter.stop()


def test_memory_sink_prefaulted_result_roundtrips(monkeypatch: pytest.MonkeyPatch) -> None:
    # A zero threshold sends this small result down the mapped, prefaulted path.
    monkeypatch.setattr(_prefault, "PREFAULT_MIN_BYTES", 0)
    data = sample_array((6, 32, 32), np.dtype("<i4"), np.random.default_rng(5))
    spec = ArraySpec("stack", data.shape, data.dtype, (1, 32, 32))

    result = stream(MemorySink(), spec, data)

    assert isinstance(_memory_owner(result), mmap.mmap)
    np.testing.assert_array_equal(result, data)

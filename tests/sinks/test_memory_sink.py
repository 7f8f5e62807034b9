"""Behaviour specific to MemorySink: zero-copy views, out= arrays, growth."""

from __future__ import annotations

import numpy as np
import pytest

from sinks import ArraySpec, MemorySink, Region, SinkConfigError, SinkRegionError
from sinks.testing import fill_destination, grid_regions, sample_array, stream


def test_memory_sink_destination_is_view_of_result() -> None:
    spec = ArraySpec("frames", (3, 4, 5), np.dtype("<u2"), (1, 4, 5))
    sink = MemorySink()
    sink.open(spec)

    dest = sink.destination(Region((1, 0, 0), (2, 4, 5)))
    dest[...] = 7
    sink.commit(Region((1, 0, 0), (2, 4, 5)))
    result = sink.finalize((3, 4, 5))

    assert dest.flags.c_contiguous
    assert np.shares_memory(dest, result)
    assert (result[1] == 7).all()


def test_memory_sink_unwritten_elements_are_zero() -> None:
    spec = ArraySpec("frames", (4, 2), np.dtype("<f8"), (2, 2))
    sink = MemorySink()
    sink.open(spec)
    sink.write(Region((0, 0), (2, 2)), np.ones((2, 2)))

    result = sink.finalize((4, 2))

    assert (result[2:] == 0).all()


def test_memory_sink_fills_out_array() -> None:
    data = sample_array((4, 3), np.dtype(">i4"), np.random.default_rng(0))
    out = np.empty_like(data)
    spec = ArraySpec("x", data.shape, data.dtype, (2, 3))

    result = stream(MemorySink(out=out), spec, data)

    assert result is out
    np.testing.assert_array_equal(out, data)


def test_memory_sink_out_with_wrong_dtype_raises() -> None:
    sink = MemorySink(out=np.empty((4, 3), dtype="<i4"))
    spec = ArraySpec("x", (4, 3), np.dtype(">i4"), (2, 3))

    with pytest.raises(SinkConfigError, match=r"dtype int32.*>i4"):
        sink.open(spec)


def test_memory_sink_out_with_wrong_shape_raises() -> None:
    sink = MemorySink(out=np.empty((4, 2), dtype="<f4"))
    spec = ArraySpec("x", (4, 3), np.dtype("<f4"), (2, 3))

    with pytest.raises(SinkConfigError, match=r"shape \(4, 2\)"):
        sink.open(spec)


def test_memory_sink_read_only_out_raises() -> None:
    out = np.empty((4, 3), dtype="<f4")
    out.flags.writeable = False
    sink = MemorySink(out=out)

    with pytest.raises(SinkConfigError, match="read-only"):
        sink.open(ArraySpec("x", (4, 3), np.dtype("<f4"), (2, 3)))


def test_memory_sink_growable_out_returns_trimmed_view() -> None:
    out = np.zeros((10, 2), dtype="<f4")
    data = sample_array((5, 2), np.dtype("<f4"), np.random.default_rng(1))
    spec = ArraySpec("x", (None, 2), data.dtype, (2, 2))

    result = stream(MemorySink(out=out), spec, data)

    assert result.shape == (5, 2)
    assert np.shares_memory(result, out)
    np.testing.assert_array_equal(out[:5], data)


def test_memory_sink_growable_out_too_short_raises() -> None:
    sink = MemorySink(out=np.zeros((3, 2), dtype="<f4"))
    sink.open(ArraySpec("x", (None, 2), np.dtype("<f4"), (2, 2)))

    with pytest.raises(SinkRegionError, match="out= has 3"):
        sink.write(Region((2, 0), (4, 2)), np.zeros((2, 2), dtype="<f4"))


def test_memory_sink_growth_keeps_pending_destination() -> None:
    spec = ArraySpec("x", (None, 3), np.dtype("<i8"), (2, 3))
    data = sample_array((10, 3), spec.dtype, np.random.default_rng(2))
    first, last = Region((0, 0), (2, 3)), Region((8, 0), (10, 3))
    sink = MemorySink()
    sink.open(spec)

    early = sink.destination(first)  # capacity is 2 rows, so the next call grows
    late = sink.destination(last)
    fill_destination(early, data[0:2])
    fill_destination(late, data[8:10])
    sink.commit(first)
    sink.commit(last)
    for region in grid_regions((10, 3), (2, 3))[1:4]:
        sink.write(region, data[region.slices])
    result = sink.finalize((10, 3))

    np.testing.assert_array_equal(result, data)


def test_memory_sink_finalize_trims_to_owned_array() -> None:
    spec = ArraySpec("x", (None, 4), np.dtype("<f4"), (4, 4))
    data = sample_array((5, 4), spec.dtype, np.random.default_rng(3))

    result = stream(MemorySink(), spec, data)

    assert result.shape == (5, 4)
    assert result.flags.owndata
    assert result.flags.c_contiguous


def test_memory_sink_commit_without_destination_raises() -> None:
    sink = MemorySink()
    sink.open(ArraySpec("x", (4,), np.dtype("<f4"), (2,)))

    with pytest.raises(SinkRegionError, match="no matching destination"):
        sink.commit(Region((0,), (2,)))


def test_memory_sink_write_with_wrong_data_shape_raises() -> None:
    sink = MemorySink()
    sink.open(ArraySpec("x", (4,), np.dtype("<f4"), (2,)))

    with pytest.raises(SinkRegionError, match=r"data of shape \(3,\)"):
        sink.write(Region((0,), (2,)), np.zeros(3, dtype="<f4"))

"""Property test: any dtype, shape, chunking, order and path gives back the data."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinks import ArraySpec, MemmapSink, MemorySink, Sink, ZarrSink
from sinks.testing import DTYPE_CASES, assert_same_values, grid_regions, sample_array, stream


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Draw a shape of 0 to 3 axes, a chunk grid over it, and whether axis 0 grows."""
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    chunks = tuple(draw(st.integers(1, max(n, 1) + 1)) for n in shape)
    growable = len(shape) > 0 and draw(st.booleans())
    return shape, chunks, growable


def _make_sink(kind: str, directory: Path) -> Sink:
    if kind == "memory":
        return MemorySink()
    if kind == "memmap":
        return MemmapSink(directory / "result.npy")
    return ZarrSink(directory / "result.zarr", compressor=None if kind == "zarr_raw" else "default")


@pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["memory", "memmap", "zarr", "zarr_raw"]),
    dtype=st.sampled_from(list(DTYPE_CASES.values())),
    layout=layouts(),
    mode=st.sampled_from(["destination", "write", "alternate"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_sinks_return_streamed_data(
    kind: str,
    dtype: np.dtype[Any],
    layout: tuple[tuple[int, ...], tuple[int, ...], bool],
    mode: Any,
    seed: int,
) -> None:
    shape, chunks, growable = layout
    rng = np.random.default_rng(seed)
    data = sample_array(shape, dtype, rng)
    declared = (None, *shape[1:]) if growable else shape
    spec = ArraySpec("result", declared, dtype, chunks)
    regions = grid_regions(shape, chunks)
    rng.shuffle(regions)  # type: ignore[arg-type]

    with tempfile.TemporaryDirectory() as directory:
        sink = _make_sink(kind, Path(directory))
        handle = stream(sink, spec, data, regions=regions, mode=mode)
        result = np.asarray(handle[...]) if kind.startswith("zarr") else np.asarray(handle)
        assert_same_values(result, data, exact_dtype=not kind.startswith("zarr"))

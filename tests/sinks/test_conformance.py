"""The public conformance suite run against the three built-in sinks."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import zarr

from sinks import MemmapSink, MemorySink, Sink, ZarrSink
from sinks.testing import SinkConformance


class TestMemorySink(SinkConformance):
    @pytest.fixture
    def make_sink(self) -> Callable[[], Sink]:
        return MemorySink

    def read_partial(self, sink: Sink) -> npt.NDArray[Any] | None:
        assert isinstance(sink, MemorySink)
        return sink.array


class TestMemmapSink(SinkConformance):
    @pytest.fixture
    def make_sink(self, tmp_path: Path) -> Callable[[], Sink]:
        counter = itertools.count()
        return lambda: MemmapSink(tmp_path / f"result-{next(counter)}.npy")

    def read_partial(self, sink: Sink) -> npt.NDArray[Any] | None:
        assert isinstance(sink, MemmapSink)
        return np.load(sink.path)


class TestMemmapSinkDirectIO(TestMemmapSink):
    """The same rules with O_DIRECT writes for every block-aligned region."""

    @pytest.fixture
    def make_sink(self, tmp_path: Path) -> Callable[[], Sink]:
        counter = itertools.count()
        return lambda: MemmapSink(tmp_path / f"direct-{next(counter)}.npy", direct_io=True)


# zarr 3.1 warns that fixed-length strings, structured and void dtypes are not
# yet in the zarr v3 specification; the suite stores them on purpose.
@pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")
class TestZarrSink(SinkConformance):
    exact_dtype = False

    @pytest.fixture
    def make_sink(self, tmp_path: Path) -> Callable[[], Sink]:
        counter = itertools.count()
        return lambda: ZarrSink(tmp_path / f"result-{next(counter)}.zarr")

    def to_numpy(self, handle: Any) -> npt.NDArray[Any]:
        return np.asarray(handle[...])

    def read_partial(self, sink: Sink) -> npt.NDArray[Any] | None:
        assert isinstance(sink, ZarrSink)
        return np.asarray(zarr.open_array(sink.store_or_path, mode="r")[...])


@pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")
class TestZarrSinkDirectIO(TestZarrSink):
    """The same rules with chunk files written by O_DIRECT, compressed and not."""

    @pytest.fixture(params=["default", None])
    def make_sink(self, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], Sink]:
        counter = itertools.count()
        return lambda: ZarrSink(
            tmp_path / f"direct-{next(counter)}.zarr",
            path="data",
            compressor=request.param,
            direct_io=True,
        )

    def read_partial(self, sink: Sink) -> npt.NDArray[Any] | None:
        assert isinstance(sink, ZarrSink)
        return np.asarray(sink.array[...])


@pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")
class TestZarrSinkUncompressed(SinkConformance):
    exact_dtype = False

    @pytest.fixture
    def make_sink(self) -> Callable[[], Sink]:
        return lambda: ZarrSink(zarr.storage.MemoryStore(), path="data", compressor=None)

    def to_numpy(self, handle: Any) -> npt.NDArray[Any]:
        return np.asarray(handle[...])

    def read_partial(self, sink: Sink) -> npt.NDArray[Any] | None:
        assert isinstance(sink, ZarrSink)
        return np.asarray(sink.array[...])

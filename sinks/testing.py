"""Conformance tests that any :class:`sinks.Sink` implementation should pass.

Subclass :class:`SinkConformance` in a pytest module and override the
``make_sink`` fixture::

    from sinks.testing import SinkConformance

    class TestMySink(SinkConformance):
        @pytest.fixture
        def make_sink(self, tmp_path):
            counter = itertools.count()
            return lambda: MySink(tmp_path / f"result-{next(counter)}")

pytest then runs every ``test_*`` method of the base class against it: all
dtype families, zero-size and 0-d shapes, edge chunks, regions out of order,
the destination and write paths, growable results, compressed chunks, abort
and the life-cycle errors. Override :meth:`SinkConformance.to_numpy` when
``finalize`` returns something ``np.asarray`` cannot read, and
:meth:`SinkConformance.read_partial` to let the abort tests read what was kept.

The helpers (:func:`grid_regions`, :func:`sample_array`, :func:`stream`,
:func:`assert_same_values`) are public for tests of your own. This module
needs pytest and numcodecs, which are test dependencies of zmqruntime.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import blosc2
import numcodecs
import numpy as np
import numpy.typing as npt
import pytest

from ._base import ArraySpec, ChunkEncoding, Region, Sink, SinkError, SinkStateError

__all__ = [
    "DTYPE_CASES",
    "SHAPE_CASES",
    "SinkConformance",
    "assert_same_values",
    "encode_region",
    "fill_destination",
    "grid_regions",
    "sample_array",
    "stream",
]

Mode = Literal["destination", "write", "owned", "alternate"]

# One dtype per family and byte order a sink must store exactly.
DTYPE_CASES: dict[str, np.dtype[Any]] = {
    "bool": np.dtype("?"),
    "int8": np.dtype("i1"),
    "int16_le": np.dtype("<i2"),
    "int32_be": np.dtype(">i4"),
    "int64_le": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "uint16_be": np.dtype(">u2"),
    "uint32_le": np.dtype("<u4"),
    "uint64_be": np.dtype(">u8"),
    "float16_le": np.dtype("<f2"),
    "float32_le": np.dtype("<f4"),
    "float64_be": np.dtype(">f8"),
    "complex64_le": np.dtype("<c8"),
    "complex128_be": np.dtype(">c16"),
    "bytes_S5": np.dtype("S5"),
    "unicode_U3_le": np.dtype("<U3"),
    "unicode_U3_be": np.dtype(">U3"),
    "datetime64_ns_le": np.dtype("<M8[ns]"),
    "datetime64_s_be": np.dtype(">M8[s]"),
    "timedelta64_ms_le": np.dtype("<m8[ms]"),
    "timedelta64_us_be": np.dtype(">m8[us]"),
    "structured_padded": np.dtype(
        {"names": ["a", "b"], "formats": ["<i2", "<f8"], "offsets": [0, 8], "itemsize": 24}
    ),
    "structured_mixed_order": np.dtype([("x", ">i4"), ("tag", "S2"), ("y", "<f4")]),
}

# (shape, chunks) pairs: 0-d, zero-size, single chunk, row bands, edge chunks on several axes.
SHAPE_CASES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "scalar_0d": ((), ()),
    "zero_size_middle": ((3, 0, 5), (1, 0, 5)),
    "zero_length": ((0,), (4,)),
    "vector_edge": ((7,), (3,)),
    "single_chunk": ((4, 5), (4, 5)),
    "frames": ((5, 4, 3), (1, 4, 3)),
    "row_bands": ((2, 9, 4), (1, 2, 4)),
    "edges_two_axes": ((6, 7), (4, 3)),
    "edges_three_axes": ((5, 6, 7), (2, 4, 3)),
}

_UNICODE_SAMPLE = [ord(c) for c in "abcxyzABC019éßøΩжÄ漢字"]


def grid_regions(shape: Sequence[int], chunks: Sequence[int]) -> list[Region]:
    """Return the regions of the regular grid ``chunks`` over ``shape``, in C order.

    Edge regions are cut at ``shape``. A zero-length axis yields no regions,
    and a 0-d shape yields the single empty-tuple region.
    """
    per_axis: list[list[tuple[int, int]]] = []
    for length, chunk in zip(shape, chunks, strict=True):
        step = max(chunk, 1)
        per_axis.append([(lo, min(lo + step, length)) for lo in range(0, length, step)])
    return [
        Region(tuple(lo for lo, _ in cell), tuple(hi for _, hi in cell))
        for cell in itertools.product(*per_axis)
    ]


def sample_array(
    shape: Sequence[int], dtype: np.dtype[Any], rng: np.random.Generator
) -> npt.NDArray[Any]:
    """Return an array of valid, distinct-looking values of ``dtype`` (no NaN, no NaT).

    Structured arrays get each field filled recursively and zero padding. A
    0-d ``shape`` gives a 0-d array, never a scalar.
    """
    shape = tuple(shape)
    kind = dtype.kind
    native = dtype.newbyteorder("=") if dtype.byteorder not in "|=" else dtype
    if dtype.names is not None:
        result = np.zeros(shape, dtype=dtype)
        for name in dtype.names:
            field_dtype = dtype.fields[name][0]  # type: ignore[index]
            result[name] = sample_array(shape, field_dtype, rng)
        return result

    # numpy arithmetic on 0-d arrays returns scalars, so every value goes
    # through np.asarray before the final astype.
    values: Any
    if kind == "b":
        values = rng.integers(0, 2, size=shape)
    elif kind in "iu":
        info = np.iinfo(native)
        values = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=native)
    elif kind == "f":
        values = rng.standard_normal(size=shape) * 100
    elif kind == "c":
        values = rng.standard_normal(size=shape) + 1j * rng.standard_normal(size=shape)
    elif kind in "mM":
        ticks = rng.integers(-(10**12), 10**12, size=shape, dtype=np.int64)
        values = np.asarray(ticks).view(native)
    elif kind == "S":
        codes = rng.integers(ord("a"), ord("z") + 1, size=(*shape, dtype.itemsize), dtype=np.uint8)
        values = codes.view(dtype).reshape(shape)
    elif kind == "U":
        length = dtype.itemsize // 4
        points = rng.choice(_UNICODE_SAMPLE, size=(*shape, length)).astype(np.uint32)
        values = points.view(f"U{length}").reshape(shape)
    elif kind == "V":
        raw = rng.integers(0, 256, size=(*shape, dtype.itemsize), dtype=np.uint8)
        values = raw.view(dtype).reshape(shape)
    else:
        raise TypeError(f"sample_array does not support dtype {dtype}")
    return np.asarray(values).astype(dtype)


def assert_same_values(
    actual: npt.NDArray[Any], expected: npt.NDArray[Any], *, exact_dtype: bool = True
) -> None:
    """Assert equal shape and values; with ``exact_dtype`` also the identical dtype.

    Structured arrays are compared field by field, so a sink that stores them
    packed (without padding) passes with ``exact_dtype=False``.
    """
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    if exact_dtype:
        assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    if expected.dtype.names is not None:
        assert actual.dtype.names == expected.dtype.names, (
            f"fields {actual.dtype.names} != {expected.dtype.names}"
        )
        for name in expected.dtype.names:
            assert_same_values(actual[name], expected[name], exact_dtype=exact_dtype)
        return
    if expected.dtype.kind == "V":
        assert actual.tobytes() == expected.tobytes(), "void bytes differ"
        return
    np.testing.assert_array_equal(actual, expected)


def fill_destination(dest: npt.NDArray[Any], block: npt.NDArray[Any]) -> None:
    """Fill ``dest`` with ``block`` the way a receiver does.

    A C-contiguous destination gets the raw bytes, as ``socket.recv_into``
    writes them; any other destination gets ``np.copyto``.
    """
    if dest.flags.c_contiguous:
        raw = np.ascontiguousarray(block, dtype=dest.dtype).reshape(-1).view(np.uint8)
        dest.reshape(-1).view(np.uint8)[...] = raw
    else:
        np.copyto(dest, block)


def encode_region(block: npt.NDArray[Any], encoding: ChunkEncoding) -> bytes:
    """Compress the raw C-order bytes of ``block`` with the parameters in ``encoding``."""
    raw = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
    shuffles = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
    if encoding.format == "blosc1":
        codec = numcodecs.Blosc(
            cname=encoding.cname, clevel=encoding.clevel, shuffle=shuffles[encoding.shuffle]
        )
        source = raw.view(f"V{encoding.typesize}") if raw.size else raw
        return bytes(codec.encode(source))
    filters = {
        "noshuffle": blosc2.Filter.NOFILTER,
        "shuffle": blosc2.Filter.SHUFFLE,
        "bitshuffle": blosc2.Filter.BITSHUFFLE,
    }
    return bytes(
        blosc2.compress2(
            raw.tobytes(),
            typesize=encoding.typesize,
            clevel=encoding.clevel,
            codec=getattr(blosc2.Codec, encoding.cname.upper()),
            filters=[filters[encoding.shuffle]],
        )
    )


def stream(
    sink: Sink,
    spec: ArraySpec,
    data: npt.NDArray[Any],
    *,
    regions: Sequence[Region] | None = None,
    mode: Mode = "destination",
    encoding: ChunkEncoding | None = None,
    finalize: bool = True,
) -> Any:
    """Open ``sink``, deliver ``data`` region by region, and return ``finalize``'s result.

    ``regions`` defaults to the grid of ``spec.chunks`` in C order. ``mode``
    picks :meth:`Sink.destination` (falling back to :meth:`Sink.write` on
    None), :meth:`Sink.write`, :meth:`Sink.write_owned` with a read-only
    copy of each block, or destination and write in turn. With ``encoding`` every region
    is first offered compressed to :meth:`Sink.write_encoded`. With
    ``finalize=False`` the sink is left open and None is returned.
    """
    if regions is None:
        regions = grid_regions(data.shape, spec.chunks)
    sink.open(spec)
    for position, region in enumerate(regions):
        selection: tuple[Any, ...] = (*region.slices, Ellipsis)
        block = data[selection]
        if encoding is not None:
            payload = encode_region(block, encoding)
            if sink.write_encoded(region, memoryview(payload), encoding):
                continue
        if mode == "owned":
            owned = block.copy()
            owned.flags.writeable = False
            sink.write_owned(region, owned)
            continue
        use_write = mode == "write" or (mode == "alternate" and position % 2 == 1)
        dest = None if use_write else sink.destination(region)
        if dest is None:
            sink.write(region, block.copy())
        else:
            fill_destination(dest, block)
            sink.commit(region)
    if not finalize:
        return None
    return sink.finalize(data.shape)


class SinkConformance:
    """Base class of the conformance tests; subclass it and override ``make_sink``.

    Class attributes tune what the suite expects:

    - ``exact_dtype``: the result keeps ``spec.dtype`` exactly (set False for
      stores that pack structured dtypes, like zarr);
    - ``checks_regions``: the sink rejects out-of-bounds regions and wrong
      final shapes with a :class:`SinkError`.
    """

    exact_dtype: ClassVar[bool] = True
    checks_regions: ClassVar[bool] = True

    @pytest.fixture
    def make_sink(self) -> Callable[[], Sink]:
        """Return a function that makes a new, unopened sink on each call."""
        raise NotImplementedError("override the make_sink fixture in your test class")

    def to_numpy(self, handle: Any) -> npt.NDArray[Any]:
        """Convert what ``finalize`` returned to an ndarray."""
        return np.asarray(handle)

    def read_partial(self, sink: Sink) -> npt.NDArray[Any] | None:
        """Return what an aborted ``sink`` kept, or None to skip the abort checks."""
        return None

    def _check(self, handle: Any, expected: npt.NDArray[Any]) -> None:
        assert_same_values(self.to_numpy(handle), expected, exact_dtype=self.exact_dtype)

    @pytest.mark.parametrize("mode", ["destination", "write", "owned"])
    @pytest.mark.parametrize("dtype", list(DTYPE_CASES.values()), ids=list(DTYPE_CASES))
    def test_dtype_roundtrip(
        self, make_sink: Callable[[], Sink], dtype: np.dtype[Any], mode: Mode
    ) -> None:
        data = sample_array((5, 6, 3), dtype, np.random.default_rng(1))
        spec = ArraySpec("data", data.shape, dtype, (2, 4, 3))
        regions = grid_regions(data.shape, spec.chunks)
        np.random.default_rng(2).shuffle(regions)

        handle = stream(make_sink(), spec, data, regions=regions, mode=mode)

        self._check(handle, data)

    @pytest.mark.parametrize("case", list(SHAPE_CASES.values()), ids=list(SHAPE_CASES))
    def test_shape_roundtrip(
        self, make_sink: Callable[[], Sink], case: tuple[tuple[int, ...], tuple[int, ...]]
    ) -> None:
        shape, chunks = case
        data = sample_array(shape, np.dtype("<f4"), np.random.default_rng(3))
        spec = ArraySpec("data", shape, data.dtype, chunks)

        handle = stream(make_sink(), spec, data, mode="alternate")

        self._check(handle, data)

    def test_regions_in_reverse_order(self, make_sink: Callable[[], Sink]) -> None:
        data = sample_array((7, 5), np.dtype("<i4"), np.random.default_rng(4))
        spec = ArraySpec("data", data.shape, data.dtype, (2, 2))
        regions = grid_regions(data.shape, spec.chunks)[::-1]

        handle = stream(make_sink(), spec, data, regions=regions)

        self._check(handle, data)

    def test_destinations_outstanding_together(self, make_sink: Callable[[], Sink]) -> None:
        data = sample_array((6, 4), np.dtype("<u2"), np.random.default_rng(5))
        spec = ArraySpec("data", data.shape, data.dtype, (2, 4))
        regions = grid_regions(data.shape, spec.chunks)
        sink = make_sink()
        sink.open(spec)

        destinations = [(r, sink.destination(r)) for r in regions]
        for region, dest in reversed(destinations):
            block = data[region.slices]
            if dest is None:
                sink.write(region, block)
            else:
                fill_destination(dest, block)
                sink.commit(region)

        self._check(sink.finalize(data.shape), data)

    def test_destination_has_region_shape_and_dtype(self, make_sink: Callable[[], Sink]) -> None:
        spec = ArraySpec("data", (4, 6), np.dtype(">f8"), (3, 4))
        sink = make_sink()
        sink.open(spec)
        try:
            for region in grid_regions((4, 6), spec.chunks):
                dest = sink.destination(region)
                if dest is None:
                    continue
                assert dest.shape == region.shape
                assert dest.dtype == spec.dtype
                assert dest.flags.writeable
                dest[...] = 1.5
                sink.commit(region)
        finally:
            sink.abort("test over")

    @pytest.mark.parametrize("mode", ["destination", "write"])
    def test_growable_result(self, make_sink: Callable[[], Sink], mode: Mode) -> None:
        data = sample_array((11, 3, 4), np.dtype("<f8"), np.random.default_rng(6))
        spec = ArraySpec("data", (None, 3, 4), data.dtype, (2, 3, 4))
        regions = grid_regions(data.shape, spec.chunks)
        np.random.default_rng(7).shuffle(regions)

        handle = stream(make_sink(), spec, data, regions=regions, mode=mode)

        self._check(handle, data)

    def test_growable_result_in_order_row_bands(self, make_sink: Callable[[], Sink]) -> None:
        data = sample_array((9, 4, 3), np.dtype("<i2"), np.random.default_rng(8))
        spec = ArraySpec("data", (None, 4, 3), data.dtype, (1, 2, 3))

        handle = stream(make_sink(), spec, data, mode="alternate")

        self._check(handle, data)

    def test_growable_result_empty(self, make_sink: Callable[[], Sink]) -> None:
        spec = ArraySpec("data", (None, 2), np.dtype("<f4"), (4, 2))
        sink = make_sink()
        sink.open(spec)

        handle = sink.finalize((0, 2))

        self._check(handle, np.zeros((0, 2), dtype="<f4"))

    @pytest.mark.parametrize("owned", [False, True])
    @pytest.mark.parametrize("fmt", ["blosc1", "blosc2"])
    def test_write_encoded_roundtrip(
        self, make_sink: Callable[[], Sink], fmt: str, owned: bool
    ) -> None:
        data = sample_array((6, 5, 4), np.dtype("<u2"), np.random.default_rng(9))
        spec = ArraySpec("data", data.shape, data.dtype, (2, 5, 4))
        sink = make_sink()
        sink.open(spec)
        preferred = sink.preferred_encoding()
        encoding = ChunkEncoding(fmt, "lz4", 1, "shuffle", 2)
        if preferred is not None and preferred.format == fmt:
            encoding = preferred

        for region in grid_regions(data.shape, spec.chunks):
            block = data[region.slices]
            payload = encode_region(block, encoding)
            # Only sinks that take ownership may be handed the payload.
            hand_over = owned and sink.takes_ownership
            if not sink.write_encoded(region, memoryview(payload), encoding, owned=hand_over):
                sink.write(region, block)

        self._check(sink.finalize(data.shape), data)

    def test_abort_keeps_committed_data(self, make_sink: Callable[[], Sink]) -> None:
        data = sample_array((6, 4), np.dtype("<i8"), np.random.default_rng(10))
        spec = ArraySpec("data", data.shape, data.dtype, (2, 4))
        regions = grid_regions(data.shape, spec.chunks)
        sink = make_sink()
        stream(sink, spec, data, regions=regions[:2], mode="alternate", finalize=False)

        sink.abort("stopped by the test")

        partial = self.read_partial(sink)
        if partial is None:
            pytest.skip("read_partial is not implemented for this sink")
        for region in regions[:2]:
            assert_same_values(partial[region.slices], data[region.slices])

    def test_abort_growable_keeps_committed_rows(self, make_sink: Callable[[], Sink]) -> None:
        data = sample_array((8, 3), np.dtype("<f4"), np.random.default_rng(11))
        spec = ArraySpec("data", (None, 3), data.dtype, (2, 3))
        regions = grid_regions(data.shape, spec.chunks)
        sink = make_sink()
        stream(sink, spec, data, regions=regions[:3], finalize=False)

        sink.abort("stopped by the test")

        partial = self.read_partial(sink)
        if partial is None:
            pytest.skip("read_partial is not implemented for this sink")
        assert partial.shape[0] >= 6
        assert_same_values(partial[:6], data[:6])

    def test_abort_after_finalize_does_nothing(self, make_sink: Callable[[], Sink]) -> None:
        data = sample_array((4,), np.dtype("<i4"), np.random.default_rng(12))
        spec = ArraySpec("data", data.shape, data.dtype, (2,))
        sink = make_sink()
        handle = stream(sink, spec, data)

        sink.abort("late abort")

        self._check(handle, data)

    def test_write_before_open_raises(self, make_sink: Callable[[], Sink]) -> None:
        sink = make_sink()
        with pytest.raises(SinkStateError):
            sink.write(Region((0,), (2,)), np.zeros(2, dtype="<f4"))

    def test_open_twice_raises(self, make_sink: Callable[[], Sink]) -> None:
        spec = ArraySpec("data", (4,), np.dtype("<f4"), (2,))
        sink = make_sink()
        sink.open(spec)
        try:
            with pytest.raises(SinkStateError):
                sink.open(spec)
        finally:
            sink.abort("test over")

    def test_write_after_finalize_raises(self, make_sink: Callable[[], Sink]) -> None:
        data = np.arange(4, dtype="<f4")
        spec = ArraySpec("data", data.shape, data.dtype, (2,))
        sink = make_sink()
        stream(sink, spec, data)

        with pytest.raises(SinkStateError):
            sink.write(Region((0,), (2,)), data[:2])

    def test_region_outside_shape_raises(self, make_sink: Callable[[], Sink]) -> None:
        if not self.checks_regions:
            pytest.skip("this sink does not check regions")
        spec = ArraySpec("data", (4, 3), np.dtype("<f4"), (2, 3))
        sink = make_sink()
        sink.open(spec)
        try:
            with pytest.raises(SinkError):
                sink.write(Region((2, 0), (4, 4)), np.zeros((2, 4), dtype="<f4"))
        finally:
            sink.abort("test over")

    def test_finalize_with_wrong_shape_raises(self, make_sink: Callable[[], Sink]) -> None:
        if not self.checks_regions:
            pytest.skip("this sink does not check shapes")
        spec = ArraySpec("data", (4, 3), np.dtype("<f4"), (2, 3))
        sink = make_sink()
        sink.open(spec)
        try:
            with pytest.raises(SinkError):
                sink.finalize((5, 3))
        finally:
            sink.abort("test over")

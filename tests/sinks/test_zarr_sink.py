"""Behaviour specific to ZarrSink: fill values, attributes, direct and verbatim chunks, locks."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
import zarr
import zarr.storage
from zarr.codecs import BloscCodec

from sinks import (
    ArraySpec,
    ChunkEncoding,
    Region,
    SinkConfigError,
    SinkExistsError,
    SinkStateError,
    SinkWriteError,
    ZarrSink,
)
from sinks import _zarr_internals as internals
from sinks.testing import encode_region, grid_regions, sample_array, stream

LZ4_SHUFFLE_U2 = ChunkEncoding("blosc1", "lz4", 1, "shuffle", 2)


def _blosc1(block: np.ndarray[Any, Any], clevel: int = 1) -> bytes:
    return encode_region(block, ChunkEncoding("blosc1", "lz4", clevel, "shuffle", block.itemsize))


def test_zarr_sink_fill_value_visible_for_unwritten_regions(tmp_path: Path) -> None:
    spec = ArraySpec("x", (4, 3), np.dtype("<f4"), (2, 3))
    sink = ZarrSink(tmp_path / "x.zarr")
    sink.open(spec)
    sink.write(Region((0, 0), (2, 3)), np.ones((2, 3), dtype="<f4"))

    result = sink.finalize((4, 3))[...]

    assert (result[:2] == 1).all()
    assert np.isnan(result[2:]).all()


def test_zarr_sink_integer_fill_value_default_and_custom(tmp_path: Path) -> None:
    spec = ArraySpec("x", (4,), np.dtype("<i4"), (2,))
    default_sink = ZarrSink(tmp_path / "default.zarr")
    custom_sink = ZarrSink(tmp_path / "custom.zarr", fill_value=-1)
    default_sink.open(spec)
    custom_sink.open(spec)

    default = default_sink.finalize((4,))[...]
    custom = custom_sink.finalize((4,))[...]

    np.testing.assert_array_equal(default, [0, 0, 0, 0])
    np.testing.assert_array_equal(custom, [-1, -1, -1, -1])


def test_zarr_sink_incomplete_until_finalize(tmp_path: Path) -> None:
    path = tmp_path / "x.zarr"
    spec = ArraySpec("x", (2,), np.dtype("<f8"), (2,), attrs={"units": "counts"})
    sink = ZarrSink(path)
    sink.open(spec)

    during = dict(zarr.open_array(path, mode="r").attrs)
    sink.write(Region((0,), (2,)), np.ones(2))
    sink.finalize((2,))
    after = dict(zarr.open_array(path, mode="r").attrs)

    assert during == {"units": "counts", "zmqruntime": {"complete": False}}
    assert after == {"units": "counts", "zmqruntime": {"complete": True}}


def test_zarr_sink_abort_records_reason(tmp_path: Path) -> None:
    path = tmp_path / "x.zarr"
    sink = ZarrSink(path)
    sink.open(ArraySpec("x", (4,), np.dtype("<f8"), (2,)))
    sink.write(Region((0,), (2,)), np.array([1.0, 2.0]))

    sink.abort("worker crashed")

    stored = zarr.open_array(path, mode="r")
    assert stored.attrs["zmqruntime"] == {"complete": False, "aborted": "worker crashed"}
    np.testing.assert_array_equal(stored[:2], [1.0, 2.0])


def test_zarr_sink_preferred_encoding_matches_default_codec(tmp_path: Path) -> None:
    sink = ZarrSink(tmp_path / "x.zarr")
    sink.open(ArraySpec("x", (4, 4), np.dtype("<u2"), (2, 4)))

    assert sink.preferred_encoding() == LZ4_SHUFFLE_U2
    sink.abort("test over")


@pytest.mark.parametrize(
    ("dtype", "compressor"),
    [
        (np.dtype(">u2"), "default"),
        (np.dtype("<u2"), None),
        (np.dtype("<u2"), zarr.codecs.ZstdCodec(level=1)),
    ],
    ids=["big_endian", "uncompressed", "zstd"],
)
def test_zarr_sink_no_preferred_encoding(
    tmp_path: Path, dtype: np.dtype[Any], compressor: Any
) -> None:
    sink = ZarrSink(tmp_path / "x.zarr", compressor=compressor)
    sink.open(ArraySpec("x", (4,), dtype, (2,)))

    assert sink.preferred_encoding() is None
    sink.abort("test over")


def test_zarr_sink_verbatim_blosc1_chunk_readable_by_zarr(tmp_path: Path) -> None:
    path = tmp_path / "x.zarr"
    data = sample_array((4, 8), np.dtype("<u2"), np.random.default_rng(0))
    sink = ZarrSink(path)
    sink.open(ArraySpec("x", data.shape, data.dtype, (2, 8)))
    payloads = {}

    for region in grid_regions(data.shape, (2, 8)):
        payloads[region.start[0] // 2] = _blosc1(data[region.slices])
        stored = sink.write_encoded(
            region, memoryview(payloads[region.start[0] // 2]), LZ4_SHUFFLE_U2
        )
        assert stored
    sink.finalize(data.shape)

    assert (path / "c" / "1" / "0").read_bytes() == payloads[1]
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[...], data)


@pytest.mark.parametrize(
    ("case", "encoding"),
    [
        ("other_clevel", ChunkEncoding("blosc1", "lz4", 5, "shuffle", 2)),
        ("blosc2_format", ChunkEncoding("blosc2", "lz4", 1, "shuffle", 2)),
        ("other_cname", ChunkEncoding("blosc1", "zstd", 1, "shuffle", 2)),
    ],
)
def test_zarr_sink_write_encoded_rejects_other_encoding(
    tmp_path: Path, case: str, encoding: ChunkEncoding
) -> None:
    data = np.arange(16, dtype="<u2").reshape(2, 8)
    sink = ZarrSink(tmp_path / "x.zarr")
    sink.open(ArraySpec("x", (4, 8), data.dtype, (2, 8)))

    stored = sink.write_encoded(
        Region((0, 0), (2, 8)), memoryview(encode_region(data, encoding)), encoding
    )

    assert not stored
    sink.abort("test over")


def test_zarr_sink_write_encoded_rejects_edge_chunk(tmp_path: Path) -> None:
    data = np.arange(8, dtype="<u2").reshape(1, 8)
    sink = ZarrSink(tmp_path / "x.zarr")
    sink.open(ArraySpec("x", (3, 8), data.dtype, (2, 8)))

    stored = sink.write_encoded(Region((2, 0), (3, 8)), memoryview(_blosc1(data)), LZ4_SHUFFLE_U2)

    assert not stored
    sink.abort("test over")


def test_zarr_sink_write_encoded_rejects_wrong_size_header(tmp_path: Path) -> None:
    block = np.arange(8, dtype="<u2").reshape(1, 8)  # half the bytes of a (2, 8) chunk
    sink = ZarrSink(tmp_path / "x.zarr")
    sink.open(ArraySpec("x", (4, 8), block.dtype, (2, 8)))

    stored = sink.write_encoded(Region((0, 0), (2, 8)), memoryview(_blosc1(block)), LZ4_SHUFFLE_U2)

    assert not stored
    sink.abort("test over")


@pytest.mark.parametrize("compressor", [None, "default"], ids=["uncompressed", "blosc_lz4"])
def test_zarr_sink_direct_chunk_bytes_equal_zarr_own(tmp_path: Path, compressor: Any) -> None:
    data = sample_array((4, 6), np.dtype("<f8"), np.random.default_rng(1))
    spec = ArraySpec("x", data.shape, data.dtype, (2, 6))
    direct = stream(ZarrSink(tmp_path / "direct.zarr", compressor=compressor), spec, data)
    reference = zarr.create_array(
        tmp_path / "reference.zarr",
        shape=data.shape,
        chunks=(2, 6),
        dtype=data.dtype,
        compressors=direct.compressors,
        fill_value=np.nan,
    )

    reference[...] = data

    for key in ("c/0/0", "c/1/0"):
        ours = (tmp_path / "direct.zarr" / key).read_bytes()
        theirs = (tmp_path / "reference.zarr" / key).read_bytes()
        assert ours == theirs, key


def test_zarr_sink_edge_chunk_padding_is_fill_value(tmp_path: Path) -> None:
    path = tmp_path / "x.zarr"
    data = np.arange(15, dtype="<f4").reshape(3, 5)
    stream(ZarrSink(path), ArraySpec("x", data.shape, data.dtype, (2, 4)), data)

    grown = zarr.open_array(path, mode="r+")
    grown.resize((4, 8))
    values = grown[...]

    np.testing.assert_array_equal(values[:3, :5], data)
    assert np.isnan(values[3]).all()
    assert np.isnan(values[:, 5:]).all()


def test_zarr_sink_stores_whole_chunks_directly(tmp_path: Path) -> None:
    # zarr's own write path skips chunks equal to the fill value; the direct
    # path stores every chunk it is given, which shows that it was taken.
    path = tmp_path / "x.zarr"
    data = np.zeros((2, 4), dtype="<i4")

    stream(ZarrSink(path), ArraySpec("x", data.shape, data.dtype, (1, 4)), data)

    assert (path / "c" / "0" / "0").is_file()
    assert (path / "c" / "1" / "0").is_file()


def test_zarr_sink_without_chunk_io_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(internals, "chunk_io_supported", lambda version=None: False)
    data = sample_array((5, 4), np.dtype("<f8"), np.random.default_rng(2))
    spec = ArraySpec("x", (None, 4), data.dtype, (2, 4))
    sink = ZarrSink(tmp_path / "x.zarr")

    result = stream(sink, spec, data, mode="alternate")

    assert sink.preferred_encoding() is None
    np.testing.assert_array_equal(result[...], data)


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("3.1.6", True),
        ("3.1.0", True),
        ("3.2.0", False),
        ("3.0.8", False),
        ("4.0.0", False),
        ("x", False),
    ],
)
def test_chunk_io_supported_versions(version: str, supported: bool) -> None:
    assert internals.chunk_io_supported(version) is supported


def test_chunk_io_supported_for_installed_zarr() -> None:
    # Fails after a zarr upgrade on purpose: recheck sinks/_zarr_internals.py, then widen the guard.
    assert internals.chunk_io_supported(), (
        f"direct chunk writes disabled for zarr {zarr.__version__}"
    )


def test_zarr_sink_concurrent_writers_to_one_chunk(tmp_path: Path) -> None:
    rows, width, writers = 8, 64, 8
    data = sample_array((rows * 4, width), np.dtype("<f8"), np.random.default_rng(3))
    # Every region is one row, so eight regions share each 8-row zarr chunk.
    spec = ArraySpec("x", data.shape, data.dtype, (1, width))
    sink = ZarrSink(tmp_path / "x.zarr", chunks=(rows, width))
    sink.open(spec)
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def write_rows(offset: int) -> None:
        try:
            for chunk in range(4):
                barrier.wait(timeout=10)
                row = chunk * rows + offset
                sink.write(Region((row, 0), (row + 1, width)), data[row : row + 1])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write_rows, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    result = sink.finalize(data.shape)[...]

    assert not errors
    np.testing.assert_array_equal(result, data)


def test_zarr_sink_sharded_array_roundtrip(tmp_path: Path) -> None:
    data = sample_array((8, 8), np.dtype("<i4"), np.random.default_rng(4))
    spec = ArraySpec("x", data.shape, data.dtype, (2, 4))
    sink = ZarrSink(tmp_path / "x.zarr", shards=(4, 8))

    result = stream(sink, spec, data)

    assert result.shards == (4, 8)
    np.testing.assert_array_equal(result[...], data)


def test_zarr_sink_growable_resizes_to_final_length(tmp_path: Path) -> None:
    path = tmp_path / "x.zarr"
    data = sample_array((13, 2), np.dtype("<u4"), np.random.default_rng(5))

    stream(ZarrSink(path), ArraySpec("x", (None, 2), data.dtype, (4, 2)), data)

    stored = zarr.open_array(path, mode="r")
    assert stored.shape == (13, 2)
    np.testing.assert_array_equal(stored[...], data)


def test_zarr_sink_array_inside_group(tmp_path: Path) -> None:
    path = tmp_path / "out.zarr"
    data = np.arange(4, dtype="<f4")

    stream(ZarrSink(path, path="scans/first"), ArraySpec("first", (4,), data.dtype, (2,)), data)

    group = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(group["scans/first"][...], data)


def test_zarr_sink_existing_array_without_overwrite_raises(tmp_path: Path) -> None:
    path = tmp_path / "x.zarr"
    spec = ArraySpec("x", (4,), np.dtype("<f4"), (2,))
    stream(ZarrSink(path), spec, np.zeros(4, dtype="<f4"))

    with pytest.raises(SinkExistsError, match="overwrite=True") as info:
        ZarrSink(path).open(spec)

    assert str(path) in str(info.value)


def test_zarr_sink_chunks_with_wrong_rank_raise(tmp_path: Path) -> None:
    sink = ZarrSink(tmp_path / "x.zarr", chunks=(2,))

    with pytest.raises(SinkConfigError, match="one chunk length per axis"):
        sink.open(ArraySpec("x", (4, 4), np.dtype("<f4"), (2, 4)))


class _FailingChunkStore(zarr.storage.WrapperStore[zarr.storage.MemoryStore]):
    """A memory store whose chunk writes fail, standing in for a full or broken disk."""

    async def set(self, key: str, value: Any) -> None:
        if "/c/" in f"/{key}":
            raise OSError(28, "No space left on device")
        await super().set(key, value)


def test_zarr_sink_background_write_failure_surfaces() -> None:
    store = _FailingChunkStore(zarr.storage.MemoryStore())
    sink = ZarrSink(store, path="x")
    sink.open(ArraySpec("x", (4, 2), np.dtype("<f4"), (2, 2)))
    sink.write(Region((0, 0), (2, 2)), np.ones((2, 2), dtype="<f4"))

    with pytest.raises(SinkWriteError, match="marked incomplete") as info:
        sink.finalize((4, 2))

    assert isinstance(info.value.__cause__, OSError)
    attrs = zarr.open_array(store, path="x", mode="r").attrs["zmqruntime"]
    assert attrs["complete"] is False
    assert "No space left" in attrs["aborted"]


def test_zarr_sink_small_pending_budget_still_completes(tmp_path: Path) -> None:
    data = sample_array((16, 32), np.dtype("<f8"), np.random.default_rng(6))
    spec = ArraySpec("x", data.shape, data.dtype, (1, 32))
    sink = ZarrSink(tmp_path / "x.zarr", max_pending_bytes=1)

    result = stream(sink, spec, data)

    np.testing.assert_array_equal(result[...], data)


def test_zarr_sink_array_before_open_raises(tmp_path: Path) -> None:
    with pytest.raises(SinkStateError):
        _ = ZarrSink(tmp_path / "x.zarr").array


def test_zarr_sink_blosc_codec_shuffle_variants(tmp_path: Path) -> None:
    data = sample_array((4, 8), np.dtype("<i4"), np.random.default_rng(7))
    compressor = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    sink = ZarrSink(tmp_path / "x.zarr", compressor=compressor)
    spec = ArraySpec("x", data.shape, data.dtype, (2, 8))
    sink.open(spec)
    encoding = sink.preferred_encoding()
    assert encoding == ChunkEncoding("blosc1", "zstd", 3, "bitshuffle", 4)

    for region in grid_regions(data.shape, spec.chunks):
        codec = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
        payload = bytes(codec.encode(np.ascontiguousarray(data[region.slices])))
        assert sink.write_encoded(region, memoryview(payload), encoding)

    np.testing.assert_array_equal(sink.finalize(data.shape)[...], data)


def test_zarr_direct_io_chunk_files(tmp_path: Path) -> None:
    # 3 x 1000 uint16 chunks are 6000 bytes: not a block multiple, so every
    # direct write is padded and then cut back to the chunk's true size.
    spec = ArraySpec("frames", (7, 1000), np.dtype("<u2"), (3, 1000))
    data = np.arange(7000, dtype="<u2").reshape(7, 1000)
    root = tmp_path / "direct.zarr"

    result = stream(ZarrSink(root, compressor=None, direct_io=True), spec, data, mode="owned")

    np.testing.assert_array_equal(result[...], data)
    chunk_file = root / "c" / "0" / "0"
    assert chunk_file.stat().st_size == 6000
    assert not list(root.rglob("*.partial"))


@pytest.mark.filterwarnings("ignore::zarr.errors.UnstableSpecificationWarning")
def test_zarr_big_endian_field_reopens(tmp_path: Path) -> None:
    dtype = np.dtype([("a", "<i2"), ("b", ">f8")])
    data = np.array([(1, 0.0204), (2, -3.5), (3, 1e300)], dtype=dtype)
    spec = ArraySpec("s", data.shape, dtype, (2,))
    root = tmp_path / "fields.zarr"

    stream(ZarrSink(root), spec, data, mode="owned")
    reopened = zarr.open_array(root, mode="r")[...]

    np.testing.assert_array_equal(reopened["a"], data["a"])
    np.testing.assert_array_equal(reopened["b"], data["b"])

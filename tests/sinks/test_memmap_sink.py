"""Behaviour specific to MemmapSink: the .npy file, growth, paths, memory use."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from sinks import ArraySpec, MemmapSink, Region, SinkConfigError, SinkExistsError, SinkWriteError
from sinks._direct import ALIGN, open_direct
from sinks.testing import grid_regions, sample_array, stream


def _read_header(path: Path) -> tuple[tuple[int, int], tuple[int, ...], int]:
    """Return the format version, shape and data offset stated in an .npy file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(f, max_header_size=1 << 20)
        return version, shape, f.tell()


def test_memmap_sink_file_opens_with_np_load(tmp_path: Path) -> None:
    path = tmp_path / "frames.npy"
    data = sample_array((4, 5, 6), np.dtype(">f8"), np.random.default_rng(0))
    spec = ArraySpec("frames", data.shape, data.dtype, (1, 5, 6))

    result = stream(MemmapSink(path), spec, data)

    assert isinstance(result, np.memmap)
    assert not result.flags.writeable
    loaded = np.load(path)
    assert loaded.dtype == np.dtype(">f8")
    np.testing.assert_array_equal(loaded, data)


def test_memmap_sink_partial_edge_chunk(tmp_path: Path) -> None:
    path = tmp_path / "edge.npy"
    spec = ArraySpec("edge", (5, 7), np.dtype("<i4"), (2, 4))
    edge = Region((4, 4), (5, 7))
    sink = MemmapSink(path)
    sink.open(spec)

    sink.write(edge, np.array([[1, 2, 3]], "<i4"))
    sink.finalize((5, 7))

    loaded = np.load(path)
    np.testing.assert_array_equal(loaded[4, 4:], [1, 2, 3])
    assert (loaded[:4] == 0).all()
    assert (loaded[4, :4] == 0).all()


def test_memmap_sink_destination_is_none(tmp_path: Path) -> None:
    spec = ArraySpec("frames", (3, 8, 8), np.dtype("<u2"), (1, 8, 8))
    sink = MemmapSink(tmp_path / "frames.npy")
    sink.open(spec)

    dest = sink.destination(Region((1, 0, 0), (2, 8, 8)))

    assert dest is None
    sink.abort("test over")


def test_memmap_sink_write_owned_queued(tmp_path: Path) -> None:
    spec = ArraySpec("frames", (6, 16, 16), np.dtype("<f4"), (1, 16, 16))
    data = np.arange(6 * 16 * 16, dtype="<f4").reshape(6, 16, 16)
    # A bound below one frame makes every write_owned wait for the one before.
    sink = MemmapSink(tmp_path / "frames.npy", max_pending_bytes=100)
    sink.open(spec)

    for i in range(6):
        block = data[i : i + 1].copy()
        block.flags.writeable = False
        sink.write_owned(Region((i, 0, 0), (i + 1, 16, 16)), block)
    result = sink.finalize((6, 16, 16))

    np.testing.assert_array_equal(result, data)


def test_memmap_sink_write_owned_failure_surfaces_at_finalize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = ArraySpec("frames", (2, 4), np.dtype("<u1"), (1, 4))
    sink = MemmapSink(tmp_path / "frames.npy")
    sink.open(spec)

    def disk_full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    # A full disk cannot be made here, so the queued pwrite is made to fail like one.
    monkeypatch.setattr(os, "pwrite", disk_full)
    sink.write_owned(Region((0, 0), (1, 4)), np.ones((1, 4), "<u1"))

    with pytest.raises(SinkWriteError, match="queued write"):
        sink.finalize((2, 4))


def test_memmap_sink_fsyncs_only_when_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real_fsync(fd))
    spec = ArraySpec("x", (2, 4), np.dtype("<u1"), (1, 4))
    data = np.ones((2, 4), "<u1")

    stream(MemmapSink(tmp_path / "fast.npy"), spec, data, mode="owned")
    fsyncs_default = len(calls)
    stream(MemmapSink(tmp_path / "durable.npy", durable=True), spec, data, mode="owned")

    assert fsyncs_default == 0
    assert len(calls) == 1


def test_memmap_sink_existing_file_without_overwrite_raises(tmp_path: Path) -> None:
    path = tmp_path / "taken.npy"
    path.write_bytes(b"keep me")
    sink = MemmapSink(path)

    with pytest.raises(SinkExistsError, match="overwrite=True") as info:
        sink.open(ArraySpec("x", (2,), np.dtype("<f4"), (2,)))

    assert str(path) in str(info.value)
    assert path.read_bytes() == b"keep me"


def test_memmap_sink_overwrite_replaces_file(tmp_path: Path) -> None:
    path = tmp_path / "taken.npy"
    path.write_bytes(b"old")
    data = np.arange(6, dtype="<f4")

    stream(MemmapSink(path, overwrite=True), ArraySpec("x", (6,), data.dtype, (4,)), data)

    np.testing.assert_array_equal(np.load(path), data)


def test_memmap_sink_directory_path_raises(tmp_path: Path) -> None:
    sink = MemmapSink(tmp_path)

    with pytest.raises(SinkConfigError, match="is a directory") as info:
        sink.open(ArraySpec("x", (2,), np.dtype("<f4"), (2,)))

    assert str(tmp_path) in str(info.value)


def test_memmap_sink_missing_parent_directory_raises(tmp_path: Path) -> None:
    sink = MemmapSink(tmp_path / "missing" / "x.npy")

    with pytest.raises(SinkConfigError, match="does not exist"):
        sink.open(ArraySpec("x", (2,), np.dtype("<f4"), (2,)))


def test_memmap_sink_growable_file_states_final_shape(tmp_path: Path) -> None:
    path = tmp_path / "grow.npy"
    data = sample_array((37, 3), np.dtype("<i2"), np.random.default_rng(1))
    spec = ArraySpec("grow", (None, 3), data.dtype, (4, 3))

    stream(MemmapSink(path), spec, data)

    version, shape, offset = _read_header(path)
    assert version == (1, 0)
    assert shape == (37, 3)
    assert path.stat().st_size == offset + data.nbytes
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), data)


def test_memmap_sink_abort_keeps_file_with_committed_rows(tmp_path: Path) -> None:
    path = tmp_path / "partial.npy"
    data = sample_array((12, 2), np.dtype("<f8"), np.random.default_rng(2))
    spec = ArraySpec("partial", (None, 2), data.dtype, (2, 2))
    regions = grid_regions(data.shape, spec.chunks)
    sink = MemmapSink(path)
    stream(sink, spec, data, regions=[regions[0], regions[3]], finalize=False)

    sink.abort("connection lost")

    _, shape, offset = _read_header(path)
    assert shape == (8, 2)
    assert path.stat().st_size == offset + 8 * 2 * 8
    partial = np.load(path)
    np.testing.assert_array_equal(partial[0:2], data[0:2])
    np.testing.assert_array_equal(partial[6:8], data[6:8])


def test_memmap_sink_wide_structured_dtype_uses_format_2(tmp_path: Path) -> None:
    # 4000 named fields make a header longer than format 1.0's 65535 bytes.
    dtype = np.dtype([(f"field_{i:04d}", "<u1") for i in range(4000)])
    path = tmp_path / "wide.npy"
    data = np.zeros(5, dtype=dtype)
    data["field_0007"] = np.arange(5)
    spec = ArraySpec("wide", (None,), dtype, (2,))

    result = stream(MemmapSink(path), spec, data)

    version, shape, _ = _read_header(path)
    assert version == (2, 0)
    assert shape == (5,)
    np.testing.assert_array_equal(result["field_0007"], np.arange(5))
    loaded = np.load(path, max_header_size=1 << 20)
    np.testing.assert_array_equal(loaded["field_0007"], np.arange(5))


def _anonymous_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon missing from /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memmap_sink_anonymous_memory_stays_flat(tmp_path: Path) -> None:
    frame = (512, 1024)  # 2 MiB of uint32 per frame, 128 MiB in total
    frames = 64
    spec = ArraySpec("big", (None, *frame), np.dtype("<u4"), (1, *frame))
    # Queued owned frames are anonymous memory; a small bound keeps them few.
    sink = MemmapSink(tmp_path / "big.npy", max_pending_bytes=4 << 20)
    sink.open(spec)
    before = _anonymous_rss_bytes()

    for i in range(frames):
        region = Region((i, 0, 0), (i + 1, *frame))
        sink.write_owned(region, np.full((1, *frame), i, "<u4"))
    after = _anonymous_rss_bytes()
    result = sink.finalize((frames, *frame))

    assert after - before < 32 << 20
    assert int(result[frames - 1, 5, 5]) == frames - 1


def _direct_supported(directory: Path) -> bool:
    fd = open_direct(directory / "probe", os.O_WRONLY | os.O_CREAT)
    if fd is None:
        return False
    os.close(fd)
    (directory / "probe").unlink()
    return True


def test_memmap_direct_io_short_last_region(tmp_path: Path) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip("the file system under tmp_path has no O_DIRECT")
    # 2048 x 4 bytes = 8 KiB per frame: every region starts on a block boundary,
    # and the last one, 2 frames of 3, ends inside a block at the array's end.
    spec = ArraySpec("frames", (7, 2048), np.dtype("<f4"), (3, 2048))
    data = np.random.default_rng(3).random((7, 2048), dtype=np.float32)
    path = tmp_path / "direct.npy"

    result = stream(MemmapSink(path, direct_io=True), spec, data, mode="owned")

    np.testing.assert_array_equal(result, data)
    assert path.stat().st_size == ALIGN + data.nbytes


def test_memmap_direct_io_header_padded(tmp_path: Path) -> None:
    spec = ArraySpec("frames", (2, 1024), np.dtype("<u4"), (1, 1024))
    path = tmp_path / "direct.npy"

    stream(MemmapSink(path, direct_io=True), spec, np.ones((2, 1024), "<u4"), mode="owned")

    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        np.lib.format.read_array_header_1_0(handle)
        assert version == (1, 0)
        assert handle.tell() == ALIGN


def test_memmap_sink_direct_io_unaligned_frames_stay_exact(tmp_path: Path) -> None:
    # 1000-byte frames never start on a block boundary after the first, so
    # they go through the page cache while aligned ones go direct.
    spec = ArraySpec("frames", (None, 250), np.dtype("<i4"), (1, 250))
    data = np.arange(9 * 250, dtype="<i4").reshape(9, 250)
    path = tmp_path / "mixed.npy"

    result = stream(MemmapSink(path, direct_io=True), spec, data, mode="owned")

    np.testing.assert_array_equal(result, data)
    assert path.stat().st_size == ALIGN + data.nbytes

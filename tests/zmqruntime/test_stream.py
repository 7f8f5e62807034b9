"""End-to-end tests of the data path: ResultStream -> PUSH/PULL -> StreamReceiver -> sink."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numcodecs
import numpy as np
import pytest
import zmq

from sinks import ArraySpec, MemmapSink, MemorySink, Region, Sink, ZarrSink
from zmqruntime import (
    ChunkReceived,
    Compression,
    IncompleteResultError,
    ResultStream,
    StreamReceiver,
    ZmqTimeoutError,
)

from .test_dtypes import ROUND_TRIP_DTYPES

Pair = tuple[zmq.Socket[Any], zmq.Socket[Any]]


def _memory(_: ArraySpec) -> Sink:
    return MemorySink()


def _receive(pull: zmq.Socket[Any], exec_id: str = "e1") -> dict[str, Any]:
    return StreamReceiver(pull, exec_id, _memory, timeout=20).run()


def _send_arrays(
    push: zmq.Socket[Any], arrays: dict[str, Any], **options: Any
) -> Callable[[], None]:
    def send() -> None:
        stream = ResultStream(push, "e1", timeout=20, **options)
        for name, array in arrays.items():
            stream.send_array(name, array)
        stream.close()

    return send


def _sample(dtype: np.dtype, shape: tuple[int, ...] = (3, 4)) -> np.ndarray:
    raw = np.random.default_rng(7).integers(0, 255, size=int(np.prod(shape)) * dtype.itemsize)
    return raw.astype(np.uint8).view(dtype).reshape(shape)


# numpy expands a subarray dtype into extra array axes, so no array has one.
ARRAY_DTYPES = [d for d in ROUND_TRIP_DTYPES if d.subdtype is None]


@pytest.mark.parametrize("dtype", ARRAY_DTYPES, ids=str)
def test_stream_dtype_round_trip_exact(push_pull: Pair, run_sender: Any, dtype: np.dtype) -> None:
    push, pull = push_pull
    array = _sample(dtype)

    sender = run_sender(_send_arrays(push, {"a": array}))
    received = _receive(pull)["a"]
    sender.join()

    assert received.dtype == array.dtype
    assert received.tobytes() == array.tobytes()


def _layouts() -> dict[str, np.ndarray]:
    base = np.arange(512 * 513, dtype=np.float64).reshape(512, 513)
    return {
        "fortran_uint16": np.asfortranarray(base.astype(np.uint16)),
        "strided": base[:, ::2],
        "negative_stride": base[::-1, ::-3],
        "neither_contiguous": base.reshape(512, 513)[10:300:3, 5:400],
        "zero_size": np.zeros((3, 0, 5), np.int32),
        "zero_d": np.array(3.5),
        "transposed_3d": np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4).transpose(2, 0, 1),
    }


@pytest.mark.parametrize("name", list(_layouts()))
def test_stream_layout_arrives_equal(push_pull: Pair, run_sender: Any, name: str) -> None:
    push, pull = push_pull
    array = _layouts()[name]

    sender = run_sender(_send_arrays(push, {name: array}))
    received = _receive(pull)[name]
    sender.join()

    assert received.shape == array.shape
    np.testing.assert_array_equal(received, array)


def test_stream_result_is_writable_and_aligned(push_pull: Pair, run_sender: Any) -> None:
    push, pull = push_pull
    array = np.arange(1000, dtype=np.float64).reshape(10, 100)

    sender = run_sender(_send_arrays(push, {"a": array}))
    received = _receive(pull)["a"]
    sender.join()

    assert received.flags.writeable
    assert received.flags.aligned


def test_stream_generator_reusing_buffer_never_corrupts(push_pull: Pair, run_sender: Any) -> None:
    push, pull = push_pull
    frames = 40
    shape = (256, 256)

    def frames_from_one_buffer() -> Any:
        buffer = np.empty(shape, np.uint16)
        for i in range(frames):
            buffer[...] = i
            yield buffer

    def send() -> None:
        stream = ResultStream(push, "e1", timeout=20)
        writer = stream.declare("stack", (frames, *shape), np.uint16)
        for i, frame in enumerate(frames_from_one_buffer()):
            writer.write(i, frame)
        stream.close()

    sender = run_sender(send)
    received = _receive(pull)["stack"]
    sender.join()

    assert [int(received[i].min()) for i in range(frames)] == list(range(frames))
    assert [int(received[i].max()) for i in range(frames)] == list(range(frames))


def test_stream_growable_result_append(push_pull: Pair, run_sender: Any) -> None:
    push, pull = push_pull
    frames = [np.full((1, 8, 8), i, np.int32) for i in range(7)]

    def send() -> None:
        stream = ResultStream(push, "e1", timeout=20)
        writer = stream.declare("grow", (None, 8, 8), np.int32)
        for frame in frames:
            writer.append(frame)
        stream.close()

    sender = run_sender(send)
    received = _receive(pull)["grow"]
    sender.join()

    np.testing.assert_array_equal(received, np.concatenate(frames))


def _microscopy_like(frames: int = 6, size: int = 256) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    background = 200 + 100 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / size**2)
    rng = np.random.default_rng(3)
    return rng.poisson(np.broadcast_to(background, (frames, size, size))).astype(np.uint16)


@pytest.mark.parametrize(
    "compression",
    [
        "blosc2",
        "blosc1",
        Compression("blosc2", cname="zstd", clevel=3, shuffle="bitshuffle", nthreads=2),
        Compression("blosc1", cname="zstd", shuffle="noshuffle"),
    ],
    ids=str,
)
def test_stream_compressed_round_trip(push_pull: Pair, run_sender: Any, compression: Any) -> None:
    push, pull = push_pull
    array = _microscopy_like()
    events: list[Any] = []

    sender = run_sender(
        _send_arrays(push, {"a": array}, compression=compression, chunk_bytes=1 << 17)
    )
    receiver = StreamReceiver(pull, "e1", _memory, timeout=20)
    events = list(receiver.events())
    sender.join()

    chunks = [e for e in events if isinstance(e, ChunkReceived)]
    assert len(chunks) > 1
    assert sum(e.cbytes for e in chunks) < array.nbytes
    np.testing.assert_array_equal(events[-1].value, array)


def test_auto_compression_sends_raw_on_loopback(push_pull: Pair, run_sender: Any) -> None:
    push, pull = push_pull
    array = _microscopy_like()

    sender = run_sender(_send_arrays(push, {"a": array}, compression="auto"))
    events = list(StreamReceiver(pull, "e1", _memory, timeout=20).events())
    sender.join()

    chunks = [e for e in events if isinstance(e, ChunkReceived)]
    assert all(e.cbytes == e.nbytes for e in chunks)


def test_auto_compression_compresses_on_slow_link(push_pull: Pair, run_sender: Any) -> None:
    push, pull = push_pull
    array = _microscopy_like()
    slow_link = Compression("auto", link_bytes_per_s=50e6)

    sender = run_sender(_send_arrays(push, {"a": array}, compression=slow_link))
    events = list(StreamReceiver(pull, "e1", _memory, timeout=20).events())
    sender.join()

    chunks = [e for e in events if isinstance(e, ChunkReceived)]
    assert sum(e.cbytes for e in chunks) < array.nbytes
    np.testing.assert_array_equal(events[-1].value, array)


def test_auto_compression_skips_random_data_on_slow_link(push_pull: Pair, run_sender: Any) -> None:
    push, pull = push_pull
    array = np.random.default_rng(0).integers(0, 2**16, (4, 256, 256), dtype=np.uint16)
    slow_link = Compression("auto", link_bytes_per_s=50e6)

    sender = run_sender(_send_arrays(push, {"a": array}, compression=slow_link))
    events = list(StreamReceiver(pull, "e1", _memory, timeout=20).events())
    sender.join()

    chunks = [e for e in events if isinstance(e, ChunkReceived)]
    assert all(e.cbytes == e.nbytes for e in chunks)


def test_stream_mixed_codecs_in_one_result(push_pull: Pair, run_sender: Any) -> None:
    push, pull = push_pull
    array = _microscopy_like(frames=4, size=64)

    def send() -> None:
        stream = ResultStream(push, "e1", timeout=20)
        writer = stream.declare("a", array.shape, array.dtype)
        for i in range(4):
            stream.compression = Compression(["none", "blosc2", "blosc1", "blosc2"][i])  # type: ignore[arg-type]
            writer.write(i, array[i : i + 1])
        stream.close()

    sender = run_sender(send)
    received = _receive(pull)["a"]
    sender.join()

    np.testing.assert_array_equal(received, array)


def test_stream_several_results_interleaved(push_pull: Pair, run_sender: Any) -> None:
    push, pull = push_pull
    stack = np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16)
    table = np.array([(1, 2.5), (2, 3.5)], dtype=[("label", "<i4"), ("area", "<f8")])

    def send() -> None:
        stream = ResultStream(push, "e1", timeout=20)
        images = stream.declare("images", stack.shape, stack.dtype)
        images.write(0, stack[:2])
        stream.send_array("table", table)
        images.write(2, stack[2:])
        stream.close()

    sender = run_sender(send)
    received = _receive(pull)
    sender.join()

    np.testing.assert_array_equal(received["images"], stack)
    np.testing.assert_array_equal(received["table"], table)


def test_receiver_times_out_naming_execution(push_pull: Pair) -> None:
    _, pull = push_pull

    with pytest.raises(ZmqTimeoutError, match="e-silent"):
        StreamReceiver(pull, "e-silent", _memory, timeout=0.2).run()


def test_writer_rejects_region_off_chunk_grid(push_pull: Pair) -> None:
    push, _ = push_pull
    stream = ResultStream(push, "e1", timeout=5)
    writer = stream.declare("a", (4, 8), np.uint8, chunks=(2, 8))

    with pytest.raises(ValueError, match="chunk grid"):
        writer.write(1, np.zeros((1, 8), np.uint8))


def test_writer_rejects_wrong_dtype_with_fix(push_pull: Pair) -> None:
    push, _ = push_pull
    writer = ResultStream(push, "e1", timeout=5).declare("a", (4, 8), np.uint8)

    with pytest.raises(TypeError, match="astype"):
        writer.write(0, np.zeros((1, 8), np.float32))


def test_send_array_rejects_object_array_before_sending(push_pull: Pair) -> None:
    push, pull = push_pull
    stream = ResultStream(push, "e1", timeout=5)

    with pytest.raises(TypeError, match="object"):
        stream.send_array("a", np.array([object(), 1], dtype=object))
    assert pull.poll(100) == 0


def test_stream_without_timeout_waits_for_release(push_pull: Pair, run_sender: Any) -> None:
    push, pull = push_pull
    array = np.arange(300_000, dtype=np.float64).reshape(3, 100_000)

    def send() -> None:
        stream = ResultStream(push, "e1")
        stream.send_array("a", array)
        stream.close()

    sender = run_sender(send)
    received = _receive(pull)["a"]
    sender.join()

    np.testing.assert_array_equal(received, array)


def test_sink_factory_live_zarr_path_groups_results(tmp_path: Any) -> None:
    from zmqruntime._sinkfactory import make_sink_factory

    sink_for = make_sink_factory(str(tmp_path / "live.zarr"))
    values = {}
    for name in ("first", "second"):
        spec = ArraySpec(name, (2, 3), np.dtype("<i4"), (1, 3))
        sink = sink_for(spec)
        sink.open(spec)
        sink.write(Region((0, 0), (2, 3)), np.full((2, 3), len(name), "<i4"))
        values[name] = sink.finalize((2, 3))

    assert np.asarray(values["first"][:]).tolist() == [[5] * 3] * 2
    assert np.asarray(values["second"][:]).tolist() == [[6] * 3] * 2


def test_sink_factory_live_npy_path_names_every_result(tmp_path: Any) -> None:
    from zmqruntime._sinkfactory import make_sink_factory

    sink_for = make_sink_factory(str(tmp_path / "live.npy"))
    spec = ArraySpec("only", (2,), np.dtype("<u1"), (2,))
    sink = sink_for(spec)
    sink.open(spec)
    sink.write(Region((0,), (2,)), np.array([1, 2], "<u1"))
    sink.finalize((2,))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.only.npy"]


@pytest.mark.parametrize("direct_io", [False, True])
def test_stream_into_memmap_sink_hands_frames_over(
    push_pull: Pair, run_sender: Any, tmp_path: Any, direct_io: bool
) -> None:
    push, pull = push_pull
    array = _microscopy_like(frames=5, size=128)
    path = tmp_path / "stack.npy"

    sender = run_sender(_send_arrays(push, {"stack": array}, chunk_bytes=1 << 15))
    receiver = StreamReceiver(
        pull, "e1", lambda spec: MemmapSink(path, direct_io=direct_io), timeout=20
    )
    values = receiver.run()
    sender.join()

    np.testing.assert_array_equal(values["stack"], array)
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), array)


def test_stream_blosc1_chunks_stored_verbatim_in_zarr(
    push_pull: Pair, run_sender: Any, tmp_path: Any
) -> None:
    push, pull = push_pull
    array = _microscopy_like(frames=4, size=128)
    root = tmp_path / "stack.zarr"
    # The sender's default Blosc1 settings equal the sink's default codec.
    sink = ZarrSink(root, direct_io=True)

    sender = run_sender(_send_arrays(push, {"stack": array}, compression="blosc1"))
    values = StreamReceiver(pull, "e1", lambda spec: sink, timeout=20).run()
    sender.join()

    np.testing.assert_array_equal(values["stack"][...], array)
    rows = values["stack"].chunks[0]
    stored = (root / "c" / "0" / "0" / "0").read_bytes()
    assert numcodecs.Blosc().decode(stored) == array[:rows].tobytes()


def test_writer_end_rejects_partly_written_result(push_pull: Pair) -> None:
    push, _ = push_pull
    stream = ResultStream(push, "e1", timeout=5)
    writer = stream.declare("grid", (3, 4), np.float32, chunks=(1, 4))
    writer.write(0, np.ones(4, np.float32))

    with pytest.raises(IncompleteResultError, match="16 of its 48 bytes"):
        writer.end()

"""Bad input on the data channel: each case raises its own error and keeps committed data."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from sinks import ArraySpec, ChunkEncoding, Region, Sink
from zmqruntime import (
    DuplicateChunkError,
    FrameCountError,
    HeaderDecodeError,
    IncompleteResultError,
    PayloadSizeError,
    ProtocolVersionError,
    RegionError,
    RemoteError,
    StreamReceiver,
    UndeclaredResultError,
    UnknownCodecError,
)
from zmqruntime._wire import ChunkHeader, ResultDeclaration, ResultEnd, StreamEnd, encode_message

Pair = tuple[zmq.Socket[Any], zmq.Socket[Any]]
SHAPE = (4, 8)


class KeepingSink(Sink):
    """An in-memory sink that records what happened to it, for checking the receiver."""

    def __init__(self) -> None:
        self.array: np.ndarray = np.empty(0)
        self.committed: list[Region] = []
        self.aborted: str | None = None

    def open(self, spec: ArraySpec) -> None:
        self.array = np.zeros(spec.initial_shape(), spec.dtype)

    def destination(self, region: Region) -> np.ndarray:
        return self.array[region.slices]

    def commit(self, region: Region) -> None:
        self.committed.append(region)

    def write(self, region: Region, data: np.ndarray) -> None:
        self.array[region.slices] = data
        self.committed.append(region)

    def finalize(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.array

    def abort(self, reason: str) -> None:
        self.aborted = reason


def _declare(push: zmq.Socket[Any]) -> None:
    push.send(encode_message(ResultDeclaration("e1", "a", SHAPE, np.dtype("<u2"), (1, 8))))


def _chunk(push: zmq.Socket[Any], seq: int, row: int, value: int = 7, **changes: Any) -> None:
    header = ChunkHeader("e1", "a", seq, (row, 0), (row + 1, 8), 16, None, 16)
    body = msgpack.unpackb(encode_message(header), raw=False)
    body.update(changes)
    push.send_multipart([msgpack.packb(body), np.full(8, value, "<u2").tobytes()])


def _receive_expecting(pull: zmq.Socket[Any], error: type[Exception], match: str) -> KeepingSink:
    sinks: list[KeepingSink] = []

    def sink_for(_: ArraySpec) -> Sink:
        sinks.append(KeepingSink())
        return sinks[-1]

    with pytest.raises(error, match=match):
        StreamReceiver(pull, "e1", sink_for, timeout=5).run()
    assert sinks, "the declaration should have opened a sink"
    return sinks[0]


def _assert_first_row_kept(sink: KeepingSink) -> None:
    assert sink.committed == [Region((0, 0), (1, 8))]
    assert sink.array[0].tolist() == [7] * 8
    assert sink.aborted is not None


def test_undecodable_header_raises_and_keeps_data(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    push.send_multipart([b"\xc1not msgpack", b"payload"])

    _assert_first_row_kept(_receive_expecting(pull, HeaderDecodeError, "not valid msgpack"))


def test_chunk_with_one_frame_raises_frame_count_error(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    push.send(encode_message(ChunkHeader("e1", "a", 1, (1, 0), (2, 8), 16, None, 16)))

    _assert_first_row_kept(_receive_expecting(pull, FrameCountError, "expected 2"))


def test_chunk_with_three_frames_raises_frame_count_error(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    header = encode_message(ChunkHeader("e1", "a", 1, (1, 0), (2, 8), 16, None, 16))
    push.send_multipart([header, bytes(16), b"extra"])

    _assert_first_row_kept(_receive_expecting(pull, FrameCountError, "extra frame"))


def test_region_outside_shape_raises_region_error(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    _chunk(push, 1, 9)

    _assert_first_row_kept(_receive_expecting(pull, RegionError, r"outside the declared shape"))


def test_payload_size_mismatch_raises(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    header = encode_message(ChunkHeader("e1", "a", 1, (1, 0), (2, 8), 16, None, 16))
    push.send_multipart([header, bytes(10)])

    sink = _receive_expecting(pull, PayloadSizeError, "has 10 bytes, its header states 16")
    _assert_first_row_kept(sink)


def test_header_nbytes_disagreeing_with_region_raises(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    _chunk(push, 1, 1, nbytes=20)

    _assert_first_row_kept(_receive_expecting(pull, PayloadSizeError, "states 20 bytes"))


def test_unknown_protocol_version_raises(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    _chunk(push, 1, 1, v=2)

    _assert_first_row_kept(_receive_expecting(pull, ProtocolVersionError, "version 2"))


def test_unknown_codec_raises(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    codec = {"format": "snappy9", "cname": "lz4", "clevel": 1, "shuffle": "shuffle", "typesize": 2}
    _chunk(push, 1, 1, codec=codec)

    _assert_first_row_kept(_receive_expecting(pull, UnknownCodecError, "snappy9"))


def test_corrupt_compressed_payload_raises(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    encoding = ChunkEncoding("blosc2", "lz4", 1, "shuffle", 2)
    header = encode_message(ChunkHeader("e1", "a", 1, (1, 0), (2, 8), 16, encoding, 16))
    push.send_multipart([header, bytes(16)])

    _assert_first_row_kept(_receive_expecting(pull, PayloadSizeError, "blosc"))


def test_chunk_for_undeclared_result_raises(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    _chunk(push, 1, 1, name="ghost")

    _assert_first_row_kept(_receive_expecting(pull, UndeclaredResultError, "ghost"))


def test_duplicate_sequence_number_raises(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    _chunk(push, 0, 1, value=9)

    sink = _receive_expecting(pull, DuplicateChunkError, "sequence number 0")
    _assert_first_row_kept(sink)
    assert sink.array[1].tolist() == [0] * 8


def test_missing_chunk_never_reported_complete(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    push.send(encode_message(ResultEnd("e1", "a", 2, 32, SHAPE)))

    _assert_first_row_kept(_receive_expecting(pull, IncompleteResultError, "1 of 2 chunks"))


def test_failed_stream_raises_remote_error_with_traceback(push_pull: Pair) -> None:
    push, pull = push_pull
    _declare(push)
    _chunk(push, 0, 0)
    error = {"type": "ValueError", "message": "bad well", "traceback": "line 3"}
    push.send(encode_message(StreamEnd("e1", "failed", error)))

    sink = _receive_expecting(pull, RemoteError, "ValueError: bad well")
    _assert_first_row_kept(sink)

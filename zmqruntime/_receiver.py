"""Receiving side of a result stream: validate each message and write chunks into sinks.

Copies and memory
-----------------
An uncompressed chunk is received with ``Socket.recv_into`` straight into the
region the sink exposes, when that region is C-contiguous (the memory sink,
with the default row-major chunk grid): one copy, out of libzmq's message. A
sink whose ``takes_ownership`` is set (memmap, zarr) is handed the received
frame itself through ``Sink.write_owned`` and stores it from there, often in
a background thread. A compressed chunk is decompressed straight into the
region. Otherwise one scratch buffer of one chunk is used and reused. The
receiver keeps at most what the socket's receive high-water mark queues plus
what the sink queues (bounded by the sink's ``max_pending_bytes``), never the
whole array: give the PULL socket a small ``RCVHWM`` (see :data:`DEFAULT_HWM`).

With an :class:`ArenaReader`, a chunk may arrive as ``[header, ARENA_MARKER,
ref]``: its payload is read from the server's shared-memory arena, copied once
into the sink's region, or mapped without a copy for a sink that takes
ownership.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import zmq

from sinks import ArraySpec, Region, Sink

from ._arena import ArenaReader, is_marker
from ._compression import decompress_into
from ._dtypes import byte_view
from ._errors import (
    DuplicateChunkError,
    ExecutionCancelledError,
    FrameCountError,
    IncompleteResultError,
    PayloadSizeError,
    ProtocolError,
    RegionError,
    RemoteError,
    TransportError,
    UndeclaredResultError,
    ZmqTimeoutError,
)
from ._wire import ChunkHeader, ResultDeclaration, ResultEnd, StreamEnd, decode_message
from ._zmqutil import endpoint_of

__all__ = [
    "DEFAULT_HWM",
    "ChunkReceived",
    "ResultCompleted",
    "ResultDeclared",
    "StreamEvent",
    "StreamReceiver",
]

logger = logging.getLogger(__name__)

# Messages a PULL socket should queue (RCVHWM) and a PUSH socket (SNDHWM):
# with chunks of a few MiB, 4 keeps the bytes in flight to tens of MiB while
# still overlapping the sender's and receiver's work. Arbitrary; raise it for
# chunks much smaller than 1 MiB.
DEFAULT_HWM = 4


@dataclass(frozen=True, slots=True)
class ResultDeclared:
    """A result was declared and its sink opened."""

    spec: ArraySpec


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    """A chunk was written into its sink. ``nbytes`` counts raw (decompressed) bytes."""

    name: str
    seq: int
    region: Region
    nbytes: int
    cbytes: int


@dataclass(frozen=True, slots=True)
class ResultCompleted:
    """A result ended with every chunk present; ``value`` is what its sink's finalize returned."""

    name: str
    value: Any


StreamEvent = ResultDeclared | ChunkReceived | ResultCompleted


@dataclass
class _ResultState:
    spec: ArraySpec
    sink: Sink
    seqs: set[int] = field(default_factory=set)
    nbytes: int = 0
    done: bool = False


class StreamReceiver:
    """Receives the result stream of one execution from a PULL socket into sinks.

    Parameters
    ----------
    socket:
        A ``zmq.PULL`` socket the stream arrives on. Not owned, never closed.
    exec_id:
        Only messages of this execution are accepted; others raise
        :class:`ProtocolError`.
    sink_for:
        Called once per declared result with its :class:`sinks.ArraySpec`;
        returns the (unopened) sink to write it into.
    timeout:
        Seconds to wait for each next message before
        :class:`ZmqTimeoutError`; None waits forever. Sinks are left open
        after a timeout so the caller may call :meth:`abort` or keep waiting.
    on_chunk:
        Called with a chunk's payload size in bytes after it is written, for
        flow-control credits or progress.
    arena:
        The server's arena for this stream, when the client could open it;
        chunks that reference it are read from it. None: every payload must
        arrive in its message.

    A protocol error, a failed or cancelled execution aborts every unfinished
    sink (keeping what they committed) before the exception propagates.
    Not thread safe.
    """

    def __init__(
        self,
        socket: zmq.Socket[Any],
        exec_id: str,
        sink_for: Callable[[ArraySpec], Sink],
        *,
        timeout: float | None = None,
        on_chunk: Callable[[int], None] | None = None,
        arena: ArenaReader | None = None,
    ) -> None:
        self._socket = socket
        self._arena = arena
        self.exec_id = exec_id
        self._sink_for = sink_for
        self.timeout = timeout
        self._on_chunk = on_chunk
        self._results: dict[str, _ResultState] = {}
        self._scratch: npt.NDArray[np.uint8] = np.empty(0, np.uint8)
        self._finished = False

    def run(self) -> dict[str, Any]:
        """Receive until the stream ends; return each result's finalized sink value by name."""
        values: dict[str, Any] = {}
        for event in self.events():
            if isinstance(event, ResultCompleted):
                values[event.name] = event.value
        return values

    def events(self) -> Iterator[StreamEvent]:
        """Receive the stream, yielding an event after each declaration, chunk and completion.

        The iterator stops after the stream's end message. It raises
        :class:`RemoteError` for a failed execution and
        :class:`ExecutionCancelledError` for a cancelled one.
        """
        while not self._finished:
            frame = self._recv_frame()
            try:
                message = decode_message(frame)
                event = self._dispatch(message)
            except ProtocolError as exc:
                self._drain_rest()
                self.abort(str(exc))
                raise
            if event is not None:
                yield event

    def abort(self, reason: str) -> None:
        """Abort every result not yet completed; committed data stays in its sink."""
        for name, state in self._results.items():
            if state.done:
                continue
            state.done = True
            try:
                state.sink.abort(reason)
            except Exception as exc:
                # One sink that fails to abort must not leave the others open.
                logger.warning(
                    "aborting result %r of execution %s failed: %s", name, self.exec_id, exc
                )
        self._finished = True

    def _dispatch(self, message: Any) -> StreamEvent | None:
        if message.exec_id != self.exec_id:
            raise ProtocolError(
                f"received a message of execution {message.exec_id!r} on the stream of "
                f"execution {self.exec_id!r}; each execution needs its own data socket"
            )
        if isinstance(message, ChunkHeader):
            return self._receive_chunk(message)

        self._expect_no_more_frames(message)
        if isinstance(message, ResultDeclaration):
            return self._declare(message)
        if isinstance(message, ResultEnd):
            return self._end_result(message)
        assert isinstance(message, StreamEnd)
        self._end_stream(message)
        return None

    def _declare(self, declaration: ResultDeclaration) -> ResultDeclared:
        if declaration.name in self._results:
            raise ProtocolError(
                f"result {declaration.name!r} of execution {self.exec_id} is declared twice"
            )
        spec = declaration.to_spec()
        sink = self._sink_for(spec)
        sink.open(spec)
        self._results[declaration.name] = _ResultState(spec, sink)
        logger.debug(
            "execution %s: result %r declared, shape %s", self.exec_id, spec.name, spec.shape
        )
        return ResultDeclared(spec)

    def _receive_chunk(self, header: ChunkHeader) -> ChunkReceived:
        if not self._socket.getsockopt(zmq.RCVMORE):
            raise FrameCountError(
                f"chunk {header.seq} of result {header.name!r} arrived as 1 frame, "
                "expected 2 (header and payload)"
            )
        state = self._checked_state(header)
        region = header.region

        if self._arena is not None:
            self._receive_with_arena(state, header, region, self._arena)
        elif header.encoding is None:
            self._receive_raw(state, header, region)
        else:
            self._receive_compressed(state, header, region)

        state.seqs.add(header.seq)
        state.nbytes += header.nbytes
        if self._on_chunk is not None:
            self._on_chunk(header.cbytes)
        return ChunkReceived(header.name, header.seq, region, header.nbytes, header.cbytes)

    def _checked_state(self, header: ChunkHeader) -> _ResultState:
        state = self._results.get(header.name)
        if state is None:
            raise UndeclaredResultError(
                f"chunk {header.seq} names result {header.name!r}, which execution "
                f"{self.exec_id} never declared; declared results: {sorted(self._results)}"
            )
        if state.done:
            raise ProtocolError(
                f"chunk {header.seq} of result {header.name!r} arrived after its end"
            )
        if header.seq in state.seqs:
            raise DuplicateChunkError(
                f"chunk sequence number {header.seq} of result {header.name!r} arrived twice; "
                "each chunk must have a distinct sequence number"
            )

        _check_region(header, state.spec)
        expected = header.region.size * state.spec.dtype.itemsize
        if header.nbytes != expected:
            raise PayloadSizeError(
                f"chunk {header.seq} of result {header.name!r} states {header.nbytes} bytes, "
                f"but its region {header.region.shape} of {state.spec.dtype} holds {expected}"
            )
        return state

    def _receive_raw(self, state: _ResultState, header: ChunkHeader, region: Region) -> None:
        if state.sink.takes_ownership:
            self._receive_owned(state, header, region)
            return
        dest = state.sink.destination(region)
        target = dest if dest is not None and dest.flags.c_contiguous else None
        buffer = byte_view(target) if target is not None else self._scratch_bytes(header.nbytes)

        # NOTE: a payload of the wrong size is copied into the destination
        # before this check rejects it. The region stays uncommitted, but a
        # memory sink's array keeps those bytes.
        received = self._recv_into(buffer)
        if received != header.nbytes:
            raise PayloadSizeError(
                f"payload of chunk {header.seq} of result {header.name!r} has {received} bytes, "
                f"its header states {header.nbytes}"
            )
        self._expect_no_more_frames(header)
        self._store(state, region, dest, target, buffer)

    def _receive_owned(self, state: _ResultState, header: ChunkHeader, region: Region) -> None:
        """Hand the received frame itself to the sink: libzmq's buffer is never reused."""
        payload = self._recv_checked_payload(header, header.nbytes)
        block = np.frombuffer(payload, np.uint8).view(state.spec.dtype).reshape(region.shape)
        state.sink.write_owned(region, block)

    def _receive_with_arena(
        self, state: _ResultState, header: ChunkHeader, region: Region, arena: ArenaReader
    ) -> None:
        """Receive a chunk whose payload is either its second frame or in the arena."""
        frame = self._recv_payload_frame()
        expected = header.nbytes if header.encoding is None else header.cbytes
        # Three frames with the marker in the middle mean a reference; a
        # payload that happens to equal the marker comes as two frames.
        if not (self._socket.getsockopt(zmq.RCVMORE) and is_marker(frame)):
            payload = self._checked_payload(header, frame, expected)
            self._store_payload(state, header, region, payload)
            return

        ref = self._recv_payload_frame()
        self._expect_no_more_frames(header)
        if header.encoding is None and not state.sink.takes_ownership:
            dest = state.sink.destination(region)
            if dest is not None and dest.flags.c_contiguous:
                arena.read_into(ref, memoryview(cast(Any, byte_view(dest))))
                state.sink.commit(region)
                return
        self._store_payload(state, header, region, arena.view(ref, expected))

    def _store_payload(
        self, state: _ResultState, header: ChunkHeader, region: Region, payload: memoryview
    ) -> None:
        """Store a payload the sink may keep: it is never reused by the receiver."""
        if header.encoding is not None:
            self._store_compressed(state, header, region, payload)
            return
        block = np.frombuffer(payload, np.uint8).view(state.spec.dtype).reshape(region.shape)
        if state.sink.takes_ownership:
            state.sink.write_owned(region, block)
            return
        dest = state.sink.destination(region)
        if dest is not None:
            np.copyto(dest, block)
            state.sink.commit(region)
        else:
            state.sink.write(region, block)

    def _receive_compressed(self, state: _ResultState, header: ChunkHeader, region: Region) -> None:
        assert header.encoding is not None
        payload = self._recv_checked_payload(header, header.cbytes)
        self._store_compressed(state, header, region, payload)

    def _store_compressed(
        self, state: _ResultState, header: ChunkHeader, region: Region, payload: memoryview
    ) -> None:
        assert header.encoding is not None
        sink = state.sink
        stored = (
            sink.write_encoded(region, payload, header.encoding, owned=True)
            if sink.takes_ownership
            else sink.write_encoded(region, payload, header.encoding)
        )
        if stored:
            return
        dest = state.sink.destination(region)
        target = dest if dest is not None and dest.flags.c_contiguous else None
        buffer = byte_view(target) if target is not None else self._scratch_bytes(header.nbytes)
        decompress_into(payload, header.encoding, header.nbytes, memoryview(cast(Any, buffer)))
        self._store(state, region, dest, target, buffer)

    def _recv_checked_payload(self, header: ChunkHeader, expected: int) -> memoryview:
        """Receive a chunk's payload frame without copying and check its length."""
        return self._checked_payload(header, self._recv_payload_frame(), expected)

    def _checked_payload(self, header: ChunkHeader, frame: zmq.Frame, expected: int) -> memoryview:
        payload = memoryview(frame.buffer)
        if len(payload) != expected:
            raise PayloadSizeError(
                f"payload of chunk {header.seq} of result {header.name!r} has {len(payload)} "
                f"bytes, its header states {expected}"
            )
        self._expect_no_more_frames(header)
        return payload

    def _store(
        self,
        state: _ResultState,
        region: Region,
        dest: npt.NDArray[Any] | None,
        target: npt.NDArray[Any] | None,
        buffer: npt.NDArray[np.uint8],
    ) -> None:
        if target is not None:
            state.sink.commit(region)
            return
        block = buffer.view(state.spec.dtype).reshape(region.shape)
        if dest is not None:
            np.copyto(dest, block)
            state.sink.commit(region)
        else:
            state.sink.write(region, block)

    def _end_result(self, end: ResultEnd) -> ResultCompleted:
        state = self._results.get(end.name)
        if state is None:
            raise UndeclaredResultError(
                f"end of result {end.name!r}, which execution {self.exec_id} never declared"
            )
        missing = end.chunks - len(state.seqs)
        if missing > 0 or state.nbytes != end.nbytes:
            raise IncompleteResultError(
                f"result {end.name!r} of execution {self.exec_id} ended with {len(state.seqs)} "
                f"of {end.chunks} chunks and {state.nbytes} of {end.nbytes} bytes; "
                "fetch the result again"
            )
        value = state.sink.finalize(end.shape)
        state.done = True
        logger.debug(
            "execution %s: result %r complete, %d bytes", self.exec_id, end.name, end.nbytes
        )
        return ResultCompleted(end.name, value)

    def _end_stream(self, end: StreamEnd) -> None:
        self._finished = True
        if end.status == "completed":
            unfinished = sorted(name for name, s in self._results.items() if not s.done)
            if unfinished:
                self.abort("stream ended before these results ended")
                raise IncompleteResultError(
                    f"execution {self.exec_id} completed but results {unfinished} never "
                    "received their end message"
                )
            return

        error = dict(end.error or {})
        message = error.get("message")
        self.abort(f"execution {end.status}: {message}" if message else f"execution {end.status}")
        if end.status == "cancelled":
            raise ExecutionCancelledError(f"execution {self.exec_id} was cancelled")
        raise RemoteError(
            error.get("type", "Error"), error.get("message", ""), error.get("traceback", "")
        )

    def _scratch_bytes(self, nbytes: int) -> npt.NDArray[np.uint8]:
        if self._scratch.nbytes < nbytes:
            self._scratch = np.empty(nbytes, np.uint8)
        return self._scratch[:nbytes]

    def _expect_no_more_frames(self, message: Any) -> None:
        if self._socket.getsockopt(zmq.RCVMORE):
            extra = self._drain_rest()
            raise FrameCountError(
                f"{type(message).__name__} message carried {extra} unexpected extra frame(s); "
                "a chunk has exactly 2 frames, every other message 1"
            )

    def _drain_rest(self) -> int:
        count = 0
        while self._socket.getsockopt(zmq.RCVMORE):
            self._socket.recv(copy=False)
            count += 1
        return count

    def _wait_readable(self) -> None:
        if self.timeout is None:
            return
        if not self._socket.poll(int(self.timeout * 1000), zmq.POLLIN):
            raise ZmqTimeoutError(
                f"no message of execution {self.exec_id}'s stream arrived on "
                f"{endpoint_of(self._socket)} within {self.timeout} s"
            )

    def _recv_frame(self) -> bytes:
        self._wait_readable()
        try:
            frame: bytes = self._socket.recv()
        except zmq.ZMQError as exc:
            raise self._transport_error(exc) from exc
        return frame

    def _recv_payload_frame(self) -> zmq.Frame:
        try:
            frame: zmq.Frame = self._socket.recv(copy=False)
        except zmq.ZMQError as exc:
            raise self._transport_error(exc) from exc
        return frame

    def _recv_into(self, buffer: npt.NDArray[np.uint8]) -> int:
        try:
            return int(self._socket.recv_into(cast(Any, buffer)))
        except zmq.ZMQError as exc:
            raise self._transport_error(exc) from exc

    def _transport_error(self, exc: zmq.ZMQError) -> TransportError:
        return TransportError(
            f"receiving execution {self.exec_id}'s stream on {endpoint_of(self._socket)} "
            f"failed: {exc}"
        )


def _check_region(header: ChunkHeader, spec: ArraySpec) -> None:
    if len(header.start) != len(spec.shape) or len(header.stop) != len(spec.shape):
        raise RegionError(
            f"chunk {header.seq} of result {header.name!r} has a region with "
            f"{len(header.start)} axes, the result has {len(spec.shape)} (shape {spec.shape})"
        )
    for axis, (lo, hi, length) in enumerate(
        zip(header.start, header.stop, spec.shape, strict=True)
    ):
        if hi < lo or (length is not None and hi > length):
            raise RegionError(
                f"chunk {header.seq} of result {header.name!r} covers start {header.start} "
                f"stop {header.stop}, outside the declared shape {spec.shape} on axis {axis}"
            )

"""The server's ingest thread: receive worker streams and retain them.

Every worker connects a PUSH socket to the server's one PULL socket. This
thread decodes each message's header, updates the execution's progress and
result summary, and appends the message to the execution's retained stream.
Payloads are kept as the received ZeroMQ frames (no copy) until spilled. A
chunk whose payload the worker put in the execution's arena arrives as
``[header, ARENA_MARKER, ref]`` and is retained as that reference.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING, Any

import zmq

from ._arena import is_marker
from ._errors import ProtocolError
from ._priority import lower_current_thread
from ._retention import RetainedStream, RetentionStore
from ._wire import ChunkHeader, ResultDeclaration, ResultEnd, StreamEnd, decode_message

if TYPE_CHECKING:
    from ._server import ExecutionServer

__all__ = ["Ingest"]

logger = logging.getLogger(__name__)

# Malformed messages logged per ingest thread before the log goes quiet (the
# count is still kept); a broken worker can send thousands.
_MAX_LOGGED_DROPS = 20

# Messages received back to back before the thread checks for a stop request.
_MAX_BATCH = 64


class Ingest:
    """Owns the server's PULL socket in a thread; see the module docstring."""

    def __init__(
        self,
        context: zmq.Context[Any],
        socket: zmq.Socket[Any],
        retention: RetentionStore,
        server: ExecutionServer,
    ) -> None:
        self._socket = socket
        self._retention = retention
        self._server = server
        self._stop = threading.Event()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="zmqruntime-ingest", daemon=True)

    def start(self) -> None:
        """Start the thread; the socket belongs to it from now on."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the socket."""
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        lower_current_thread(self._server.config.data_nice)
        try:
            while not self._stop.is_set():
                if not self._socket.poll(100, zmq.POLLIN):
                    continue
                # Drain what is queued without a poll per message. The bound
                # lets the thread notice a stop request while workers keep sending.
                for _ in range(_MAX_BATCH):
                    try:
                        frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._ingest(frames)
        finally:
            self._socket.close(linger=0)

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        if self.dropped <= _MAX_LOGGED_DROPS:
            logger.warning("dropped a data message (%d so far): %s", self.dropped, reason)

    def _ingest(self, frames: list[zmq.Frame]) -> None:
        header = frames[0].bytes
        try:
            message = decode_message(header)
        except ProtocolError as exc:
            self._drop(str(exc))
            return
        is_chunk = isinstance(message, ChunkHeader)
        by_ref = is_chunk and len(frames) == 3 and is_marker(frames[1])
        if len(frames) != (2 if is_chunk else 1) and not by_ref:
            self._drop(
                f"{type(message).__name__} of execution {message.exec_id} arrived "
                f"as {len(frames)} frames"
            )
            return

        stream = self._retention.get(message.exec_id)
        if stream is None:
            self._drop(f"execution {message.exec_id} is unknown or released")
            if isinstance(message, StreamEnd):
                # The worker waits for this acknowledgement before it exits,
                # and its worker slot stays busy until then.
                self._server.acknowledge_stream(message.exec_id)
            return

        if isinstance(message, StreamEnd):
            with self._server.lock:
                # A cancelled stream is sealed by the server itself.
                active = self._server.execution(message.exec_id) is not None and not stream.cut
                if active and stream.seal(header, by_worker=True):
                    self._server.on_stream_end(message)
            # Nothing follows a stream end, so the worker may exit whatever
            # became of it. Outside the server's lock: the executor takes its own.
            self._server.acknowledge_stream(message.exec_id)
            return

        # The append runs without the server's lock: a spilled payload is
        # written to disk, and status requests must not wait for that.
        if stream.cut:
            return  # cancelled: the rest of its stream is discarded
        if by_ref:
            assert isinstance(message, ChunkHeader)
            span = self._arena_span(stream, message, frames[2])
            if span is None or not stream.append(header, arena_span=span):
                return
        elif not stream.append(header, frames[1].buffer if is_chunk else None):
            return
        with self._server.lock:
            record = self._server.execution(message.exec_id)
            if record is not None:
                _summarize(record, message)

    def _arena_span(
        self, stream: RetainedStream, message: ChunkHeader, ref: zmq.Frame
    ) -> tuple[int, int] | None:
        arena = stream.arena
        if arena is None:
            self._drop(f"execution {message.exec_id} sent an arena reference but has no arena")
            return None
        try:
            return arena.check(ref, message.cbytes)
        except (ProtocolError, KeyError) as exc:
            self._drop(f"chunk {message.seq} of result {message.name!r}: {exc}")
            return None


def _summarize(record: Any, message: Any) -> None:
    # Caller holds the server lock.
    if isinstance(message, ChunkHeader):
        record.chunks_done += 1
        record.bytes_done += message.nbytes
        info = record.results.get(message.name)
        if info is not None:
            info["chunks_done"] += 1
            info["bytes_done"] += message.nbytes
    elif isinstance(message, ResultDeclaration):
        record.results[message.name] = _declared_summary(message)
    elif isinstance(message, ResultEnd):
        info = record.results.get(message.name)
        if info is not None:
            info.update(
                shape=list(message.shape),
                chunks_total=message.chunks,
                bytes_total=message.nbytes,
                bytes=message.nbytes,
                complete=info["chunks_done"] == message.chunks,
            )


def _declared_summary(message: ResultDeclaration) -> dict[str, Any]:
    shape = list(message.shape)
    sizes = [n for n in shape if n is not None]
    bytes_total: int | None = None
    chunks_total: int | None = None
    if len(sizes) == len(shape):
        bytes_total = math.prod(sizes) * message.dtype.itemsize
        # Ceiling division per axis: edge chunks count as whole chunks.
        per_axis = [-(-n // c) if c else 0 for n, c in zip(sizes, message.chunks, strict=True)]
        chunks_total = math.prod(per_axis)
    return {
        "name": message.name,
        "shape": shape,
        "dtype": message.dtype.str if message.dtype.fields is None else str(message.dtype),
        "chunks": list(message.chunks),
        "bytes": bytes_total,
        "bytes_total": bytes_total,
        "chunks_total": chunks_total,
        "chunks_done": 0,
        "bytes_done": 0,
        "complete": False,
    }

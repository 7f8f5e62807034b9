"""Sending side of a result stream: declare results, send chunks, close.

Buffer ownership
----------------
Chunks whose bytes are C-contiguous in the caller's array are sent without a
copy: the payload frame points into the caller's memory until libzmq has
handed it to the kernel. :meth:`ResultWriter.write` and
:meth:`ResultStream.send_array` therefore wait on pyzmq's message trackers
before they return, so the caller may refill or free its buffer as soon as
the call returns. Non-contiguous chunks (Fortran order, strided views) are
copied once into a C-ordered buffer that the message owns; compressed chunks
are new buffers too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import zmq

from sinks import ChunkEncoding, Region

from ._arena import ARENA_MARKER, MIN_ARENA_PAYLOAD, ArenaWriter
from ._chunking import DEFAULT_CHUNK_BYTES, default_chunks, regions_within, validate_chunks
from ._compression import (
    Compression,
    as_compression,
    compress_chunk,
    sample_pays_off,
)
from ._dtypes import byte_view, check_sendable
from ._errors import (
    ChunkingError,
    ClosedError,
    IncompleteResultError,
    TransportError,
    ZmqTimeoutError,
)
from ._wire import (
    ChunkHeader,
    Message,
    ResultDeclaration,
    ResultEnd,
    StreamEnd,
    encode_message,
)
from ._zmqutil import endpoint_of

__all__ = ["ResultStream", "ResultWriter", "encode_chunk"]

logger = logging.getLogger(__name__)

# "auto" compression samples the first chunk of a result and then every this
# many chunks, so a change in the data (a blank plate region, say) is seen.
_AUTO_RESAMPLE_CHUNKS = 64

_LOCAL_PREFIXES = ("ipc://", "inproc://", "tcp://127.", "tcp://localhost", "tcp://[::1]")


class ResultStream:
    """Sends the results of one execution over a PUSH socket.

    Parameters
    ----------
    socket:
        A connected or bound ``zmq.PUSH`` socket. The stream does not own it
        and never closes it.
    exec_id:
        The execution id written into every header.
    compression:
        None, ``"blosc2"``, ``"blosc1"``, ``"auto"`` or a :class:`Compression`.
    chunk_bytes:
        Target chunk size for default chunking, in bytes.
    timeout:
        Seconds a send, or the wait for libzmq to release a zero-copy buffer,
        may block before :class:`ZmqTimeoutError`; None waits forever. After a
        timeout, a buffer that was being sent may still be referenced by
        libzmq: do not reuse it.
    arena:
        A worker's shared-memory arena (see ``_arena``): payloads of at least
        :data:`MIN_ARENA_PAYLOAD` bytes are copied into it and only a
        reference is sent. For a server's workers only; None sends every payload.

    Not thread safe: use a stream, and its socket, from one thread.
    """

    def __init__(
        self,
        socket: zmq.Socket[Any],
        exec_id: str,
        *,
        compression: Compression | str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
        arena: ArenaWriter | None = None,
    ) -> None:
        self._socket = socket
        self._arena = arena
        self.exec_id = exec_id
        self.endpoint = endpoint_of(socket)
        local = self.endpoint.startswith(_LOCAL_PREFIXES)
        self.compression = as_compression(compression).for_link(local)
        self.chunk_bytes = chunk_bytes
        self.timeout = timeout
        self._writers: dict[str, ResultWriter] = {}
        self._closed = False

    def declare(
        self,
        name: str,
        shape: Sequence[int | None],
        dtype: npt.DTypeLike,
        *,
        chunks: Sequence[int] | None = None,
        attrs: Mapping[str, Any] | None = None,
        group_frames: bool = False,
    ) -> ResultWriter:
        """Declare a result and return the writer for its chunks.

        ``shape[0]`` may be None for a result whose length along axis 0 is
        unknown; the writer's :meth:`ResultWriter.append` then extends it. The
        default chunk grid puts one frame along axis 0 per chunk (or row
        bands of a large frame), matching a producer that writes frame by frame.
        """
        self._check_open()
        if name in self._writers:
            raise ValueError(f"result {name!r} is already declared in execution {self.exec_id}")

        dtype = np.dtype(dtype)
        check_sendable(dtype)
        shape_t = tuple(None if n is None else int(n) for n in shape)
        if any(n is None for n in shape_t[1:]) or any(n is not None and n < 0 for n in shape_t):
            raise ValueError(
                f"shape {shape_t} is invalid: only the first axis may be None (unknown "
                "length) and lengths must be >= 0"
            )

        if chunks is None:
            chunk_t = default_chunks(
                shape_t, dtype.itemsize, target_bytes=self.chunk_bytes, group_frames=group_frames
            )
        else:
            chunk_t = tuple(int(c) for c in chunks)
        validate_chunks(shape_t, chunk_t, dtype.itemsize)

        declaration = ResultDeclaration(
            self.exec_id, name, shape_t, dtype, chunk_t, dict(attrs or {})
        )
        self._send_single(declaration)
        writer = ResultWriter(self, declaration)
        self._writers[name] = writer
        return writer

    def send_array(
        self,
        name: str,
        array: npt.ArrayLike,
        *,
        chunks: Sequence[int] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Declare, send and end one whole result.

        Small frames are grouped into chunks of about ``chunk_bytes``. Returns
        once libzmq no longer references ``array``.
        """
        data = np.asarray(array)
        writer = self.declare(
            name, data.shape, data.dtype, chunks=chunks, attrs=attrs, group_frames=True
        )
        writer.write((0,) * data.ndim, data)
        writer.end()

    def end_results(self) -> None:
        """End every open result; raises :class:`IncompleteResultError` for a partial one."""
        for writer in self._writers.values():
            writer.end()

    def close(self, status: str = "completed", error: Mapping[str, str] | None = None) -> None:
        """End every open result and send the stream's end; later calls do nothing."""
        if self._closed:
            return
        if status == "completed":
            self.end_results()
        self._send_single(StreamEnd(self.exec_id, status, dict(error) if error else None))
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"result stream of execution {self.exec_id} is closed")

    def _send_single(self, message: Message) -> None:
        self._guarded(self._socket.send, encode_message(message))

    def send_chunk(
        self, header: ChunkHeader, payload: Any, *, zero_copy: bool
    ) -> zmq.MessageTracker | None:
        """Send one chunk message; return its tracker when ``payload`` is the caller's memory."""
        self._check_open()
        ref = None
        if self._arena is not None and memoryview(payload).nbytes >= MIN_ARENA_PAYLOAD:
            ref = self._arena.put(payload)
        self._guarded(self._socket.send, encode_message(header), zmq.SNDMORE)
        if ref is not None:
            # The arena contains a copy, so the caller's buffer is free at once.
            self._guarded(self._socket.send, ARENA_MARKER, zmq.SNDMORE)
            self._guarded(self._socket.send, ref)
            return None
        if not zero_copy:
            self._guarded(self._socket.send, payload, copy=False)
            return None
        tracker: zmq.MessageTracker = self._guarded(
            self._socket.send, payload, copy=False, track=True
        )
        return tracker

    def wait_released(self, trackers: list[zmq.MessageTracker]) -> None:
        """Block until libzmq has released every tracked zero-copy buffer."""
        # pyzmq's MessageTracker.wait takes -1, not None, for no timeout.
        timeout = -1 if self.timeout is None else self.timeout
        for tracker in trackers:
            try:
                tracker.wait(timeout)
            except zmq.NotDone as exc:
                raise ZmqTimeoutError(
                    f"timed out after {self.timeout} s waiting for libzmq to release a chunk of "
                    f"execution {self.exec_id} sent to {self.endpoint}; check that the receiver "
                    "is running. libzmq may still read the buffer, so do not reuse it"
                ) from exc

    def _guarded(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        # Sets the send timeout per call so a caller may change self.timeout.
        timeout_ms = -1 if self.timeout is None else int(self.timeout * 1000)
        try:
            self._socket.setsockopt(zmq.SNDTIMEO, timeout_ms)
            return call(*args, **kwargs)
        except zmq.Again as exc:
            raise ZmqTimeoutError(
                f"sending execution {self.exec_id}'s stream to {self.endpoint} timed out "
                f"after {self.timeout} s; the receiver is gone or not reading"
            ) from exc
        except zmq.ZMQError as exc:
            raise TransportError(
                f"sending execution {self.exec_id}'s stream to {self.endpoint} failed: {exc}"
            ) from exc


class ResultWriter:
    """Writes the chunks of one declared result; made by :meth:`ResultStream.declare`."""

    def __init__(self, stream: ResultStream, declaration: ResultDeclaration) -> None:
        self._stream = stream
        self.declaration = declaration
        self.name = declaration.name
        self.dtype = declaration.dtype
        self.chunks = declaration.chunks
        self._seq = 0
        self._nbytes = 0
        self._extent0 = 0
        self._ended = False
        self._auto_compress = False

    @property
    def shape(self) -> tuple[int | None, ...]:
        """The declared shape (first entry None when the length is open)."""
        return self.declaration.shape

    def write(self, start: int | Sequence[int], data: npt.ArrayLike) -> None:
        """Send ``data`` as the region that begins at ``start``.

        ``start`` is an offset along axis 0, or one offset per axis. With an
        int ``start``, ``data`` may also be one frame without the leading axis
        (``writer.write(i, image)``). The region must consist of whole cells of
        the chunk grid (edge cells included). Returns once ``data``'s buffer may
        be reused.
        """
        if self._ended:
            raise ClosedError(f"result {self.name!r} of execution {self._stream.exec_id} is ended")
        array = np.asarray(data)
        if isinstance(start, (int, np.integer)) and array.ndim == len(self.shape) - 1:
            array = array[np.newaxis]
        array = self._checked_array(array)
        region = self._region_for(start, array.shape)

        trackers = []
        for cell in regions_within(region, self.shape, self.chunks):
            local = tuple(
                slice(lo - o, hi - o)
                for lo, hi, o in zip(cell.start, cell.stop, region.start, strict=True)
            )
            # Indexing a 0-d array with () yields a scalar, which loses the dtype's width.
            block = array[local] if local else array[...]
            tracker = self._send_cell(cell, block)
            if tracker is not None:
                trackers.append(tracker)

        if region.stop:
            self._extent0 = max(self._extent0, region.stop[0])
        self._stream.wait_released(trackers)

    def append(self, data: npt.ArrayLike) -> None:
        """Write ``data`` after the last frame written so far along axis 0."""
        self.write(self._extent0, data)

    def end(self) -> None:
        """Send this result's totals; later calls do nothing.

        Raises :class:`IncompleteResultError`, sending nothing, when the
        regions written do not cover the whole result: its declared shape, or
        for an open length the rows up to the furthest one written. Otherwise
        a receiver would report a result with unwritten parts as complete.
        """
        if self._ended:
            return
        shape = tuple(self._extent0 if n is None else n for n in self.shape)
        expected = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        if self._nbytes != expected:
            raise IncompleteResultError(
                f"result {self.name!r} of execution {self._stream.exec_id} ends with "
                f"{self._nbytes} of its {expected} bytes written (shape {shape}); write "
                "every region before the pipeline returns"
            )
        self._stream._send_single(
            ResultEnd(self._stream.exec_id, self.name, self._seq, self._nbytes, shape)
        )
        self._ended = True

    def _checked_array(self, data: npt.ArrayLike) -> npt.NDArray[Any]:
        array = np.asarray(data)
        if array.dtype != self.dtype:
            raise TypeError(
                f"result {self.name!r} is declared as {self.dtype!r} but the data is "
                f"{array.dtype!r}; convert it with .astype({self.dtype.str!r})"
            )
        if array.ndim != len(self.shape):
            raise ValueError(
                f"result {self.name!r} has {len(self.shape)} axes but the data has "
                f"shape {array.shape}"
            )
        return array

    def _region_for(self, start: int | Sequence[int], extent: tuple[int, ...]) -> Region:
        if isinstance(start, (int, np.integer)):
            start_t = (int(start),) + (0,) * (len(extent) - 1) if extent else ()
        else:
            start_t = tuple(int(s) for s in start)
        stop_t = tuple(s + n for s, n in zip(start_t, extent, strict=True))

        for axis, (hi, length) in enumerate(zip(stop_t, self.shape, strict=True)):
            if length is not None and hi > length:
                raise ChunkingError(
                    f"data of shape {extent} at start {start_t} ends at {hi} on axis {axis}, "
                    f"outside result {self.name!r} of shape {self.shape}"
                )
        return Region(start_t, stop_t)

    def _send_cell(self, cell: Region, block: npt.NDArray[Any]) -> zmq.MessageTracker | None:
        zero_copy = bool(block.flags.c_contiguous)
        if not zero_copy:
            block = np.ascontiguousarray(block)
        raw = memoryview(cast(Any, byte_view(block)))

        payload: Any = raw
        encoding: ChunkEncoding | None = None
        fmt = self._format_for(raw)
        if fmt is not None:
            payload, encoding = compress_chunk(
                raw, self.dtype.itemsize, self._stream.compression, fmt
            )
            zero_copy = False

        header = ChunkHeader(
            self._stream.exec_id,
            self.name,
            self._seq,
            cell.start,
            cell.stop,
            len(raw),
            encoding,
            len(payload),
        )
        tracker = self._stream.send_chunk(header, payload, zero_copy=zero_copy)
        self._seq += 1
        self._nbytes += len(raw)
        return tracker

    def _format_for(self, raw: memoryview) -> str | None:
        compression = self._stream.compression
        if compression.mode == "none" or len(raw) == 0:
            return None
        if compression.mode != "auto":
            return compression.mode

        if self._seq % _AUTO_RESAMPLE_CHUNKS == 0:
            self._auto_compress = sample_pays_off(raw, self.dtype.itemsize, compression)
        return "blosc2" if self._auto_compress else None


def encode_chunk(
    header: ChunkHeader, payload: Any, compression: Compression, itemsize: int
) -> tuple[ChunkHeader, Any]:
    """Compress a raw chunk for a receiver that asked for ``compression``.

    Returns the header and payload to send; both are the inputs unchanged when
    the chunk is already encoded or ``compression.mode`` is ``"none"``.
    ``"auto"`` decides per chunk from a sample.
    """
    if header.encoding is not None or compression.mode == "none" or header.nbytes == 0:
        return header, payload

    raw = memoryview(payload).cast("B")
    fmt = compression.mode
    if fmt == "auto":
        if not sample_pays_off(raw, itemsize, compression):
            return header, payload
        fmt = "blosc2"

    compressed, encoding = compress_chunk(raw, itemsize, compression, fmt)
    return replace(header, encoding=encoding, cbytes=len(compressed)), compressed

"""Server side of one fetch: replay a retained stream to one client with a byte window.

Each fetch gets its own pair of sockets, bound by the server on random ports:
a PUSH socket for the data (the client connects a PULL socket) and a PULL
socket for credits (the client connects a PUSH socket). Only the client that
asked learns the endpoints, so results go only to it.

Flow control: the transfer sends a chunk only while the payload bytes sent but
not yet credited stay within ``window_bytes`` (a chunk larger than the window
goes alone). The client credits each chunk's bytes after its sink stored it,
so a slow sink slows the transfer and both ends hold at most a window of
bytes, beyond the one chunk being written. ZeroMQ's high-water mark counts
messages, not bytes, so it alone cannot give this bound.

Credit messages are packed maps: ``{"v": 1, "credit": nbytes}`` and, after the
stream end, ``{"v": 1, "done": True}``.

Arena references: when the client asked for them and the stream has an arena,
the transfer waits for the client's first credit message, ``{"v": 1, "arena":
bool}``, saying whether it could open the arena. If it could, chunks whose
payload is in the arena go as ``[header, ARENA_MARKER, ref]`` and the client
reads the bytes itself; the window then counts the bytes it has yet to copy.
With ``compression="auto"`` such chunks go raw, since no link carries them.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import zmq

from ._arena import ARENA_MARKER, pack_ref
from ._compression import Compression
from ._control import CONTROL_PROTOCOL_VERSION, pack_value, unpack_value
from ._errors import HeaderDecodeError
from ._priority import lower_current_thread
from ._retention import Record, RetainedStream
from ._sender import encode_chunk
from ._wire import ChunkHeader, ResultDeclaration, decode_message, encode_message

__all__ = ["Transfer", "pack_arena_reply", "pack_credit", "pack_done"]

logger = logging.getLogger(__name__)

# Messages the data socket queues (SNDHWM). The byte window is the real bound;
# this only stops libzmq from queueing many small messages. Arbitrary.
_DATA_SNDHWM = 8

# How often a waiting transfer checks for stop requests, in seconds.
_TICK = 0.1

_transfer_ids = itertools.count(1)


def pack_credit(nbytes: int) -> bytes:
    """Encode a credit for ``nbytes`` payload bytes the client has stored."""
    return pack_value({"v": CONTROL_PROTOCOL_VERSION, "credit": nbytes})


def pack_arena_reply(opened: bool) -> bytes:
    """Encode the client's reply to an arena offer: whether it opened the arena."""
    return pack_value({"v": CONTROL_PROTOCOL_VERSION, "arena": opened})


def pack_done() -> bytes:
    """Encode the client's acknowledgement that it received the stream end."""
    return pack_value({"v": CONTROL_PROTOCOL_VERSION, "done": True})


def pack_closed() -> bytes:
    """Encode the client's notice that it stopped reading before the stream end."""
    return pack_value({"v": CONTROL_PROTOCOL_VERSION, "closed": True})


class Transfer:
    """Streams one retained stream to one client in its own thread.

    Parameters
    ----------
    context:
        The server's ZeroMQ context; the transfer creates and owns two sockets.
    stream:
        The retained stream to replay and follow.
    bind_base:
        ``"tcp://127.0.0.1"`` (random ports) or an ipc path prefix.
    window_bytes:
        Maximum payload bytes sent and not yet credited.
    timeout:
        Seconds without progress (client not connecting, no credit) before the
        transfer gives up and closes its sockets.
    names:
        Results to send; None sends all.
    compression:
        Recompress raw chunks for this client, or None to send them as stored.
    on_done:
        Called with the transfer once its thread ends, whatever the reason.
    nice:
        Nice increment of the transfer's thread, so control requests run
        first on a saturated machine (Linux only); 0 keeps the creator's.
    offer_arena:
        The client requested arena references. They are used only if the
        stream has an arena and the client's first message reports that it opened it.
    """

    def __init__(
        self,
        context: zmq.Context[Any],
        stream: RetainedStream,
        *,
        bind_base: str,
        window_bytes: int,
        timeout: float,
        names: Collection[str] | None = None,
        compression: Compression | None = None,
        on_done: Callable[[Transfer], None] | None = None,
        nice: int = 0,
        offer_arena: bool = False,
    ) -> None:
        self.transfer_id = next(_transfer_ids)
        self.stream = stream
        self.window_bytes = max(1, window_bytes)
        self.timeout = timeout
        self.max_in_flight = 0
        self.arena_chunks = 0
        self.outcome = "running"
        self._names = None if names is None else frozenset(names)
        self._compression = compression
        self._on_done = on_done
        self._nice = nice
        self._itemsizes: dict[str, int] = {}
        self._in_flight = 0
        self._client_done = False
        # Set when the client stopped reading early, which ends the transfer.
        self._client_closed = False
        self._stop = threading.Event()
        self.arena_offered = offer_arena and stream.arena is not None
        # None until the client's first message replies to an offer.
        self.arena_accepted: bool | None = None

        self._data = context.socket(zmq.PUSH)
        self._credits = context.socket(zmq.PULL)
        for socket in (self._data, self._credits):
            socket.setsockopt(zmq.LINGER, 0)
        self._data.setsockopt(zmq.SNDHWM, _DATA_SNDHWM)
        self.data_endpoint = _bind(self._data, bind_base, f"{self.transfer_id}-data")
        self.credit_endpoint = _bind(self._credits, bind_base, f"{self.transfer_id}-credit")
        self._thread = threading.Thread(
            target=self._run, name=f"transfer-{stream.exec_id}-{self.transfer_id}", daemon=True
        )

    def start(self) -> None:
        """Start streaming; the sockets belong to the transfer's thread from now on."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop at its next check (within about 0.1 s)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end."""
        self._thread.join(timeout)

    def _run(self) -> None:
        lower_current_thread(self._nice)
        self.stream.add_reader()
        try:
            self.outcome = self._stream_records()
            if self.outcome == "sent":
                self.outcome = "completed" if self._wait_done() else self._unacknowledged()
        except KeyError:
            self.outcome = "released"
        except (zmq.ZMQError, OSError) as exc:
            self.outcome = "failed"
            logger.warning(
                "transfer %d of execution %s failed: %s", self.transfer_id, self.stream.exec_id, exc
            )
        finally:
            self._data.close(linger=0)
            self._credits.close(linger=0)
            # Only an acknowledged transfer is known to have no page in use.
            self.stream.remove_reader(self.outcome == "completed")
            logger.debug(
                "transfer %d of execution %s ended: %s",
                self.transfer_id,
                self.stream.exec_id,
                self.outcome,
            )
            if self._on_done is not None:
                self._on_done(self)

    def _stream_records(self) -> str:
        if self.arena_offered and not self._await_arena_reply():
            return self._end_reason()
        index = 0
        idle_since = time.monotonic()
        while not self._stopping():
            record = self.stream.wait_record(index, _TICK)
            if record is None:
                self._read_credits(0)
                if time.monotonic() - idle_since > self.timeout and self.stream.sealed:
                    return "timed out"
                continue

            if not self._send_record(record):
                return self._end_reason()
            # Credits are read after every send, not only when the window is
            # full: unread, a long stream of small chunks fills the credit
            # socket's queues and blocks the client.
            self._read_credits(0)
            index += 1
            idle_since = time.monotonic()
            with self.stream.cond:
                if self.stream.sealed and index >= len(self.stream):
                    return "sent"
        return self._end_reason()

    def _stopping(self) -> bool:
        return self._stop.is_set() or self._client_closed

    def _unacknowledged(self) -> str:
        # Everything was sent, but the client's "done" never came.
        return self._end_reason() if self._client_closed else "unacknowledged"

    def _end_reason(self) -> str:
        if self._client_closed:
            return "closed by client"
        return "stopped" if self._stop.is_set() else "timed out"

    def _send_record(self, record: Record) -> bool:
        header_frame = record.header
        message = None
        if self._names is not None or self._compression is not None or not record.is_chunk:
            message = decode_message(header_frame)
            if isinstance(message, ResultDeclaration):
                self._itemsizes[message.name] = message.dtype.itemsize
            name = getattr(message, "name", None)
            if self._names is not None and name is not None and name not in self._names:
                return True

        if not record.is_chunk:
            return self._send_frames([header_frame], 0)
        if self.stream.cut:
            return True  # a cancelled execution's chunks are not sent any more

        if record.arena_offset >= 0 and self.arena_accepted and self._raw_over_arena():
            ref = pack_ref(record.arena_offset, record.nbytes)
            if not self._wait_for_window(record.nbytes):
                return False
            if not self._send_frames([header_frame, ARENA_MARKER, ref], record.nbytes):
                return False
            self.arena_chunks += 1
            return True

        payload: Any = self.stream.read_payload(record)
        if self._compression is not None:
            assert isinstance(message, ChunkHeader)
            itemsize = self._itemsizes.get(message.name, 1)
            header, payload = encode_chunk(message, payload, self._compression, itemsize)
            header_frame = encode_message(header)
        size = len(memoryview(payload).cast("B"))

        if not self._wait_for_window(size):
            return False
        return self._send_frames([header_frame, payload], size)

    def _raw_over_arena(self) -> bool:
        # A client reading the arena moves no bytes over any link, so "auto"
        # never pays there. An explicit codec was requested, so it is used.
        return self._compression is None or self._compression.mode == "auto"

    def _wait_for_window(self, size: int) -> bool:
        deadline = time.monotonic() + self.timeout
        while self._in_flight > 0 and self._in_flight + size > self.window_bytes:
            if self._stopping():
                return False
            if time.monotonic() > deadline:
                logger.warning(
                    "transfer %d of execution %s got no credit for %.0f s",
                    self.transfer_id,
                    self.stream.exec_id,
                    self.timeout,
                )
                return False
            self._read_credits(int(_TICK * 1000))
        return True

    def _send_frames(self, frames: list[Any], size: int) -> bool:
        deadline = time.monotonic() + self.timeout
        while True:
            if self._stopping() or time.monotonic() > deadline:
                return False
            if not self._data.poll(int(_TICK * 1000), zmq.POLLOUT):
                self._read_credits(0)
                continue
            # Chunks are sent under the stream's lock so that a cancel, which
            # cuts the stream under the same lock, is never overtaken by a send.
            with self.stream.cond:
                if size and self.stream.cut:
                    return True
                try:
                    self._data.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
            self._in_flight += size
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            return True

    def _await_arena_reply(self) -> bool:
        deadline = time.monotonic() + self.timeout
        while self.arena_accepted is None:
            if self._stopping() or time.monotonic() > deadline:
                return False
            self._read_credits(int(_TICK * 1000))
        return True

    def _read_credits(self, timeout_ms: int) -> bool:
        """Apply every credit that arrives within ``timeout_ms``; True once the client is done."""
        if not self._credits.poll(timeout_ms, zmq.POLLIN):
            return self._client_done
        while True:
            try:
                frame = self._credits.recv(zmq.NOBLOCK)
            except zmq.Again:
                return self._client_done
            try:
                message = unpack_value(frame)
            except HeaderDecodeError as exc:
                logger.warning("transfer %d: dropped a malformed credit: %s", self.transfer_id, exc)
                continue
            if isinstance(message, dict):
                credit = message.get("credit")
                if isinstance(credit, int) and not isinstance(credit, bool):
                    self._in_flight = max(0, self._in_flight - credit)
                self._client_done = self._client_done or message.get("done") is True
                self._client_closed = self._client_closed or message.get("closed") is True
                arena = message.get("arena")
                if isinstance(arena, bool) and self.arena_accepted is None:
                    self.arena_accepted = arena

    def _wait_done(self) -> bool:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not self._stopping():
            if self._read_credits(int(_TICK * 1000)):
                return True
        return False


def _bind(socket: zmq.Socket[Any], bind_base: str, suffix: str) -> str:
    if bind_base.startswith("ipc://"):
        endpoint = f"{bind_base}-{suffix}.sock"
        socket.bind(endpoint)
        return endpoint
    port = socket.bind_to_random_port(bind_base)
    return f"{bind_base}:{port}"

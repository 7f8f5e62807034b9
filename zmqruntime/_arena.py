"""Shared-memory arenas: chunk payloads passed between processes of one host without a socket.

A server makes one arena per execution: an anonymous shared-memory file
(``memfd_create``) that only its descriptor names. The worker appends each large
chunk payload to the arena with one ``pwrite`` and sends only a reference over
its PUSH socket. The server retains the reference instead of a received copy.
A client on the same host reads referenced payloads from the arena straight
into its sink. A client on another host gets the bytes over the data socket as
before, sent from the arena without a copy.

Reaching an arena
-----------------
Other processes open the server's descriptor as ``/proc/<pid>/fd/<fd>``, which
Linux allows only to processes of the same user. The first page contains a
random token, and a process that opens the path checks it, so a client on another host
that happens to find a process with the same pid and descriptor never reads the
wrong memory. The arena has no name in any file system, so the kernel frees
it once the last process that has it open ends, killed or not.

A reference frame is ``struct.pack("<QQ", offset, nbytes)``. It follows the
frame :data:`ARENA_MARKER` in a chunk message: ``[header, ARENA_MARKER, ref]``.
Offsets are multiples of :data:`PAGE`, so every payload can be mapped alone.

Arenas need Linux (``os.memfd_create`` and ``/proc``). Everywhere else, and
whenever opening one fails, payloads travel over the sockets.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import secrets
import struct
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from ._errors import FrameCountError, PayloadSizeError, ProtocolError

__all__ = [
    "ARENA_HEADER_BYTES",
    "ARENA_MARKER",
    "MIN_ARENA_PAYLOAD",
    "Arena",
    "ArenaPool",
    "ArenaReader",
    "ArenaWriter",
    "arenas_supported",
    "is_marker",
]

logger = logging.getLogger(__name__)

ARENA_MARKER = b"zmqruntime-arena-ref-v1"

# Payloads smaller than this go over the socket: a reference saves little
# for them, and each referenced payload takes whole pages of the arena.
MIN_ARENA_PAYLOAD = 256 << 10

PAGE = mmap.ALLOCATIONGRANULARITY
# The first page contains the token, and payloads start after it.
ARENA_HEADER_BYTES = PAGE
_TOKEN_BYTES = 16
_REF = struct.Struct("<QQ")

# fallocate(2) flags from linux/falloc.h.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def arenas_supported() -> bool:
    """Return whether this platform has Linux ``memfd_create`` and ``/proc``, which arenas need."""
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create")


def is_marker(frame: Any) -> bool:
    """Return whether ``frame`` (bytes, a buffer or a ``zmq.Frame``) is :data:`ARENA_MARKER`."""
    buffer = memoryview(getattr(frame, "buffer", frame))
    return len(buffer) == len(ARENA_MARKER) and buffer.tobytes() == ARENA_MARKER


def pack_ref(offset: int, nbytes: int) -> bytes:
    """Encode a reference to ``nbytes`` payload bytes at ``offset`` of an arena."""
    return _REF.pack(offset, nbytes)


def unpack_ref(frame: Any) -> tuple[int, int]:
    """Decode a reference frame into ``(offset, nbytes)``; raise :class:`FrameCountError`."""
    buffer = memoryview(getattr(frame, "buffer", frame))
    if len(buffer) != _REF.size:
        raise FrameCountError(
            f"an arena reference frame has {len(buffer)} bytes, expected {_REF.size}"
        )
    offset, nbytes = _REF.unpack(buffer)
    return int(offset), int(nbytes)


def _round_up(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


class Arena:
    """The server's side of one execution's arena: it creates, owns and closes the file.

    Thread safety: :meth:`view`, :meth:`spill` and :meth:`punch` may run in any
    thread; :meth:`close` must come after the last of them started. Views made
    before :meth:`close` stay readable until they are dropped.
    """

    def __init__(self, exec_id: str) -> None:
        self._fd: int | None = os.memfd_create("zmqruntime-arena", os.MFD_CLOEXEC)
        self.reset(exec_id)

    def reset(self, exec_id: str) -> None:
        """Give the arena to ``exec_id`` with a new token; its pages stay allocated.

        Only for an arena no process writes or reads any more: a reader that
        opened it before keeps seeing whatever the new execution writes.
        """
        self.exec_id = exec_id
        self._token = secrets.token_bytes(_TOKEN_BYTES)
        os.pwrite(self._open_fd(), self._token, 0)

    @property
    def resident_bytes(self) -> int:
        """Memory the arena's pages take now, in bytes."""
        return os.fstat(self._open_fd()).st_blocks * 512

    @property
    def locator(self) -> dict[str, Any]:
        """What another process needs to open the arena: pid, descriptor and token."""
        return {"pid": os.getpid(), "fd": self._fd, "token": self._token.hex()}

    def check(self, ref: Any, expected: int) -> tuple[int, int]:
        """Decode ``ref`` and check that it lies inside the arena and spans ``expected`` bytes."""
        offset, nbytes = unpack_ref(ref)
        _check_span(offset, nbytes, expected, self._size(), self.exec_id)
        return offset, nbytes

    def view(self, offset: int, nbytes: int) -> memoryview:
        """Map ``nbytes`` at ``offset`` read-only and return them; no copy is made."""
        return _map(self._open_fd(), offset, nbytes)

    def spill(self, fd: int, file_offset: int, offset: int, nbytes: int) -> None:
        """Copy a payload into the file ``fd`` at ``file_offset`` and free it in the arena."""
        view = self.view(offset, nbytes)
        try:
            written = os.pwrite(fd, view, file_offset)
        finally:
            view.release()
        if written != nbytes:
            raise OSError(f"short write to spill file: {written} of {nbytes} bytes")
        self.punch(offset, nbytes)

    def punch(self, offset: int, nbytes: int) -> None:
        """Give the memory of a payload back; its bytes read as zeros afterwards."""
        length = _round_up(nbytes)
        if _fallocate is None or length == 0:
            return
        result = _fallocate(
            self._open_fd(),
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
            ctypes.c_int64(offset),
            ctypes.c_int64(length),
        )
        if result != 0:
            # NOTE: only the memory stays in use until the arena closes; the
            # payload itself was already copied to the spill file.
            logger.debug("execution %s: freeing %d arena bytes failed", self.exec_id, length)

    def close(self) -> None:
        """Close the server's descriptor; the memory is freed once no process has it open."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open_fd(self) -> int:
        if self._fd is None:
            raise KeyError(self.exec_id)
        return self._fd

    def _size(self) -> int:
        return os.fstat(self._open_fd()).st_size


class ArenaPool:
    """Arenas of released results, kept so the next execution writes into allocated pages.

    Writing into pages that a file already has skips the kernel's
    allocation and zeroing of each page, which costs as much as the copy
    itself. The pool keeps at most ``max_bytes`` of arenas and closes each one
    that stays unused for ``idle_seconds``.

    Thread safety: every method may be called from any thread.
    """

    def __init__(self, max_bytes: int, idle_seconds: float = 60.0) -> None:
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.reused = 0
        self._closed = False
        self._lock = threading.Lock()
        # (arena, resident bytes, time it was given back), most recent last.
        self._idle: list[tuple[Arena, int, float]] = []

    @property
    def pooled_bytes(self) -> int:
        """Memory the pooled arenas take, in bytes."""
        with self._lock:
            return sum(size for _, size, _ in self._idle)

    def take(self, exec_id: str) -> Arena:
        """Return a pooled arena reset for ``exec_id``, or a new one."""
        with self._lock:
            arena = self._idle.pop()[0] if self._idle else None
        if arena is None:
            return Arena(exec_id)
        arena.reset(exec_id)
        self.reused += 1
        return arena

    def give(self, arena: Arena) -> None:
        """Keep ``arena`` for a later :meth:`take`, or close it if the pool is full."""
        size = arena.resident_bytes
        with self._lock:
            room = self.max_bytes - sum(kept for _, kept, _ in self._idle)
            if not self._closed and size <= room:
                self._idle.append((arena, size, time.monotonic()))
                return
        arena.close()

    def trim(self, now: float | None = None) -> None:
        """Close the arenas unused for longer than ``idle_seconds``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [entry for entry in self._idle if now - entry[2] > self.idle_seconds]
            self._idle = [entry for entry in self._idle if entry not in stale]
        for arena, _, _ in stale:
            arena.close()

    def close(self) -> None:
        """Close every pooled arena; arenas given later are closed at once."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for arena, _, _ in idle:
            arena.close()


class ArenaWriter:
    """A worker's side of its execution's arena: appends payloads, never rewrites them.

    ``limit`` bounds the arena's size in bytes. Past it, and after any write
    error (out of memory, for one), :meth:`put` returns None and payloads go
    over the socket. Not thread safe.
    """

    def __init__(self, locator: Mapping[str, Any], limit: int) -> None:
        self._fd: int | None = open_arena(locator, writable=True)
        self._end = ARENA_HEADER_BYTES
        self._limit = limit

    def put(self, payload: Any) -> bytes | None:
        """Copy ``payload`` into the arena; return its reference, or None if it does not fit."""
        if self._fd is None:
            return None
        data = memoryview(payload).cast("B")
        offset = self._end
        if offset + len(data) > self._limit:
            return None

        try:
            written = os.pwrite(self._fd, data, offset)
        except OSError as exc:
            logger.info("arena write failed, sending payloads over the socket: %s", exc)
            self.close()
            return None
        if written != len(data):
            # The partial bytes are never referenced; the socket carries the rest.
            self.close()
            return None

        self._end = _round_up(offset + len(data))
        return pack_ref(offset, len(data))

    def close(self) -> None:
        """Close the descriptor; later :meth:`put` calls return None."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ArenaReader:
    """A client's read-only handle on a server's arena, checked by its token. Not thread safe."""

    def __init__(self, locator: Mapping[str, Any], exec_id: str) -> None:
        self.exec_id = exec_id
        self._fd: int | None = open_arena(locator, writable=False)

    def view(self, ref: Any, expected: int) -> memoryview:
        """Map the payload ``ref`` names read-only after checking its length is ``expected``."""
        offset, nbytes = self._checked(ref, expected)
        return _map(self._open_fd(), offset, nbytes)

    def read_into(self, ref: Any, buffer: memoryview) -> None:
        """Copy the payload ``ref`` names into ``buffer``, which must hold exactly its bytes."""
        offset, nbytes = self._checked(ref, len(buffer))
        done = 0
        while done < nbytes:
            count = os.preadv(self._open_fd(), [buffer[done:]], offset + done)
            if count <= 0:
                raise PayloadSizeError(
                    f"arena of execution {self.exec_id} ended after {done} of {nbytes} bytes "
                    f"of the payload at offset {offset}"
                )
            done += count

    def close(self) -> None:
        """Close the descriptor; the server keeps the arena."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _checked(self, ref: Any, expected: int) -> tuple[int, int]:
        offset, nbytes = unpack_ref(ref)
        _check_span(offset, nbytes, expected, os.fstat(self._open_fd()).st_size, self.exec_id)
        return offset, nbytes

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ProtocolError(f"the arena of execution {self.exec_id} is closed")
        return self._fd


def open_arena(locator: Mapping[str, Any], *, writable: bool) -> int:
    """Open the arena ``locator`` names and check its token; return the descriptor.

    Raises
    ------
    OSError
        The arena cannot be opened (another host, another user, the server
        ended) or its token differs.
    """
    path = f"/proc/{int(locator['pid'])}/fd/{int(locator['fd'])}"
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        token = os.pread(fd, _TOKEN_BYTES, 0)
        if token.hex() != locator["token"]:
            raise OSError(f"{path} is not the arena it was announced as (token differs)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_span(offset: int, nbytes: int, expected: int, size: int, exec_id: str) -> None:
    if nbytes != expected:
        raise PayloadSizeError(
            f"arena reference of execution {exec_id} names {nbytes} bytes, its header states "
            f"{expected}"
        )
    if offset < ARENA_HEADER_BYTES or offset % PAGE or offset + nbytes > size:
        raise ProtocolError(
            f"arena reference of execution {exec_id} covers bytes {offset} to "
            f"{offset + nbytes}, outside the arena's payload area ({ARENA_HEADER_BYTES} to "
            f"{size}) or not at a multiple of {PAGE}"
        )


def _map(fd: int, offset: int, nbytes: int) -> memoryview:
    if nbytes == 0:
        return memoryview(b"")
    # MAP_POPULATE maps every page up front: one call instead of a page fault
    # per 4 KiB when the payload is read.
    mapping = mmap.mmap(
        fd,
        nbytes,
        flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
        prot=mmap.PROT_READ,
        offset=offset,
    )
    return memoryview(mapping)


def _load_fallocate() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()

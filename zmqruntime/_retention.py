"""Retained result streams: every message of an execution's stream, kept for later fetches.

The server appends each message it receives from a worker to that execution's
:class:`RetainedStream`, in arrival order. A fetch replays the list from the
start and then follows new messages as they arrive, so a live fetch and a fetch
long after the run see the same stream.

Chunk payloads stay in memory while the store's total is under
``memory_limit`` bytes; past it new payloads are appended to one spill file per
execution under ``spill_dir``. A stream with an :class:`Arena` may keep
payloads there, written by its worker. They count against the same bound, and
spilling one frees its arena pages. A released stream's arena goes back to the
store's :class:`ArenaPool` only when nothing can still touch it: the worker sent
its stream end, and every transfer of the stream ended with the client's
acknowledgement. Otherwise it is closed. A release while a transfer still runs
leaves that decision to the transfer's end. Headers always stay in memory. A stream and its
spill file are removed by :meth:`RetentionStore.release`, by
:meth:`RetentionStore.close` (server shutdown) and by
:meth:`RetentionStore.expire` once the retention time has passed since the
stream was sealed.

Thread safety: every method may be called from any thread. One lock guards the
store; each stream's condition (sharing that lock) wakes readers waiting for
new messages.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ._arena import Arena, ArenaPool

__all__ = ["Record", "RetainedStream", "RetentionStore"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Record:
    """One message of a stream: its header frame and, for a chunk, its payload.

    ``payload`` holds the bytes when they are in memory; a spilled payload has
    ``payload`` None and lives at ``spill_offset`` in the stream's spill file;
    a payload in the stream's arena has ``payload`` None and lives at
    ``arena_offset`` there. ``is_chunk`` is True for chunk messages.
    """

    header: bytes
    is_chunk: bool
    nbytes: int = 0
    payload: bytes | memoryview | None = None
    spill_offset: int = -1
    arena_offset: int = -1


class RetainedStream:
    """The messages of one execution's result stream.

    A stream is *sealed* once its final message (the stream end) is appended;
    a *cut* stream (the execution was cancelled) stops accepting chunks and
    readers skip every chunk they have not sent yet.
    """

    def __init__(self, store: RetentionStore, exec_id: str) -> None:
        self.exec_id = exec_id
        self.cond = threading.Condition(store.lock)
        self._store = store
        self._records: list[Record] = []
        self._sealed = False
        self._cut = False
        self._released = False
        self.sealed_at: float | None = None
        self._spill_fd: int | None = None
        self._spill_path: Path | None = None
        self._spill_size = 0
        self.memory_bytes = 0
        # Set by the server before the worker starts; pooled or closed on release.
        self.arena: Arena | None = None
        self._arena_users = 0
        self._arena_tainted = False
        self._ended_by_worker = False
        # The arena of a stream released while transfers ran, until the last ends.
        self._arena_pending: Arena | None = None

    @property
    def sealed(self) -> bool:
        """Whether the stream end was appended; no message follows it."""
        return self._sealed

    @property
    def cut(self) -> bool:
        """Whether the stream was cut by a cancel."""
        return self._cut

    @property
    def released(self) -> bool:
        """Whether the stream was released; reading it raises."""
        return self._released

    @property
    def spill_path(self) -> Path | None:
        """The spill file, if any payload was spilled."""
        return self._spill_path

    def __len__(self) -> int:
        with self.cond:
            return len(self._records)

    def append(
        self,
        header: bytes,
        payload: bytes | memoryview | None = None,
        *,
        arena_span: tuple[int, int] | None = None,
    ) -> bool:
        """Append a message; False (and nothing stored) when sealed, released or cut for chunks.

        The stream keeps a reference to ``payload`` (no copy) while it stays in
        memory; the caller must not modify it afterwards. ``arena_span``
        (offset, byte count) stands for a payload in the stream's arena
        instead. A spilled payload is written to disk without holding the
        store's lock, so readers and the server's control loop never wait for
        the disk. One thread per stream may call this (the server's ingest
        thread); messages keep its order.
        """
        is_chunk = payload is not None or arena_span is not None
        with self.cond:
            if not self._accepts(is_chunk):
                return False
            if not is_chunk:
                self._add(Record(header, False))
                return True
            nbytes = arena_span[1] if arena_span is not None else len(payload or b"")
            if self._store.reserve_memory(nbytes):
                self.memory_bytes += nbytes
                if arena_span is not None:
                    self._add(Record(header, True, nbytes, arena_offset=arena_span[0]))
                else:
                    self._add(Record(header, True, nbytes, payload))
                return True
            fd, offset = self._reserve_spill(nbytes)
            arena = self.arena

        # The duplicate descriptor keeps the file writable if a release closes
        # the original during the write.
        try:
            if arena_span is not None:
                assert arena is not None
                arena.spill(fd, offset, *arena_span)
            else:
                written = os.pwrite(fd, payload or b"", offset)
                if written != nbytes:
                    raise OSError(
                        f"short write to spill file {self._spill_path}: {written} of {nbytes}"
                    )
        finally:
            os.close(fd)

        with self.cond:
            # A cancel or release during the write discards the chunk.
            if not self._accepts(True):
                return False
            self._add(Record(header, True, nbytes, None, offset))
            return True

    def _accepts(self, is_chunk: bool) -> bool:
        # Caller holds the lock.
        return not (self._sealed or self._released or (is_chunk and self._cut))

    def _add(self, record: Record) -> None:
        # Caller holds the lock.
        self._records.append(record)
        self.cond.notify_all()

    def _reserve_spill(self, nbytes: int) -> tuple[int, int]:
        # Caller holds the lock. Returns a duplicate descriptor of the spill
        # file (the caller closes it) and the offset reserved for nbytes.
        if self._spill_fd is None:
            self._open_spill_file()
        assert self._spill_fd is not None
        offset = self._spill_size
        self._spill_size += nbytes
        return os.dup(self._spill_fd), offset

    def _open_spill_file(self) -> None:
        fd, name = tempfile.mkstemp(
            prefix=f"zmqruntime-{self.exec_id}-", suffix=".spill", dir=self._store.spill_dir
        )
        self._spill_fd = fd
        self._spill_path = Path(name)
        logger.info("execution %s spills result payloads to %s", self.exec_id, name)

    def seal(self, header: bytes, *, by_worker: bool = False) -> bool:
        """Append the stream end ``header`` and seal; False when already sealed or released.

        ``by_worker`` marks the worker's own stream end, after which it writes
        nothing more to the arena. The server seals cancelled and crashed
        streams itself, and their workers may still be writing.
        """
        with self.cond:
            if self._sealed or self._released:
                return False
            self._ended_by_worker = by_worker
            self._records.append(Record(header, False))
            self._sealed = True
            self.sealed_at = time.monotonic()
            self.cond.notify_all()
            return True

    def add_reader(self) -> None:
        """Count a transfer that may send the arena's pages, zero-copy or by reference."""
        with self.cond:
            self._arena_users += 1

    def remove_reader(self, acknowledged: bool) -> None:
        """Uncount a transfer; one that ended without the client's acknowledgement
        may have left pages in use, so the arena is then never pooled."""
        with self.cond:
            self._arena_users -= 1
            self._arena_tainted = self._arena_tainted or not acknowledged
            arena = self._arena_pending if self._arena_users == 0 else None
            if arena is None:
                return
            self._arena_pending = None
            pool = self._store.arena_pool if not self._arena_tainted else None
        # Closing the last descriptor frees the pages, which can take 100 ms
        # for a gigabyte, so it happens outside the lock.
        _Cleanup([], None, arena, pool).run()

    def cut_stream(self) -> int:
        """Mark the stream cancelled: no chunk is appended or sent from now on.

        Returns the number of chunks appended before the cut, the only ones
        a transfer may still send.
        """
        with self.cond:
            self._cut = True
            self.cond.notify_all()
            return sum(1 for record in self._records if record.is_chunk)

    def wait_record(self, index: int, timeout: float) -> Record | None:
        """Return message ``index``, waiting up to ``timeout`` s for it; None if absent.

        Raises
        ------
        KeyError
            The stream was released.
        """
        deadline = time.monotonic() + timeout
        with self.cond:
            while index >= len(self._records):
                if self._released:
                    raise KeyError(self.exec_id)
                remaining = deadline - time.monotonic()
                if self._sealed or remaining <= 0:
                    return None
                self.cond.wait(remaining)
            if self._released:
                raise KeyError(self.exec_id)
            return self._records[index]

    def read_payload(self, record: Record) -> bytes | memoryview:
        """Return a chunk record's payload, reading it from the spill file if needed."""
        if record.payload is not None:
            return record.payload
        if record.arena_offset >= 0:
            with self.cond:
                if self._released or self.arena is None:
                    raise KeyError(self.exec_id)
                return self.arena.view(record.arena_offset, record.nbytes)
        with self.cond:
            if self._released or self._spill_fd is None:
                raise KeyError(self.exec_id)
            fd = os.dup(self._spill_fd)
        # The duplicate descriptor keeps the file readable if a release closes
        # the original during the read.
        try:
            data = os.pread(fd, record.nbytes, record.spill_offset)
        finally:
            os.close(fd)
        if len(data) != record.nbytes:
            raise OSError(f"short read from spill file of execution {self.exec_id}")
        return data

    def _drop(self) -> tuple[int, _Cleanup]:
        # Caller holds the lock. Returns the memory bytes given back and what
        # the caller frees and deletes after releasing the lock (both can take
        # milliseconds).
        self._released = True
        records, self._records = self._records, []
        if self._spill_fd is not None:
            os.close(self._spill_fd)
            self._spill_fd = None
        freed, self.memory_bytes = self.memory_bytes, 0
        arena, self.arena = self.arena, None
        pool = None
        if arena is not None and self._ended_by_worker and not self._arena_tainted:
            if self._arena_users > 0:
                self._arena_pending, arena = arena, None
            else:
                pool = self._store.arena_pool
        self.cond.notify_all()
        return freed, _Cleanup(records, self._spill_path, arena, pool)


class RetentionStore:
    """All retained streams of a server, with one memory bound for their payloads.

    Parameters
    ----------
    memory_limit:
        Payload bytes kept in memory across all streams before spilling.
    spill_dir:
        Directory for spill files; created if missing. None: the system temp dir.
    arena_pool:
        Where the arenas of released streams go when they may be reused; None
        closes them.
    """

    def __init__(
        self,
        memory_limit: int,
        spill_dir: str | os.PathLike[str] | None = None,
        arena_pool: ArenaPool | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.memory_limit = memory_limit
        self.arena_pool = arena_pool
        self.spill_dir = None if spill_dir is None else str(spill_dir)
        if self.spill_dir is not None:
            Path(self.spill_dir).mkdir(parents=True, exist_ok=True)
        self._memory_used = 0
        self._streams: dict[str, RetainedStream] = {}
        # Released payloads and spill files waiting for the cleanup thread;
        # None stops it. The thread starts with the first background release.
        self._cleanup_queue: queue.SimpleQueue[_Cleanup | None] = queue.SimpleQueue()
        self._cleanup_thread: threading.Thread | None = None

    @property
    def memory_used(self) -> int:
        """Payload bytes held in memory now."""
        with self.lock:
            return self._memory_used

    def reserve_memory(self, nbytes: int) -> bool:
        """Count ``nbytes`` against the bound; False (nothing counted) if they do not fit."""
        with self.lock:
            if self._memory_used + nbytes > self.memory_limit:
                return False
            self._memory_used += nbytes
            return True

    def new_arena(self, exec_id: str) -> Arena:
        """Return an arena for ``exec_id``'s stream, from the pool when it has one."""
        if self.arena_pool is not None:
            return self.arena_pool.take(exec_id)
        return Arena(exec_id)

    def create(self, exec_id: str) -> RetainedStream:
        """Create and return the stream of ``exec_id``; an existing one is returned as is."""
        with self.lock:
            stream = self._streams.get(exec_id)
            if stream is None:
                stream = self._streams[exec_id] = RetainedStream(self, exec_id)
            return stream

    def get(self, exec_id: str) -> RetainedStream | None:
        """Return the stream of ``exec_id``, or None if absent or released."""
        with self.lock:
            return self._streams.get(exec_id)

    def release(self, exec_id: str, *, background: bool = False) -> bool:
        """Drop the stream of ``exec_id`` and delete its spill file; False if there was none.

        The payloads are freed and the spill file deleted after the store's
        lock is released, so other streams are not held up meanwhile. With
        ``background`` a cleanup thread does both and this returns at once:
        freeing a gigabyte of payloads and deleting its spill file can take
        100 ms, which the server's control loop must not wait for.
        :meth:`close` waits for the cleanup thread.
        """
        with self.lock:
            stream = self._streams.pop(exec_id, None)
            if stream is None:
                return False
            freed, cleanup = stream._drop()
            self._memory_used -= freed
        if background:
            self._start_cleanup_thread()
            self._cleanup_queue.put(cleanup)
        else:
            cleanup.run()
        return True

    def _start_cleanup_thread(self) -> None:
        with self.lock:
            if self._cleanup_thread is None:
                self._cleanup_thread = threading.Thread(
                    target=self._clean_up, name="zmqruntime-retention-cleanup", daemon=True
                )
                self._cleanup_thread.start()

    def _clean_up(self) -> None:
        while True:
            cleanup = self._cleanup_queue.get()
            if cleanup is None:
                return
            cleanup.run()

    def expire(self, retention_seconds: float, now: float | None = None) -> list[str]:
        """Release streams sealed more than ``retention_seconds`` ago; return their ids.

        Their payloads and spill files are cleaned up in the background (see
        :meth:`release`).
        """
        now = time.monotonic() if now is None else now
        with self.lock:
            candidates = [
                exec_id
                for exec_id, stream in self._streams.items()
                if stream.sealed_at is not None and now - stream.sealed_at > retention_seconds
            ]
        if self.arena_pool is not None:
            self.arena_pool.trim()
        return [exec_id for exec_id in candidates if self.release(exec_id, background=True)]

    def close(self) -> None:
        """Release every stream and remove every spill file, background releases included."""
        with self.lock:
            exec_ids = list(self._streams)
            thread, self._cleanup_thread = self._cleanup_thread, None
        for exec_id in exec_ids:
            self.release(exec_id)
        if thread is not None:
            self._cleanup_queue.put(None)
            thread.join(30.0)
        if self.arena_pool is not None:
            self.arena_pool.close()


@dataclass(slots=True)
class _Cleanup:
    """Payloads, spill file and arena of a released stream, to free outside any lock."""

    records: list[Record]
    spill_path: Path | None
    arena: Arena | None = None
    pool: ArenaPool | None = None

    def run(self) -> None:
        self.records.clear()
        if self.spill_path is not None:
            self.spill_path.unlink(missing_ok=True)
        if self.arena is None:
            return
        if self.pool is not None:
            self.pool.give(self.arena)
        else:
            self.arena.close()

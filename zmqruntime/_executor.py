"""Executors: where executions run.

:class:`Executor` is the small interface the server needs (submit, cancel,
wait, shutdown), so another backend (a Dask cluster, for example) can run
pipelines while results still stream through the data channel.
:class:`ProcessExecutor` runs each execution in a fresh worker process, at most
``max_workers`` at a time, the rest waiting in a bounded FIFO queue.

Events reach the server through the ``on_event(exec_id, event)`` callback, a
map with ``"kind"``:

- ``"started"`` (with ``"pid"``), ``"progress"``, ``"value"``: from the worker;
- ``"finished"``: the worker's own outcome (``"status"``, ``"error"``);
- ``"exited"``: the last event of every submitted execution, with
  ``"exitcode"`` (negative: killed by that signal; None: never started).

Callbacks run on the executor's monitor thread; they must be quick and must
not call back into the executor while holding their own locks.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ._control import pack_value, unpack_value
from ._errors import HeaderDecodeError, ZmqRuntimeError
from ._worker import run_worker

__all__ = ["Executor", "ExecutorFullError", "Job", "ProcessExecutor"]

logger = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any]], None]

# How often the monitor thread wakes without events to apply cancel deadlines,
# in seconds. Bounds how late a terminate or kill can come.
_MONITOR_TICK = 0.05


class ExecutorFullError(ZmqRuntimeError):
    """The executor's queue is full; retry later or raise the server's queue size."""


@dataclass(frozen=True, slots=True)
class Job:
    """One execution to run: its pipeline, config and where its results go."""

    exec_id: str
    pipeline: str
    config: str | Mapping[str, Any] | None
    data_endpoint: str
    chunk_bytes: int | None = None
    compression: str | None = None
    arena: Mapping[str, Any] | None = None
    arena_limit: int = 0
    await_stream_ack: bool = False

    def pack(self) -> bytes:
        """Encode the job as msgpack bytes for the worker (no pickling)."""
        return pack_value(
            {
                "exec_id": self.exec_id,
                "pipeline": self.pipeline,
                "config": None if self.config is None else self.config,
                "data_endpoint": self.data_endpoint,
                "chunk_bytes": self.chunk_bytes,
                "compression": self.compression,
                "arena": None if self.arena is None else dict(self.arena),
                "arena_limit": self.arena_limit,
                "await_stream_ack": self.await_stream_ack,
            }
        )


class Executor(abc.ABC):
    """Runs executions and reports their events; every method is thread safe."""

    # Whether stream_received reaches the worker, so a worker may wait for it.
    acknowledges_streams: bool = False

    def stream_received(self, exec_id: str) -> None:
        """Tell the worker of ``exec_id`` that the server received its whole stream.

        A worker that waits for this exits only once nothing it sent can be
        lost in transit. The default does nothing; such executors keep
        ``acknowledges_streams`` False.
        """
        return

    @abc.abstractmethod
    def submit(self, job: Job) -> None:
        """Queue ``job``; it starts when a slot is free.

        Raises
        ------
        ExecutorFullError
            The queue is full.
        """

    @abc.abstractmethod
    def cancel(self, exec_id: str) -> bool:
        """Ask execution ``exec_id`` to stop; False when it is not queued or running.

        A queued job is dropped at once. A running one is asked to stop
        cooperatively, then forced; its ``"exited"`` event follows.
        """

    @abc.abstractmethod
    def wait(self, exec_id: str, timeout: float | None = None) -> bool:
        """Block until ``exec_id`` is neither queued nor running; False on timeout."""

    @abc.abstractmethod
    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel everything, wait up to ``timeout`` seconds, kill what is left."""


@dataclass(slots=True)
class _Running:
    job: Job
    process: BaseProcess
    conn: Connection
    cancel_at: float | None = None
    terminate_at: float | None = None


def default_start_method() -> str:
    """Return ``"forkserver"`` where it exists (Linux), else ``"spawn"``.

    Both start a worker from a fresh interpreter, so no worker inherits the
    server's ZeroMQ context (forking a process that holds one is unsafe).
    """
    if sys.platform.startswith("linux"):
        return "forkserver"
    return "spawn"


class ProcessExecutor(Executor):
    """Runs each execution in its own worker process.

    Parameters
    ----------
    on_event:
        Receives ``(exec_id, event)``; see the module docstring.
    max_workers:
        Executions running at once.
    max_queued:
        Executions waiting beyond those; :meth:`submit` raises past it.
    start_method:
        ``"forkserver"`` or ``"spawn"``; ``"fork"`` is rejected.
    grace_period:
        Seconds between a cooperative cancel and ``terminate()`` (SIGTERM).
    kill_after:
        Seconds between ``terminate()`` and ``kill()`` (SIGKILL).
    """

    def __init__(
        self,
        on_event: EventCallback,
        *,
        max_workers: int = 2,
        max_queued: int = 1000,
        start_method: str | None = None,
        grace_period: float = 1.0,
        kill_after: float = 0.5,
    ) -> None:
        method = start_method or default_start_method()
        if method not in ("forkserver", "spawn"):
            raise ValueError(
                f"start method {method!r} is not allowed; use 'forkserver' or 'spawn' "
                "(forking a process that holds a ZeroMQ context is unsafe)"
            )
        if max_workers < 1:
            raise ValueError(f"max_workers is {max_workers}, expected 1 or more")

        self._mp = multiprocessing.get_context(method)
        if method == "forkserver":
            self._mp.set_forkserver_preload(["zmqruntime._worker"])
        self._on_event = on_event
        self._max_workers = max_workers
        self._max_queued = max_queued
        self._grace_period = grace_period
        self._kill_after = kill_after

        self._lock = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: dict[str, _Running] = {}
        self._closed = False
        self._wake_reader, self._wake_writer = multiprocessing.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._monitor, name="executor-monitor", daemon=True)
        self._thread.start()

    @property
    def active_count(self) -> int:
        """Executions queued or running."""
        with self._lock:
            return len(self._queue) + len(self._running)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise ZmqRuntimeError("the executor is shut down; no new executions start")
            if len(self._queue) >= self._max_queued:
                raise ExecutorFullError(
                    f"executor queue is full ({self._max_queued} executions waiting); "
                    "retry later or start the server with a larger --max-queued"
                )
            self._queue.append(job)
        self._wake()

    acknowledges_streams = True

    def stream_received(self, exec_id: str) -> None:
        with self._lock:
            running = self._running.get(exec_id)
        if running is not None:
            self._send(running, {"kind": "stream_received"})

    def cancel(self, exec_id: str) -> bool:
        with self._lock:
            for job in self._queue:
                if job.exec_id == exec_id:
                    self._queue.remove(job)
                    dropped = True
                    break
            else:
                dropped = False
                running = self._running.get(exec_id)
                if running is None:
                    return False
                if running.cancel_at is None:
                    running.cancel_at = time.monotonic()
                    self._send(running, {"kind": "cancel"})

        if dropped:
            self._emit(exec_id, {"kind": "exited", "exitcode": None})
            with self._lock:
                self._lock.notify_all()
        self._wake()
        return True

    def wait(self, exec_id: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while exec_id in self._running or any(j.exec_id == exec_id for j in self._queue):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            queued = [job.exec_id for job in self._queue]
            running = list(self._running)
        for exec_id in queued + running:
            self.cancel(exec_id)

        deadline = time.monotonic() + timeout
        with self._lock:
            while self._running and time.monotonic() < deadline:
                self._lock.wait(_MONITOR_TICK)
            leftovers = list(self._running.values())
        for entry in leftovers:
            if entry.process.pid is None:
                continue  # the monitor thread is still starting it and stops after
            logger.warning(
                "killing worker pid %s of execution %s at shutdown",
                entry.process.pid,
                entry.job.exec_id,
            )
            entry.process.kill()

        self._wake()
        self._thread.join(timeout=2.0)
        self._wake_reader.close()
        self._wake_writer.close()

    def _wake(self) -> None:
        # Closed during shutdown: the monitor is stopping anyway.
        with contextlib.suppress(OSError):
            self._wake_writer.send_bytes(b"")

    def _send(self, running: _Running, message: dict[str, Any]) -> None:
        # An error means the worker already exited; its sentinel reports that.
        with contextlib.suppress(OSError):
            running.conn.send_bytes(pack_value(message))

    def _emit(self, exec_id: str, event: dict[str, Any]) -> None:
        try:
            self._on_event(exec_id, event)
        except Exception:
            logger.exception("event handler failed on %s of execution %s", event["kind"], exec_id)

    def _monitor(self) -> None:
        while True:
            self._start_queued()
            with self._lock:
                if self._closed and not self._running:
                    return
                waitables: list[Any] = [self._wake_reader]
                for entry in self._running.values():
                    waitables.extend((entry.conn, entry.process.sentinel))

            ready = multiprocessing.connection.wait(waitables, timeout=_MONITOR_TICK)
            if self._wake_reader in ready:
                self._drain_wakeups()
            self._poll_workers(ready)
            self._apply_cancel_deadlines()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_reader.poll():
                self._wake_reader.recv_bytes()
        except (EOFError, OSError):
            pass

    def _start_queued(self) -> None:
        # Runs in the monitor thread only. The first start of a forkserver
        # worker takes 0.3 to 0.8 s, so process.start() runs outside the lock:
        # submit() and cancel() from the control loop do not wait for it.
        while True:
            with self._lock:
                if not self._queue or len(self._running) >= self._max_workers or self._closed:
                    return
                job = self._queue.popleft()
                parent_conn, child_conn = self._mp.Pipe(duplex=True)
                process = self._mp.Process(  # type: ignore[attr-defined]
                    target=run_worker,
                    args=(job.pack(), child_conn),
                    name=f"zmqruntime-{job.exec_id}",
                )
                # Registered before it starts, so wait() and cancel() see it;
                # a cancel sent meanwhile waits in the pipe for the worker.
                self._running[job.exec_id] = _Running(job, process, parent_conn)

            try:
                process.start()
            except Exception as exc:
                self._start_failed(job.exec_id, parent_conn, exc)
                continue
            finally:
                child_conn.close()
            logger.debug("worker pid %s started for execution %s", process.pid, job.exec_id)

    def _start_failed(self, exec_id: str, conn: Connection, exc: Exception) -> None:
        """Report a worker that could not start as a failed execution and keep serving."""
        logger.error("starting the worker of execution %s failed: %r", exec_id, exc)
        conn.close()
        with self._lock:
            self._running.pop(exec_id, None)
            self._lock.notify_all()
        error = {
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": f"the worker process could not start: {exc}",
            "traceback": "".join(traceback.format_exception(exc)),
        }
        self._emit(exec_id, {"kind": "finished", "status": "failed", "error": error})
        self._emit(exec_id, {"kind": "exited", "exitcode": None})

    def _poll_workers(self, ready: list[Any]) -> None:
        with self._lock:
            entries = list(self._running.values())
        for entry in entries:
            if entry.conn in ready:
                self._read_messages(entry)
            if entry.process.sentinel in ready:
                self._reap(entry)

    def _read_messages(self, entry: _Running) -> None:
        exec_id = entry.job.exec_id
        try:
            while entry.conn.poll():
                event = unpack_value(entry.conn.recv_bytes())
                if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
                    raise HeaderDecodeError(f"worker sent {event!r}, expected a map with 'kind'")
                if event["kind"] == "started":
                    event["pid"] = entry.process.pid
                self._emit(exec_id, event)
        except (EOFError, OSError):
            return  # the worker closed its end; its sentinel reports the exit
        except HeaderDecodeError as exc:
            logger.warning("dropped a malformed message from the worker of %s: %s", exec_id, exc)

    def _reap(self, entry: _Running) -> None:
        self._read_messages(entry)
        entry.process.join(timeout=1.0)
        exitcode = entry.process.exitcode
        entry.conn.close()
        with self._lock:
            self._running.pop(entry.job.exec_id, None)
            self._lock.notify_all()
        self._emit(entry.job.exec_id, {"kind": "exited", "exitcode": exitcode})

    def _apply_cancel_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            entries = [e for e in self._running.values() if e.cancel_at is not None]
        for entry in entries:
            assert entry.cancel_at is not None
            if entry.terminate_at is None and now - entry.cancel_at >= self._grace_period:
                logger.info(
                    "terminating worker pid %s of execution %s after a %.1f s grace period",
                    entry.process.pid,
                    entry.job.exec_id,
                    self._grace_period,
                )
                entry.process.terminate()
                entry.terminate_at = now
            elif entry.terminate_at is not None and now - entry.terminate_at >= self._kill_after:
                logger.warning(
                    "killing worker pid %s of execution %s: it ignored SIGTERM",
                    entry.process.pid,
                    entry.job.exec_id,
                )
                entry.process.kill()
                entry.terminate_at = float("inf")

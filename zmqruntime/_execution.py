"""Server configuration and the server's record of one execution."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from ._control import pack_value

__all__ = [
    "STREAM_END_GRACE",
    "TERMINAL_STATES",
    "ExecutionRecord",
    "RequestIds",
    "ServerConfig",
    "crash_error",
    "default_memory_limit",
    "final_outcome",
]

STATES = ("queued", "running", "cancelling", "completed", "failed", "cancelled")
TERMINAL_STATES = frozenset({"completed", "failed", "cancelled"})

# Fields of each result summary in a brief (``list``) status row.
_BRIEF_RESULT_KEYS = ("name", "shape", "dtype", "bytes", "chunks_done", "complete")


# Share of physical memory that retained results may use before spilling. Ray
# reserves 30 % of available memory for its object store by default (Ray
# documentation, "Memory Management").
_MEMORY_SHARE = 0.3
_MIN_MEMORY_LIMIT = 512 << 20


def default_memory_limit() -> int:
    """Return 30 % of physical memory in bytes, at least 512 MiB (512 MiB where unknown)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return _MIN_MEMORY_LIMIT
    return max(_MIN_MEMORY_LIMIT, int(physical * _MEMORY_SHARE))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of an :class:`ExecutionServer`; every size in bytes, every time in seconds.

    Attributes
    ----------
    endpoint:
        Control endpoint to bind, ``tcp://127.0.0.1:5555`` by default. Binding
        another interface lets other hosts submit code that the server runs.
    host:
        Address data sockets bind to (``tcp://...`` form); None uses
        ``tcp://127.0.0.1``. Ignored for an ipc control endpoint.
    max_workers:
        Executions that run at once.
    max_queued:
        Executions that may wait for a worker; more are rejected.
    memory_limit:
        Retained result payload bytes kept in memory; the rest spills to disk.
        By default 30 % of physical memory, at least 512 MiB.
    spill_dir:
        Directory for spill files; None uses the system temp directory.
    retention_seconds:
        How long results stay after their execution ended, unless released.
    idle_timeout:
        Stop after this long with no request, execution or transfer; None: never.
    grace_period:
        Time a cancelled pipeline gets to stop on its own before SIGTERM.
    kill_after:
        Time between SIGTERM and SIGKILL.
    window_bytes:
        Default flow-control window of a fetch: payload bytes sent and not yet
        stored by the client.
    transfer_timeout:
        A fetch whose client neither connects nor credits for this long is dropped.
    ingest_hwm:
        Messages the ingest socket queues (RCVHWM).
    chunk_bytes:
        Target chunk size for pipelines that let the sender choose; None: the default.
    start_method:
        ``"forkserver"`` or ``"spawn"``; None picks forkserver on Linux.
    data_nice:
        Nice increment of the server's data-path threads (ingest, transfers
        and the data context's libzmq I/O thread); 0, the default, leaves
        them at the control loop's priority. Linux only. A lowered thread
        that holds the GIL delays the control loop until it runs again, and
        on 2 cores the status p99 was lower without the increment.
    shared_memory:
        Pass large payloads between workers, server and clients of this host
        through shared-memory arenas instead of sockets (Linux only; see
        ``docs/concepts.md``). False sends every byte over the sockets.
    """

    endpoint: str = "tcp://127.0.0.1:5555"
    host: str | None = None
    max_workers: int = 2
    max_queued: int = 1000
    memory_limit: int = field(default_factory=default_memory_limit)
    spill_dir: str | None = None
    retention_seconds: float = 3600.0
    idle_timeout: float | None = None
    grace_period: float = 1.0
    kill_after: float = 0.5
    window_bytes: int = 32 << 20
    transfer_timeout: float = 60.0
    ingest_hwm: int = 8
    chunk_bytes: int | None = None
    start_method: str | None = None
    data_nice: int = 0
    shared_memory: bool = True


@dataclass(slots=True)
class ExecutionRecord:
    """What the server knows about one execution; guarded by the server's lock."""

    exec_id: str
    request_id: str
    state: str = "queued"
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    pid: int | None = None
    exitcode: int | None = None
    exited_at: float | None = None
    cancel_requested: bool = False
    stream_ended: bool = False
    results_released: bool = False
    outcome: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    chunks_done: int = 0
    bytes_done: int = 0

    def to_status(self, *, brief: bool = False) -> dict[str, Any]:
        """Return the status map sent to clients.

        ``brief`` (for ``list``) keeps the cheap fields: state, timestamps,
        error, exit code, progress and a summary of each result without its
        chunk grid. It leaves out the pipeline's values, which can be large.
        """
        chunks_total, bytes_total = self._totals()
        status: dict[str, Any] = {
            "exec_id": self.exec_id,
            "state": self.state,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "exitcode": self.exitcode,
            "progress": {
                **self.progress,
                "chunks_done": self.chunks_done,
                "bytes_done": self.bytes_done,
                "chunks_total": chunks_total,
                "bytes_total": bytes_total,
            },
        }
        if brief:
            status["results"] = {
                name: {key: info.get(key) for key in _BRIEF_RESULT_KEYS}
                for name, info in self.results.items()
            }
            return status
        status.update(
            pid=self.pid,
            results_released=self.results_released,
            values=dict(self.values),
            results={name: dict(info) for name, info in self.results.items()},
        )
        return status

    def _totals(self) -> tuple[int | None, int | None]:
        # Totals are known once every declared result has a known size.
        chunks_total = 0
        bytes_total = 0
        for info in self.results.values():
            if info.get("chunks_total") is None or info.get("bytes_total") is None:
                return None, None
            chunks_total += info["chunks_total"]
            bytes_total += info["bytes_total"]
        if not self.results:
            return None, None
        return chunks_total, bytes_total


# After a worker exits having reported success, how long the server waits for
# the stream end still in flight on the data channel before it marks the
# execution failed, in seconds. The worker flushes its socket before it exits,
# so this is a safety margin, not a typical wait.
STREAM_END_GRACE = 5.0


def final_outcome(record: ExecutionRecord, now: float) -> tuple[str, dict[str, str] | None] | None:
    """Return the final state and error of an execution whose worker exited.

    ``now`` is ``time.monotonic()``. Returns None while a successful worker's
    stream end may still be in flight (within :data:`STREAM_END_GRACE` of its
    exit), so the caller asks again later.
    """
    if record.cancel_requested or record.exitcode is None:
        return "cancelled", None
    if record.outcome is None:
        return "failed", crash_error(record.exitcode)
    status, error = str(record.outcome.get("status")), record.outcome.get("error")
    if status != "completed" or record.stream_ended:
        return status, error
    assert record.exited_at is not None
    if now - record.exited_at < STREAM_END_GRACE:
        return None
    message = "the worker exited but its stream end never arrived"
    return "failed", {"type": "IncompleteStream", "message": message, "traceback": ""}


def crash_error(exitcode: int | None) -> dict[str, str]:
    """Describe a worker that exited without reporting an outcome."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        message = f"worker process was killed by {name} (signal {-exitcode})"
    else:
        message = f"worker process exited with code {exitcode} before reporting an outcome"
    return {"type": "WorkerCrashed", "message": message, "traceback": ""}


class RequestIds:
    """The execution each client request id started, so a retried execute runs once.

    Not thread safe: the server calls it under its lock.
    """

    def __init__(self) -> None:
        # Request id -> (execution id, digest of the pipeline and config it ran).
        self._started: dict[str, tuple[str, bytes]] = {}

    def lookup(self, request_id: str, pipeline: str, config: Any) -> str | None:
        """Return the execution ``request_id`` started, or None if it started none.

        Raises
        ------
        ValueError
            ``request_id`` started an execution of another pipeline or config.
        """
        started = self._started.get(request_id)
        if started is None:
            return None
        if started[1] != _digest(pipeline, config):
            raise ValueError(
                f"request_id {request_id!r} was already used for execution {started[0]} with "
                "another pipeline or config; pass a new request_id"
            )
        return started[0]

    def add(self, request_id: str, exec_id: str, pipeline: str, config: Any) -> None:
        """Record that ``request_id`` started ``exec_id``."""
        self._started[request_id] = (exec_id, _digest(pipeline, config))

    def discard(self, request_id: str) -> None:
        """Forget ``request_id``; nothing happens if it is unknown."""
        self._started.pop(request_id, None)


def _digest(pipeline: str, config: Any) -> bytes:
    # msgpack of the decoded request: a retry sends the same bytes, so the same digest.
    return hashlib.sha256(pack_value([pipeline, config])).digest()

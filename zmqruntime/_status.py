"""Typed views of the server's status replies, as the client returns them."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CancelResult", "ExecutionState", "ExecutionStatus", "Progress", "ResultSummary"]


class ExecutionState(enum.StrEnum):
    """Life-cycle states of an execution; the last three are final."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        """Whether the state is final (completed, failed or cancelled)."""
        return self in (ExecutionState.COMPLETED, ExecutionState.FAILED, ExecutionState.CANCELLED)


@dataclass(frozen=True, slots=True)
class Progress:
    """Progress of an execution.

    ``chunks_done``/``bytes_done`` count result chunks and raw bytes the server
    received; the totals are None until every declared result has a known
    size. ``done``/``total``/``message`` are what the pipeline last reported
    through ``ctx.progress``, in its own units.
    """

    chunks_done: int = 0
    bytes_done: int = 0
    chunks_total: int | None = None
    bytes_total: int | None = None
    done: float | None = None
    total: float | None = None
    message: str | None = None

    @classmethod
    def from_map(cls, data: Mapping[str, Any]) -> Progress:
        """Build from the ``progress`` map of a status reply."""
        return cls(
            chunks_done=int(data.get("chunks_done") or 0),
            bytes_done=int(data.get("bytes_done") or 0),
            chunks_total=data.get("chunks_total"),
            bytes_total=data.get("bytes_total"),
            done=data.get("done"),
            total=data.get("total"),
            message=data.get("message"),
        )


@dataclass(frozen=True, slots=True)
class ResultSummary:
    """One declared result: name, shape (None first for unknown length), dtype and bytes."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    bytes: int | None
    chunks_done: int
    complete: bool

    @classmethod
    def from_map(cls, data: Mapping[str, Any]) -> ResultSummary:
        """Build from one entry of the ``results`` map of a status reply."""
        return cls(
            name=str(data["name"]),
            shape=tuple(data["shape"]),
            dtype=str(data["dtype"]),
            bytes=data.get("bytes"),
            chunks_done=int(data.get("chunks_done", 0)),
            complete=bool(data.get("complete", False)),
        )


@dataclass(frozen=True, slots=True)
class ExecutionStatus:
    """Status of one execution; timestamps are seconds since the epoch.

    ``error`` maps ``"type"``, ``"message"`` and ``"traceback"`` for a failure
    (type ``"WorkerCrashed"`` with the exit code or signal for a crash).
    ``values`` holds what the pipeline stored with ``ctx.set_value`` and its
    small return value under ``"return"``. The state becomes final as soon as
    the server has the worker's stream end, so ``exitcode`` can still be None
    for a short while after that, until the worker process has exited.
    """

    exec_id: str
    state: ExecutionState
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: Mapping[str, str] | None = None
    progress: Progress = field(default_factory=Progress)
    results: Mapping[str, ResultSummary] = field(default_factory=dict)
    values: Mapping[str, Any] = field(default_factory=dict)
    exitcode: int | None = None
    pid: int | None = None

    @property
    def done(self) -> bool:
        """Whether the execution reached a final state."""
        return self.state.done

    @classmethod
    def from_map(cls, data: Mapping[str, Any]) -> ExecutionStatus:
        """Build from a status reply (full or brief)."""
        return cls(
            exec_id=str(data["exec_id"]),
            state=ExecutionState(data["state"]),
            submitted_at=float(data["submitted_at"]),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            error=data.get("error"),
            progress=Progress.from_map(data.get("progress") or {}),
            results={
                name: ResultSummary.from_map(info)
                for name, info in (data.get("results") or {}).items()
            },
            values=dict(data.get("values") or {}),
            exitcode=data.get("exitcode"),
            pid=data.get("pid"),
        )


@dataclass(frozen=True, slots=True)
class CancelResult:
    """Outcome of a cancel request.

    ``accepted`` is False when the execution had already finished (``state``
    says how) or was already being cancelled. ``chunks_done`` is how many
    chunks the server had received when it accepted the cancel; no later
    chunk of the execution is sent to any client.
    """

    exec_id: str
    accepted: bool
    state: ExecutionState
    message: str
    chunks_done: int | None = None

    @classmethod
    def from_map(cls, exec_id: str, data: Mapping[str, Any]) -> CancelResult:
        """Build from a cancel reply."""
        return cls(
            exec_id,
            bool(data["accepted"]),
            ExecutionState(data["state"]),
            str(data.get("message", "")),
            data.get("chunks_done"),
        )

"""Run a pipeline in this process, writing its results straight into sinks.

:class:`LocalContext` implements the pipeline context (``declare``,
``send_array``, ``progress``, ``set_value``, cancellation) without a server,
so the screening job can run in-process (``--in-process``) and the tests can
compare the served results with a direct run on the same images.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from sinks import ArraySpec, Region, Sink
from zmqruntime._errors import ExecutionCancelledError

__all__ = ["LocalContext", "LocalWriter", "TableSink", "run_local"]

SinkFactory = Callable[[ArraySpec], Sink]


class TableSink(Sink):
    """An in-memory sink for small tables; grows along axis 0 as regions arrive.

    :meth:`finalize` returns one new array of the final shape; regions that
    never arrived are zero-filled. After an interruption (:meth:`abort`, or a
    fetch that stopped) :meth:`received` returns the rows that did arrive.
    """

    def __init__(self) -> None:
        self._spec: ArraySpec | None = None
        self._pieces: list[tuple[Region, npt.NDArray[Any]]] = []
        self.abort_reason: str | None = None

    def open(self, spec: ArraySpec) -> None:
        self._spec = spec

    def write(self, region: Region, data: npt.NDArray[Any]) -> None:
        self._pieces.append((region, np.array(data, copy=True)))

    def finalize(self, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        assert self._spec is not None, "finalize before open"
        result = np.zeros(shape, dtype=self._spec.dtype)
        for region, data in self._pieces:
            result[region.slices] = data
        self._pieces.clear()
        return result

    def abort(self, reason: str) -> None:
        # The pieces stay, so a partial table can still be saved.
        self.abort_reason = reason

    def received(self) -> npt.NDArray[Any] | None:
        """Return a new array of the rows received so far, in row order; None before ``open``.

        Rows that never arrived are left out rather than zero-filled, so the
        result may be shorter than the declared shape. Empty after :meth:`finalize`.
        """
        if self._spec is None:
            return None
        pieces = sorted(self._pieces, key=lambda piece: piece[0].start[0])
        if not pieces:
            frame = tuple(int(n) for n in self._spec.shape[1:] if n is not None)
            return np.zeros((0, *frame), dtype=self._spec.dtype)
        return np.concatenate([data for _, data in pieces])


class LocalWriter:
    """The writer :meth:`LocalContext.declare` returns; writes go to the sink at once."""

    def __init__(self, spec: ArraySpec, sink: Sink) -> None:
        self.spec = spec
        self.sink = sink
        self.length = 0 if spec.shape[0] is None else int(spec.shape[0])
        self._appended = 0

    def write(self, start: int, data: npt.ArrayLike) -> None:
        """Write ``data`` at ``start`` along axis 0; the sink copies, so ``data`` is free after."""
        array = np.asarray(data, dtype=self.spec.dtype)
        expected = tuple(int(n) for n in self.spec.shape[1:] if n is not None)
        if array.shape[1:] != expected:
            raise ValueError(
                f"result {self.spec.name!r}: data of shape {array.shape} does not fit frames "
                f"of shape {expected}"
            )
        stop = start + array.shape[0]
        if self.spec.shape[0] is not None and not 0 <= start <= stop <= self.length:
            raise ValueError(
                f"result {self.spec.name!r}: rows {start}..{stop} are outside 0..{self.length}"
            )
        if array.shape[0] == 0:
            return
        region = Region((start, *[0] * len(expected)), (stop, *expected))
        self.sink.write(region, array)
        if self.spec.shape[0] is None:
            self.length = max(self.length, stop)

    def append(self, data: npt.ArrayLike) -> None:
        """Write ``data`` after everything appended so far (for a result of unknown length)."""
        array = np.asarray(data, dtype=self.spec.dtype)
        self.write(self._appended, array)
        self._appended += array.shape[0]

    def final_shape(self) -> tuple[int, ...]:
        """Return the result's shape with its final length along axis 0."""
        return (self.length, *[int(n) for n in self.spec.shape[1:] if n is not None])


class LocalContext:
    """Pipeline context that runs in the caller's process (see the module docstring).

    Not thread safe, except :meth:`cancel` and :attr:`cancelled`.
    """

    def __init__(self, sink_for: SinkFactory, execution_id: str = "local") -> None:
        self.execution_id = execution_id
        self.values: dict[str, Any] = {}
        self.progress_done: float = 0
        self.progress_total: float | None = None
        self.on_progress: Callable[[float, float | None, str | None], None] | None = None
        self._sink_for = sink_for
        self._writers: dict[str, LocalWriter] = {}
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the pipeline to stop at its next :meth:`check_cancelled`."""
        self._cancel.set()

    def check_cancelled(self) -> None:
        """Raise :class:`ExecutionCancelledError` if :meth:`cancel` was called."""
        if self._cancel.is_set():
            raise ExecutionCancelledError(f"execution {self.execution_id} was cancelled")

    def declare(
        self,
        name: str,
        shape: tuple[int | None, ...],
        dtype: npt.DTypeLike,
        *,
        chunks: tuple[int, ...] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> LocalWriter:
        """Declare result ``name``, open its sink and return its writer."""
        if name in self._writers:
            raise ValueError(f"result {name!r} is already declared")
        frame = [int(n) for n in shape[1:] if n is not None]
        spec = ArraySpec(
            name=name,
            shape=tuple(shape),
            dtype=np.dtype(dtype),
            chunks=tuple(chunks) if chunks is not None else (1, *frame),
            attrs=dict(attrs or {}),
        )
        sink = self._sink_for(spec)
        sink.open(spec)
        writer = LocalWriter(spec, sink)
        self._writers[name] = writer
        return writer

    def send_array(
        self, name: str, array: npt.ArrayLike, *, attrs: Mapping[str, Any] | None = None
    ) -> None:
        """Declare result ``name`` with ``array``'s shape and write all of it."""
        data = np.asarray(array)
        self.declare(name, data.shape, data.dtype, attrs=attrs).write(0, data)

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Record progress and pass it to :attr:`on_progress` when set."""
        self.progress_done, self.progress_total = done, total
        if self.on_progress is not None:
            self.on_progress(done, total, message)

    def set_value(self, key: str, value: Any) -> None:
        """Store a small value under ``key`` in :attr:`values`."""
        self.values[key] = value

    def finish(self, failure: str | None) -> dict[str, Any]:
        """Finalize every sink (or abort them all with ``failure``); return finalized values."""
        results: dict[str, Any] = {}
        for name, writer in self._writers.items():
            if failure is None:
                results[name] = writer.sink.finalize(writer.final_shape())
            else:
                writer.sink.abort(failure)
        return results


def run_local(
    pipeline: Callable[[Any, dict[str, Any]], Any],
    config: Mapping[str, Any],
    context: LocalContext,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``pipeline(context, config)`` here and return ``(results, values)``.

    ``results`` maps each result name to what its sink's ``finalize`` returned;
    ``values`` holds what the pipeline passed to ``set_value``. On any
    exception (cancellation and Ctrl-C included) every sink is aborted,
    keeping what it already wrote, and the exception propagates.
    """
    try:
        pipeline(context, dict(config))
    except BaseException as exc:
        context.finish(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        raise
    return context.finish(None), dict(context.values)

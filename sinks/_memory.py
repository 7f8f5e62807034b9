"""A sink that fills an ndarray in memory."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from ._base import ArraySpec, Region, Sink, SinkConfigError, SinkRegionError
from ._common import (
    Lifecycle,
    State,
    check_data,
    check_final_shape,
    check_region,
    check_spec,
    grown_length,
    region_view,
)
from ._prefault import Prefaulter, allocate_zeroed

logger = logging.getLogger(__name__)

__all__ = ["MemorySink"]


class MemorySink(Sink):
    """Store a result in a C-ordered, writable ndarray.

    :meth:`destination` returns a view of the array, so a receiver's
    ``recv_into`` writes straight into the result without an extra copy.
    Unwritten elements are zero. A fixed-shape result of 64 MiB or more is
    backed by an anonymous mapping whose pages a background thread faults in
    ahead of the receiver. The thread stops at :meth:`finalize` or
    :meth:`abort`.

    Parameters
    ----------
    out:
        Optional array to fill instead of allocating one. Its dtype must equal
        ``spec.dtype`` and it must be writable. For a fixed shape its shape must
        equal ``spec.shape``; for a growable result (``spec.shape[0] is None``)
        its axis-0 length is the maximum number of rows, and :meth:`finalize`
        returns the view ``out[:length]``. A non-contiguous ``out`` works, but
        then :meth:`destination` views are not C-contiguous and receivers copy
        through a scratch buffer.

    Notes
    -----
    A growable result without ``out`` starts with ``spec.chunks[0]`` rows and
    doubles its capacity when a region reaches past it, so growth costs O(1)
    amortised per element. Growth resizes in place (``ndarray.resize``, which
    can remap instead of copying) when no view of the array is alive, and
    otherwise copies into a new array; views already handed out by
    :meth:`destination` stay valid, because :meth:`commit` copies them over if
    the array moved. :meth:`finalize` trims the capacity the same way, so peak
    memory during the trim is at most the capacity plus the final size.

    Not thread safe: call its methods from one thread at a time.
    """

    def __init__(self, *, out: npt.NDArray[Any] | None = None) -> None:
        self._out = out
        self._lifecycle = Lifecycle(type(self).__name__)
        self._spec: ArraySpec | None = None
        self._array: npt.NDArray[Any] = np.empty(0)
        # Incremented whenever the array moves to a new buffer, so commit() can
        # tell whether a handed-out view still points into the current one.
        self._generation = 0
        self._pending: dict[Region, tuple[int, npt.NDArray[Any]]] = {}
        self._extent = 0
        self._prefaulter: Prefaulter | None = None

    @property
    def array(self) -> npt.NDArray[Any]:
        """The array being filled, including any spare capacity of a growable result.

        After :meth:`abort` it is trimmed to the committed rows; use it to
        recover partial data.
        """
        return self._array

    def open(self, spec: ArraySpec) -> None:
        """Allocate (or check ``out=``) for the array ``spec`` declares."""
        self._lifecycle.start()
        check_spec(spec, type(self).__name__)
        self._spec = spec

        if self._out is not None:
            self._array = self._checked_out(spec, self._out)
            return

        shape = spec.initial_shape()
        if spec.growable:
            # np.zeros maps fresh zero pages lazily, so untouched capacity costs no RAM.
            shape = (max(spec.chunks[0], 1), *shape[1:])
            self._array = np.zeros(shape, dtype=spec.dtype)
            return
        # A fixed-shape result is written in full, so its pages are faulted in
        # ahead of the receiver (see _prefault for the measured difference).
        self._array, self._prefaulter = allocate_zeroed(shape, spec.dtype)

    def destination(self, region: Region) -> npt.NDArray[Any]:
        """Return the view of ``region`` in the result array.

        The view is C-contiguous when the region spans whole trailing axes
        (whole frames, or row bands of one frame).
        """
        spec = self._checked_region(region, "destination")
        self._reserve(spec, region)
        view = region_view(self._array, region)
        self._pending[region] = (self._generation, view)
        return view

    def commit(self, region: Region) -> None:
        """Record ``region`` as filled, moving its data if the array grew meanwhile."""
        self._lifecycle.require_open("commit")
        try:
            generation, view = self._pending.pop(region)
        except KeyError:
            raise SinkRegionError(
                f"commit({region.start}..{region.stop}) has no matching destination(); "
                "call destination(region) before commit(region)"
            ) from None

        if generation != self._generation:
            np.copyto(region_view(self._array, region), view)
        self._extent = max(self._extent, region.stop[0] if region.stop else 0)

    def write(self, region: Region, data: npt.NDArray[Any]) -> None:
        """Copy ``data`` into ``region``; numpy casting rule ``"same_kind"`` applies."""
        spec = self._checked_region(region, "write")
        check_data(region, data, spec.name)
        self._reserve(spec, region)
        np.copyto(region_view(self._array, region), data, casting="same_kind")
        self._extent = max(self._extent, region.stop[0] if region.stop else 0)

    def finalize(self, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        """Return the result array with ``shape``; a growable result is trimmed."""
        self._lifecycle.require_open("finalize")
        spec = self._require_spec()
        check_final_shape(spec, tuple(shape), self._extent, type(self).__name__)
        self._drop_pending("finalize")
        self._stop_prefault()

        if spec.growable:
            self._trim(shape[0])
        self._lifecycle.end(State.FINALIZED)
        return self._array

    def abort(self, reason: str) -> None:
        """Stop; :attr:`array` keeps the committed data, trimmed to the committed rows."""
        if self._lifecycle.state is State.NEW:
            self._lifecycle.end(State.ABORTED)
        if self._lifecycle.state is not State.OPEN:
            return
        self._drop_pending("abort")
        self._stop_prefault()
        spec = self._spec
        if spec is not None and spec.growable:
            self._trim(self._extent)
        logger.info("memory sink aborted: %s", reason)
        self._lifecycle.end(State.ABORTED)

    def _stop_prefault(self) -> None:
        if self._prefaulter is not None:
            self._prefaulter.stop()
            self._prefaulter = None

    def _require_spec(self) -> ArraySpec:
        assert self._spec is not None, "open() sets the spec before the state becomes OPEN"
        return self._spec

    def _checked_region(self, region: Region, method: str) -> ArraySpec:
        self._lifecycle.require_open(method)
        spec = self._require_spec()
        check_region(region, self._array.shape, spec.growable, spec.name)
        return spec

    @staticmethod
    def _checked_out(spec: ArraySpec, out: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if out.dtype != spec.dtype:
            raise SinkConfigError(
                f"out= has dtype {out.dtype}, but result {spec.name!r} has dtype {spec.dtype}; "
                "pass an array of exactly that dtype (byte order included)"
            )
        declared = spec.initial_shape()
        expected_tail = declared[1:] if spec.growable else declared
        actual_tail = out.shape[1:] if spec.growable else out.shape
        if out.ndim != len(declared) or actual_tail != expected_tail:
            raise SinkConfigError(
                f"out= has shape {out.shape}, but result {spec.name!r} has shape {spec.shape}; "
                "pass an array of that shape (any length along axis 0 if it is None)"
            )
        if not out.flags.writeable:
            raise SinkConfigError(
                f"out= for result {spec.name!r} is read-only; pass a writable array"
            )
        return out

    def _reserve(self, spec: ArraySpec, region: Region) -> None:
        """Grow a growable array so that ``region`` fits along axis 0."""
        if not spec.growable or region.stop[0] <= self._array.shape[0]:
            return
        if self._out is not None:
            raise SinkRegionError(
                f"region {region.start}..{region.stop} of result {spec.name!r} needs "
                f"{region.stop[0]} rows, but out= has {self._array.shape[0]}; pass a longer "
                "out= array or let the sink allocate"
            )
        rows = grown_length(self._array.shape[0], region.stop[0], spec.chunks[0])
        self._resize_rows(rows)

    def _resize_rows(self, rows: int) -> None:
        new_shape = (rows, *self._array.shape[1:])
        try:
            # refcheck makes numpy refuse while any view (a pending destination)
            # references the array, because realloc could move the buffer.
            self._array.resize(new_shape, refcheck=True)
        except ValueError:
            old = self._array
            copied_rows = min(rows, old.shape[0])
            self._array = np.zeros(new_shape, dtype=old.dtype)
            self._array[:copied_rows] = old[:copied_rows]
            self._generation += 1
            logger.debug("memory sink copied %d rows to resize to %s", copied_rows, new_shape)

    def _trim(self, rows: int) -> None:
        if self._out is not None:
            self._array = self._array[:rows]
        elif self._array.shape[0] != rows:
            self._resize_rows(rows)

    def _drop_pending(self, method: str) -> None:
        if self._pending:
            logger.warning(
                "%s() discards %d destination(s) that were never committed",
                method,
                len(self._pending),
            )
            self._pending.clear()

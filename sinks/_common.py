"""Checks and small helpers shared by the built-in sinks."""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import numpy.typing as npt

from ._base import ArraySpec, Region, SinkConfigError, SinkRegionError, SinkStateError


class State(enum.Enum):
    """Life-cycle stage of a sink."""

    NEW = "new"
    OPEN = "open"
    FINALIZED = "finalized"
    ABORTED = "aborted"


class Lifecycle:
    """Life-cycle state of one sink, raising :class:`SinkStateError` on misuse.

    Not thread safe by itself; sinks that allow several threads guard it with
    their own lock.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.state = State.NEW

    def start(self) -> None:
        """Move from NEW to OPEN, or raise because the sink was already opened."""
        if self.state is not State.NEW:
            raise SinkStateError(
                f"{self.owner}.open() was called on a sink that is {self.state.value}; "
                "a sink stores one result, so create a new sink for each array"
            )
        self.state = State.OPEN

    def require_open(self, method: str) -> None:
        """Raise unless the sink is open, naming ``method`` in the message."""
        if self.state is State.OPEN:
            return
        if self.state is State.NEW:
            hint = "call open(spec) first"
        else:
            hint = "a sink stores one result and cannot be reused after finalize() or abort()"
        raise SinkStateError(
            f"{self.owner}.{method}() called while the sink is {self.state.value}; {hint}"
        )

    def end(self, state: State) -> None:
        """Move from OPEN to FINALIZED or ABORTED."""
        self.state = state


def check_spec(spec: ArraySpec, owner: str) -> None:
    """Raise :class:`SinkConfigError` when ``spec`` cannot describe a storable array."""
    if spec.dtype.hasobject:
        raise SinkConfigError(
            f"{owner} cannot store result {spec.name!r} of dtype {spec.dtype}: object "
            "elements are pointers, not data; convert the array to a fixed-size dtype"
        )
    if any(n is None for n in spec.shape[1:]):
        raise SinkConfigError(
            f"result {spec.name!r} has shape {spec.shape}: only axis 0 may be unknown (None)"
        )
    if any(n is not None and n < 0 for n in spec.shape):
        raise SinkConfigError(f"result {spec.name!r} has a negative length in shape {spec.shape}")
    if len(spec.chunks) != len(spec.shape):
        raise SinkConfigError(
            f"result {spec.name!r} has shape {spec.shape} but chunks {spec.chunks}; "
            "chunks needs one entry per axis"
        )
    if any(c < 0 for c in spec.chunks):
        raise SinkConfigError(f"result {spec.name!r} has a negative chunk length in {spec.chunks}")


def check_region(region: Region, shape: tuple[int, ...], growable: bool, name: str) -> None:
    """Raise :class:`SinkRegionError` unless ``region`` lies inside ``shape``.

    For a growable array axis 0 is not checked, because the sink grows to fit.
    """
    if len(region.start) != len(shape):
        raise SinkRegionError(
            f"region {region.start}..{region.stop} has {len(region.start)} axes, but result "
            f"{name!r} has {len(shape)} (shape {shape})"
        )
    first_checked = 1 if growable else 0
    for axis in range(first_checked, len(shape)):
        if region.stop[axis] > shape[axis]:
            raise SinkRegionError(
                f"region {region.start}..{region.stop} ends past axis {axis} of result "
                f"{name!r}, whose shape is {shape}"
            )


def check_data(region: Region, data: npt.NDArray[Any], name: str) -> None:
    """Raise :class:`SinkRegionError` when ``data`` does not have the region's shape."""
    if data.shape != region.shape:
        raise SinkRegionError(
            f"data of shape {data.shape} does not match region {region.start}..{region.stop} "
            f"(shape {region.shape}) of result {name!r}"
        )


def check_final_shape(spec: ArraySpec, shape: tuple[int, ...], extent: int, owner: str) -> None:
    """Raise :class:`SinkRegionError` when ``shape`` cannot close the array ``spec`` declares.

    ``extent`` is the end along axis 0 of the furthest committed region.
    """
    declared = spec.initial_shape()
    if len(shape) != len(declared) or tuple(shape[1:]) != declared[1:]:
        raise SinkRegionError(
            f"{owner}.finalize({shape}) does not match the declared shape {spec.shape} "
            f"of result {spec.name!r}"
        )
    if not spec.growable and tuple(shape) != declared:
        raise SinkRegionError(
            f"{owner}.finalize({shape}) differs from the fixed shape {spec.shape} "
            f"of result {spec.name!r}"
        )
    if spec.growable and shape[0] < extent:
        raise SinkRegionError(
            f"{owner}.finalize({shape}) would cut off committed rows: regions of result "
            f"{spec.name!r} reach row {extent} along axis 0"
        )


def region_view(array: npt.NDArray[Any], region: Region) -> npt.NDArray[Any]:
    """Return the view of ``region`` in ``array``, also for 0-d arrays.

    ``array[()]`` would return a scalar copy for a 0-d array; the trailing
    Ellipsis keeps the result a view.
    """
    index: tuple[Any, ...] = (*region.slices, Ellipsis)
    view: npt.NDArray[Any] = array[index]
    return view


def grown_length(current: int, needed: int, step: int) -> int:
    """Return the new axis-0 capacity: at least ``needed``, doubling for amortised growth."""
    return max(needed, 2 * current, step, 1)


def default_fill_value(dtype: np.dtype[Any]) -> Any:
    """Return the value that marks unwritten elements: NaN, NaT or zero.

    Floating and complex dtypes get NaN and datetime64/timedelta64 get NaT, so
    gaps are distinguishable from data; every other dtype gets its zero (False,
    0, empty string, zero bytes).
    """
    if dtype.kind == "f":
        return np.full((), np.nan, dtype=dtype)[()]
    if dtype.kind == "c":
        return np.full((), complex(np.nan, np.nan), dtype=dtype)[()]
    if dtype.kind == "M":
        return np.full((), np.datetime64("NaT"), dtype=dtype)[()]
    if dtype.kind == "m":
        return np.full((), np.timedelta64("NaT"), dtype=dtype)[()]
    return np.zeros((), dtype=dtype)[()]


def contiguous_start(region: Region, shape: tuple[int, ...]) -> int | None:
    """Flat C-order index where ``region`` starts, if it is one contiguous run of ``shape``.

    A region is contiguous when, after its first axis longer than 1, it spans
    every later axis in full (whole frames, or whole rows of one frame).
    Returns None otherwise.
    """
    seen_long_axis = False
    for lo, hi, length in zip(region.start, region.stop, shape, strict=True):
        if seen_long_axis and (lo != 0 or hi != length):
            return None
        if hi - lo > 1:
            seen_long_axis = True

    index = 0
    for lo, length in zip(region.start, shape, strict=True):
        index = index * length + lo
    return index

"""Locks, scratch buffers and Blosc1 header checks used by :class:`ZarrSink`."""

from __future__ import annotations

import contextlib
import itertools
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ._base import Region

# Blosc1 chunk header: version, versionlz, flags, typesize (1 byte each), then
# nbytes, blocksize, cbytes (uint32 little-endian). Source: c-blosc 1.x README_HEADER.rst.
_BLOSC1_HEADER = struct.Struct("<BBBBIII")
# c-blosc 1.x writes format version 2; Blosc2 chunks carry 3 or higher and
# numcodecs' Blosc1 decoder cannot read them.
_BLOSC1_MAX_FORMAT_VERSION = 2


def blosc1_header_matches(payload: memoryview, nbytes: int, typesize: int) -> bool:
    """Return whether ``payload`` is a Blosc1 chunk of ``nbytes`` raw bytes and ``typesize``.

    Checks the format version, the typesize, the raw size and that the stated
    compressed size equals the payload length. It does not decompress.
    """
    if len(payload) < _BLOSC1_HEADER.size:
        return False
    fields: tuple[int, ...] = _BLOSC1_HEADER.unpack_from(payload)
    version, _, _, stated_typesize, stated_nbytes, _, cbytes = fields
    return (
        1 <= version <= _BLOSC1_MAX_FORMAT_VERSION
        and stated_typesize == typesize
        and stated_nbytes == nbytes
        and cbytes == len(payload)
    )


def store_identity(store: Any) -> str:
    """Return a string that is equal for two handles of the same zarr store in this process.

    Local stores compare by resolved root directory, so two ``LocalStore``
    objects on one directory share locks. Other stores compare by object id.
    """
    root = getattr(store, "root", None)
    if isinstance(root, Path):
        return f"local:{root.resolve()}"
    return f"object:{id(store)}"


class ChunkLocks:
    """Striped locks that serialise read-modify-write of zarr chunks or shards.

    A storage unit (chunk or shard) is named by store identity, array path and
    grid coordinates, and hashed onto one of ``stripes`` locks. Two units may
    share a stripe; that costs waiting, never correctness. Locks are always
    taken in ascending stripe order, so holders of several cannot deadlock.
    Thread safe.
    """

    def __init__(self, stripes: int) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]

    def _stripe(self, store_id: str, path: str, coords: tuple[int, ...]) -> int:
        return hash((store_id, path, coords)) % len(self._locks)

    @contextlib.contextmanager
    def hold(self, store_id: str, path: str, units: Iterable[tuple[int, ...]]) -> Iterator[None]:
        """Hold the locks of every unit in ``units`` for the duration of the block."""
        stripes = sorted({self._stripe(store_id, path, coords) for coords in units})
        with self._held(stripes):
            yield

    @contextlib.contextmanager
    def hold_grid(self, store_id: str, path: str, ranges: Sequence[range]) -> Iterator[None]:
        """Hold the locks of every unit in the grid block given by one range per axis.

        A block with at least as many units as stripes takes every stripe.
        """
        count = 1
        for axis_range in ranges:
            count *= len(axis_range)
        if count >= len(self._locks):
            stripes: Sequence[int] = range(len(self._locks))
        else:
            units = itertools.product(*ranges)
            stripes = sorted({self._stripe(store_id, path, coords) for coords in units})
        with self._held(stripes):
            yield

    @contextlib.contextmanager
    def _held(self, stripes: Iterable[int]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for index in stripes:
                stack.enter_context(self._locks[index])
            yield


class ScratchPool:
    """A bounded pool of byte buffers, each big enough for one encoded or raw chunk.

    :meth:`acquire` reuses a free buffer, allocates one while fewer than
    ``limit`` exist, and otherwise waits for a background write to release
    one. If every buffer is held by an uncommitted destination and no write is
    running, waiting could never end, so it allocates one more buffer; extra
    buffers are dropped on release. Thread safe.
    """

    def __init__(self, nbytes: int, limit: int) -> None:
        self.nbytes = nbytes
        self.limit = limit
        self._condition = threading.Condition()
        self._free: list[npt.NDArray[np.uint8]] = []
        self._allocated = 0
        self._jobs = 0

    def acquire(self) -> npt.NDArray[np.uint8]:
        """Return a buffer of :attr:`nbytes` bytes, blocking while the pool is exhausted."""
        with self._condition:
            while True:
                if self._free:
                    return self._free.pop()
                if self._allocated < self.limit or self._jobs == 0:
                    self._allocated += 1
                    return np.empty(self.nbytes, dtype=np.uint8)
                self._condition.wait()

    def job_started(self) -> None:
        """Count a background write that will release its buffer when done."""
        with self._condition:
            self._jobs += 1

    def release(self, buffer: npt.NDArray[np.uint8], *, job_done: bool) -> None:
        """Return ``buffer`` to the pool.

        ``job_done`` ends a background write counted by :meth:`job_started`.
        """
        with self._condition:
            if job_done:
                self._jobs -= 1
            if self._allocated > self.limit:
                self._allocated -= 1
            else:
                self._free.append(buffer)
            self._condition.notify()


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """How a region maps onto exactly one zarr chunk.

    ``kind`` is ``"whole"`` when the region is the full chunk. It is ``"tail"``
    when only axis 0 ends early, so the region is the contiguous front of the
    chunk. Other edge chunks are ``"padded"``: they are copied into a full
    chunk before encoding.
    """

    coords: tuple[int, ...]
    kind: Literal["whole", "tail", "padded"]


def plan_region(
    region: Region, chunk_shape: tuple[int, ...], shape: tuple[int, ...], growable: bool
) -> ChunkPlan | None:
    """Return how ``region`` of an array of ``shape`` maps onto one chunk, or None."""
    coords: list[int] = []
    short_axes: list[int] = []
    for axis, chunk in enumerate(chunk_shape):
        start, stop = region.start[axis], region.stop[axis]
        if start % chunk != 0:
            return None
        if stop - start == chunk:
            pass
        elif stop - start < chunk and stop == shape[axis] and not (growable and axis == 0):
            # Only a true edge of a fixed axis may be short: padding it
            # with the fill value cannot overwrite another region.
            short_axes.append(axis)
        else:
            return None
        coords.append(start // chunk)

    if not short_axes:
        return ChunkPlan(tuple(coords), "whole")
    if short_axes == [0]:
        return ChunkPlan(tuple(coords), "tail")
    return ChunkPlan(tuple(coords), "padded")

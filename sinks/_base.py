"""The sink interface: where received chunks of a result array are written.

A sink receives one result. Its life cycle is::

    sink.open(spec)
    for each chunk:                          # in any order, each region once
        dest = sink.destination(region)      # writable view of the region, or None
        if dest is not None:
            ... fill dest ...                # e.g. socket.recv_into(dest)
            sink.commit(region)
        else:
            sink.write(region, data)         # or write_owned(region, data)
    handle = sink.finalize(shape)            # or sink.abort(reason)

A region may also arrive compressed: ``sink.write_encoded(region, payload,
encoding)`` stores the bytes as they are and returns True, or returns False and
the caller decodes them into :meth:`Sink.destination` (or :meth:`Sink.write`).

This package never imports the transport. It works with arrays, regions and
files, not sockets.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "ArraySpec",
    "ChunkEncoding",
    "Region",
    "Sink",
    "SinkConfigError",
    "SinkError",
    "SinkRegionError",
    "SinkStateError",
    "SinkWriteError",
]


class SinkError(Exception):
    """Root of the errors a sink raises on purpose."""


class SinkStateError(SinkError, RuntimeError):
    """A sink method was called out of order (write before open, after finalize ...)."""


class SinkConfigError(SinkError, ValueError):
    """A sink argument is invalid: unknown sink name, unusable path, mismatched ``out=`` array."""


class SinkExistsError(SinkConfigError):
    """The target file or zarr node exists and the sink was not asked to overwrite it."""


class SinkRegionError(SinkError, ValueError):
    """A region or its data does not fit the declared array (bounds, rank, shape, dtype)."""


class SinkWriteError(SinkError, OSError):
    """Storing a chunk failed; the underlying exception is chained as ``__cause__``."""


@dataclass(frozen=True, slots=True)
class Region:
    """A hyper-rectangle of a result array: ``start`` inclusive, ``stop`` exclusive.

    Both tuples have one entry per axis of the result.
    """

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.start) != len(self.stop):
            raise ValueError(
                f"region start {self.start} and stop {self.stop} have different lengths"
            )
        for lo, hi in zip(self.start, self.stop, strict=True):
            if lo < 0 or hi < lo:
                raise ValueError(
                    f"invalid region start {self.start} stop {self.stop}: "
                    "every axis needs 0 <= start <= stop"
                )

    @property
    def shape(self) -> tuple[int, ...]:
        """Extent of the region along each axis."""
        return tuple(hi - lo for lo, hi in zip(self.start, self.stop, strict=True))

    @property
    def size(self) -> int:
        """Number of elements in the region."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def slices(self) -> tuple[slice, ...]:
        """The region as a tuple of slices, for indexing an array."""
        return tuple(slice(lo, hi) for lo, hi in zip(self.start, self.stop, strict=True))


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """Declaration of one result array, handed to :meth:`Sink.open`.

    Attributes
    ----------
    name:
        The result's name, unique within its execution.
    shape:
        Full shape. ``None`` as the first entry means the length along axis 0 is
        not known in advance and the sink must grow as regions arrive.
    dtype:
        The exact dtype of the elements, byte order included.
    chunks:
        Shape of the regular grid the incoming regions follow. Edge regions may
        be smaller. Sinks that store chunks (zarr) align their chunks to it.
    attrs:
        User attributes, JSON-compatible values only.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]
    chunks: tuple[int, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def growable(self) -> bool:
        """Whether the length along axis 0 is unknown until the stream ends."""
        return len(self.shape) > 0 and self.shape[0] is None

    def initial_shape(self) -> tuple[int, ...]:
        """Shape to allocate at open: an unknown axis-0 length starts at 0."""
        return tuple(0 if n is None else n for n in self.shape)


@dataclass(frozen=True, slots=True)
class ChunkEncoding:
    """Compression parameters of a chunk that arrives already compressed.

    Attributes
    ----------
    format:
        ``"blosc1"`` (the chunk format zarr's ``BloscCodec`` stores) or
        ``"blosc2"`` (the Blosc2 chunk format).
    cname:
        Compressor name, for example ``"lz4"`` or ``"zstd"``.
    clevel:
        Compression level, 0 to 9.
    shuffle:
        ``"noshuffle"``, ``"shuffle"`` or ``"bitshuffle"``.
    typesize:
        Element size in bytes used for shuffling, 1 to 255.
    """

    format: str
    cname: str
    clevel: int
    shuffle: str
    typesize: int


class Sink(abc.ABC):
    """Destination for one result array.

    Contract
    --------
    - Methods are called from one thread at a time; a sink is not thread safe
      unless its class documents otherwise.
    - :meth:`open` is called once, then any number of region calls, then
      :meth:`finalize` or :meth:`abort`. Calls out of this order raise
      :class:`SinkStateError`, except :meth:`abort` after :meth:`finalize` or
      :meth:`abort`, which does nothing, so error handlers can call it freely.
    - Each region is delivered at most once, in any order. Regions never
      overlap and always lie inside the declared shape (for a growable result,
      inside the shape as extended along axis 0). Sinks may check this and
      raise :class:`SinkRegionError`.
    - :meth:`finalize` makes every committed region durable (flushed to disk
      for file sinks) before it returns. After :meth:`abort`, data already
      committed stays where it was written; sinks that mark completeness (zarr)
      leave the mark saying incomplete.
    - The conformance suite in :mod:`sinks.testing` checks these rules for any
      sink class.
    """

    #: True when :meth:`write_owned` stores the data without copying it
    #: first. A caller with memory that is never modified afterwards (a
    #: received message frame) then hands it to :meth:`write_owned` instead
    #: of filling :meth:`destination`, which saves one copy.
    takes_ownership: ClassVar[bool] = False

    @abc.abstractmethod
    def open(self, spec: ArraySpec) -> None:
        """Prepare storage for the array ``spec`` declares."""

    def destination(self, region: Region) -> npt.NDArray[Any] | None:
        """Return a writable array of ``region.shape`` to fill in place, or None.

        The array has ``spec.dtype`` exactly. The caller fills it, then calls
        :meth:`commit` with the same region; callers that receive raw bytes
        (``socket.recv_into``) do so only when the array is C-contiguous.
        Returning None makes the caller use :meth:`write` instead. The returned
        array stays valid until that :meth:`commit`, and writing into it after
        :meth:`finalize` or :meth:`abort` is undefined (file sinks may have
        unmapped it).
        """
        return None

    def commit(self, region: Region) -> None:  # noqa: B027 - optional hook, no-op by default
        """Record that the array :meth:`destination` returned for ``region`` is filled."""

    @abc.abstractmethod
    def write(self, region: Region, data: npt.NDArray[Any]) -> None:
        """Copy ``data`` (shape ``region.shape``) into the region; the caller keeps ``data``."""

    def write_owned(self, region: Region, data: npt.NDArray[Any]) -> None:
        """Store ``data`` (shape ``region.shape``), taking over its memory.

        Unlike :meth:`write`, the caller hands ``data`` over: it never modifies
        or reuses that memory afterwards, so the sink may keep a reference and
        store the data later, for example from a background thread, without
        copying it first. ``data`` may be read-only. A failure of such a
        deferred store is raised by a later region call or by
        :meth:`finalize`. The default calls :meth:`write`.
        """
        self.write(region, data)

    def write_encoded(
        self, region: Region, payload: memoryview, encoding: ChunkEncoding, *, owned: bool = False
    ) -> bool:
        """Store already-compressed bytes as they are, if this sink can.

        Returns True when the bytes were stored verbatim; False means nothing was
        stored and the caller must decode them and use :meth:`destination` or
        :meth:`write`. ``payload`` is only valid during the call, so a sink that
        stores it later must copy it first. With ``owned`` the caller hands the
        memory over as in :meth:`write_owned`; callers pass it only to sinks
        whose :attr:`takes_ownership` is True.
        """
        return False

    def preferred_encoding(self) -> ChunkEncoding | None:
        """Return the encoding whose chunks :meth:`write_encoded` stores verbatim, if any."""
        return None

    @abc.abstractmethod
    def finalize(self, shape: tuple[int, ...]) -> Any:
        """Complete the array with its final ``shape`` and return a handle to it.

        For a growable result ``shape[0]`` is the final length. The handle is
        what the user gets back: an ndarray, a read-only memmap, a zarr array.
        """

    @abc.abstractmethod
    def abort(self, reason: str) -> None:
        """Stop receiving; keep what was committed and record ``reason`` if the sink can."""

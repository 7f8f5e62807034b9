"""A sink that writes a result into a memory-mapped ``.npy`` file."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from ._base import ArraySpec, Region, Sink, SinkConfigError, SinkRegionError, SinkWriteError
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

logger = logging.getLogger(__name__)

__all__ = ["MemmapSink"]


class MemmapSink(Sink):
    """Store a result in an ``.npy`` file through a writable memory map.

    :meth:`destination` returns a slice of the map, so a receiver's
    ``recv_into`` copies bytes from the socket straight into the page cache.
    The file is a standard ``.npy`` (format 1.0, or 2.0 for headers over 64 KiB)
    that ``np.load(path, mmap_mode="r")`` opens anywhere. Unwritten elements
    read as zero because the file is extended sparsely. Structured dtypes with
    hundreds of fields make headers over 10000 bytes, which ``np.load`` only
    reads with a larger ``max_header_size``.

    Parameters
    ----------
    path:
        The ``.npy`` file to create. Its parent directory must exist.
    overwrite:
        Replace an existing file at ``path``. Without it an existing file is an
        error, so a typo cannot destroy data.

    Notes
    -----
    A growable result starts with ``spec.chunks[0]`` rows and doubles the file
    when a region reaches past it. numpy's ``.npy`` writer pads every header so
    that axis 0 can grow to 21 digits, so the header is rewritten in place and
    the data never moves. While streaming, the header states the capacity;
    :meth:`finalize` and :meth:`abort` truncate the file and write the real
    length.

    The sink keeps no copy of the data in anonymous memory: pages belong to the
    file and the kernel writes them back. :meth:`finalize` flushes the map and
    calls ``fsync`` before it returns.

    Not thread safe: call its methods from one thread at a time.
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self._lifecycle = Lifecycle(type(self).__name__)
        self._spec: ArraySpec | None = None
        self._file: BinaryIO | None = None
        self._map: np.memmap[Any, Any] | None = None
        self._header_version: tuple[int, int] = (1, 0)
        self._data_offset = 0
        self._extent = 0
        self._pending: set[Region] = set()

    def open(self, spec: ArraySpec) -> None:
        """Create the file with a header for ``spec`` and map its data."""
        self._lifecycle.start()
        check_spec(spec, type(self).__name__)
        self._check_path()
        self._spec = spec

        shape = spec.initial_shape()
        if spec.growable:
            shape = (max(spec.chunks[0], 1), *shape[1:])
        try:
            self._file = open(self.path, "w+b")  # noqa: SIM115 - closed in finalize/abort
            self._write_header(shape)
            self._data_offset = self._file.tell()
            self._remap(shape)
        except OSError as exc:
            self._close_quietly()
            raise SinkWriteError(f"cannot create memmap file {self.path}: {exc}") from exc
        logger.debug("memmap sink created %s with shape %s", self.path, shape)

    def destination(self, region: Region) -> npt.NDArray[Any]:
        """Return the memmap slice of ``region``; it is C-contiguous for row-major blocks."""
        array = self._mapped_for(region, "destination")
        self._pending.add(region)
        return region_view(array, region)

    def commit(self, region: Region) -> None:
        """Record ``region`` as filled; the bytes are already in the mapped file."""
        self._lifecycle.require_open("commit")
        try:
            self._pending.remove(region)
        except KeyError:
            raise SinkRegionError(
                f"commit({region.start}..{region.stop}) has no matching destination(); "
                "call destination(region) before commit(region)"
            ) from None
        self._extent = max(self._extent, region.stop[0] if region.stop else 0)

    def write(self, region: Region, data: npt.NDArray[Any]) -> None:
        """Copy ``data`` into the mapped file; numpy casting rule ``"same_kind"`` applies."""
        array = self._mapped_for(region, "write")
        check_data(region, data, self._require_spec().name)
        np.copyto(region_view(array, region), data, casting="same_kind")
        self._extent = max(self._extent, region.stop[0] if region.stop else 0)

    def finalize(self, shape: tuple[int, ...]) -> np.memmap[Any, Any]:
        """Flush and fsync the file, then return it as a read-only memmap of ``shape``."""
        self._lifecycle.require_open("finalize")
        spec = self._require_spec()
        check_final_shape(spec, tuple(shape), self._extent, type(self).__name__)
        try:
            self._close(tuple(shape))
        except OSError as exc:
            self._close_quietly()
            self._lifecycle.end(State.ABORTED)
            raise SinkWriteError(f"cannot complete memmap file {self.path}: {exc}") from exc
        self._lifecycle.end(State.FINALIZED)

        # numpy refuses headers over 10000 bytes by default, as a guard against
        # untrusted files; this header was written just now, so it is trusted.
        max_header_size = max(10_000, self._data_offset)
        result: np.memmap[Any, Any] = np.lib.format.open_memmap(
            self.path, mode="r", max_header_size=max_header_size
        )
        return result

    def abort(self, reason: str) -> None:
        """Flush what was committed and close the file; it stays on disk.

        A growable result's header states the rows up to the furthest
        committed region. Rows inside that range that were never written read
        as zero.
        """
        if self._lifecycle.state is State.NEW:
            self._lifecycle.end(State.ABORTED)
        if self._lifecycle.state is not State.OPEN:
            return
        spec = self._require_spec()
        shape = spec.initial_shape()
        if spec.growable:
            shape = (self._extent, *shape[1:])
        try:
            self._close(shape)
        except OSError as exc:
            logger.error("memmap sink could not flush %s while aborting: %s", self.path, exc)
            self._close_quietly()
        logger.info("memmap sink aborted, partial data kept in %s: %s", self.path, reason)
        self._lifecycle.end(State.ABORTED)

    def _require_spec(self) -> ArraySpec:
        assert self._spec is not None, "open() sets the spec before the state becomes OPEN"
        return self._spec

    def _check_path(self) -> None:
        path = self.path
        if path.is_dir():
            raise SinkConfigError(
                f"memmap path {path} is a directory; pass a file path such as {path / 'result.npy'}"
            )
        if path.exists() and not self.overwrite:
            raise SinkConfigError(
                f"memmap file {path} already exists; pass overwrite=True to replace it, "
                "or choose another path"
            )
        if not path.parent.is_dir():
            raise SinkConfigError(
                f"the directory {path.parent} for memmap file {path.name} does not exist; "
                "create it first"
            )

    def _mapped_for(self, region: Region, method: str) -> npt.NDArray[Any]:
        self._lifecycle.require_open(method)
        spec = self._require_spec()
        assert self._map is not None
        check_region(region, self._map.shape, spec.growable, spec.name)
        if spec.growable and region.stop[0] > self._map.shape[0]:
            rows = grown_length(self._map.shape[0], region.stop[0], spec.chunks[0])
            self._grow(rows)
        return self._map

    def _header_dict(self, shape: tuple[int, ...]) -> dict[str, Any]:
        spec = self._require_spec()
        return {
            "descr": np.lib.format.dtype_to_descr(spec.dtype),
            "fortran_order": False,
            "shape": shape,
        }

    def _write_header(self, shape: tuple[int, ...]) -> None:
        """Write a fresh header at offset 0, choosing format 1.0 or 2.0 as numpy does."""
        assert self._file is not None
        header = self._header_dict(shape)
        try:
            np.lib.format.write_array_header_1_0(self._file, header)
            self._header_version = (1, 0)
        except ValueError:
            # Format 1.0 stores the header length in 16 bits; large structured
            # dtypes need format 2.0.
            self._file.seek(0)
            self._file.truncate()
            np.lib.format.write_array_header_2_0(self._file, header)
            self._header_version = (2, 0)

    def _rewrite_header(self, shape: tuple[int, ...]) -> None:
        """Overwrite the header in place, keeping its length so the data does not move."""
        assert self._file is not None
        buffer = io.BytesIO()
        if self._header_version == (1, 0):
            np.lib.format.write_array_header_1_0(buffer, self._header_dict(shape))
        else:
            np.lib.format.write_array_header_2_0(buffer, self._header_dict(shape))
        if buffer.tell() != self._data_offset:
            # numpy pads headers for 21-digit axis-0 lengths, so this means a
            # numpy release changed its header layout.
            raise SinkWriteError(
                f"the .npy header for shape {shape} is {buffer.tell()} bytes, but the data in "
                f"{self.path} starts at byte {self._data_offset}; the header cannot be "
                "rewritten in place with this numpy version"
            )
        self._file.seek(0)
        self._file.write(buffer.getbuffer())

    def _remap(self, shape: tuple[int, ...]) -> None:
        """Size the file for ``shape`` and map its data section."""
        assert self._file is not None
        spec = self._require_spec()
        nbytes = int(np.prod(shape, dtype=np.int64)) * spec.dtype.itemsize
        # truncate() extends sparsely: no blocks are written until pages are dirtied.
        self._file.truncate(self._data_offset + nbytes)
        self._file.flush()
        self._map = np.memmap(
            self._file, dtype=spec.dtype, mode="r+", offset=self._data_offset, shape=shape
        )

    def _grow(self, rows: int) -> None:
        """Extend the file to ``rows`` along axis 0 and remap it.

        Slices from the old map stay valid: both maps share the same file pages
        and the file only grows until the sink closes.
        """
        assert self._map is not None
        shape = (rows, *self._map.shape[1:])
        try:
            self._map.flush()
            self._rewrite_header(shape)
            self._remap(shape)
        except OSError as exc:
            raise SinkWriteError(f"cannot grow memmap file {self.path} to {shape}: {exc}") from exc
        logger.debug("memmap sink grew %s to shape %s", self.path, shape)

    def _close(self, shape: tuple[int, ...]) -> None:
        """Flush the map, cut the file to ``shape``, write the header and fsync."""
        assert self._file is not None and self._map is not None
        if self._pending:
            logger.warning(
                "memmap sink closes %s with %d destination(s) never committed",
                self.path,
                len(self._pending),
            )
            self._pending.clear()
        self._map.flush()
        # Dropping the sink's reference unmaps the file once no slice is alive.
        self._map = None

        spec = self._require_spec()
        if spec.growable:
            nbytes = int(np.prod(shape, dtype=np.int64)) * spec.dtype.itemsize
            self._file.truncate(self._data_offset + nbytes)
            self._rewrite_header(shape)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def _close_quietly(self) -> None:
        self._map = None
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                logger.warning("closing memmap file %s failed: %s", self.path, exc)
            self._file = None

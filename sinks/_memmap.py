"""A sink that writes a result into a memory-mapped ``.npy`` file."""

from __future__ import annotations

import errno
import io
import logging
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import numpy.typing as npt

from ._background import BackgroundWriter
from ._base import (
    ArraySpec,
    Region,
    Sink,
    SinkConfigError,
    SinkExistsError,
    SinkRegionError,
    SinkWriteError,
)
from ._common import (
    Lifecycle,
    State,
    check_data,
    check_final_shape,
    check_region,
    check_spec,
    contiguous_start,
    grown_length,
    region_view,
)
from ._direct import ALIGN, Staging, aligned_up, open_direct, wants_direct

logger = logging.getLogger(__name__)

# Default bound on queued background writes, in bytes: eight 8 MiB frames.
_DEFAULT_MAX_PENDING_BYTES = 64 << 20

__all__ = ["MemmapSink"]


class MemmapSink(Sink):
    """Store a result in an ``.npy`` file.

    A region that is contiguous in the file (whole frames, or whole rows of
    one frame) is written with ``os.pwrite``, one copy into the page cache.
    :meth:`write_owned` queues that write for a background thread, so the
    receiver goes on receiving while the kernel copies. Other regions are
    copied through a memory map of the file. :meth:`destination` returns
    None: writing through a shared file mapping costs a page fault per 4 KiB
    and ran slower than ``pwrite`` here.

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
    durable:
        Call ``fsync`` in :meth:`finalize`, so the data is on disk, not only in
        the page cache, when the result is reported complete. Off by default:
        every process on the machine reads the finished file either way, and
        on the test machine ``fsync`` cut the throughput to about 0.5 GB/s.
    direct_io:
        Write contiguous, block-aligned regions queued by :meth:`write_owned`
        with ``O_DIRECT``, past the page cache (see ``sinks/_direct.py`` for
        the measurements behind it). None (the default) does so for results
        of 256 MiB or more; True for any size; False never. File systems
        without ``O_DIRECT`` (tmpfs) always get buffered writes.
    max_pending_bytes:
        Bound on the bytes :meth:`write_owned` queues for the background
        writer; the call blocks beyond it.

    Notes
    -----
    A growable result starts with ``spec.chunks[0]`` rows and doubles the file
    when a region reaches past it. numpy's ``.npy`` writer pads every header so
    that axis 0 can grow to 21 digits, so the header is rewritten in place and
    the data never moves. While streaming, the header states the capacity;
    :meth:`finalize` and :meth:`abort` truncate the file and write the real
    length.

    The sink keeps no copy of the data in anonymous memory beyond the queued
    writes: pages belong to the file and the kernel writes them back.
    :meth:`finalize` waits for the queued writes and flushes the map before it
    returns (and calls ``fsync`` with ``durable=True``).

    Not thread safe: call its methods from one thread at a time.
    """

    takes_ownership = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        durable: bool = False,
        direct_io: bool | None = None,
        max_pending_bytes: int = _DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.durable = durable
        self.direct_io = direct_io
        self._direct_fd: int | None = None
        # Set by the writer thread after the device rejected a direct write.
        self._direct_rejected = False
        self._staging: Staging | None = None
        self.max_pending_bytes = max_pending_bytes
        self._writer: BackgroundWriter | None = None
        self._shape: tuple[int, ...] = ()
        self._lifecycle = Lifecycle(type(self).__name__)
        self._spec: ArraySpec | None = None
        self._file: BinaryIO | None = None
        self._map: np.memmap[Any, Any] | None = None
        self._header_version: tuple[int, int] = (1, 0)
        self._data_offset = 0
        self._extent = 0

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
            self._write_header(shape, aligned=wants_direct(self.direct_io, spec))
            self._data_offset = self._file.tell()
            self._resize_file(shape)
            if self._data_offset % ALIGN == 0:
                self._direct_fd = open_direct(self.path, os.O_WRONLY)
        except OSError as exc:
            self._close_quietly()
            raise SinkWriteError(f"cannot create memmap file {self.path}: {exc}") from exc
        logger.debug("memmap sink created %s with shape %s", self.path, shape)

    def destination(self, region: Region) -> None:
        """Return None: regions arrive through :meth:`write` or :meth:`write_owned`."""
        self._checked_for(region, "destination")
        return None

    def write(self, region: Region, data: npt.NDArray[Any]) -> None:
        """Write ``data`` into the file before returning; ``"same_kind"`` casting applies."""
        spec = self._checked_for(region, "write")
        check_data(region, data, spec.name)
        offset = self._file_offset(region)
        if offset is None:
            np.copyto(region_view(self._mapped(), region), data, casting="same_kind")
        else:
            self._pwrite(_as_bytes(data, spec.dtype), offset)
        self._extent = max(self._extent, region.stop[0] if region.stop else 0)

    def write_owned(self, region: Region, data: npt.NDArray[Any]) -> None:
        """Queue ``data`` for the background writer; it keeps a reference until written.

        Raises :class:`SinkWriteError` at once if an earlier queued write failed.
        """
        spec = self._checked_for(region, "write_owned")
        check_data(region, data, spec.name)
        offset = self._file_offset(region)
        if offset is None:
            self.write(region, data)
            return

        payload = _as_bytes(data, spec.dtype)
        store = self._pwrite_direct if self._direct_ok(region, offset, payload) else self._pwrite
        if self._writer is None:
            self._writer = BackgroundWriter("memmap-sink", self.max_pending_bytes)
        try:
            self._writer.submit(payload.nbytes, store, payload, offset)
        except OSError as exc:
            raise SinkWriteError(f"an earlier write to {self.path} failed: {exc}") from exc
        self._extent = max(self._extent, region.stop[0] if region.stop else 0)

    def finalize(self, shape: tuple[int, ...]) -> np.memmap[Any, Any]:
        """Finish queued writes and flush, then return the file as a read-only memmap.

        With ``durable=True`` the file is also fsynced first.
        """
        self._lifecycle.require_open("finalize")
        spec = self._require_spec()
        check_final_shape(spec, tuple(shape), self._extent, type(self).__name__)
        try:
            error = self._close(tuple(shape))
        except OSError as exc:
            self._close_quietly()
            self._lifecycle.end(State.ABORTED)
            raise SinkWriteError(f"cannot complete memmap file {self.path}: {exc}") from exc
        if error is not None:
            self._lifecycle.end(State.ABORTED)
            raise SinkWriteError(
                f"a queued write to memmap file {self.path} failed, so the file is incomplete: "
                f"{error}"
            ) from error
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
            error = self._close(shape)
        except OSError as exc:
            error = exc
            self._close_quietly()
        if error is not None:
            logger.error(
                "memmap sink could not write all of %s while aborting: %s", self.path, error
            )
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
            raise SinkExistsError(
                f"memmap file {path} already exists; pass overwrite=True to replace it, "
                "or choose another path"
            )
        if not path.parent.is_dir():
            raise SinkConfigError(
                f"the directory {path.parent} for memmap file {path.name} does not exist; "
                "create it first"
            )

    def _checked_for(self, region: Region, method: str) -> ArraySpec:
        """Check ``region`` against the file's shape, growing a growable file to fit it."""
        self._lifecycle.require_open(method)
        spec = self._require_spec()
        check_region(region, self._shape, spec.growable, spec.name)
        if spec.growable and region.stop[0] > self._shape[0]:
            rows = grown_length(self._shape[0], region.stop[0], spec.chunks[0])
            self._grow(rows)
        return spec

    def _file_offset(self, region: Region) -> int | None:
        """Byte offset of ``region`` in the file, or None if it is not one contiguous run."""
        index = contiguous_start(region, self._shape)
        if index is None:
            return None
        return self._data_offset + index * self._require_spec().dtype.itemsize

    def _direct_ok(self, region: Region, offset: int, payload: memoryview) -> bool:
        """Check that a direct write of ``region`` touches only blocks no other region shares.

        It must start on a block boundary and end on one, or end where the
        fixed-shape array ends (the padding then lies past the data and is
        cut off when the sink closes).
        """
        if self._direct_fd is None or self._direct_rejected or offset % ALIGN:
            return False
        if payload.nbytes % ALIGN == 0:
            return True
        spec = self._require_spec()
        return not spec.growable and tuple(region.stop) == self._shape

    def _pwrite_direct(self, payload: memoryview, offset: int) -> None:
        """Write from the background thread through the direct descriptor."""
        assert self._direct_fd is not None
        if self._staging is None:
            self._staging = Staging()
        try:
            self._staging.write_at(self._direct_fd, offset, payload)
        except OSError as exc:
            # A device whose logical blocks exceed ALIGN rejects the write with
            # EINVAL before writing anything, so a buffered write is safe.
            if exc.errno != errno.EINVAL:
                raise
            logger.warning("direct write to %s failed (%s); using buffered writes", self.path, exc)
            self._direct_rejected = True
            self._pwrite(payload, offset)

    def _pwrite(self, payload: memoryview, offset: int) -> None:
        assert self._file is not None
        fd = self._file.fileno()
        written = 0
        while written < payload.nbytes:
            written += os.pwrite(fd, payload[written:], offset + written)

    def _mapped(self) -> np.memmap[Any, Any]:
        """Map the data section on first use (only non-contiguous regions need it)."""
        if self._map is None or self._map.shape != self._shape:
            assert self._file is not None
            if self._map is not None:
                self._map.flush()
            self._map = np.memmap(
                self._file,
                dtype=self._require_spec().dtype,
                mode="r+",
                offset=self._data_offset,
                shape=self._shape,
            )
        return self._map

    def _header_dict(self, shape: tuple[int, ...]) -> dict[str, Any]:
        spec = self._require_spec()
        return {
            "descr": np.lib.format.dtype_to_descr(spec.dtype),
            "fortran_order": False,
            "shape": shape,
        }

    def _write_header(self, shape: tuple[int, ...], *, aligned: bool) -> None:
        """Write a fresh header at offset 0, choosing format 1.0 or 2.0 as numpy does.

        With ``aligned`` the header is padded with spaces to a multiple of
        :data:`ALIGN` bytes, which the format allows, so the data starts on a
        block boundary for direct writes.
        """
        assert self._file is not None
        buffer = io.BytesIO()
        header = self._header_dict(shape)
        try:
            np.lib.format.write_array_header_1_0(buffer, header)
            self._header_version = (1, 0)
        except ValueError:
            # Format 1.0 stores the header length in 16 bits; large structured
            # dtypes need format 2.0.
            buffer = io.BytesIO()
            np.lib.format.write_array_header_2_0(buffer, header)
            self._header_version = (2, 0)
        raw = buffer.getvalue()
        total = aligned_up(len(raw)) if aligned else len(raw)
        self._file.write(_padded_header(raw, self._header_version, total))

    def _rewrite_header(self, shape: tuple[int, ...]) -> None:
        """Overwrite the header in place, keeping its length so the data does not move."""
        assert self._file is not None
        buffer = io.BytesIO()
        if self._header_version == (1, 0):
            np.lib.format.write_array_header_1_0(buffer, self._header_dict(shape))
        else:
            np.lib.format.write_array_header_2_0(buffer, self._header_dict(shape))
        if buffer.tell() > self._data_offset:
            # numpy pads headers for 21-digit axis-0 lengths, so this means a
            # numpy release changed its header layout.
            raise SinkWriteError(
                f"the .npy header for shape {shape} is {buffer.tell()} bytes, but the data in "
                f"{self.path} starts at byte {self._data_offset}; the header cannot be "
                "rewritten in place with this numpy version"
            )
        self._file.seek(0)
        self._file.write(_padded_header(buffer.getvalue(), self._header_version, self._data_offset))

    def _resize_file(self, shape: tuple[int, ...]) -> None:
        """Size the file for ``shape``; a mapping is made again on next use."""
        assert self._file is not None
        spec = self._require_spec()
        nbytes = int(np.prod(shape, dtype=np.int64)) * spec.dtype.itemsize
        # truncate() extends sparsely: no blocks are written until pages are dirtied.
        self._file.truncate(self._data_offset + nbytes)
        self._file.flush()
        self._shape = shape

    def _grow(self, rows: int) -> None:
        """Extend the file to ``rows`` along axis 0.

        Queued writes may run meanwhile: the file only grows until the sink
        closes, and the header lies before every data offset.
        """
        shape = (rows, *self._shape[1:])
        try:
            self._rewrite_header(shape)
            self._resize_file(shape)
        except OSError as exc:
            raise SinkWriteError(f"cannot grow memmap file {self.path} to {shape}: {exc}") from exc
        logger.debug("memmap sink grew %s to shape %s", self.path, shape)

    def _close(self, shape: tuple[int, ...]) -> BaseException | None:
        """Finish queued writes, flush, cut the file to ``shape`` and write the header.

        Returns the first error of a queued write, if any; the file is closed
        either way.
        """
        assert self._file is not None
        error = self._writer.close() if self._writer is not None else None
        self._writer = None
        self._close_direct()
        if self._map is not None:
            self._map.flush()
            # Dropping the sink's reference unmaps the file once no slice is alive.
            self._map = None

        # Direct writes pad the last block, so a fixed-shape file is cut too.
        spec = self._require_spec()
        nbytes = int(np.prod(shape, dtype=np.int64)) * spec.dtype.itemsize
        self._file.truncate(self._data_offset + nbytes)
        if spec.growable:
            self._rewrite_header(shape)
        self._file.flush()
        if self.durable:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        return error

    def _close_direct(self) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def _close_quietly(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._close_direct()
        self._map = None
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                logger.warning("closing memmap file %s failed: %s", self.path, exc)
            self._file = None


def _as_bytes(data: npt.NDArray[Any], dtype: np.dtype[Any]) -> memoryview:
    """Return ``data`` as C-ordered bytes of ``dtype``, copying only to cast or reorder."""
    if data.dtype != dtype:
        if not np.can_cast(data.dtype, dtype, casting="same_kind"):
            raise SinkRegionError(
                f"cannot write data of dtype {data.dtype} into a result of dtype {dtype} "
                "under numpy's 'same_kind' casting rule; convert the data first"
            )
        data = data.astype(dtype)
    contiguous = np.ascontiguousarray(data)
    return memoryview(cast(Any, contiguous.reshape(-1).view(np.uint8)))


def _padded_header(raw: bytes, version: tuple[int, int], total: int) -> bytes:
    """Pad an ``.npy`` header made by numpy with spaces to ``total`` bytes.

    The format ends the header with a newline after any number of spaces and
    stores its length after the magic string and version, in 2 bytes for
    format 1.0 and 4 for 2.0.
    """
    if len(raw) == total:
        return raw
    length_format = "<H" if version == (1, 0) else "<I"
    prefix = 8 + struct.calcsize(length_format)
    text = raw[prefix:].rstrip(b"\n")
    text = text + b" " * (total - prefix - len(text) - 1) + b"\n"
    return raw[:8] + struct.pack(length_format, len(text)) + text

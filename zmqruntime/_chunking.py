"""Chunk layout: which regions of an array travel as one message.

Chunks follow a regular grid (like zarr's): a chunk shape, with smaller edge
chunks. The default grid keeps every chunk a contiguous run of the array's
C-order bytes ("row-major blocks"): whole frames along axis 0, several small
frames grouped together, or row bands of one large frame. A receiver with a
C-ordered destination can then receive each chunk straight into place.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import blosc2

from sinks import Region

from ._errors import ChunkingError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "default_chunks",
    "iter_regions",
    "validate_chunks",
]

# Target size of one chunk message. On 2-core test machines (pyzmq 27, libzmq
# 4.3, tcp loopback) messages of 1 to 4 MiB streamed fastest, about twice as
# fast as single messages of 256 MiB; tune with benchmarks/test_data_path.py.
DEFAULT_CHUNK_BYTES = 4 << 20

# A frame of up to this size is kept whole even when it exceeds the target, so
# a 2048 x 2048 uint16 image (8 MiB) stays one chunk, which is what viewers
# expect as a zarr chunk. Arbitrary; larger frames are split into row bands.
MAX_WHOLE_FRAME_BYTES = 16 << 20

# No frame may reach 2 GiB (libzmq and msgpack lengths are 32-bit signed in
# places) and blosc2 rejects inputs above MAX_BUFFERSIZE (2**31 - 33 bytes in
# python-blosc2 4.x), so a chunk's raw size stays at or below the smaller one.
MAX_CHUNK_BYTES = min(int(blosc2.MAX_BUFFERSIZE), 2**31 - 1)


def default_chunks(
    shape: tuple[int | None, ...],
    itemsize: int,
    *,
    target_bytes: int = DEFAULT_CHUNK_BYTES,
    group_frames: bool = True,
) -> tuple[int, ...]:
    """Return the default chunk shape for an array of ``shape``.

    Parameters
    ----------
    shape:
        The array's shape; ``None`` as the first entry means unknown length.
    itemsize:
        Bytes per element.
    target_bytes:
        Aimed-for chunk size in bytes.
    group_frames:
        Whether several small frames along axis 0 may share one chunk. A
        producer that writes frame by frame needs False.
    """
    if not shape:
        return ()

    # Bytes of one index along each axis: row_bytes[i] = prod(shape[i+1:]) * itemsize.
    tail = [int(n) if n is not None else 1 for n in shape]
    row_bytes = [max(1, math.prod(tail[i + 1 :]) * itemsize) for i in range(len(shape))]

    frame_bytes = row_bytes[0]
    if frame_bytes <= MAX_WHOLE_FRAME_BYTES:
        per_chunk = max(1, target_bytes // frame_bytes) if group_frames else 1
        if shape[0] is not None:
            per_chunk = min(per_chunk, max(1, shape[0]))
        return (per_chunk, *(max(1, n) for n in tail[1:]))

    # Split the first axis whose single index fits the target, keeping one
    # index of every axis before it: the chunk stays C-contiguous.
    for axis in range(1, len(shape)):
        if row_bytes[axis] <= target_bytes or axis == len(shape) - 1:
            count = max(1, min(tail[axis], target_bytes // row_bytes[axis]))
            return (1,) * axis + (count,) + tuple(max(1, n) for n in tail[axis + 1 :])

    # A 1-d array whose elements are each larger than the target.
    return (1,)


def validate_chunks(shape: tuple[int | None, ...], chunks: tuple[int, ...], itemsize: int) -> None:
    """Raise :class:`ChunkingError` if ``chunks`` does not fit ``shape`` or the size limits."""
    if len(chunks) != len(shape):
        raise ChunkingError(
            f"chunk shape {chunks} has {len(chunks)} axes but the array shape {shape} "
            f"has {len(shape)}; give one chunk length per axis"
        )
    if any(c < 1 for c in chunks):
        raise ChunkingError(f"chunk shape {chunks} has a length below 1; every axis needs >= 1")

    chunk_bytes = math.prod(chunks) * itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise ChunkingError(
            f"chunk shape {chunks} makes chunks of {chunk_bytes} bytes, above the limit of "
            f"{MAX_CHUNK_BYTES} bytes per message; use smaller chunks (the default "
            f"chunking aims at {DEFAULT_CHUNK_BYTES} bytes)"
        )


def iter_regions(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[Region]:
    """Yield the regions of the chunk grid covering ``shape``, in C order of the grid.

    Yields nothing when the array has no elements; yields one empty region
    for a 0-d array.
    """
    if any(n == 0 for n in shape):
        return

    ranges = [range(0, n, c) for n, c in zip(shape, chunks, strict=True)]
    for start in itertools.product(*ranges):
        stop = tuple(min(s + c, n) for s, c, n in zip(start, chunks, shape, strict=True))
        yield Region(tuple(start), stop)


def regions_within(
    region: Region, shape: tuple[int | None, ...], chunks: tuple[int, ...]
) -> Iterator[Region]:
    """Yield the grid cells that make up ``region``, which must be grid-aligned.

    Raises :class:`ChunkingError` when a bound of ``region`` falls inside a
    grid cell, except at the end of an axis of known length.
    """
    for axis, (lo, hi, c) in enumerate(zip(region.start, region.stop, chunks, strict=True)):
        length = shape[axis]
        aligned_stop = hi % c == 0 or (length is not None and hi == length)
        if lo % c != 0 or not aligned_stop:
            raise ChunkingError(
                f"region start {region.start} stop {region.stop} does not follow the chunk "
                f"grid {chunks} on axis {axis}; write whole chunks (start a multiple of "
                f"{c}, stop a multiple of {c} or the end of the axis), or declare the "
                "result with chunks matching how you write it"
            )

    offset = region.start
    for sub in iter_regions(region.shape, chunks):
        yield Region(
            tuple(o + s for o, s in zip(offset, sub.start, strict=True)),
            tuple(o + s for o, s in zip(offset, sub.stop, strict=True)),
        )

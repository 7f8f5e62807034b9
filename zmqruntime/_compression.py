"""Chunk compression: settings, the ``"auto"`` decision, compress and decompress.

Two chunk formats travel:

- ``"blosc2"``: the Blosc2 chunk format, made by python-blosc2.
- ``"blosc1"``: the Blosc1 chunk format, made by numcodecs. It is what zarr's
  ``BloscCodec`` stores, so a zarr sink can write such a chunk to its store
  as it is, without decompressing and compressing again.

python-blosc2 decompresses both formats, so receivers need only blosc2.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

import blosc2
import numcodecs
import numpy as np

from sinks import ChunkEncoding

from ._errors import PayloadSizeError, UnknownCodecError

__all__ = [
    "Compression",
    "as_compression",
    "compress_chunk",
    "decompress_into",
    "release_gil_in_codecs",
]

logger = logging.getLogger(__name__)

Mode = Literal["none", "blosc2", "blosc1", "auto"]

_BLOSC2_CODECS = {
    "blosclz": blosc2.Codec.BLOSCLZ,
    "lz4": blosc2.Codec.LZ4,
    "lz4hc": blosc2.Codec.LZ4HC,
    "zlib": blosc2.Codec.ZLIB,
    "zstd": blosc2.Codec.ZSTD,
}
_BLOSC2_FILTERS = {
    "noshuffle": blosc2.Filter.NOFILTER,
    "shuffle": blosc2.Filter.SHUFFLE,
    "bitshuffle": blosc2.Filter.BITSHUFFLE,
}
_BLOSC1_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}

# Blosc stores the typesize in one byte of its header.
_MAX_TYPESIZE = 255

# "auto" treats a link as local (loopback, ipc, inproc) at this many bytes per
# second, far above what a compressor reaches on one core, so it sends raw.
_LOCAL_LINK_BYTES_PER_S = 1e12

# Bytes of a chunk that "auto" compresses to estimate ratio and speed. Large
# enough to span several blosc blocks, small enough to cost well under 1 ms.
_SAMPLE_BYTES = 256 << 10


@dataclass(frozen=True, slots=True)
class Compression:
    """How a sender compresses chunks.

    Attributes
    ----------
    mode:
        ``"none"``; ``"blosc2"`` or ``"blosc1"`` to compress every chunk in
        that format; ``"auto"`` to compress with Blosc2 only where a sample of
        the data shows it pays on the link (see :meth:`pays_off`).
    cname:
        ``"lz4"`` (default), ``"lz4hc"``, ``"blosclz"``, ``"zstd"`` or ``"zlib"``.
    clevel:
        Compression level 0 to 9; 1 favours speed.
    shuffle:
        ``"shuffle"`` (byte shuffle, default), ``"bitshuffle"`` or ``"noshuffle"``.
    nthreads:
        Threads blosc2 uses per call.
    link_bytes_per_s:
        Bandwidth of the link in bytes per second, for ``"auto"``. None means
        a local link for loopback, ipc and inproc endpoints and 1.25e9 (10
        Gbit/s) otherwise; the sender fills it in from its endpoint.
    """

    mode: Mode = "none"
    cname: str = "lz4"
    clevel: int = 1
    shuffle: str = "shuffle"
    nthreads: int = 1
    link_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("none", "blosc2", "blosc1", "auto"):
            raise ValueError(
                f"compression mode {self.mode!r} is not one of None, 'blosc2', 'blosc1', 'auto'"
            )
        if self.cname not in _BLOSC2_CODECS:
            raise ValueError(
                f"compressor {self.cname!r} is not one of {sorted(_BLOSC2_CODECS)}; "
                "'lz4' is fast, 'zstd' compresses more"
            )
        if self.shuffle not in _BLOSC2_FILTERS:
            raise ValueError(f"shuffle {self.shuffle!r} is not one of {sorted(_BLOSC2_FILTERS)}")
        if not 0 <= self.clevel <= 9:
            raise ValueError(f"clevel {self.clevel} is outside 0..9")
        if self.nthreads < 1:
            raise ValueError(f"nthreads {self.nthreads} must be at least 1")

    def for_link(self, local: bool) -> Compression:
        """Return a copy with ``link_bytes_per_s`` filled in for a local or remote link."""
        if self.link_bytes_per_s is not None:
            return self
        return replace(self, link_bytes_per_s=_LOCAL_LINK_BYTES_PER_S if local else 1.25e9)

    def pays_off(self, ratio: float, compress_bytes_per_s: float) -> bool:
        """Return whether compressing beats sending raw by at least 10 %.

        Sending raw moves ``link`` raw bytes per second. Compressing moves
        ``min(compress speed, ratio * link)``, since compression and sending
        overlap in a pipeline.
        """
        link = self.link_bytes_per_s or _LOCAL_LINK_BYTES_PER_S
        return min(compress_bytes_per_s, ratio * link) > 1.1 * link


def release_gil_in_codecs() -> None:
    """Let blosc2 release the GIL while it compresses or decompresses, process-wide.

    python-blosc2 keeps the GIL during its codecs by default, so one 8 MiB
    chunk blocks every other thread of the process for milliseconds. The
    server and its workers call this at start; a client process decides for
    itself, since the setting is global to blosc2.
    """
    blosc2.set_releasegil(True)


def as_compression(value: Compression | str | None) -> Compression:
    """Turn the user-facing ``compression=`` argument into a :class:`Compression`."""
    if value is None:
        return Compression()
    if isinstance(value, Compression):
        return value
    if isinstance(value, str):
        return Compression(mode=value)  # type: ignore[arg-type]  # checked in __post_init__
    raise TypeError(
        f"compression={value!r} is not supported; use None, 'blosc2', 'blosc1', 'auto' "
        "or a zmqruntime.Compression"
    )


def typesize_for(itemsize: int) -> int:
    """Return blosc's typesize for an element size: at least 1, at most 255."""
    return max(1, min(itemsize, _MAX_TYPESIZE))


def compress_chunk(
    raw: memoryview, itemsize: int, compression: Compression, fmt: str
) -> tuple[bytes, ChunkEncoding]:
    """Compress the raw bytes of one chunk in format ``fmt``; the caller keeps ``raw``."""
    typesize = typesize_for(itemsize)
    encoding = ChunkEncoding(
        fmt, compression.cname, compression.clevel, compression.shuffle, typesize
    )

    if fmt == "blosc1":
        codec = numcodecs.Blosc(
            cname=compression.cname,
            clevel=compression.clevel,
            shuffle=_BLOSC1_SHUFFLES[compression.shuffle],
        )
        # numcodecs takes the typesize from the buffer's item size.
        source = np.frombuffer(raw, dtype=np.dtype(f"V{typesize}")) if len(raw) else raw
        return bytes(codec.encode(source)), encoding

    payload = blosc2.compress2(
        raw,
        typesize=typesize,
        clevel=compression.clevel,
        codec=_BLOSC2_CODECS[compression.cname],
        filters=[_BLOSC2_FILTERS[compression.shuffle]],
        nthreads=compression.nthreads,
    )
    return bytes(payload), encoding


def sample_pays_off(raw: memoryview, itemsize: int, compression: Compression) -> bool:
    """Compress a sample of ``raw`` and decide whether Blosc2 pays on this link."""
    link = compression.link_bytes_per_s or _LOCAL_LINK_BYTES_PER_S
    if link >= _LOCAL_LINK_BYTES_PER_S:
        # No compressor comes near a local link's speed, so a sample cannot
        # change the decision. Send raw without spending CPU on one.
        return False

    typesize = typesize_for(itemsize)
    usable = (min(len(raw), _SAMPLE_BYTES) // typesize) * typesize
    if usable == 0:
        return False
    sample = raw[:usable]

    started = time.perf_counter()
    compressed, _ = compress_chunk(sample, itemsize, compression, "blosc2")
    elapsed = max(time.perf_counter() - started, 1e-7)

    ratio = usable / len(compressed)
    speed = usable / elapsed
    decision = compression.pays_off(ratio, speed)
    logger.debug(
        "auto compression sample: ratio %.2f, %.2f GB/s, link %.3g B/s, compress=%s",
        ratio,
        speed / 1e9,
        compression.link_bytes_per_s,
        decision,
    )
    return decision


def decompress_into(payload: Any, encoding: ChunkEncoding, nbytes: int, dest: memoryview) -> None:
    """Decompress ``payload`` into ``dest`` (``nbytes`` long) after checking its sizes.

    Raises :class:`UnknownCodecError` for a format other than blosc1 or
    blosc2, and :class:`PayloadSizeError` when the compressed frame's own
    header disagrees with ``nbytes`` or with the payload's length.
    """
    if encoding.format not in ("blosc1", "blosc2"):
        raise UnknownCodecError(
            f"chunk codec format {encoding.format!r} is unknown; this receiver decodes "
            "'blosc1' and 'blosc2' (upgrade zmqruntime if the sender is newer)"
        )

    view = memoryview(payload).cast("B")
    try:
        stated_nbytes, stated_cbytes, _ = blosc2.get_cbuffer_sizes(view)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise PayloadSizeError(
            f"compressed payload of {len(view)} bytes has no valid blosc header ({exc})"
        ) from exc
    if stated_nbytes != nbytes or stated_cbytes != len(view):
        raise PayloadSizeError(
            f"the blosc header of the compressed payload states {stated_nbytes} raw / "
            f"{stated_cbytes} compressed bytes, but the chunk header expects {nbytes} raw "
            f"bytes in a {len(view)}-byte "
            "payload; the chunk is corrupt or truncated"
        )

    if nbytes == 0:
        return
    blosc2.decompress2(view, dst=dest)

"""The only module that touches zarr internals (``zarr.core.*`` and private codec methods).

:class:`ZarrSink` writes whole chunks itself, bypassing ``array[region] =
data``, whose indexing machinery limits it to about 0.2 GB/s. That needs four
things zarr 3 has no public API for: the chunk spec its codecs expect, each
codec's synchronous ``_encode_sync``, running a store coroutine from
synchronous code (``zarr.core.sync.sync``), and growing or shrinking an array
without scanning for chunks outside the new shape. They were checked against
zarr 3.1.6. :func:`chunk_io_supported` gates every use on the zarr version, and
the sink falls back to ``array[region] = data`` on other versions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import zarr
    from zarr.abc.buffer import Buffer

logger = logging.getLogger(__name__)

# Versions whose internals this module was tested with: 3.1.x.
_SUPPORTED_MAJOR_MINOR = ((3, 1),)


def chunk_io_supported(version: str | None = None) -> bool:
    """Return whether direct chunk writes may be used with this zarr ``version``.

    ``version`` defaults to the installed ``zarr.__version__``.
    """
    if version is None:
        import zarr

        version = zarr.__version__
    parts = version.split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return False
    return major_minor in _SUPPORTED_MAJOR_MINOR


def chunk_store_key(array: zarr.Array[Any], coords: tuple[int, ...]) -> str:
    """Return the store key of chunk ``coords``, prefixed with the array's path."""
    key = array.metadata.encode_chunk_key(coords)
    prefix = array.store_path.path
    return f"{prefix}/{key}" if prefix else key


def encode_chunk(
    array: zarr.Array[Any], coords: tuple[int, ...], chunk: npt.NDArray[Any]
) -> Buffer | None:
    """Encode one full chunk with the array's own codecs; the bytes are what zarr would store.

    ``chunk`` must have the array's chunk shape and dtype. The result may share
    memory with ``chunk`` (the bytes codec does not copy a little-endian
    array), so keep ``chunk`` unchanged until the bytes are stored. Returns
    None only when a codec drops the chunk, which no built-in codec does.
    """
    from zarr.abc.codec import SupportsSyncCodec
    from zarr.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async_array = array.async_array
    prototype = default_buffer_prototype()
    spec = async_array.metadata.get_chunk_spec(coords, async_array.config, prototype)
    data: Any = prototype.nd_buffer.from_numpy_array(chunk)
    codecs = async_array.metadata.codecs

    if all(isinstance(codec, SupportsSyncCodec) for codec in codecs):
        for codec in codecs:
            data = codec._encode_sync(data, spec)
            if data is None:
                return None
            spec = codec.resolve_metadata(spec)
        result: Buffer = data
        return result

    # Codecs from zarr.codecs.numcodecs only offer the asynchronous interface.
    (encoded,) = sync(async_array.codec_pipeline.encode([(data, spec)]))
    return encoded


def array_codecs(array: zarr.Array[Any]) -> tuple[Any, ...]:
    """Return the array's codecs, already adapted to its dtype; empty for zarr v2 arrays."""
    return tuple(getattr(array.metadata, "codecs", ()))


def store_chunk(
    array: zarr.Array[Any],
    coords: tuple[int, ...],
    data: Buffer | npt.NDArray[np.uint8],
    *,
    copy: bool,
) -> None:
    """Store encoded chunk bytes under the key of chunk ``coords``, blocking until done.

    Without ``copy`` the store receives a view of ``data``. That is only safe
    for stores that have written the bytes out when ``set`` returns (such as
    ``LocalStore``); a ``MemoryStore`` keeps the object it is given.
    """
    from zarr.buffer import default_buffer_prototype

    prototype = default_buffer_prototype()
    if isinstance(data, np.ndarray):
        data = prototype.buffer.from_array_like(data.copy() if copy else data)
    elif copy:
        data = prototype.buffer.from_array_like(data.as_numpy_array().copy())
    _set_key(array, chunk_store_key(array, coords), data)


def writes_through(store: Any) -> bool:
    """Return whether ``store.set`` is known to be done with its buffer when it returns."""
    from zarr.storage import LocalStore

    return isinstance(store, LocalStore)


def _set_key(array: zarr.Array[Any], key: str, data: Buffer) -> None:
    from zarr.core.sync import sync

    store = array.store_path.store
    sync(store.set(key, data))


def resize_without_scan(array: zarr.Array[Any], shape: tuple[int, ...]) -> None:
    """Set the array's shape without deleting chunks outside it.

    ``Array.resize`` lists every chunk coordinate of the old shape to find
    chunks to delete when shrinking. The sink never writes past the final
    shape, so there is nothing to delete and the scan is skipped.
    """
    from zarr.core.sync import sync

    sync(array.async_array.resize(shape, delete_outside_chunks=False))

"""Lossless dtype encoding for the wire, and byte views of arrays.

A dtype travels as a msgpack-compatible value:

- a plain dtype (no fields, no subarray) as its ``dtype.str``, for example
  ``"<u2"``, ``">f8"``, ``"|S5"``, ``"<U3"``, ``"<M8[ns]"``; ``dtype.str``
  keeps byte order, item size and datetime unit;
- a subarray dtype as ``{"base": <dtype>, "shape": [..]}``;
- a structured dtype as ``{"names": [..], "formats": [<dtype>, ..],
  "offsets": [..], "itemsize": n, "aligned": bool}`` plus ``"titles"``
  when a field has a title, so padding, offsets and item size survive exactly.

``str(dtype)`` is never used: it drops byte order and offsets.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import numpy.typing as npt

from ._errors import HeaderDecodeError, UnsupportedDtypeError

__all__ = ["byte_view", "check_sendable", "decode_dtype", "encode_dtype"]

# Bound on nesting of structured and subarray dtypes accepted from a peer, so a
# hostile or broken header cannot make decoding recurse without limit.
_MAX_DTYPE_DEPTH = 16


def check_sendable(dtype: np.dtype[Any]) -> None:
    """Raise :class:`UnsupportedDtypeError` if arrays of ``dtype`` cannot be sent.

    Object arrays (and structured dtypes with an object field) hold pointers
    into the sender's heap, not data, so no receiver could rebuild them.
    """
    if dtype.hasobject:
        raise UnsupportedDtypeError(
            f"arrays of dtype {dtype!r} cannot be sent because they hold Python object "
            "references, not data; convert them to a fixed-width dtype first "
            "(for example .astype('U32') for strings or a numeric dtype)"
        )


def encode_dtype(dtype: np.dtype[Any]) -> Any:
    """Encode ``dtype`` as a msgpack-compatible value that :func:`decode_dtype` inverts."""
    check_sendable(dtype)

    if dtype.fields is not None and dtype.names is not None:
        formats = []
        offsets = []
        titles = []
        for name in dtype.names:
            field = dtype.fields[name]
            formats.append(encode_dtype(field[0]))
            offsets.append(int(field[1]))
            titles.append(field[2] if len(field) > 2 else None)
        encoded: dict[str, Any] = {
            "names": list(dtype.names),
            "formats": formats,
            "offsets": offsets,
            "itemsize": int(dtype.itemsize),
            "aligned": bool(dtype.isalignedstruct),
        }
        if any(title is not None for title in titles):
            encoded["titles"] = titles
        return encoded

    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return {"base": encode_dtype(base), "shape": list(shape)}

    return dtype.str


def decode_dtype(value: Any, _depth: int = 0) -> np.dtype[Any]:
    """Rebuild a dtype from :func:`encode_dtype`'s output.

    Raises :class:`HeaderDecodeError` naming the value when it is not a valid
    encoding, and :class:`UnsupportedDtypeError` for object dtypes.
    """
    if _depth > _MAX_DTYPE_DEPTH:
        raise HeaderDecodeError(
            f"dtype nesting deeper than {_MAX_DTYPE_DEPTH} levels; the header is malformed"
        )

    try:
        if isinstance(value, str):
            dtype = np.dtype(value)
        elif isinstance(value, dict) and "names" in value:
            dtype = _decode_structured(value, _depth)
        elif isinstance(value, dict) and "base" in value:
            dtype = np.dtype((decode_dtype(value["base"], _depth + 1), tuple(value["shape"])))
        else:
            raise TypeError(f"expected a str or a map, got {type(value).__name__}")
    except (TypeError, ValueError, KeyError) as exc:
        raise HeaderDecodeError(
            f"invalid dtype encoding {_shorten(value)}: {exc}; expected a dtype string such "
            "as '<u2' or a map with 'names', 'formats', 'offsets' and 'itemsize'"
        ) from exc

    check_sendable(dtype)
    return dtype


def _decode_structured(value: dict[str, Any], depth: int) -> np.dtype[Any]:
    spec = {
        "names": value["names"],
        "formats": [decode_dtype(f, depth + 1) for f in value["formats"]],
        "offsets": value["offsets"],
        "itemsize": value["itemsize"],
    }
    if value.get("titles") is not None:
        spec["titles"] = value["titles"]
    dtype: np.dtype[Any] = np.dtype(cast(Any, spec), align=bool(value.get("aligned", False)))
    return dtype


def byte_view(array: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Return the bytes of a C-contiguous ``array`` as a flat uint8 view, without copying.

    Works for every dtype, including datetime64 and timedelta64, which the
    buffer protocol does not export: those travel as raw bytes with their true
    dtype in the header.
    """
    if not array.flags.c_contiguous:
        raise ValueError("byte_view needs a C-contiguous array; call np.ascontiguousarray first")
    return array.reshape(-1).view(np.uint8)


def _shorten(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

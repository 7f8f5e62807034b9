from __future__ import annotations

import msgpack
import numpy as np
import pytest

from zmqruntime import HeaderDecodeError, UnsupportedDtypeError
from zmqruntime._dtypes import byte_view, decode_dtype, encode_dtype

ROUND_TRIP_DTYPES = [
    np.dtype("?"),
    np.dtype("i1"),
    np.dtype("<i2"),
    np.dtype(">i4"),
    np.dtype("<u2"),
    np.dtype(">u8"),
    np.dtype("<f2"),
    np.dtype(">f4"),
    np.dtype("<f8"),
    np.dtype("<c8"),
    np.dtype(">c16"),
    np.dtype("S5"),
    np.dtype("<U3"),
    np.dtype(">U7"),
    np.dtype("V6"),
    np.dtype("<M8[ns]"),
    np.dtype(">m8[s]"),
    np.dtype([("x", "<f4"), ("y", ">i8")]),
    np.dtype([("x", "u1"), ("y", "<f8")], align=True),
    np.dtype({"names": ["a", "b"], "formats": ["<u2", "<f4"], "offsets": [8, 0], "itemsize": 24}),
    np.dtype([("pos", "<f4", (3,)), ("label", "S4")]),
    np.dtype([("inner", [("a", "<i2"), ("b", ">u4")]), ("c", "?")]),
    np.dtype(("<u2", (2, 2))),
    np.dtype([(("Pixel area", "area"), "<f8"), ("n", "<i2")]),
]


@pytest.mark.parametrize("dtype", ROUND_TRIP_DTYPES, ids=str)
def test_dtype_round_trip_is_exact(dtype: np.dtype) -> None:
    wire = msgpack.unpackb(msgpack.packb(encode_dtype(dtype)), raw=False)

    decoded = decode_dtype(wire)

    assert decoded == dtype
    assert decoded.itemsize == dtype.itemsize
    assert decoded.isalignedstruct == dtype.isalignedstruct
    if dtype.names:
        assert decoded.fields == dtype.fields


def test_dtype_byte_order_survives() -> None:
    decoded = decode_dtype(encode_dtype(np.dtype(">u2")))

    assert decoded.byteorder == ">"


@pytest.mark.parametrize("dtype", [np.dtype(object), np.dtype([("a", "<f4"), ("b", "O")])])
def test_object_dtype_rejected_with_name(dtype: np.dtype) -> None:
    with pytest.raises(UnsupportedDtypeError, match="object"):
        encode_dtype(dtype)


@pytest.mark.parametrize("value", [42, "not-a-dtype", {"names": ["a"]}, {"base": "<u2"}])
def test_invalid_dtype_encoding_names_value(value: object) -> None:
    with pytest.raises(HeaderDecodeError, match="invalid dtype encoding"):
        decode_dtype(value)


def test_object_dtype_from_peer_rejected() -> None:
    with pytest.raises(UnsupportedDtypeError):
        decode_dtype("|O")


def test_byte_view_of_datetime_array_shares_memory() -> None:
    array = np.arange(4).astype("M8[ms]")

    view = byte_view(array)

    assert view.nbytes == array.nbytes
    assert np.shares_memory(view, array)


def test_byte_view_rejects_non_contiguous() -> None:
    with pytest.raises(ValueError, match="C-contiguous"):
        byte_view(np.zeros((4, 4))[:, ::2])

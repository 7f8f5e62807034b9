from __future__ import annotations

import msgpack
import numpy as np
import pytest

from zmqruntime._control import (
    CONTROL_PROTOCOL_VERSION,
    ControlValueError,
    MessageType,
    check_value,
    decode_control,
    encode_control,
    make_reply,
    make_request,
    pack_value,
    unpack_value,
)
from zmqruntime._errors import HeaderDecodeError, ProtocolVersionError


def test_codec_round_trip_keeps_tuples() -> None:
    value = {"shape": (3, 4), "nested": [(1, (2, 3))], "flag": True}
    assert unpack_value(pack_value(value)) == value
    assert isinstance(unpack_value(pack_value(value))["shape"], tuple)


@pytest.mark.parametrize(
    ("value", "expected", "kind"),
    [
        (np.float32(0.5), 0.5, float),
        (np.int64(-7), -7, int),
        (np.uint64(2**64 - 1), 2**64 - 1, int),
        (np.bool_(True), True, bool),
        (np.float16(1.5), 1.5, float),
    ],
)
def test_codec_numpy_scalars_become_python(value: object, expected: object, kind: type) -> None:
    decoded = unpack_value(pack_value({"x": value}))["x"]
    assert decoded == expected
    assert type(decoded) is kind


def test_codec_numpy_shape_arrives_as_tuple_of_ints() -> None:
    shape = np.zeros((2, 5)).shape
    decoded = unpack_value(pack_value({"shape": shape}))["shape"]
    assert decoded == (2, 5)
    assert all(type(n) is int for n in decoded)


def test_codec_int_beyond_64_bits_names_field() -> None:
    with pytest.raises(ControlValueError, match=r"config\['big'\]\[1\]"):
        check_value({"big": [1, 2**64]}, "config")


def test_codec_tuple_key_rejected_with_field() -> None:
    with pytest.raises(ControlValueError, match=r"map key \(1, 2\) in config\['table'\]"):
        check_value({"table": {(1, 2): 3}}, "config")


@pytest.mark.parametrize("value", [{1, 2}, object(), np.zeros(3), np.complex64(1j)])
def test_codec_rejects_values_msgpack_cannot_carry(value: object) -> None:
    with pytest.raises(ControlValueError, match=r"config\['v'\]"):
        check_value({"v": value}, "config")


def test_codec_ndarray_error_suggests_fix() -> None:
    with pytest.raises(ControlValueError, match="tolist"):
        check_value(np.arange(3), "config")


def test_codec_request_round_trip() -> None:
    frame = encode_control(make_request(MessageType.STATUS, "r1", {"exec_id": "abc"}))
    message = decode_control(frame)
    assert message["type"] == "status"
    assert message["body"] == {"exec_id": "abc"}


def test_codec_version_mismatch_names_both() -> None:
    frame = msgpack.packb({"v": 99, "type": "ping", "id": "x", "body": {}})
    with pytest.raises(ProtocolVersionError) as info:
        decode_control(frame)
    assert "99" in str(info.value)
    assert str(CONTROL_PROTOCOL_VERSION) in str(info.value)


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"v": CONTROL_PROTOCOL_VERSION, "type": "nope", "id": "x"}),
        msgpack.packb({"v": CONTROL_PROTOCOL_VERSION, "type": "ping", "id": 5}),
        msgpack.packb({"v": CONTROL_PROTOCOL_VERSION, "type": "ping", "id": "x", "body": 3}),
        msgpack.packb(msgpack.ExtType(42, b"")),
    ],
)
def test_codec_malformed_frame_raises_decode_error(frame: bytes) -> None:
    with pytest.raises(HeaderDecodeError):
        decode_control(frame)


def test_codec_error_reply_carries_type_and_message() -> None:
    reply = decode_control(encode_control(make_reply("r", error=KeyError("gone"))))
    assert reply["ok"] is False
    assert reply["error"]["type"] == "KeyError"

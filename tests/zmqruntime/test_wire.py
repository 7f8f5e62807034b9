from __future__ import annotations

import msgpack
import numpy as np
import pytest

from sinks import ChunkEncoding
from zmqruntime import PROTOCOL_VERSION, HeaderDecodeError, ProtocolVersionError
from zmqruntime._wire import (
    ChunkHeader,
    ResultDeclaration,
    ResultEnd,
    StreamEnd,
    decode_message,
    encode_message,
)

MESSAGES = [
    ResultDeclaration("e1", "stack", (None, 4, 5), np.dtype(">u2"), (1, 4, 5), {"unit": "um"}),
    ChunkHeader("e1", "stack", 3, (3, 0, 0), (4, 4, 5), 40, None, 40),
    ChunkHeader(
        "e1",
        "stack",
        4,
        (4, 0, 0),
        (5, 4, 5),
        40,
        ChunkEncoding("blosc2", "lz4", 1, "shuffle", 2),
        31,
    ),
    ResultEnd("e1", "stack", 5, 200, (5, 4, 5)),
    StreamEnd("e1", "failed", {"type": "ValueError", "message": "bad", "traceback": "tb"}),
    StreamEnd("e1", "completed"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(message: object) -> None:
    assert decode_message(encode_message(message)) == message  # type: ignore[arg-type]


def _header(**changes: object) -> bytes:
    body = msgpack.unpackb(encode_message(MESSAGES[1]), raw=False)
    body.update(changes)
    return msgpack.packb(body)


def test_version_mismatch_names_both_versions() -> None:
    with pytest.raises(ProtocolVersionError) as info:
        decode_message(_header(v=99))

    assert "99" in str(info.value)
    assert str(PROTOCOL_VERSION) in str(info.value)


def test_undecodable_header_raises_header_decode_error() -> None:
    with pytest.raises(HeaderDecodeError, match="not valid msgpack"):
        decode_message(b"\xc1\xff\x00garbage")


def test_header_that_is_not_a_map_is_rejected() -> None:
    with pytest.raises(HeaderDecodeError, match="expected a msgpack map"):
        decode_message(msgpack.packb([1, 2, 3]))


def test_header_missing_field_names_it() -> None:
    body = msgpack.unpackb(encode_message(MESSAGES[1]), raw=False)
    del body["seq"]

    with pytest.raises(HeaderDecodeError, match="'seq'"):
        decode_message(msgpack.packb(body))


def test_negative_region_start_rejected() -> None:
    with pytest.raises(HeaderDecodeError, match="'start'"):
        decode_message(_header(start=[-1, 0, 0]))


def test_unknown_kind_rejected() -> None:
    with pytest.raises(HeaderDecodeError, match="unknown message kind"):
        decode_message(_header(kind="teleport"))

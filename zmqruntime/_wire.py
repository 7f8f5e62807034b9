"""Typed messages of a result stream and their msgpack encoding.

A result stream carries, for one execution, in this order:

1. one :class:`ResultDeclaration` per named result (one frame),
2. chunks: each the two-frame message ``[ChunkHeader, payload]``,
3. one :class:`ResultEnd` per result with its totals (one frame),
4. one :class:`StreamEnd` with the execution's outcome (one frame).

Declarations, chunks and ends of different results may interleave. Every
header is a msgpack map that carries the protocol version under ``"v"``; see
``docs/protocol.md`` for the field-by-field reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from sinks import ArraySpec, ChunkEncoding, Region

from ._dtypes import decode_dtype, encode_dtype
from ._errors import HeaderDecodeError, ProtocolVersionError

__all__ = [
    "PROTOCOL_VERSION",
    "ChunkHeader",
    "Message",
    "ResultDeclaration",
    "ResultEnd",
    "StreamEnd",
    "decode_message",
    "encode_message",
]

PROTOCOL_VERSION = 1

STREAM_STATUSES = ("completed", "failed", "cancelled")
SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")
ENCODING_FORMATS = ("blosc1", "blosc2")


@dataclass(frozen=True, slots=True)
class ResultDeclaration:
    """Announces one result array before its first chunk."""

    exec_id: str
    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]
    chunks: tuple[int, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def to_spec(self) -> ArraySpec:
        """Return the sink-side declaration of this result."""
        return ArraySpec(self.name, self.shape, self.dtype, self.chunks, dict(self.attrs))


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """Describes the payload frame that follows it.

    ``nbytes`` is the size of the region's raw C-ordered bytes; ``cbytes`` the
    size of the payload frame, equal to ``nbytes`` when ``encoding`` is None.
    """

    exec_id: str
    name: str
    seq: int
    start: tuple[int, ...]
    stop: tuple[int, ...]
    nbytes: int
    encoding: ChunkEncoding | None
    cbytes: int

    @property
    def region(self) -> Region:
        """The chunk's region in the full array."""
        return Region(self.start, self.stop)


@dataclass(frozen=True, slots=True)
class ResultEnd:
    """Closes one result: how many chunks and raw bytes were sent, and its final shape."""

    exec_id: str
    name: str
    chunks: int
    nbytes: int
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """Closes the stream of one execution.

    ``status`` is ``"completed"``, ``"failed"`` or ``"cancelled"``; for a
    failure ``error`` maps ``"type"``, ``"message"`` and ``"traceback"`` to str.
    """

    exec_id: str
    status: str
    error: Mapping[str, str] | None = None


Message = ResultDeclaration | ChunkHeader | ResultEnd | StreamEnd


def encode_message(message: Message) -> bytes:
    """Encode one message header as msgpack bytes."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "exec": message.exec_id}

    if isinstance(message, ChunkHeader):
        body.update(
            kind="chunk",
            name=message.name,
            seq=message.seq,
            start=list(message.start),
            stop=list(message.stop),
            nbytes=message.nbytes,
            cbytes=message.cbytes,
            codec=_encode_encoding(message.encoding),
        )
    elif isinstance(message, ResultDeclaration):
        body.update(
            kind="declare",
            name=message.name,
            shape=list(message.shape),
            dtype=encode_dtype(message.dtype),
            chunks=list(message.chunks),
            attrs=dict(message.attrs),
        )
    elif isinstance(message, ResultEnd):
        body.update(
            kind="end",
            name=message.name,
            chunks=message.chunks,
            nbytes=message.nbytes,
            shape=list(message.shape),
        )
    else:
        body.update(kind="close", status=message.status, error=message.error)

    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode_message(frame: bytes | memoryview) -> Message:
    """Decode one header frame, checking the version and every field's type.

    Raises
    ------
    ProtocolVersionError
        The header's ``"v"`` is not :data:`PROTOCOL_VERSION`.
    HeaderDecodeError
        The frame is not a msgpack map, or a field is missing or mistyped.
    """
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise HeaderDecodeError(
            f"header frame of {len(frame)} bytes is not valid msgpack ({exc}); "
            "expected a msgpack map written by a zmqruntime sender"
        ) from exc
    if not isinstance(body, dict):
        raise HeaderDecodeError(
            f"header decoded to a {type(body).__name__}, expected a msgpack map"
        )

    if body.get("v") != PROTOCOL_VERSION:
        raise ProtocolVersionError(body.get("v"), PROTOCOL_VERSION)

    fields = _Fields(body)
    kind = fields.text("kind")
    exec_id = fields.text("exec")

    if kind == "chunk":
        return ChunkHeader(
            exec_id=exec_id,
            name=fields.text("name"),
            seq=fields.count("seq"),
            start=fields.shape("start"),
            stop=fields.shape("stop"),
            nbytes=fields.count("nbytes"),
            encoding=_decode_encoding(body.get("codec")),
            cbytes=fields.count("cbytes"),
        )
    if kind == "declare":
        attrs = body.get("attrs", {})
        if not isinstance(attrs, dict):
            raise HeaderDecodeError(f"field 'attrs' is {attrs!r}, expected a map")
        return ResultDeclaration(
            exec_id=exec_id,
            name=fields.text("name"),
            shape=fields.shape("shape", allow_none_first=True),
            dtype=decode_dtype(fields.require("dtype")),
            chunks=fields.shape("chunks"),
            attrs=attrs,
        )
    if kind == "end":
        return ResultEnd(
            exec_id=exec_id,
            name=fields.text("name"),
            chunks=fields.count("chunks"),
            nbytes=fields.count("nbytes"),
            shape=fields.shape("shape"),
        )
    if kind == "close":
        return _decode_stream_end(exec_id, fields)
    raise HeaderDecodeError(
        f"unknown message kind {kind!r}; expected 'declare', 'chunk', 'end' or 'close'"
    )


def _decode_stream_end(exec_id: str, fields: _Fields) -> StreamEnd:
    status = fields.text("status")
    if status not in STREAM_STATUSES:
        raise HeaderDecodeError(f"stream status {status!r} is not one of {STREAM_STATUSES}")

    error = fields.body.get("error")
    if error is not None and not (
        isinstance(error, dict) and all(isinstance(v, str) for v in error.values())
    ):
        raise HeaderDecodeError(f"field 'error' is {error!r}, expected a map of strings or nil")
    return StreamEnd(exec_id, status, error)


def _encode_encoding(encoding: ChunkEncoding | None) -> dict[str, Any] | None:
    if encoding is None:
        return None
    return {
        "format": encoding.format,
        "cname": encoding.cname,
        "clevel": encoding.clevel,
        "shuffle": encoding.shuffle,
        "typesize": encoding.typesize,
    }


def _decode_encoding(value: Any) -> ChunkEncoding | None:
    # Unknown format names pass through here on purpose: the receiver raises
    # UnknownCodecError, which names the codec, once it knows the chunk.
    if value is None:
        return None
    if not isinstance(value, dict):
        raise HeaderDecodeError(f"field 'codec' is {value!r}, expected a map or nil")

    fields = _Fields(value)
    shuffle = fields.text("shuffle")
    if shuffle not in SHUFFLES:
        raise HeaderDecodeError(f"codec shuffle {shuffle!r} is not one of {SHUFFLES}")
    return ChunkEncoding(
        format=fields.text("format"),
        cname=fields.text("cname"),
        clevel=fields.count("clevel"),
        shuffle=shuffle,
        typesize=fields.count("typesize"),
    )


class _Fields:
    """Typed access to a decoded header map; errors name the field and the value."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def require(self, key: str) -> Any:
        if key not in self.body:
            raise HeaderDecodeError(f"header lacks the required field {key!r}")
        return self.body[key]

    def text(self, key: str) -> str:
        value = self.require(key)
        if not isinstance(value, str):
            raise HeaderDecodeError(f"field {key!r} is {value!r}, expected a string")
        return value

    def count(self, key: str) -> int:
        value = self.require(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise HeaderDecodeError(f"field {key!r} is {value!r}, expected an integer >= 0")
        return value

    def shape(self, key: str, *, allow_none_first: bool = False) -> tuple[Any, ...]:
        value = self.require(key)
        if not isinstance(value, list):
            raise HeaderDecodeError(f"field {key!r} is {value!r}, expected a list of integers")
        for i, n in enumerate(value):
            if n is None and i == 0 and allow_none_first:
                continue
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise HeaderDecodeError(
                    f"field {key!r} is {value!r}, expected a list of integers >= 0"
                )
        return tuple(value)

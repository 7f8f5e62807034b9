"""Messages of the control channel and their strict msgpack encoding.

A control message is one msgpack map::

    {"v": CONTROL_PROTOCOL_VERSION, "type": "<MessageType value>", "id": "<request id>",
     "body": {...}}

A reply carries ``"type": "reply"``, the request's ``"id"``, ``"ok"`` and either
``"body"`` (success) or ``"error"`` (a map with ``"type"`` and ``"message"``).

Values are checked before they are packed, so msgpack never changes one
silently: tuples travel as tuples (a msgpack extension type), numpy scalars
become the equal Python scalar, and anything msgpack cannot carry exactly (an
int beyond 64 bits, a tuple used as a map key, a set, an object) raises
:class:`ControlValueError` naming the field. Decoding never unpickles.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from ._errors import HeaderDecodeError, ProtocolVersionError, ZmqRuntimeError

__all__ = [
    "CONTROL_PROTOCOL_VERSION",
    "ControlValueError",
    "MessageType",
    "check_value",
    "decode_control",
    "encode_control",
    "make_reply",
    "make_request",
    "pack_value",
    "peek_request_id",
    "unpack_value",
]

CONTROL_PROTOCOL_VERSION = 1

# msgpack extension type code that marks a packed list as a Python tuple.
_TUPLE_EXT = 1

_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1

# Decoded messages larger than this are rejected; a config or a status reply is
# far smaller. Arbitrary; raise it if configs carry large tables.
MAX_CONTROL_BYTES = 64 << 20


class ControlValueError(ZmqRuntimeError, TypeError):
    """A value cannot travel over the control channel without changing."""


class MessageType(enum.Enum):
    """Kinds of control messages; each request kind has one server handler."""

    EXECUTE = "execute"
    STATUS = "status"
    LIST = "list"
    CANCEL = "cancel"
    RESULTS = "results"
    RELEASE = "release"
    PING = "ping"
    SHUTDOWN = "shutdown"
    REPLY = "reply"


def check_value(value: Any, field: str = "value") -> Any:
    """Return ``value`` converted to types msgpack carries exactly.

    Tuples stay tuples, lists stay lists, numpy scalars become the equal
    Python scalar and ``bytearray``/``memoryview`` become ``bytes``. The input
    is not modified; containers are copied.

    Raises
    ------
    ControlValueError
        A value (or a map key) cannot travel unchanged; the message names its
        position, for example ``config['shape'][2]``.
    """
    # Subclasses (IntEnum, StrEnum, ...) become their base type because the
    # packer runs with strict_types, which rejects subclasses.
    if value is None or isinstance(value, bool):
        return None if value is None else bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, int):
        return _check_int(value, field)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, np.generic):
        return _check_numpy_scalar(value, field)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [check_value(item, f"{field}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(check_value(item, f"{field}[{i}]") for i, item in enumerate(value))
    if isinstance(value, Mapping):
        return _check_mapping(value, field)

    hint = ""
    if isinstance(value, np.ndarray):
        hint = "; send arrays as results (ctx.send_array) or convert small ones with .tolist()"
    raise ControlValueError(
        f"{field} is a {type(value).__module__}.{type(value).__qualname__} ({_short(value)}), "
        "which msgpack cannot carry unchanged; use None, bool, int, float, str, bytes, "
        f"list, tuple or dict{hint}"
    )


def _check_int(value: int, field: str) -> int:
    if not _INT64_MIN <= value <= _UINT64_MAX:
        raise ControlValueError(
            f"{field} is the integer {_short(value)}, outside the 64-bit range msgpack "
            "carries; send it as a string"
        )
    return int(value)


def _check_numpy_scalar(value: np.generic, field: str) -> Any:
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return _check_int(int(value), field)
    if isinstance(value, np.floating) and value.dtype.itemsize <= 8:
        # float16 and float32 widen to float64 exactly.
        return float(value)
    if isinstance(value, np.str_ | np.bytes_):
        return value.item()
    raise ControlValueError(
        f"{field} is a numpy {value.dtype} scalar ({_short(value)}), which msgpack cannot "
        "carry unchanged; convert it to a Python int, float or str"
    )


def _check_mapping(value: Mapping[Any, Any], field: str) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, item in value.items():
        if isinstance(key, np.integer | np.str_):
            key = key.item()
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise ControlValueError(
                f"map key {_short(key)} in {field} is a {type(key).__name__}; only str and "
                "int keys travel unchanged (a tuple key would arrive as a list); use a str key"
            )
        if isinstance(key, int):
            _check_int(key, f"map key in {field}")
        out[key] = check_value(item, f"{field}[{key!r}]")
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pack_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return msgpack.ExtType(_TUPLE_EXT, _packb(list(value)))
    raise ControlValueError(f"cannot encode {_short(value)}: run check_value on it first")


def _packb(value: Any) -> bytes:
    packed: bytes = msgpack.packb(
        value, use_bin_type=True, strict_types=True, default=_pack_default
    )
    return packed


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _TUPLE_EXT:
        raise HeaderDecodeError(f"unknown msgpack extension type {code} in a control message")
    return tuple(_unpackb(data))


def _unpackb(data: bytes | memoryview) -> Any:
    if len(data) > MAX_CONTROL_BYTES:
        raise HeaderDecodeError(
            f"control message of {len(data)} bytes exceeds the limit of {MAX_CONTROL_BYTES}"
        )
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False, ext_hook=_ext_hook)


def pack_value(value: Any) -> bytes:
    """Check ``value`` with :func:`check_value` and pack it; :func:`unpack_value` inverts it."""
    return _packb(check_value(value))


def unpack_value(data: bytes | memoryview) -> Any:
    """Unpack bytes made by :func:`pack_value`; tuples come back as tuples.

    Raises
    ------
    HeaderDecodeError
        ``data`` is not valid msgpack.
    """
    try:
        return _unpackb(data)
    except HeaderDecodeError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise HeaderDecodeError(f"{len(data)} bytes are not valid msgpack ({exc})") from exc


def encode_control(message: Mapping[str, Any]) -> bytes:
    """Pack a control message (already made with :func:`make_request` or :func:`make_reply`).

    Raises
    ------
    ControlValueError
        A value in the message cannot travel unchanged.
    """
    return _packb(check_value(message, "message"))


def decode_control(frame: bytes | memoryview) -> dict[str, Any]:
    """Unpack and check one control message.

    Raises
    ------
    ProtocolVersionError
        The message's ``"v"`` differs from :data:`CONTROL_PROTOCOL_VERSION`.
    HeaderDecodeError
        The frame is not a msgpack map with ``"v"``, ``"type"`` and ``"id"``.
    """
    try:
        message = _unpackb(frame)
    except HeaderDecodeError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise HeaderDecodeError(
            f"control frame of {len(frame)} bytes is not valid msgpack ({exc}); "
            "expected a map written by a zmqruntime client or server"
        ) from exc

    if not isinstance(message, dict):
        raise HeaderDecodeError(
            f"control frame decoded to a {type(message).__name__}, expected a msgpack map"
        )
    if message.get("v") != CONTROL_PROTOCOL_VERSION:
        raise ProtocolVersionError(message.get("v"), CONTROL_PROTOCOL_VERSION)

    kind = message.get("type")
    if kind not in _TYPE_VALUES:
        raise HeaderDecodeError(
            f"control message type {kind!r} is unknown; expected one of {sorted(_TYPE_VALUES)}"
        )
    if not isinstance(message.get("id"), str):
        raise HeaderDecodeError(f"control message id {message.get('id')!r} is not a string")
    body = message.get("body", {})
    if not isinstance(body, dict):
        raise HeaderDecodeError(f"control message body {_short(body)} is not a map")
    return message


_TYPE_VALUES = frozenset(member.value for member in MessageType)


def make_request(kind: MessageType, request_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """Build a request map; pack it with :func:`encode_control`."""
    return {"v": CONTROL_PROTOCOL_VERSION, "type": kind.value, "id": request_id, "body": body}


def make_reply(
    request_id: str,
    body: Mapping[str, Any] | None = None,
    *,
    error: BaseException | None = None,
) -> dict[str, Any]:
    """Build a reply map: success with ``body``, or failure describing ``error``."""
    reply: dict[str, Any] = {
        "v": CONTROL_PROTOCOL_VERSION,
        "type": MessageType.REPLY.value,
        "id": request_id,
        "ok": error is None,
    }
    if error is None:
        reply["body"] = dict(body or {})
    else:
        reply["error"] = {"type": type(error).__name__, "message": str(error)}
    return reply


def peek_request_id(payload: bytes) -> str | None:
    """Return the ``id`` of a request that failed to decode, if one can be read, for the reply."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError):
        return None
    request_id = message.get("id") if isinstance(message, dict) else None
    return request_id if isinstance(request_id, str) else None

"""Exception hierarchy of zmqruntime.

Every error the package raises on purpose derives from :class:`ZmqRuntimeError`.
The subclasses are split by meaning, so callers can react to a cause without
parsing messages:

- :class:`ProtocolError` and its subclasses: a peer sent something that does not
  follow the wire protocol (bad header, wrong frame count, bad region ...).
- :class:`UnsupportedDtypeError`: an array cannot travel (object dtype).
- :class:`ChunkingError`: a requested chunk layout cannot be sent.
- :class:`ZmqTimeoutError`: a request got no reply in time.
- :class:`ExecutionCancelledError`: the execution was cancelled.
- :class:`RemoteError`: the pipeline raised or its worker crashed.
- :class:`TransportError`: a ZeroMQ call failed; the endpoint is in the message.
- :class:`ClosedError`: the object was closed by its owner.
"""

from __future__ import annotations

__all__ = [
    "ChunkingError",
    "ClosedError",
    "DuplicateChunkError",
    "ExecutionCancelledError",
    "ExecutionNotFoundError",
    "FrameCountError",
    "HeaderDecodeError",
    "IncompleteResultError",
    "PayloadSizeError",
    "ProtocolError",
    "ProtocolVersionError",
    "RegionError",
    "RemoteError",
    "TransportError",
    "UndeclaredResultError",
    "UnknownCodecError",
    "UnsupportedDtypeError",
    "ZmqRuntimeError",
    "ZmqTimeoutError",
]


class ZmqRuntimeError(Exception):
    """Root of every exception zmqruntime raises on purpose."""


class ProtocolError(ZmqRuntimeError):
    """A message received from a peer does not follow the wire protocol."""


class HeaderDecodeError(ProtocolError):
    """A header frame is not valid msgpack or lacks a required field."""


class FrameCountError(ProtocolError):
    """A multipart message has a different number of frames than its kind needs."""


class ProtocolVersionError(ProtocolError):
    """The peer speaks a protocol version this side does not understand."""

    def __init__(self, received: object, supported: int) -> None:
        super().__init__(
            f"protocol version mismatch: the peer sent version {received!r}, "
            f"this side speaks version {supported}; install the same zmqruntime "
            "release on both sides"
        )
        self.received = received
        self.supported = supported


class UnknownCodecError(ProtocolError):
    """A chunk names a compression codec this side cannot decode."""


class RegionError(ProtocolError):
    """A chunk's region lies outside its result's declared shape."""


class PayloadSizeError(ProtocolError):
    """A payload's byte count disagrees with the size its header states."""


class UndeclaredResultError(ProtocolError):
    """A chunk names a result that was never declared in its stream."""


class DuplicateChunkError(ProtocolError):
    """A chunk repeats a sequence number already received for its result."""


class IncompleteResultError(ProtocolError):
    """A stream ended but chunks of a result are missing."""


class UnsupportedDtypeError(ZmqRuntimeError, TypeError):
    """An array's dtype cannot be sent (object arrays hold pointers, not data)."""


class ChunkingError(ZmqRuntimeError, ValueError):
    """A requested chunk shape cannot be sent within the frame size limits."""


class ZmqTimeoutError(ZmqRuntimeError, TimeoutError):
    """A request got no reply within its timeout."""


class ExecutionCancelledError(ZmqRuntimeError):
    """The execution was cancelled before it produced the requested data."""


class ExecutionNotFoundError(ZmqRuntimeError, KeyError):
    """No execution with the given id is known to the server."""

    def __str__(self) -> str:
        # KeyError.__str__ would quote the whole message.
        return str(self.args[0]) if self.args else ""


class RemoteError(ZmqRuntimeError):
    """The pipeline raised an exception, or its worker process died.

    Attributes
    ----------
    type_name:
        Qualified name of the remote exception type, or ``"WorkerCrashed"``.
    remote_message:
        The remote exception's message.
    remote_traceback:
        The formatted remote traceback, empty for a crash.
    """

    def __init__(self, type_name: str, remote_message: str, remote_traceback: str = "") -> None:
        text = f"{type_name}: {remote_message}"
        if remote_traceback:
            text = f"{text}\n\nRemote traceback:\n{remote_traceback}"
        super().__init__(text)
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback


class TransportError(ZmqRuntimeError, ConnectionError):
    """A ZeroMQ call failed; the message names the endpoint."""


class ClosedError(ZmqRuntimeError):
    """The object was closed and cannot be used any more."""

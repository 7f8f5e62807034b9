"""zmqruntime: distributed execution and zero-copy array streaming over ZeroMQ.

The data path (this module's stream names) turns result arrays into chunk
messages and writes received chunks into sinks; see ``docs/protocol.md``.
"""

from __future__ import annotations

from ._chunking import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, default_chunks
from ._client import ExecutionClient
from ._compression import Compression
from ._control import CONTROL_PROTOCOL_VERSION, ControlValueError, MessageType
from ._errors import (
    ChunkingError,
    ClosedError,
    DuplicateChunkError,
    ExecutionCancelledError,
    ExecutionNotFoundError,
    FrameCountError,
    HeaderDecodeError,
    IncompleteResultError,
    PayloadSizeError,
    ProtocolError,
    ProtocolVersionError,
    RegionError,
    RemoteError,
    TransportError,
    UndeclaredResultError,
    UnknownCodecError,
    UnsupportedDtypeError,
    ZmqRuntimeError,
    ZmqTimeoutError,
)
from ._execution import ServerConfig
from ._executor import Executor, ExecutorFullError, Job, ProcessExecutor
from ._pipeline import PipelineContext, PipelineLoadError
from ._receiver import (
    DEFAULT_HWM,
    ChunkReceived,
    ResultCompleted,
    ResultDeclared,
    StreamEvent,
    StreamReceiver,
)
from ._sender import ResultStream, ResultWriter
from ._server import ExecutionServer
from ._spawn import EndpointInUseError
from ._status import CancelResult, ExecutionState, ExecutionStatus, Progress, ResultSummary
from ._wire import PROTOCOL_VERSION

__version__ = "0.1.0"

__all__ = [
    "CONTROL_PROTOCOL_VERSION",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_HWM",
    "MAX_CHUNK_BYTES",
    "PROTOCOL_VERSION",
    "CancelResult",
    "ChunkReceived",
    "ChunkingError",
    "ClosedError",
    "Compression",
    "ControlValueError",
    "DuplicateChunkError",
    "EndpointInUseError",
    "ExecutionCancelledError",
    "ExecutionClient",
    "ExecutionNotFoundError",
    "ExecutionServer",
    "ExecutionState",
    "ExecutionStatus",
    "Executor",
    "ExecutorFullError",
    "FrameCountError",
    "HeaderDecodeError",
    "IncompleteResultError",
    "Job",
    "MessageType",
    "PayloadSizeError",
    "PipelineContext",
    "PipelineLoadError",
    "ProcessExecutor",
    "Progress",
    "ProtocolError",
    "ProtocolVersionError",
    "RegionError",
    "RemoteError",
    "ResultCompleted",
    "ResultDeclared",
    "ResultStream",
    "ResultSummary",
    "ResultWriter",
    "ServerConfig",
    "StreamEvent",
    "StreamReceiver",
    "TransportError",
    "UndeclaredResultError",
    "UnknownCodecError",
    "UnsupportedDtypeError",
    "ZmqRuntimeError",
    "ZmqTimeoutError",
    "__version__",
    "default_chunks",
]

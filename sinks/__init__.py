"""Destinations for streamed result arrays: memory, ``.npy`` memmap files and zarr.

A sink stores one result array whose chunks arrive in any order (see
:class:`Sink` for the life cycle). Use :func:`resolve_sink` or
:func:`resolve_sinks` to turn a user's ``sink=`` argument into sinks, and
:mod:`sinks.testing` to check a sink of your own. This package never imports
``zmqruntime``.
"""

from ._base import (
    ArraySpec,
    ChunkEncoding,
    Region,
    Sink,
    SinkConfigError,
    SinkError,
    SinkExistsError,
    SinkRegionError,
    SinkStateError,
    SinkWriteError,
)
from ._memmap import MemmapSink
from ._memory import MemorySink
from ._registry import (
    ENTRY_POINT_GROUP,
    available_sinks,
    register_sink,
    resolve_result_sink,
    resolve_sink,
    resolve_sinks,
)
from ._zarr import ZarrSink

__all__ = [
    "ENTRY_POINT_GROUP",
    "ArraySpec",
    "ChunkEncoding",
    "MemmapSink",
    "MemorySink",
    "Region",
    "Sink",
    "SinkConfigError",
    "SinkError",
    "SinkExistsError",
    "SinkRegionError",
    "SinkStateError",
    "SinkWriteError",
    "ZarrSink",
    "available_sinks",
    "register_sink",
    "resolve_result_sink",
    "resolve_sink",
    "resolve_sinks",
]

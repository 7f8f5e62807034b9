"""Baselines and engine-level streams of the benchmark suite, each against a spawned sender.

A sender process makes its data, reports ready and then sends one copy per
``go`` message on its control pipe, so process start-up and data making stay
outside every timed round. Each timed round runs from the ``go`` message to
the last byte in the receiver's destination.

Modes of the sender:

- ``zmq``: bare pyzmq PUSH, zero-copy send of 8 MiB frames (the whole array
  when it is smaller). The receiver calls ``recv_into`` into a preallocated,
  pre-faulted array. This is the transport limit.
- ``stream``: zmqruntime's ``ResultStream`` on a PUSH socket, received with
  ``StreamReceiver`` into a sink (the engine without the server in between).
- ``pickle``: the whole array pickled with protocol 5 and out-of-band
  buffers, sent over a ``multiprocessing`` pipe.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import multiprocessing as mp
import os
import pickle
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from sinks import Sink

from ._suite_data import distinct_frames, full_stack

# Messages the PUSH and PULL sockets queue. ZMQ counts messages, not bytes, so
# a small count keeps receiver memory flat, and 4 messages of 8 MiB keep the pipe full.
HWM = 4
READY_TIMEOUT_S = 180.0
ROUND_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class SenderSpec:
    """Settings of one sender process: ``mode``, stack shape, data kind, endpoint and codec."""

    mode: str
    shape: tuple[int, int, int]
    data: str = "microscopy"
    endpoint: str = ""
    # Blosc2 codec for the stream mode: "none", "lz4" or "zstd".
    codec: str = "none"


def _send_zmq(push: zmq.Socket[Any], frames: np.ndarray, count: int) -> None:
    for i in range(count):
        push.send(memoryview(frames[i % len(frames)]).cast("B"), copy=False)


def _send_stream(push: zmq.Socket[Any], frames: np.ndarray, spec: SenderSpec, tag: str) -> None:
    from zmqruntime import Compression, ResultStream

    compression = None if spec.codec == "none" else Compression("blosc2", cname=spec.codec)
    stream = ResultStream(push, tag, compression=compression)
    writer = stream.declare("stack", spec.shape, np.uint16)
    for i in range(spec.shape[0]):
        writer.write(i, frames[i % len(frames)][np.newaxis])
    stream.close()


def _send_pickle(data: Connection, stack: np.ndarray) -> None:
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(stack, protocol=5, buffer_callback=buffers.append)
    data.send_bytes(struct.pack("<I", len(buffers)))
    data.send_bytes(header)
    for buffer in buffers:
        data.send_bytes(buffer.raw())


def _sender_main(spec: SenderSpec, ctl: Connection, data: Connection | None) -> None:
    context: zmq.Context[Any] = zmq.Context()
    push: zmq.Socket[Any] | None = None
    if spec.mode in ("zmq", "stream"):
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, HWM)
        push.connect(spec.endpoint)

    if spec.mode == "pickle":
        frames = full_stack(spec.shape, spec.data)
    else:
        frames = distinct_frames(spec.shape, spec.data)
    if spec.mode == "stream":
        # Importing zmqruntime takes about 0.2 s, which must not fall into the first round.
        import zmqruntime  # noqa: F401
    ctl.send("ready")

    # Bounded: the parent sends "stop" after its rounds, and a silent parent ends the loop.
    while ctl.poll(ROUND_TIMEOUT_S):
        tag = ctl.recv()
        if tag == "stop":
            break
        if spec.mode == "zmq" and push is not None:
            _send_zmq(push, frames, spec.shape[0])
        elif spec.mode == "stream" and push is not None:
            _send_stream(push, frames, spec, str(tag))
        elif data is not None:
            _send_pickle(data, frames)

    if push is not None:
        push.close(linger=5000)
    context.term()


@dataclass
class PeerSender:
    """A spawned sender process. ``go`` starts one round and ``stop`` ends the process."""

    spec: SenderSpec
    process: mp.process.BaseProcess
    ctl: Connection
    data: Connection | None
    rounds: int = field(default=0)

    @property
    def pid(self) -> int:
        return int(self.process.pid or 0)

    def go(self) -> None:
        self.rounds += 1
        self.ctl.send(f"r{self.rounds}")

    def stop(self) -> None:
        """Ask the process to end, then kill it if it has not within 30 s."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self.ctl.send("stop")
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def start_peer_sender(spec: SenderSpec) -> PeerSender:
    """Spawn a sender for ``spec`` and wait until its data is ready.

    Raises
    ------
    RuntimeError
        The sender did not report ready within ``READY_TIMEOUT_S``. It is killed first.
    """
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    data_parent: Connection | None = None
    data_child: Connection | None = None
    if spec.mode == "pickle":
        data_parent, data_child = context.Pipe(duplex=False)
    process = context.Process(target=_sender_main, args=(spec, child, data_child), daemon=True)
    process.start()

    if not parent.poll(READY_TIMEOUT_S):
        process.kill()
        raise RuntimeError(f"{spec.mode} sender for {spec.shape} was not ready in time")
    parent.recv()
    return PeerSender(spec, process, parent, data_parent)


def prefaulted(nbytes: int) -> np.ndarray:
    """Return a byte array of ``nbytes`` whose pages are already mapped (first touch done)."""
    array = np.empty(nbytes, np.uint8)
    array.fill(0)
    return array


def receive_zmq(pull: zmq.Socket[Any], sender: PeerSender, dest: np.ndarray) -> float:
    """Start one round and receive it into ``dest`` with ``recv_into``; return seconds."""
    shape = sender.spec.shape
    message_bytes = shape[1] * shape[2] * 2
    view = memoryview(dest.data).cast("B")

    started = time.perf_counter()
    sender.go()
    for i in range(shape[0]):
        offset = i * message_bytes
        pull.recv_into(view[offset : offset + message_bytes])
    return time.perf_counter() - started


@dataclass
class StreamRound:
    """Figures of one engine-level round: seconds, raw and compressed payload bytes."""

    seconds: float
    raw_bytes: int
    wire_bytes: int


def receive_engine_stream(
    pull: zmq.Socket[Any], sender: PeerSender, sink_for: Callable[[Any], Sink]
) -> StreamRound:
    """Start one round and receive the stream into sinks; return its figures."""
    from zmqruntime import ChunkReceived, StreamReceiver

    raw = wire = 0
    started = time.perf_counter()
    sender.go()
    receiver = StreamReceiver(pull, f"r{sender.rounds}", sink_for, timeout=ROUND_TIMEOUT_S)
    for event in receiver.events():
        if isinstance(event, ChunkReceived):
            raw += event.nbytes
            wire += event.cbytes
    return StreamRound(time.perf_counter() - started, raw, wire)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that loads only numpy arrays; any other global raises UnpicklingError."""

    _ALLOWED = frozenset({("numpy._core.numeric", "_frombuffer"), ("numpy", "dtype")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not a numpy array part")
        return super().find_class(module, name)


def receive_pickle(sender: PeerSender) -> tuple[float, np.ndarray]:
    """Start one round and load the array from the pipe; return seconds and the array."""
    data = sender.data
    if data is None:
        raise RuntimeError("receive_pickle needs a sender started in pickle mode")

    started = time.perf_counter()
    sender.go()
    (count,) = struct.unpack("<I", data.recv_bytes())
    header = data.recv_bytes()
    buffers = [data.recv_bytes() for _ in range(count)]
    array = _ArrayOnlyUnpickler(io.BytesIO(header), buffers=buffers).load()
    return time.perf_counter() - started, array


def time_copyto(source: np.ndarray, dest: np.ndarray) -> float:
    """Copy ``source`` into the preallocated ``dest`` with ``np.copyto``; return seconds."""
    started = time.perf_counter()
    np.copyto(dest, source)
    return time.perf_counter() - started


def time_disk_write(path: Path, nbytes: int, piece_bytes: int) -> float:
    """Write ``nbytes`` to the new file ``path`` in pieces of ``piece_bytes``, then fsync it.

    Returns the seconds taken. The file is opened with ``O_DIRECT`` where the
    file system allows it, as the memmap and zarr sinks write large results,
    and with buffered writes otherwise. ``nbytes`` must be a multiple of
    ``piece_bytes``, and ``piece_bytes`` of 4096. The file is removed afterwards.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd = os.open(path, flags, 0o644)  # tmpfs and others without O_DIRECT

    # An anonymous mapping is page-aligned, as O_DIRECT needs. np.empty is not always.
    # Filled before the clock starts, so that none of its pages faults in while it runs.
    with mmap.mmap(-1, piece_bytes) as piece:
        piece.write(bytes(range(256)) * (piece_bytes // 256))
        try:
            return _timed_writes(fd, memoryview(piece), nbytes)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)


def _timed_writes(fd: int, piece: memoryview, nbytes: int) -> float:
    started = time.perf_counter()
    for offset in range(0, nbytes, piece.nbytes):
        written = 0
        while written < piece.nbytes:
            written += os.pwrite(fd, piece[written:], offset + written)
    os.fsync(fd)
    seconds = time.perf_counter() - started
    piece.release()
    return seconds

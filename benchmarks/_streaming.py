"""Sender processes and receive loops shared by the data-path benchmarks.

Each measurement streams a stack of 2048 x 2048 uint16 frames from a spawned
sender process to this process over tcp loopback. The clock runs in the
receiver, from the first message to the last, so process start-up and the
sender's data preparation are excluded from every figure alike.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import zmq

FRAME_SHAPE = (2048, 2048)
FRAME_BYTES = 2048 * 2048 * 2
HWM = 4


def microscopy_frames(count: int, seed: int = 0) -> np.ndarray:
    """Return ``count`` distinct uint16 frames: a smooth background plus Poisson noise."""
    yy, xx = np.mgrid[0 : FRAME_SHAPE[0], 0 : FRAME_SHAPE[1]].astype(np.float32)
    rng = np.random.default_rng(seed)
    frames = np.empty((count, *FRAME_SHAPE), np.uint16)
    for i in range(count):
        cy, cx = rng.uniform(500, 1500, 2)
        background = 300 + 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 1.5e6)
        frames[i] = rng.poisson(background).astype(np.uint16)
    return frames


def _stack(total_bytes: int) -> np.ndarray:
    count = total_bytes // FRAME_BYTES
    distinct = microscopy_frames(min(count, 8))
    return np.resize(distinct, (count, *FRAME_SHAPE))


def _sender(endpoint: str, mode: str, total_bytes: int, compression: Any, ctl: Connection) -> None:
    from zmqruntime import ResultStream

    context: zmq.Context[Any] = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, HWM)
    push.connect(endpoint)

    frames_by_frame = mode == "frames"
    stack = microscopy_frames(8) if frames_by_frame else _stack(total_bytes)
    ctl.send("ready")
    ctl.recv()

    if mode == "bare":
        for frame in stack:
            push.send(memoryview(frame).cast("B"), copy=False)
    elif frames_by_frame:
        count = total_bytes // FRAME_BYTES
        stream = ResultStream(push, "bench", compression=compression)
        writer = stream.declare("stack", (count, *FRAME_SHAPE), np.uint16)
        for i in range(count):
            writer.write(i, stack[i % len(stack)][np.newaxis])
        stream.close()
    else:
        stream = ResultStream(push, "bench", compression=compression)
        stream.send_array("stack", stack)
        stream.close()

    ctl.recv()
    push.close(linger=-1)
    context.term()


@dataclass
class Sender:
    """A spawned sender process waiting for the go signal."""

    process: mp.process.BaseProcess
    ctl: Connection

    def go(self) -> None:
        self.ctl.send("go")

    def finish(self) -> None:
        self.ctl.send("done")
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()


def start_sender(endpoint: str, mode: str, total_bytes: int, compression: Any = None) -> Sender:
    """Spawn a sender and wait until its data is ready."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_sender, args=(endpoint, mode, total_bytes, compression, child))
    process.start()
    if not parent.poll(120):
        process.kill()
        raise RuntimeError("benchmark sender did not get ready within 120 s")
    parent.recv()
    return Sender(process, parent)


def bound_pull() -> tuple[zmq.Context[Any], zmq.Socket[Any], str]:
    """Return a context, a PULL socket bound to a random loopback port, and its endpoint."""
    context: zmq.Context[Any] = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, HWM)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    return context, pull, f"tcp://127.0.0.1:{port}"


def receive_bare(pull: zmq.Socket[Any], total_bytes: int) -> float:
    """Receive ``total_bytes`` as zero-copy frames and drop them; return seconds."""
    received = 0
    frame = pull.recv(copy=False)
    started = time.perf_counter()
    received += len(frame.buffer)
    while received < total_bytes:
        received += len(pull.recv(copy=False).buffer)
    return time.perf_counter() - started


def receive_stream(pull: zmq.Socket[Any], sink_for: Callable[[Any], Any]) -> tuple[float, Any]:
    """Receive one stream into sinks; return seconds (first message to end) and the values."""
    from zmqruntime import StreamReceiver

    pull.poll(-1)
    started = time.perf_counter()
    values = StreamReceiver(pull, "bench", sink_for, timeout=120).run()
    return time.perf_counter() - started, values


def rss_anon_bytes(pid: int | None = None) -> int:
    """Return RssAnon of a process from /proc, in bytes (file-backed pages excluded)."""
    with open(f"/proc/{pid or os.getpid()}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not found in /proc/PID/status")


def arena_bytes(pid: int) -> int:
    """Return the memory of the shared-memory arenas that process ``pid`` has open, in bytes.

    Arena pages belong to no process's RssAnon (workers write them with
    ``pwrite``, readers map them briefly), so memory figures add them here.
    """
    total = 0
    seen: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            if not os.readlink(f"{fd_dir}/{name}").startswith("/memfd:zmqruntime-"):
                continue
            info = os.stat(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed meanwhile
        if info.st_ino not in seen:
            seen.add(info.st_ino)
            total += info.st_blocks * 512
    return total


class RssSampler:
    """Samples this process's RssAnon every 10 ms in a thread and keeps the peak."""

    def __init__(self) -> None:
        self.baseline = rss_anon_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_anon_bytes())

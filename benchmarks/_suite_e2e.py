"""End-to-end rounds: ExecutionClient fetching a pipeline's array from a server subprocess.

The server runs as ``python -m zmqruntime serve`` on a tcp loopback port or
an ipc path under a temporary directory. Each round executes a pipeline that
makes its frames, declares the result, reports ready and then waits on a
named FIFO. The clock starts when the client writes to that FIFO and stops
when ``iter_results`` has put the last chunk into the sink. So pipeline start
and data making stay outside the figure. The fetch set-up, both hops (worker
to server, server to client) and the sink writes are inside it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from sinks import MemmapSink, MemorySink, Sink, ZarrSink
from zmqruntime import (
    ChunkReceived,
    ExecutionClient,
    TransportError,
    ZmqTimeoutError,
)

from . import _suite_data
from ._streaming import RssSampler, arena_bytes, rss_anon_bytes
from ._suite_config import ROOT, EndToEnd

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 180.0
SERVER_START_TIMEOUT_S = 30.0
# Seconds a benchmark server waits without work before it exits. Longer than
# any stretch of a profile during which one server's configurations are unused.
SERVER_IDLE_TIMEOUT_S = 900
# Pause between two status requests of the poller: frequent enough for a
# p99 over a 1 GiB stream, sparse enough not to take a core from the stream.
STATUS_INTERVAL_S = 0.005
# A status poller process that gets no request for this long ends itself.
POLLER_IDLE_S = 900.0

_PIPELINE_TAIL = """

def pipeline(ctx, config):
    import os
    import select
    from pathlib import Path

    shape = tuple(config["shape"])
    frames = distinct_frames(shape, config["data"])
    writer = ctx.declare("stack", shape, "uint16")

    # Non-blocking open, so a client that never writes cannot hang the worker.
    fifo = os.open(config["go"], os.O_RDONLY | os.O_NONBLOCK)
    try:
        Path(config["ready"]).touch()
        readable, _, _ = select.select([fifo], [], [], config["wait_s"])
        if not readable:
            raise TimeoutError("no go signal from the benchmark client")
    finally:
        os.close(fifo)

    for i in range(shape[0]):
        writer.write(i, frames[i % len(frames)][np.newaxis])
"""


def pipeline_source() -> str:
    """Return the benchmark pipeline: the data module's text plus ``pipeline(ctx, config)``."""
    return Path(_suite_data.__file__).read_text() + _PIPELINE_TAIL


def _free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ServerProcess:
    """A ``python -m zmqruntime serve`` subprocess and the directory it may use."""

    endpoint: str
    process: subprocess.Popen[bytes]
    workdir: Path

    def tree_pids(self) -> list[int]:
        """Return the pids of the server and its worker processes."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [self.process.pid, *(child.pid for child in children)]

    @staticmethod
    def tree_rss_anon(pids: list[int]) -> int:
        """Return RssAnon of ``pids`` plus the server's arenas, summed, in bytes.

        ``pids[0]`` is the server; processes that ended count 0.
        """
        total = 0
        for pid in pids:
            with contextlib.suppress(OSError, RuntimeError):
                total += rss_anon_bytes(pid)
        if pids:
            with contextlib.suppress(OSError):
                total += arena_bytes(pids[0])
        return total


def _start_server(transport: str, server_args: Sequence[str]) -> ServerProcess:
    workdir = Path(tempfile.mkdtemp(prefix="zr-bench-"))
    if transport == "ipc":
        endpoint = f"ipc://{workdir}/control.sock"
    else:
        # The port may be taken between this probe and the server's bind, so callers retry.
        endpoint = f"tcp://127.0.0.1:{_free_tcp_port()}"
    command = [sys.executable, "-m", "zmqruntime", "serve", "--endpoint", endpoint]
    # The idle timeout ends a server whose benchmark process died without stopping it.
    command += ["--workers", "1", "--log-level", "INFO", "--spill-dir", str(workdir)]
    command += ["--idle-timeout", str(SERVER_IDLE_TIMEOUT_S), *server_args]

    with open(workdir / "server.log", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return ServerProcess(endpoint, process, workdir)


def _wait_answering(server: ServerProcess) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    with ExecutionClient(endpoint=server.endpoint, auto_spawn=False, timeout=2) as client:
        while time.monotonic() < deadline and server.process.poll() is None:
            with contextlib.suppress(ZmqTimeoutError, TransportError):
                client.ping()
                return
    log = (server.workdir / "server.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(
        f"benchmark server on {server.endpoint} did not answer a ping within "
        f"{SERVER_START_TIMEOUT_S} s (exit code {server.process.poll()}); its log ends:\n{log}"
    )


@contextlib.contextmanager
def running_server(transport: str, server_args: Sequence[str] = ()) -> Iterator[ServerProcess]:
    """Start a server subprocess on ``transport`` (tcp or ipc) and stop it on exit.

    ``server_args`` are added to the ``serve`` command line.
    A server that does not reply to a ping is stopped and started once more on
    a new endpoint. A second failure raises ``RuntimeError`` with the end of its log.
    """
    for attempt in (1, 2):
        server = _start_server(transport, server_args)
        try:
            _wait_answering(server)
            break
        except RuntimeError as error:
            _stop_server(server)
            if attempt == 2:
                raise
            logger.warning("restarting the benchmark server: %s", error)
    try:
        yield server
    finally:
        _stop_server(server)


def _stop_server(server: ServerProcess) -> None:
    with (
        contextlib.suppress(Exception),
        ExecutionClient(endpoint=server.endpoint, auto_spawn=False, timeout=5) as client,
    ):
        client.shutdown()
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(5)
    shutil.rmtree(server.workdir, ignore_errors=True)


def make_sink_for(
    config: EndToEnd, directory: Path, tag: str, out: np.ndarray | None = None
) -> Callable[[Any], Sink]:
    """Return ``spec -> Sink`` for ``config``'s sink, writing files under ``directory``.

    ``out`` is the array a preallocated configuration receives into.
    """
    if config.preallocated:
        if out is None:
            raise ValueError(f"configuration {config.label} needs an out array")
        return lambda spec: MemorySink(out=out)
    if config.sink == "memory":
        return lambda spec: MemorySink()
    if config.sink == "memmap":
        return lambda spec: MemmapSink(directory / f"{tag}.npy")
    compressor: Any = None
    if config.compression == "blosc1":
        from zarr.codecs import BloscCodec

        # The settings the server's "blosc1" mode compresses with, so chunks store as they are.
        compressor = BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")
    return lambda spec: ZarrSink(directory / f"{tag}.zarr", compressor=compressor)


def _poll_status(endpoint: str, ctl: Connection) -> None:
    # Runs in its own process, so that neither the fetching client's threads
    # nor its GIL delay a status round trip. Bounded: a silent parent ends it.
    with ExecutionClient(endpoint=endpoint, auto_spawn=False, timeout=30) as client:
        while ctl.poll(POLLER_IDLE_S):
            exec_id = ctl.recv_bytes().decode()
            if not exec_id:
                return
            samples = []
            while not ctl.poll(STATUS_INTERVAL_S):
                started = time.perf_counter()
                client.get_status(exec_id)
                samples.append(time.perf_counter() - started)
            ctl.recv_bytes()
            ctl.send_bytes(np.asarray(samples, np.float64).tobytes())


class StatusPoller:
    """A process that times ``get_status`` round trips of one execution while it streams.

    ``start(exec_id)`` begins polling every ``STATUS_INTERVAL_S``, ``stop()``
    returns the round trips in seconds. ``close()`` ends the process.
    """

    def __init__(self, endpoint: str) -> None:
        context = mp.get_context("spawn")
        self._ctl, child = context.Pipe()
        self._process = context.Process(target=_poll_status, args=(endpoint, child), daemon=True)
        self._process.start()

    def start(self, exec_id: str) -> None:
        self._ctl.send_bytes(exec_id.encode())

    def stop(self) -> list[float]:
        self._ctl.send_bytes(b"stop")
        if not self._ctl.poll(30):
            raise RuntimeError("status poller did not return its samples within 30 s")
        return [float(s) for s in np.frombuffer(self._ctl.recv_bytes(), np.float64)]

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self._ctl.send_bytes(b"")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)


@dataclass
class TreeRssSampler:
    """Samples the summed RssAnon of the server and its workers every 10 ms; keeps the peak."""

    server: ServerProcess
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeRssSampler:
        self.peak = self.server.tree_rss_anon(self.server.tree_pids())
        self._thread = threading.Thread(target=self._run, name="server-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        # Listing children scans all of /proc, which cost the benchmark process
        # a measurable share of a core at 100 Hz, so the pid list is refreshed at 2 Hz.
        pids: list[int] = []
        for tick in itertools.count():
            if self._stop.wait(0.01):
                return
            if tick % 50 == 0:
                pids = self.server.tree_pids()
            self.peak = max(self.peak, self.server.tree_rss_anon(pids))


@dataclass
class EndToEndRound:
    """Figures of one end-to-end round; RSS figures in bytes, latencies in seconds."""

    seconds: float
    raw_bytes: int
    wire_bytes: int
    client_rss_growth: int
    server_rss_peak: int
    status_samples: list[float]


def _wait_ready(client: ExecutionClient, exec_id: str, ready: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark pipeline {exec_id} was not ready in time")
        status = client.get_status(exec_id)
        if status.done:
            raise RuntimeError(f"benchmark pipeline {exec_id} ended early: {status}")
        time.sleep(0.01)


def _fetch(
    server: ServerProcess,
    client: ExecutionClient,
    config: EndToEnd,
    exec_id: str,
    tag: str,
    out: np.ndarray | None,
) -> EndToEndRound:
    # The pipeline waits on the FIFO ``<tag>.go``; writing to it starts the clock.
    compression = None if config.compression == "none" else config.compression
    sink_for = make_sink_for(config, server.workdir, tag, out)
    raw = wire = 0

    with RssSampler() as client_rss, TreeRssSampler(server) as server_rss:
        started = time.perf_counter()
        with open(server.workdir / f"{tag}.go", "wb") as signal:
            signal.write(b"g")
        for event in client.iter_results(exec_id, sink_for, compression=compression):
            if isinstance(event, ChunkReceived):
                raw += event.nbytes
                wire += event.cbytes
        seconds = time.perf_counter() - started

    growth = client_rss.peak - client_rss.baseline
    return EndToEndRound(seconds, raw, wire, growth, server_rss.peak, [])


def run_round(
    server: ServerProcess,
    client: ExecutionClient,
    poller: StatusPoller,
    config: EndToEnd,
    nbytes: int,
    tag: str,
    out: np.ndarray | None = None,
) -> EndToEndRound:
    """Execute the benchmark pipeline once and fetch its array into ``config``'s sink.

    ``out`` is the array a preallocated configuration receives into; the
    caller allocates it once, so that no round pays for its first touch.

    Raises
    ------
    RuntimeError
        The fetch ended with fewer bytes than ``nbytes``.
    """
    directory = server.workdir
    go, ready = directory / f"{tag}.go", directory / f"{tag}.ready"
    os.mkfifo(go)
    shape = _suite_data.stack_shape(nbytes)
    body = {"shape": list(shape), "data": config.data, "go": str(go), "ready": str(ready)}
    exec_id = client.execute(pipeline_source(), {**body, "wait_s": READY_TIMEOUT_S})

    try:
        _wait_ready(client, exec_id, ready)
        poller.start(exec_id)
        try:
            result = _fetch(server, client, config, exec_id, tag, out)
        finally:
            result_status = poller.stop()
    finally:
        client.wait(exec_id, timeout=60)
        client.release(exec_id)
        _remove_outputs(directory, tag)

    if result.raw_bytes != nbytes:
        raise RuntimeError(f"round {tag} received {result.raw_bytes} bytes of {nbytes}")
    result.status_samples = result_status
    return result


def _remove_outputs(directory: Path, tag: str) -> None:
    for path in directory.glob(f"{tag}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def percentile(samples: list[float], q: float) -> float:
    """Return the ``q`` quantile (0 to 1) of ``samples`` by nearest rank; NaN when empty."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median_seconds(rounds: list[EndToEndRound]) -> float:
    """Return the median duration of ``rounds`` in seconds."""
    return statistics.median(r.seconds for r in rounds)

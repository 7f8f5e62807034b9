"""Entry point of a worker process: run one execution's pipeline.

The worker gets its job as msgpack bytes and a pipe to the server's executor.
Over the pipe (msgpack maps via ``send_bytes``; nothing is pickled) it reports
``started``, ``progress``, ``value`` and ``finished``, and it receives
``cancel``. Results travel on the data channel: a PUSH socket connected to the
server, written through a :class:`ResultStream`.

This module is preloaded by the forkserver, so it must not create a ZeroMQ
context at import time.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import zmq

from ._arena import ArenaWriter
from ._chunking import DEFAULT_CHUNK_BYTES
from ._compression import release_gil_in_codecs
from ._control import pack_value, unpack_value
from ._errors import ExecutionCancelledError
from ._pipeline import PipelineContext, load_config, load_pipeline
from ._sender import ResultStream

__all__ = ["run_worker"]

logger = logging.getLogger(__name__)

# Messages a worker's PUSH socket queues before a send blocks. With chunks of at
# most a few MiB this bounds the bytes waiting for the server; arbitrary.
WORKER_SNDHWM = 4

# How long closing the data socket may wait to hand queued chunks to the
# server, in milliseconds. Past it the remaining chunks are dropped and the
# server reports the result incomplete.
WORKER_LINGER_MS = 60_000

# Seconds one send may block on a full queue before the pipeline fails. The
# server's ingest thread drains continuously, so only a dead server blocks
# this long.
WORKER_SEND_TIMEOUT = 600.0

# Seconds a worker waits, after its stream end, for the server to confirm that
# it received the whole stream. libzmq (4.3.5 here; libzmq GitHub issue 4660)
# drops messages still unread on an ipc connection when the sending process
# exits, whatever its linger, so the worker must outlive them.
WORKER_ACK_TIMEOUT = 60.0

# Seconds a worker whose server died gives its pipeline to stop on its own
# before the process ends itself, and the exit code it ends with then.
ORPHAN_GRACE = 2.0
_ORPHAN_EXIT_CODE = 75


class _PipeReporter:
    """Sends msgpack maps to the executor; safe to call from several threads."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        data = pack_value(event)
        with self._lock:
            self._conn.send_bytes(data)


def _listen_for_cancel(
    conn: Connection, cancel_event: threading.Event, received_event: threading.Event
) -> None:
    # The server closes its end only after this process exits, so a closed pipe
    # means the server died and the results can no longer be collected. Ask the
    # pipeline to stop, then end the process if it does not, because a send
    # blocked on the dead server's socket or a long sleep would leave an orphan.
    while True:
        try:
            message = unpack_value(conn.recv_bytes())
        except (EOFError, OSError):
            cancel_event.set()
            time.sleep(ORPHAN_GRACE)
            logger.warning("the server is gone; worker pid %d exits", os.getpid())
            os._exit(_ORPHAN_EXIT_CODE)
        kind = message.get("kind") if isinstance(message, dict) else None
        if kind == "cancel":
            cancel_event.set()
        elif kind == "stream_received":
            received_event.set()


def run_worker(job_bytes: bytes, conn: Connection) -> None:
    """Run the job described by ``job_bytes`` and report over ``conn``.

    ``job_bytes`` is a packed map with ``exec_id``, ``pipeline``, ``config``,
    ``data_endpoint`` and optional ``chunk_bytes`` and ``compression``.
    Returns after the result stream was flushed to the server (or its linger
    time passed) and ``finished`` was sent.
    """
    job = unpack_value(job_bytes)
    exec_id: str = job["exec_id"]
    # The cancel listener must run while the sender compresses a chunk.
    release_gil_in_codecs()
    report = _PipeReporter(conn)
    cancel_event = threading.Event()
    received_event = threading.Event()
    threading.Thread(
        target=_listen_for_cancel,
        args=(conn, cancel_event, received_event),
        name="cancel-listener",
        daemon=True,
    ).start()

    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, WORKER_SNDHWM)
    socket.connect(job["data_endpoint"])
    arena = _open_arena(job)
    try:
        stream = ResultStream(
            socket,
            exec_id,
            compression=job.get("compression"),
            chunk_bytes=job.get("chunk_bytes") or DEFAULT_CHUNK_BYTES,
            timeout=WORKER_SEND_TIMEOUT,
            arena=arena,
        )
        report({"kind": "started"})
        ctx = PipelineContext(exec_id, stream, report, cancel_event)
        status, error = _run_pipeline(ctx, job)
        stream.close(status, error)
        # A cancelled stream is discarded, so nothing is left to wait for.
        awaits_ack = job.get("await_stream_ack") and status != "cancelled"
        if awaits_ack and not received_event.wait(WORKER_ACK_TIMEOUT):
            logger.warning(
                "execution %s: the server did not confirm the stream within %.0f s",
                exec_id,
                WORKER_ACK_TIMEOUT,
            )
    finally:
        # Closing with a linger hands queued chunks to the server before
        # "finished" is reported, so the server rarely waits for the stream end.
        socket.close(linger=WORKER_LINGER_MS)
        context.term()
        if arena is not None:
            arena.close()
    report({"kind": "finished", "status": status, "error": error})


def _open_arena(job: dict[str, Any]) -> ArenaWriter | None:
    locator = job.get("arena")
    if not locator:
        return None
    try:
        return ArenaWriter(locator, int(job.get("arena_limit") or 0))
    except (OSError, KeyError, ValueError) as exc:
        # The socket carries every payload instead; slower, never wrong.
        logger.info("execution %s: cannot open its arena: %s", job["exec_id"], exc)
        return None


def _run_pipeline(ctx: PipelineContext, job: dict[str, Any]) -> tuple[str, dict[str, str] | None]:
    try:
        function = load_pipeline(job["pipeline"])
        config = load_config(job.get("config"))
        result = function(ctx, config)
        _send_return_value(ctx, result)
        # Ending the results here reports a partly written one as this
        # execution's failure, with its message, instead of crashing the worker.
        ctx._stream.end_results()
    except ExecutionCancelledError:
        return "cancelled", None
    except Exception as exc:
        if ctx.cancelled:
            return "cancelled", None
        return "failed", {
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
    return ("cancelled" if ctx.cancelled else "completed"), None


def _send_return_value(ctx: PipelineContext, result: Any) -> None:
    if inspect.isgenerator(result):
        for index, item in enumerate(result):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(
                    f"pipeline generator item {index} is {type(item).__name__}, "
                    "expected a (name, ndarray) pair"
                )
            ctx.send_array(item[0], item[1])
            ctx.check_cancelled()
    elif isinstance(result, np.ndarray):
        ctx.send_array("return", result)
    elif result is not None:
        ctx.set_value("return", result)

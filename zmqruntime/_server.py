"""The execution server: control loop, result ingest and fetch transfers.

Threads and sockets
-------------------
- The control loop (the thread that calls :meth:`ExecutionServer.serve_forever`)
  owns the ROUTER socket, in a ZeroMQ context of its own, and replies to
  every request itself. Handlers only update tables and start threads, so a reply
  does not wait on a data transfer.
- The ingest thread owns a PULL socket that every worker's PUSH socket
  connects to; it appends each message to the execution's retained stream.
- Each fetch runs a :class:`Transfer` thread with its own two sockets.
- The executor's monitor thread delivers worker events (started, progress,
  values, exit) through :meth:`ExecutionServer._on_executor_event`.
- The retention store's cleanup thread frees released or expired results and
  deletes their spill files, so the control loop does not wait for that.

One re-entrant lock guards the execution table and the records in it. The
ingest thread writes spilled payloads to disk without holding it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ._arena import ARENA_HEADER_BYTES, ArenaPool, arenas_supported
from ._compression import Compression, as_compression, release_gil_in_codecs
from ._control import (
    ControlValueError,
    MessageType,
    decode_control,
    encode_control,
    make_reply,
    peek_request_id,
)
from ._errors import ExecutionNotFoundError, ProtocolError, ZmqRuntimeError
from ._execution import TERMINAL_STATES, ExecutionRecord, RequestIds, ServerConfig, final_outcome
from ._executor import Executor, Job, ProcessExecutor
from ._ingest import Ingest
from ._priority import lower_new_zmq_threads, thread_ids
from ._retention import RetentionStore
from ._spawn import EndpointLock, bind_or_raise
from ._transfer import Transfer
from ._wire import StreamEnd, encode_message

__all__ = ["ExecutionServer"]

logger = logging.getLogger(__name__)

# Terminal execution records kept for status queries; the oldest beyond this
# are forgotten (their results released), so a long-running server stays
# within a fixed memory bound.
MAX_FINISHED_RECORDS = 10_000

# How often the control loop finalizes exited executions, trims old records,
# expires results and checks the idle timeout, in milliseconds.
HOUSEKEEPING_INTERVAL_MS = 100

Handler = Callable[[dict[str, Any], str], dict[str, Any]]


class ExecutionServer:
    """Serves executions on one control endpoint.

    Use :meth:`start` then :meth:`serve_forever` (blocking), or
    :meth:`serve_in_thread`. :meth:`stop` may be called from any thread;
    :meth:`serve_forever` then cleans up (workers stopped, retained results and
    spill files removed, sockets closed) before it returns.
    """

    def __init__(self, config: ServerConfig | None = None, *, executor: Executor | None = None):
        self.config = config or ServerConfig()
        self._lock = threading.RLock()
        self._executions: dict[str, ExecutionRecord] = {}
        self._request_ids = RequestIds()
        self._transfers: dict[int, Transfer] = {}
        # Outcomes of the last transfers, for tests and benchmarks.
        self.transfer_stats: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self._stop = threading.Event()
        self._started = False
        self._last_activity = time.monotonic()
        self._started_at = time.time()
        self._executor_override = executor
        self._handlers: dict[MessageType, Handler] = {
            MessageType.EXECUTE: self._handle_execute,
            MessageType.STATUS: self._handle_status,
            MessageType.LIST: self._handle_list,
            MessageType.CANCEL: self._handle_cancel,
            MessageType.RESULTS: self._handle_results,
            MessageType.RELEASE: self._handle_release,
            MessageType.PING: self._handle_ping,
            MessageType.SHUTDOWN: self._handle_shutdown,
        }

    # ------------------------------------------------------------------ life cycle

    @property
    def endpoint(self) -> str:
        """The control endpoint clients connect to (the bound port filled in)."""
        return self._endpoint

    def start(self) -> None:
        """Take the endpoint lock, bind the sockets and start the helper threads.

        Raises
        ------
        EndpointInUseError
            Another live server holds the endpoint.
        TransportError
            Binding failed (for example, the tcp port is taken by another program).
        """
        self._lock_file = EndpointLock(self.config.endpoint)
        self._lock_file.acquire_or_raise()
        # Transfers compress for remote clients; control requests must not wait on that.
        release_gil_in_codecs()
        self._control_context: zmq.Context[Any] = zmq.Context()
        self._context: zmq.Context[Any] = zmq.Context()
        try:
            self._open_sockets()
        except BaseException:
            self._control_context.destroy(linger=0)
            self._context.destroy(linger=0)
            self._lock_file.release(delete=True)
            raise

        pool = ArenaPool(self.config.memory_limit // 4) if arenas_supported() else None
        self._retention = RetentionStore(self.config.memory_limit, self.config.spill_dir, pool)
        self._executor = self._executor_override or ProcessExecutor(
            self._on_executor_event,
            max_workers=self.config.max_workers,
            max_queued=self.config.max_queued,
            start_method=self.config.start_method,
            grace_period=self.config.grace_period,
            kill_after=self.config.kill_after,
        )
        self._ingest = Ingest(self._context, self._ingest_socket, self._retention, self)
        self._ingest.start()
        self._started = True
        logger.info(
            "zmqruntime server pid %d started: control %s, data %s, %d workers",
            os.getpid(),
            self._endpoint,
            self._ingest_endpoint,
            self.config.max_workers,
        )

    def _open_sockets(self) -> None:
        # The control socket has a context of its own, so its I/O thread is
        # idle between requests: replies never queue behind the gigabytes the
        # data context's I/O thread moves, and the OS wakes it at once.
        self._router = self._control_context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._endpoint = bind_or_raise(self._router, self.config.endpoint)

        self._ipc_dir: str | None = None
        if self._endpoint.startswith("ipc://"):
            self._ipc_dir = tempfile.mkdtemp(prefix="zmqruntime-")
            self._bind_base = f"ipc://{self._ipc_dir}/t"
        else:
            self._bind_base = "tcp://127.0.0.1" if self.config.host is None else self.config.host
        # The data context's libzmq threads start with its first socket.
        threads_before = thread_ids()
        self._ingest_socket = self._context.socket(zmq.PULL)
        # One reaper thread besides the I/O threads.
        expected = self._context.get(zmq.IO_THREADS) + 1
        lower_new_zmq_threads(threads_before, self.config.data_nice, expected)
        self._ingest_socket.setsockopt(zmq.LINGER, 0)
        self._ingest_socket.setsockopt(zmq.RCVHWM, self.config.ingest_hwm)
        if self._ipc_dir is not None:
            self._ingest_endpoint = f"ipc://{self._ipc_dir}/ingest.sock"
            self._ingest_socket.bind(self._ingest_endpoint)
        else:
            port = self._ingest_socket.bind_to_random_port(self._bind_base)
            self._ingest_endpoint = f"{self._bind_base}:{port}"

    def serve_forever(self) -> None:
        """Answer requests until :meth:`stop`, a shutdown request or the idle timeout."""
        if not self._started:
            self.start()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        next_housekeeping = 0.0
        try:
            while not self._stop.is_set():
                if poller.poll(HOUSEKEEPING_INTERVAL_MS):
                    self._serve_one()
                # Housekeeping scans every record, so it runs on a timer, not
                # after every request.
                now = time.monotonic()
                if now >= next_housekeeping:
                    self._housekeeping()
                    next_housekeeping = now + HOUSEKEEPING_INTERVAL_MS / 1000
        finally:
            self._close()

    def serve_in_thread(self) -> threading.Thread:
        """Start the server and run :meth:`serve_forever` in a daemon thread; return it."""
        if not self._started:
            self.start()
        thread = threading.Thread(target=self.serve_forever, name="zmqruntime-server", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Ask the control loop to stop; it cleans up within about 0.1 s plus worker shutdown."""
        self._stop.set()

    def _close(self) -> None:
        with self._lock:
            transfers = list(self._transfers.values())
        for transfer in transfers:
            transfer.stop()
        for transfer in transfers:
            transfer.join(2.0)
        self._mark_unfinished_cancelled()
        self._executor.shutdown(timeout=self.config.grace_period + self.config.kill_after + 1.0)
        self._ingest.stop()
        self._retention.close()
        self._router.close(linger=0)
        self._control_context.term()
        self._context.term()
        self._remove_control_socket_file()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
        self._lock_file.release(delete=True)
        logger.info("zmqruntime server pid %d on %s stopped", os.getpid(), self._endpoint)

    def _remove_control_socket_file(self) -> None:
        # libzmq 4.3.5 leaves the file of a bound ipc endpoint behind. The
        # endpoint lock is still held, so no other server can have bound it since.
        if self._endpoint.startswith("ipc://") and not self._endpoint.startswith("ipc://@"):
            with contextlib.suppress(OSError):
                os.unlink(self._endpoint[len("ipc://") :])

    def _mark_unfinished_cancelled(self) -> None:
        """Record that stopping the server cancels what still runs, so it ends cancelled."""
        with self._lock:
            for record in self._executions.values():
                if record.state in TERMINAL_STATES:
                    continue
                record.cancel_requested = True
                if record.state != "cancelling":
                    self._set_state(record, "cancelling")

    # ------------------------------------------------------------------ requests

    def _serve_one(self) -> None:
        try:
            frames = self._router.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        if len(frames) < 2:
            logger.warning(
                "dropped a control message of %d frame(s): no routing envelope", len(frames)
            )
            return
        envelope, payload = frames[:-1], frames[-1]
        self._last_activity = time.monotonic()
        reply = self._dispatch(payload)
        try:
            self._router.send_multipart([*envelope, encode_control(reply)], zmq.NOBLOCK)
        except (zmq.ZMQError, ControlValueError) as exc:
            logger.warning("could not send a reply to request %s: %s", reply.get("id"), exc)

    def _dispatch(self, payload: bytes) -> dict[str, Any]:
        try:
            message = decode_control(payload)
        except ProtocolError as exc:
            logger.warning("rejected a control message: %s", exc)
            # Without a readable id the reply carries an empty one: a REQ client
            # is unblocked, and the error describes what was wrong with its message.
            return make_reply(peek_request_id(payload) or "", error=exc)

        request_id = message["id"]
        kind = MessageType(message["type"])
        handler = self._handlers.get(kind)
        if handler is None:
            return make_reply(request_id, error=ProtocolError(f"{kind.value!r} is not a request"))
        try:
            return make_reply(request_id, handler(message["body"], request_id))
        except (ZmqRuntimeError, ValueError, TypeError, KeyError) as exc:
            logger.debug("request %s (%s) failed: %s", request_id, kind.value, exc)
            return make_reply(request_id, error=exc)

    def _handle_execute(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        key = body.get("request_id") or request_id
        pipeline = body.get("pipeline")
        if not isinstance(pipeline, str):
            raise TypeError(f"execute: pipeline is {type(pipeline).__name__}, expected a str")
        config = body.get("config")
        if config is not None and not isinstance(config, str | dict):
            raise TypeError(f"execute: config is {type(config).__name__}, expected str or map")

        with self._lock:
            existing = self._request_ids.lookup(key, pipeline, config)
            if existing is not None:
                return {"exec_id": existing, "duplicate": True}
            exec_id = secrets.token_hex(8)
            record = ExecutionRecord(exec_id, key)
            self._executions[exec_id] = record
            self._request_ids.add(key, exec_id, pipeline, config)
            stream = self._retention.create(exec_id)
            if self.config.shared_memory and arenas_supported():
                stream.arena = self._retention.new_arena(exec_id)

        job = Job(
            exec_id,
            pipeline,
            config,
            self._ingest_endpoint,
            self.config.chunk_bytes,
            arena=None if stream.arena is None else stream.arena.locator,
            arena_limit=self.config.memory_limit + ARENA_HEADER_BYTES,
            await_stream_ack=self._executor.acknowledges_streams,
        )
        try:
            self._executor.submit(job)
        except ZmqRuntimeError:
            with self._lock:
                self._forget(exec_id)
            raise
        logger.info("execution %s queued (request %s)", exec_id, key)
        return {"exec_id": exec_id, "duplicate": False}

    def _handle_status(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        with self._lock:
            return self._record(body.get("exec_id")).to_status()

    def _handle_list(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        states = body.get("states")
        with self._lock:
            rows = [
                record.to_status(brief=True)
                for record in self._executions.values()
                if not states or record.state in states
            ]
        return {"executions": rows}

    def _handle_cancel(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        with self._lock:
            record = self._record(body.get("exec_id"))
            if record.state in TERMINAL_STATES or record.state == "cancelling":
                return {
                    "accepted": False,
                    "state": record.state,
                    "message": f"execution {record.exec_id} is already {record.state}; "
                    "nothing to cancel",
                }
            # The stream's own count, not record.chunks_done: the ingest thread
            # appends a chunk before it counts it, so the record can lag by one.
            stream = self._retention.get(record.exec_id)
            chunks_done = record.chunks_done if stream is None else stream.cut_stream()
            self._set_state(record, "cancelling")
            record.cancel_requested = True

        self._executor.cancel(record.exec_id)
        # A queued execution is dropped at once, so it may already be cancelled.
        with self._lock:
            state = record.state
        done = "was cancelled" if state == "cancelled" else "is being cancelled"
        return {
            "accepted": True,
            "state": state,
            "chunks_done": chunks_done,
            "message": f"execution {record.exec_id} {done}",
        }

    def _handle_results(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        with self._lock:
            record = self._record(body.get("exec_id"))
            stream = self._retention.get(record.exec_id)
            # A released execution that still runs keeps its stream until it ends.
            if stream is None or record.results_released:
                raise ExecutionNotFoundError(
                    f"results of execution {record.exec_id} were released or expired; "
                    "run the execution again"
                )
        window = int(body.get("window_bytes") or self.config.window_bytes)
        names = body.get("names")
        compression = body.get("compression")
        transfer = Transfer(
            self._context,
            stream,
            bind_base=self._bind_base,
            window_bytes=window,
            timeout=self.config.transfer_timeout,
            names=names,
            compression=None if compression is None else _as_compression(compression),
            on_done=self._transfer_done,
            nice=self.config.data_nice,
            offer_arena=body.get("arena") is True,
        )
        with self._lock:
            self._transfers[transfer.transfer_id] = transfer
        transfer.start()
        logger.debug(
            "transfer %d of execution %s started to %s",
            transfer.transfer_id,
            record.exec_id,
            transfer.data_endpoint,
        )
        return {
            "data_endpoint": transfer.data_endpoint,
            "credit_endpoint": transfer.credit_endpoint,
            "transfer_id": transfer.transfer_id,
            "window_bytes": window,
            "arena": stream.arena.locator if transfer.arena_offered and stream.arena else None,
        }

    def _handle_release(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        with self._lock:
            record = self._record(body.get("exec_id"))
            already = record.results_released
            record.results_released = True
            if record.state not in TERMINAL_STATES:
                # Dropping the stream now would make the ingest thread discard
                # the rest of it and fail the execution, so _drop_released
                # drops it once the execution has ended.
                deferred = not already and self._retention.get(record.exec_id) is not None
                if deferred:
                    logger.info("execution %s: results released once it ends", record.exec_id)
                return {"released": deferred}
        # Outside the server lock, and the cleanup runs in the background:
        # deleting a large spill file takes a while.
        released = self._retention.release(record.exec_id, background=True)
        if released:
            logger.info("execution %s: results released", record.exec_id)
        return {"released": released}

    def _handle_ping(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        with self._lock:
            active = sum(1 for r in self._executions.values() if r.state not in TERMINAL_STATES)
        return {
            "pid": os.getpid(),
            "endpoint": self._endpoint,
            "data_endpoint": self._ingest_endpoint,
            "uptime": time.time() - self._started_at,
            "active": active,
            "transfers": len(self._transfers),
            "retained_memory_bytes": self._retention.memory_used,
        }

    def _handle_shutdown(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        logger.info("shutdown requested (request %s)", request_id)
        self._stop.set()
        return {"stopping": True}

    def _record(self, exec_id: Any) -> ExecutionRecord:
        if not isinstance(exec_id, str):
            raise TypeError(f"exec_id is {exec_id!r}, expected a str")
        record = self._executions.get(exec_id)
        if record is None:
            raise ExecutionNotFoundError(
                f"no execution {exec_id!r} is known to the server at {self._endpoint}; "
                "it may have expired or belong to another server"
            )
        return record

    # ------------------------------------------------------------------ events

    def _on_executor_event(self, exec_id: str, event: dict[str, Any]) -> None:
        with self._lock:
            record = self._executions.get(exec_id)
            if record is None:
                return
            kind = event["kind"]
            if kind == "started":
                record.pid = event.get("pid")
                record.started_at = time.time()
                if record.state == "queued":
                    self._set_state(record, "running")
            elif kind == "progress":
                record.progress = {k: event.get(k) for k in ("done", "total", "message")}
            elif kind == "value":
                record.values[str(event.get("key"))] = event.get("value")
            elif kind == "finished":
                record.outcome = event
            elif kind == "exited":
                record.exited_at = time.monotonic()
                record.exitcode = event.get("exitcode")
                self._maybe_finalize(record)

    def on_stream_end(self, end: StreamEnd) -> None:
        """Apply the worker's stream end; the ingest thread calls this once it was retained.

        The caller has acquired :attr:`lock` and sealed the stream under it. The
        execution takes the outcome in ``end`` at once, before its worker
        process exits, so a client that received the stream end (a
        ``RemoteError``, say) gets the same state from its next status call.
        A cancel requested earlier still ends as cancelled when the worker exits.
        """
        with self._lock:
            record = self._executions.get(end.exec_id)
            if record is None:
                return
            record.stream_ended = True
            if record.state in TERMINAL_STATES or record.cancel_requested:
                return
            if end.status not in TERMINAL_STATES:
                self._maybe_finalize(record)
                return
            record.error = dict(end.error) if end.error else None
            record.finished_at = time.time()
            self._set_state(record, end.status)

    def acknowledge_stream(self, exec_id: str) -> None:
        """Tell the worker of ``exec_id`` that its whole stream arrived, so it may exit."""
        self._executor.stream_received(exec_id)

    def execution(self, exec_id: str) -> ExecutionRecord | None:
        """Return the record of ``exec_id`` (caller holds :attr:`lock`), or None."""
        return self._executions.get(exec_id)

    @property
    def lock(self) -> threading.RLock:
        """The lock guarding the execution table."""
        return self._lock

    def _maybe_finalize(self, record: ExecutionRecord) -> None:
        # Caller holds the lock.
        if record.state in TERMINAL_STATES or record.exited_at is None:
            return
        outcome = final_outcome(record, time.monotonic())
        if outcome is None:
            return  # the stream end may still be in flight, and housekeeping retries
        status, error = outcome

        stream = self._retention.get(record.exec_id)
        if stream is not None and not stream.sealed:
            if status == "cancelled":
                stream.cut_stream()
            stream.seal(encode_message(StreamEnd(record.exec_id, status, error)))
        record.error = error
        record.finished_at = time.time()
        self._set_state(record, status)

    def _set_state(self, record: ExecutionRecord, state: str) -> None:
        # Caller holds the lock.
        previous, record.state = record.state, state
        if state in TERMINAL_STATES:
            self._drop_released(record)
        if state in TERMINAL_STATES and record.error:
            logger.info(
                "execution %s: %s -> %s (%s: %s)",
                record.exec_id,
                previous,
                state,
                record.error.get("type"),
                record.error.get("message"),
            )
        else:
            logger.info("execution %s: %s -> %s", record.exec_id, previous, state)

    def _drop_released(self, record: ExecutionRecord) -> None:
        """Drop the stream of an ended execution that was released while it ran.

        Caller holds the lock. A fetch that was running at the release may
        still be sending the stream's tail, so the stream stays until the
        last such fetch ends (see :meth:`_transfer_done`).
        """
        if not record.results_released or record.state not in TERMINAL_STATES:
            return
        if any(t.stream.exec_id == record.exec_id for t in self._transfers.values()):
            return
        self._retention.release(record.exec_id, background=True)

    def _transfer_done(self, transfer: Transfer) -> None:
        with self._lock:
            self._transfers.pop(transfer.transfer_id, None)
            record = self._executions.get(transfer.stream.exec_id)
            if record is not None:
                self._drop_released(record)
            self.transfer_stats.append(
                {
                    "transfer_id": transfer.transfer_id,
                    "exec_id": transfer.stream.exec_id,
                    "outcome": transfer.outcome,
                    "max_in_flight": transfer.max_in_flight,
                    "window_bytes": transfer.window_bytes,
                    "arena_chunks": transfer.arena_chunks,
                }
            )
        self._last_activity = time.monotonic()

    # ------------------------------------------------------------------ housekeeping

    def _housekeeping(self) -> None:
        with self._lock:
            for record in list(self._executions.values()):
                if record.state not in TERMINAL_STATES and record.exited_at is not None:
                    self._maybe_finalize(record)
            self._trim_records()
        for exec_id in self._retention.expire(self.config.retention_seconds):
            logger.info(
                "execution %s: results expired after %.0f s", exec_id, self.config.retention_seconds
            )
        self._check_idle()

    def _trim_records(self) -> None:
        # Caller holds the lock. Dicts keep insertion order: oldest first.
        finished = [r for r in self._executions.values() if r.state in TERMINAL_STATES]
        for record in finished[: max(0, len(finished) - MAX_FINISHED_RECORDS)]:
            self._forget(record.exec_id)

    def _forget(self, exec_id: str) -> None:
        record = self._executions.pop(exec_id, None)
        if record is not None:
            self._request_ids.discard(record.request_id)
        self._retention.release(exec_id, background=True)

    def _check_idle(self) -> None:
        idle_timeout = self.config.idle_timeout
        if idle_timeout is None or idle_timeout <= 0:
            return
        with self._lock:
            busy = self._transfers or any(
                r.state not in TERMINAL_STATES for r in self._executions.values()
            )
        if busy:
            self._last_activity = time.monotonic()
            return
        if time.monotonic() - self._last_activity > idle_timeout:
            logger.info("server on %s idle for %.0f s; stopping", self._endpoint, idle_timeout)
            self._stop.set()


def _as_compression(value: Any) -> Compression:
    if not isinstance(value, str):
        raise TypeError(f"compression {value!r} is not a str; use 'blosc2', 'blosc1' or 'auto'")
    return as_compression(value)

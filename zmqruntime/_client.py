"""The client: submit executions, query and cancel them, fetch their results.

Every request has a timeout. A request that gets no reply in time leaves no
stuck socket: the client closes it with linger 0, opens a new one and, for
idempotent requests, retries (``execute`` is idempotent through its request
id, which the retry reuses). All sockets have linger 0, so an interpreter
exits at once even with requests outstanding.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

import zmq

from ._arena import arenas_supported
from ._control import (
    ControlValueError,
    MessageType,
    check_value,
    decode_control,
    encode_control,
    make_request,
)
from ._errors import (
    ExecutionNotFoundError,
    ProtocolError,
    TransportError,
    ZmqRuntimeError,
    ZmqTimeoutError,
)
from ._fetch import FetchSockets, early_end_reason
from ._pipeline import check_pipeline_source
from ._receiver import ChunkReceived, StreamEvent, StreamReceiver
from ._sinkfactory import SinkArgument, make_sink_factory
from ._spawn import spawn_server
from ._status import CancelResult, ExecutionStatus

__all__ = ["ExecutionClient"]

logger = logging.getLogger(__name__)

_ERRORS: dict[str, type[Exception]] = {
    "ExecutionNotFoundError": ExecutionNotFoundError,
    "ControlValueError": ControlValueError,
    "TypeError": TypeError,
    "ValueError": ValueError,
    "KeyError": KeyError,
}

# While a fetch waits for the next message, how often it checks that the server
# still answers and the execution is still active, in seconds.
_FETCH_POLL = 2.0


class ExecutionClient:
    """Connects to a zmqruntime server, starting one if none answers.

    Parameters
    ----------
    port:
        Server port on ``host``; ignored when ``endpoint`` is given.
    host:
        Server address; 127.0.0.1 by default.
    endpoint:
        Full control endpoint (``tcp://host:port`` or ``ipc:///path``).
    timeout:
        Seconds one call may take in total, retries included.
    retries:
        Extra attempts of an idempotent request after a lost reply.
    auto_spawn:
        Start ``python -m zmqruntime serve`` on the endpoint when nothing answers.
    idle_timeout:
        Seconds a spawned server waits idle before it exits.
    spawn_timeout:
        Seconds to wait for a spawned server's first answer.
    server_args:
        Extra command-line arguments for a spawned server.
    shared_memory:
        On the server's host, read large payloads from the server's
        shared-memory arena instead of the data socket (Linux, same user;
        anything else falls back to the socket). False always uses the socket.

    The client is thread safe: requests are serialized by a lock. Fetches use
    their own sockets and may run in parallel with requests.
    """

    def __init__(
        self,
        port: int = 5555,
        *,
        host: str = "127.0.0.1",
        endpoint: str | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        auto_spawn: bool = True,
        idle_timeout: float = 300.0,
        spawn_timeout: float = 10.0,
        server_args: Sequence[str] = (),
        shared_memory: bool = True,
    ) -> None:
        self.endpoint = endpoint or f"tcp://{host}:{port}"
        self.timeout = timeout
        self.retries = retries
        self.auto_spawn = auto_spawn
        self.idle_timeout = idle_timeout
        self.spawn_timeout = spawn_timeout
        self.server_args = tuple(server_args)
        self.shared_memory = shared_memory
        self._context: zmq.Context[Any] = zmq.Context()
        self._context.setsockopt(zmq.LINGER, 0)
        self._socket: zmq.Socket[Any] | None = None
        self._lock = threading.RLock()
        self._server_checked = False
        self._finalizer = weakref.finalize(self, _destroy, self._context)

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close every socket with linger 0; closing twice does nothing."""
        with self._lock:
            self._reset_socket()
            self._finalizer()

    def __enter__(self) -> ExecutionClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connect(self) -> zmq.Socket[Any]:
        if not self._finalizer.alive:
            raise ZmqRuntimeError("the client is closed; create a new ExecutionClient")
        if self._socket is None:
            socket = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(self.endpoint)
            self._socket = socket
        return self._socket

    def _reset_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _exchange(self, payload: bytes, request_id: str, timeout: float) -> dict[str, Any] | None:
        socket = self._connect()
        socket.send_multipart([b"", payload])
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not socket.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                return None
            frames = socket.recv_multipart()
            reply = decode_control(frames[-1])
            if reply.get("id") == request_id:
                return reply
            logger.debug("dropped a stale reply to request %s", reply.get("id"))

    def _request(
        self,
        kind: MessageType,
        body: Mapping[str, Any],
        *,
        timeout: float | None = None,
        idempotent: bool = True,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        total = self.timeout if timeout is None else timeout
        attempts = 1 + (self.retries if idempotent else 0)
        request_id = request_id or uuid.uuid4().hex
        # Packing checks every value before anything is sent.
        payload = encode_control(make_request(kind, request_id, body))

        with self._lock:
            deadline = time.monotonic() + total
            if self.auto_spawn and not self._server_checked:
                self._ensure_server()
            for attempt in range(1, attempts + 1):
                remaining = deadline - time.monotonic()
                share = remaining / (attempts - attempt + 1)
                if share <= 0:
                    break
                reply = self._exchange(payload, request_id, share)
                if reply is not None:
                    return _unwrap(reply, kind, self.endpoint)
                self._reset_socket()
                logger.info(
                    "request %s (%s) to %s got no reply in %.2f s (attempt %d of %d)",
                    request_id,
                    kind.value,
                    self.endpoint,
                    share,
                    attempt,
                    attempts,
                )
                if self.auto_spawn and attempt < attempts:
                    self._ensure_server()
        raise ZmqTimeoutError(
            f"{kind.value} request to {self.endpoint} got no reply within {total} s "
            f"({attempts} attempt(s)); is a zmqruntime server running there?"
        )

    def _ping_once(self, timeout: float) -> bool:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(self.endpoint)
            request_id = uuid.uuid4().hex
            socket.send_multipart(
                [b"", encode_control(make_request(MessageType.PING, request_id, {}))]
            )
            if not socket.poll(int(timeout * 1000), zmq.POLLIN):
                return False
            reply = decode_control(socket.recv_multipart()[-1])
            return bool(reply.get("ok")) and reply.get("id") == request_id
        except ProtocolError:
            raise
        finally:
            socket.close(linger=0)

    def _ensure_server(self) -> None:
        if self._ping_once(min(0.5, self.timeout)):
            self._server_checked = True
            return
        spawn_server(
            self.endpoint,
            self._ping_once,
            idle_timeout=self.idle_timeout,
            timeout=self.spawn_timeout,
            extra_args=self.server_args,
        )
        self._server_checked = True

    # ------------------------------------------------------------------ requests

    def ping(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Return the server's pid, endpoints, uptime and load."""
        return self._request(MessageType.PING, {}, timeout=timeout)

    def execute(
        self,
        pipeline: str | Callable[..., Any],
        config: str | Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Submit a pipeline and return its execution id as soon as it is queued.

        ``pipeline`` is Python source defining ``pipeline(ctx, config)``, a
        ``"package.module:function"`` reference, or an importable function
        (sent as its reference). ``config`` is a mapping, Python source, or None.
        Retrying with the same ``request_id`` never starts a second execution.

        Raises
        ------
        ControlValueError
            A config value cannot travel unchanged; nothing was sent.
        PipelineLoadError
            The pipeline source has a syntax error; nothing was sent.
        """
        source = _pipeline_text(pipeline)
        check_pipeline_source(source)
        config_value: Any = config
        if isinstance(config, Mapping):
            config_value = check_value(dict(config), "config")
        elif config is not None and not isinstance(config, str):
            raise TypeError(f"config is a {type(config).__name__}; pass a mapping, source or None")
        body = {"pipeline": source, "config": config_value}
        reply = self._request(
            MessageType.EXECUTE, body, timeout=timeout, request_id=request_id or uuid.uuid4().hex
        )
        return str(reply["exec_id"])

    def get_status(self, exec_id: str, *, timeout: float | None = None) -> ExecutionStatus:
        """Return the state, progress, timestamps, error, values and results of ``exec_id``.

        Raises
        ------
        ExecutionNotFoundError
            The server has no execution with this id.
        """
        reply = self._request(MessageType.STATUS, {"exec_id": exec_id}, timeout=timeout)
        return ExecutionStatus.from_map(reply)

    def list_executions(
        self, states: Sequence[str] | None = None, *, timeout: float | None = None
    ) -> list[ExecutionStatus]:
        """Return a brief status of every execution the server has a record of, oldest first."""
        reply = self._request(
            MessageType.LIST, {"states": list(states) if states else None}, timeout=timeout
        )
        return [ExecutionStatus.from_map(row) for row in reply["executions"]]

    def cancel(self, exec_id: str, *, timeout: float | None = None) -> CancelResult:
        """Ask the server to cancel ``exec_id``; returns at once with the outcome of the request.

        After this returns with ``accepted`` True, no further chunk of the
        execution is sent to any client. A finished execution gives
        ``accepted`` False and its state.

        Raises
        ------
        ExecutionNotFoundError
            The server has no execution with this id.
        """
        reply = self._request(MessageType.CANCEL, {"exec_id": exec_id}, timeout=timeout)
        return CancelResult.from_map(exec_id, reply)

    def release(self, exec_id: str, *, timeout: float | None = None) -> bool:
        """Drop the retained results of ``exec_id``; False when none were retained.

        An execution that is still queued or running goes on to its end, and
        the server drops its results then. From the release on, a fetch of
        ``exec_id`` raises :class:`ExecutionNotFoundError`, and so does
        ``release`` for an unknown ``exec_id``. A fetch that runs when a queued
        or running execution is released completes, and the results are
        dropped after it. A fetch that runs when an ended execution is
        released ends with that error within about 2 s, and keeps the chunks
        its sinks have written.
        """
        reply = self._request(MessageType.RELEASE, {"exec_id": exec_id}, timeout=timeout)
        return bool(reply["released"])

    def shutdown(self, *, timeout: float | None = None) -> None:
        """Ask the server to stop; it cancels running executions and removes retained results."""
        self._request(MessageType.SHUTDOWN, {}, timeout=timeout)

    def wait(
        self, exec_id: str, timeout: float | None = None, *, poll_interval: float = 0.05
    ) -> ExecutionStatus:
        """Poll the status of ``exec_id`` until it is completed, failed or cancelled.

        Raises
        ------
        ZmqTimeoutError
            The execution did not finish within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.get_status(exec_id)
            if status.done:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise ZmqTimeoutError(
                    f"execution {exec_id} is still {status.state} after {timeout} s"
                )
            time.sleep(poll_interval)

    # ------------------------------------------------------------------ results

    def get_results(
        self,
        exec_id: str,
        sink: SinkArgument = "memory",
        *,
        names: Sequence[str] | None = None,
        timeout: float | None = None,
        window_bytes: int | None = None,
        compression: str | None = None,
        progress: bool = False,
        release: bool = False,
    ) -> dict[str, Any]:
        """Fetch the results of ``exec_id`` into sinks; return each sink's handle by name.

        Works during the run (chunks stream live as they are produced) and
        after it, until the results are released or expire.

        Parameters
        ----------
        sink:
            ``"memory"``, ``"memmap"``, ``"zarr"``, a ``.npy`` or ``.zarr`` path,
            a :class:`sinks.Sink`, a callable that takes a result name and
            returns a new Sink, or a mapping of result name to any of these.
            A mapping fetches only its keys when ``names`` is None.
        names:
            Results to fetch; None fetches all.
        timeout:
            Seconds without a message once the execution has ended (or the
            server stops answering) before :class:`ZmqTimeoutError`; None uses
            the client's timeout. While the execution runs the fetch waits.
            Telling a stopped server from a slow one takes one status request
            more, up to 5 s past this timeout.
        window_bytes:
            Flow-control window: payload bytes in flight. None: the server's default.
        compression:
            ``"blosc2"``, ``"blosc1"`` or ``"auto"`` to have chunks compressed for this link.
        progress:
            Show a tqdm progress bar on stderr.
        release:
            Release the results on the server after a complete fetch.

        Raises
        ------
        RemoteError
            The pipeline failed; type, message and traceback are attached.
        ExecutionCancelledError
            The execution was cancelled.
        IncompleteResultError
            A chunk is missing; fetching again by id gets the whole result.
        ExecutionNotFoundError
            The execution is unknown, or a name in ``names`` is not one of its
            results.
        """
        names = _requested_names(sink, names)
        values: dict[str, Any] = {}
        bar = _progress_bar(self, exec_id) if progress else None
        try:
            for event in self.iter_results(
                exec_id,
                sink,
                names=names,
                timeout=timeout,
                window_bytes=window_bytes,
                compression=compression,
            ):
                if isinstance(event, ChunkReceived) and bar is not None:
                    bar.update(event.nbytes)
                elif hasattr(event, "value") and hasattr(event, "name"):
                    values[event.name] = event.value
        finally:
            if bar is not None:
                bar.close()
        missing = sorted(set(names or ()) - set(values))
        if missing:
            known = sorted(self.get_status(exec_id).results)
            raise ExecutionNotFoundError(
                f"execution {exec_id} has no result named {', '.join(map(repr, missing))}; "
                f"its results are {known or 'none'}"
            )
        if release:
            self.release(exec_id)
        return values

    def get_result(
        self, exec_id: str, name: str, sink: SinkArgument = "memory", **kwargs: Any
    ) -> Any:
        """Fetch one result by name and return its sink's handle (see :meth:`get_results`)."""
        return self.get_results(exec_id, sink, names=[name], **kwargs)[name]

    def iter_results(
        self,
        exec_id: str,
        sink: SinkArgument = "memory",
        *,
        names: Sequence[str] | None = None,
        timeout: float | None = None,
        window_bytes: int | None = None,
        compression: str | None = None,
    ) -> Generator[StreamEvent, None, None]:
        """Fetch results chunk by chunk, yielding an event after each declaration, chunk and end.

        Each ``ChunkReceived`` arrives after the chunk is in its sink. Closing
        the iterator early, or an error in a sink, aborts every result not
        yet complete: its sink keeps what was committed and marks the result
        incomplete (see each sink's ``abort``). The fetch's sockets close and
        the client notifies the server, which ends the transfer within about
        0.1 s. A client that dies cannot notify it: the server then drops the
        transfer after its transfer timeout.

        A ``break`` out of a ``for`` loop over the call closes the iterator
        at once. An iterator kept in a variable is closed only by its
        ``close()`` or when it is garbage collected, so wrap it in
        ``contextlib.closing`` to abort at a known point.
        """
        if window_bytes is not None and window_bytes < 1:
            raise ValueError(
                f"window_bytes={window_bytes} must be at least 1; pass None for the "
                "server's default window"
            )
        names = _requested_names(sink, names)
        body = {
            "exec_id": exec_id,
            "names": list(names) if names is not None else None,
            "window_bytes": window_bytes,
            "compression": compression,
            "arena": self.shared_memory and arenas_supported(),
        }
        # Only the caller's names= decide the layout, never the timing: a fetch
        # started before or after the run ended writes the same paths.
        known_names = list(names) if names is not None else None
        reply = self._request(MessageType.RESULTS, body)
        idle_limit = self.timeout if timeout is None else timeout
        with FetchSockets(self._context, reply, exec_id) as fetch:
            receiver = StreamReceiver(
                fetch.data,
                exec_id,
                make_sink_factory(sink, known_names),
                timeout=min(_FETCH_POLL, idle_limit),
                on_chunk=fetch.credit,
                arena=fetch.arena,
            )
            try:
                yield from self._follow(receiver, exec_id, idle_limit)
            except BaseException as exc:
                # Closed early, a sink error or an interrupt: every result not
                # yet complete keeps what it committed and is marked incomplete.
                receiver.abort(early_end_reason(exc))
                raise
            fetch.done()

    def _follow(
        self, receiver: StreamReceiver, exec_id: str, idle_limit: float
    ) -> Generator[StreamEvent, None, None]:
        idle_since = time.monotonic()
        while True:
            try:
                for event in receiver.events():
                    idle_since = time.monotonic()
                    yield event
                return
            except ZmqTimeoutError:
                problem = self._fetch_problem(exec_id, idle_limit)
                if problem is None:
                    continue
                released = isinstance(problem, ExecutionNotFoundError)
                if not released and time.monotonic() - idle_since < idle_limit:
                    continue
                receiver.abort(str(problem))
                raise problem from None

    def _fetch_problem(self, exec_id: str, idle_limit: float) -> ZmqRuntimeError | None:
        """Return why a silent fetch of ``exec_id`` gets no message, or None while it runs."""
        try:
            reply = self._request(
                MessageType.STATUS, {"exec_id": exec_id}, timeout=min(self.timeout, 5.0)
            )
        except (ZmqTimeoutError, TransportError) as exc:
            return ZmqTimeoutError(
                f"results of execution {exec_id}: no message for {idle_limit} s, and the server "
                f"at {self.endpoint} does not answer status requests ({exc}); it may have stopped"
            )
        except ExecutionNotFoundError as exc:
            return exc
        if reply.get("results_released"):
            return ExecutionNotFoundError(
                f"results of execution {exec_id} were released on {self.endpoint} during the "
                "fetch; the chunks already written are kept, run the execution again for the rest"
            )
        if not ExecutionStatus.from_map(reply).done:
            return None
        return ZmqTimeoutError(
            f"results of execution {exec_id} from {self.endpoint}: no message for "
            f"{idle_limit} s after the execution ended"
        )


def _requested_names(sink: SinkArgument, names: Sequence[str] | None) -> Sequence[str] | None:
    # A sink mapping names the results it has sinks for, so a key that is no
    # result is reported like an unknown name.
    if names is None and isinstance(sink, Mapping):
        return [str(key) for key in sink]
    return names


def _destroy(context: zmq.Context[Any]) -> None:
    context.destroy(linger=0)


def _pipeline_text(pipeline: str | Callable[..., Any]) -> str:
    if isinstance(pipeline, str):
        return pipeline
    module = getattr(pipeline, "__module__", None)
    qualname = getattr(pipeline, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise TypeError(
            f"pipeline {pipeline!r} is not importable by the server (module {module!r}); "
            "pass its source code or a 'package.module:function' reference"
        )
    return f"{module}:{qualname}"


def _unwrap(reply: dict[str, Any], kind: MessageType, endpoint: str) -> dict[str, Any]:
    if reply.get("ok"):
        body = reply.get("body", {})
        return body if isinstance(body, dict) else {}
    error = reply.get("error") or {}
    type_name = str(error.get("type", "Error"))
    message = str(error.get("message", ""))
    cls = _ERRORS.get(type_name)
    if cls is not None:
        raise cls(message)
    raise ZmqRuntimeError(f"{kind.value} request to {endpoint} failed: {type_name}: {message}")


def _progress_bar(client: ExecutionClient, exec_id: str) -> Any:
    from tqdm import tqdm

    with contextlib.suppress(ZmqRuntimeError):
        total = client.get_status(exec_id).progress.bytes_total
        return tqdm(total=total, unit="B", unit_scale=True, desc=f"results {exec_id}")
    return tqdm(unit="B", unit_scale=True, desc=f"results {exec_id}")

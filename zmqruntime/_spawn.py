"""Endpoint locks, binding, and auto-spawning a server for a client.

Two file locks (``fcntl.flock``, released by the kernel when their process
dies) guard an endpoint:

- the *server lock*, held by a live server for its whole life, so a second
  server never binds an ipc path a live server holds (libzmq would silently
  unlink and replace the socket file);
- the *spawn lock*, held by a client while it checks for a server and starts
  one, so clients racing on one port end with exactly one server.

Lock files live beside an ipc socket file. For tcp they live in the runtime
directory: ``$ZMQRUNTIME_RUNTIME_DIR`` if set, else the system temp directory.
A server deletes its lock file when it stops; a spawned server's log file stays
beside the lock file for debugging.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import zmq

from ._errors import TransportError, ZmqRuntimeError

__all__ = [
    "RUNTIME_DIR_VARIABLE",
    "EndpointInUseError",
    "EndpointLock",
    "bind_or_raise",
    "runtime_dir",
    "spawn_server",
]

logger = logging.getLogger(__name__)

# Environment variable naming the directory for tcp endpoints' lock and log files.
RUNTIME_DIR_VARIABLE = "ZMQRUNTIME_RUNTIME_DIR"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class EndpointInUseError(TransportError):
    """Another live server is bound to the endpoint."""


def lock_path(endpoint: str, purpose: str) -> Path:
    """Return the lock file of ``endpoint`` for ``purpose`` (``"server"`` or ``"spawn"``)."""
    if endpoint.startswith("ipc://"):
        return Path(f"{endpoint[len('ipc://') :]}.{purpose}.lock")
    safe = re.sub(r"[^A-Za-z0-9.]+", "-", endpoint)
    return runtime_dir() / f"zmqruntime-{safe}.{purpose}.lock"


def runtime_dir() -> Path:
    """Return the directory for tcp endpoints' lock and log files.

    ``$ZMQRUNTIME_RUNTIME_DIR`` when set (created if missing), else the system
    temp directory. A spawned server inherits the variable from its client.
    """
    configured = os.environ.get(RUNTIME_DIR_VARIABLE)
    if not configured:
        return Path(tempfile.gettempdir())
    path = Path(configured)
    path.mkdir(parents=True, exist_ok=True)
    return path


class EndpointLock:
    """An exclusive ``flock`` on an endpoint's lock file.

    NOTE: on platforms without ``fcntl`` (Windows) the lock does nothing, so
    two servers racing on one ipc path are not prevented there.
    """

    def __init__(self, endpoint: str, purpose: str = "server") -> None:
        self.endpoint = endpoint
        self.path = lock_path(endpoint, purpose)
        self._fd: int | None = None

    def _wildcard(self) -> bool:
        return self.endpoint.endswith(":*") or self.endpoint.endswith(":0")

    def try_acquire(self) -> bool:
        """Take the lock without waiting; False if another process holds it."""
        if fcntl is None or self._wildcard():
            return True
        # A holder may delete the file as it releases (see release). After
        # locking, check that the path still names the locked file, and lock
        # the new file if not. Each retry means another process released in
        # between, so a few tries suffice; the bound keeps the loop finite.
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if _same_file(fd, self.path):
                self._fd = fd
                return True
            os.close(fd)
        return False

    def acquire(self, timeout: float) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds; False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def acquire_or_raise(self) -> None:
        """Take the lock or raise :class:`EndpointInUseError` naming the endpoint."""
        if not self.try_acquire():
            raise EndpointInUseError(
                f"endpoint {self.endpoint} is in use by another zmqruntime server (lock file "
                f"{self.path}); "
                "connect to it, or stop it first"
            )

    def release(self, *, delete: bool = False) -> None:
        """Release the lock; releasing twice does nothing.

        With ``delete`` the lock file is removed first, while still locked, so
        a process waiting on it retries on a fresh file (see :meth:`try_acquire`).
        """
        if self._fd is not None and fcntl is not None:
            if delete:
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def bind_or_raise(socket: zmq.Socket[Any], endpoint: str) -> str:
    """Bind ``socket`` to ``endpoint``; return the endpoint with its port filled in.

    Raises
    ------
    TransportError
        The bind failed; the message names the endpoint.
    """
    try:
        if endpoint.endswith(":*") or endpoint.endswith(":0"):
            base = endpoint.rsplit(":", 1)[0]
            port = socket.bind_to_random_port(base)
            return f"{base}:{port}"
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        raise TransportError(
            f"cannot bind the control socket to {endpoint}: {exc}; "
            "pick another port or stop the program that holds it"
        ) from exc
    return endpoint


def server_command(endpoint: str, idle_timeout: float, extra_args: Sequence[str]) -> list[str]:
    """Return the command line that starts a detached server on ``endpoint``."""
    return [
        sys.executable,
        "-m",
        "zmqruntime",
        "serve",
        "--endpoint",
        endpoint,
        "--idle-timeout",
        str(idle_timeout),
        *extra_args,
    ]


def spawn_server(
    endpoint: str,
    ping: Callable[[float], bool],
    *,
    idle_timeout: float = 300.0,
    timeout: float = 10.0,
    extra_args: Sequence[str] = (),
) -> bool:
    """Start a detached server on ``endpoint`` unless one responds; wait until it is ready.

    ``ping(timeout_s)`` must return True when a server responds. Returns True
    when this call started the server, False when another one already answered.

    The server runs in its own session with stdin closed and its output
    appended to a log file beside the lock files. It is not a child of this
    process for long: a short-lived shell starts it in the background and
    exits, so no zombie and no ``subprocess`` handle outlives this call.

    Raises
    ------
    ZmqRuntimeError
        No server answered within ``timeout`` seconds; the message names the
        endpoint and the log file.
    """
    spawn_lock = EndpointLock(endpoint, "spawn")
    if not spawn_lock.acquire(timeout):
        raise ZmqRuntimeError(
            f"timed out after {timeout} s waiting for another client to start a server "
            f"on {endpoint} (lock {spawn_lock.path})"
        )
    try:
        if ping(0.5):
            return False
        log_path = lock_path(endpoint, "server").with_suffix(".log")
        command = server_command(endpoint, idle_timeout, extra_args)
        logger.info("no server responds on %s; starting one (log %s)", endpoint, log_path)
        pid = _start_detached(command, log_path)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ping(0.2):
                return True
            # A server that exited at once (another program uses the port, or an
            # option is invalid) cannot reply, so fail now instead of at the
            # deadline, unless another server replies in the meantime.
            if pid is not None and not _alive(pid) and not ping(0.5):
                raise ZmqRuntimeError(
                    f"the server started on {endpoint} exited at once; see its log "
                    f"{log_path}{_log_tail(log_path)}"
                )
        raise ZmqRuntimeError(
            f"started a server on {endpoint} but it did not respond within {timeout} s; "
            f"see its log {log_path}{_log_tail(log_path)}"
        )
    finally:
        spawn_lock.release(delete=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else: the PID was reused
    return True


def _start_detached(command: list[str], log_path: Path) -> int | None:
    """Start ``command`` detached and return its PID (None where it is unknown)."""
    if os.name != "posix":  # pragma: no cover - Windows
        # NOTE: untested; Windows has no double-fork, so the server stays a
        # child object of this process until it exits.
        with open(log_path, "a") as log:
            subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                creationflags=getattr(subprocess, "DETACHED_PROCESS", 0)
                | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0),
            )
        return None

    # The shell starts the server in the background and exits at once, so the
    # server is re-parented to init, which reaps it when it exits.
    script = 'exec "$@" </dev/null >>"$ZMQRUNTIME_LOG" 2>&1 & echo $!'
    env = dict(os.environ, ZMQRUNTIME_LOG=str(log_path))
    # The server must import this same zmqruntime, even when it is not installed.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    started = subprocess.run(
        ["/bin/sh", "-c", script, "sh", *command],
        env=env,
        check=True,
        start_new_session=True,
        timeout=10,
        capture_output=True,
        text=True,
    )
    text = started.stdout.strip()
    return int(text) if text.isdigit() else None


def _log_tail(path: Path, lines: int = 10) -> str:
    try:
        text: TextIO
        with open(path, errors="replace") as text:
            tail = text.read().splitlines()[-lines:]
    except OSError:
        return ""
    return "; last lines:\n" + "\n".join(tail) if tail else ""

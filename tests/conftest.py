"""Fixtures shared by the whole suite: a ZMQ context and PUSH/PULL pairs on loopback."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq


@pytest.fixture(autouse=True)
def zmqruntime_runtime_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Point tcp endpoints' lock and log files at a per-test directory, not the system /tmp."""
    path = tmp_path_factory.mktemp("runtime")
    monkeypatch.setenv("ZMQRUNTIME_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(params=["tcp", "ipc"])
def push_pull(
    request: pytest.FixtureRequest, zmq_context: zmq.Context[Any], tmp_path: Any
) -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    """A connected PUSH/PULL pair over tcp loopback or an ipc path in tmp_path."""
    pull = zmq_context.socket(zmq.PULL)
    push = zmq_context.socket(zmq.PUSH)
    pull.setsockopt(zmq.RCVHWM, 4)
    push.setsockopt(zmq.SNDHWM, 4)
    if request.param == "tcp":
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
    else:
        endpoint = f"ipc://{tmp_path}/stream.sock"
        pull.bind(endpoint)
        push.connect(endpoint)
    yield push, pull
    push.close(linger=0)
    pull.close(linger=0)


class SenderThread:
    """Runs a send function in a thread and re-raises its exception on join."""

    def __init__(self, target: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self._target = target
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # re-raised in join
            self.error = exc

    def join(self, timeout: float = 30.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "sender thread did not finish"
        if self.error is not None:
            raise self.error


@pytest.fixture
def run_sender() -> Callable[[Callable[[], None]], SenderThread]:
    return SenderThread

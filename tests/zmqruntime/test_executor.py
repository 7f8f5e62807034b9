"""ProcessExecutor on its own: real worker processes, a real PULL socket for their streams."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import zmq

from zmqruntime._errors import ZmqRuntimeError
from zmqruntime._executor import ExecutorFullError, Job, ProcessExecutor

from .control_helpers import SLEEP_PIPELINE

VALUE_PIPELINE = """
def pipeline(ctx, config):
    ctx.progress(1, 2)
    ctx.set_value("answer", 42)
    return "ok"
"""

COOPERATIVE_PIPELINE = """
import time

def pipeline(ctx, config):
    for _ in range(6000):
        ctx.check_cancelled()
        time.sleep(0.01)
"""

# Ignores the cooperative cancel and SIGTERM, so only SIGKILL stops it.
STUBBORN_PIPELINE = """
import signal
import time

def pipeline(ctx, config):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
"""

SEGFAULT_PIPELINE = """
import os
import signal

def pipeline(ctx, config):
    os.kill(os.getpid(), signal.SIGSEGV)
"""

# Grace periods short enough for unit tests; the monitor applies them within
# one 0.05 s tick.
GRACE = 0.3
KILL_AFTER = 0.3


class EventLog:
    """Collects executor events and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any], float]] = []
        self._cond = threading.Condition()

    def __call__(self, exec_id: str, event: dict[str, Any]) -> None:
        with self._cond:
            self.events.append((exec_id, event, time.monotonic()))
            self._cond.notify_all()

    def wait_for(self, exec_id: str, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event_id, event, _ in self.events:
                    if event_id == exec_id and event["kind"] == kind:
                        return event
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {kind!r} event of {exec_id} within {timeout} s"
                self._cond.wait(remaining)

    def kinds(self, exec_id: str) -> list[str]:
        with self._cond:
            return [event["kind"] for event_id, event, _ in self.events if event_id == exec_id]

    def time_of(self, exec_id: str, kind: str) -> float:
        with self._cond:
            return next(t for i, e, t in self.events if i == exec_id and e["kind"] == kind)


@pytest.fixture
def data_endpoint(zmq_context: zmq.Context[Any]) -> Iterator[str]:
    """A bound PULL socket the workers stream to; its queue keeps their few small messages."""
    pull = zmq_context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    yield f"tcp://127.0.0.1:{port}"
    pull.close(linger=0)


@pytest.fixture
def log() -> EventLog:
    return EventLog()


@pytest.fixture
def make_executor(log: EventLog) -> Iterator[Any]:
    executors: list[ProcessExecutor] = []

    def make(**kwargs: Any) -> ProcessExecutor:
        options = {"grace_period": GRACE, "kill_after": KILL_AFTER, **kwargs}
        executor = ProcessExecutor(log, **options)
        executors.append(executor)
        return executor

    yield make
    for executor in executors:
        executor.shutdown(timeout=5.0)


def _job(exec_id: str, pipeline: str, endpoint: str, config: Any = None) -> Job:
    return Job(exec_id, pipeline, config, endpoint)


def test_executor_runs_job_and_reports_events(
    make_executor: Any, log: EventLog, data_endpoint: str
) -> None:
    executor = make_executor()
    executor.submit(_job("a", VALUE_PIPELINE, data_endpoint))
    assert executor.wait("a", timeout=30)

    exited = log.wait_for("a", "exited")
    kinds = log.kinds("a")
    assert kinds[0] == "started"
    assert kinds[-1] == "exited"
    assert "progress" in kinds
    assert log.wait_for("a", "value") == {"kind": "value", "key": "answer", "value": 42}
    assert log.wait_for("a", "finished")["status"] == "completed"
    assert isinstance(log.wait_for("a", "started")["pid"], int)
    assert exited["exitcode"] == 0
    assert executor.active_count == 0


def test_executor_queue_respects_concurrency_limit(
    make_executor: Any, log: EventLog, data_endpoint: str
) -> None:
    executor = make_executor(max_workers=1)
    executor.submit(_job("first", SLEEP_PIPELINE, data_endpoint, {"seconds": 0.3}))
    executor.submit(_job("second", SLEEP_PIPELINE, data_endpoint, {"seconds": 0.0}))
    assert executor.active_count == 2
    assert executor.wait("second", timeout=30)

    first_exit = log.time_of("first", "exited")
    second_start = log.time_of("second", "started")
    assert second_start > first_exit


def test_executor_full_queue_raises(make_executor: Any, log: EventLog, data_endpoint: str) -> None:
    executor = make_executor(max_workers=1, max_queued=1)
    executor.submit(_job("running", SLEEP_PIPELINE, data_endpoint, {"seconds": 60}))
    log.wait_for("running", "started")
    executor.submit(_job("queued", SLEEP_PIPELINE, data_endpoint))

    with pytest.raises(ExecutorFullError, match="1 executions waiting"):
        executor.submit(_job("rejected", SLEEP_PIPELINE, data_endpoint))


def test_executor_cancel_queued_job_never_starts(
    make_executor: Any, log: EventLog, data_endpoint: str
) -> None:
    executor = make_executor(max_workers=1)
    executor.submit(_job("running", SLEEP_PIPELINE, data_endpoint, {"seconds": 60}))
    executor.submit(_job("queued", SLEEP_PIPELINE, data_endpoint, {"seconds": 60}))

    assert executor.cancel("queued")
    assert log.wait_for("queued", "exited", timeout=1.0)["exitcode"] is None
    assert log.kinds("queued") == ["exited"]
    assert executor.wait("queued", timeout=0.1)


def test_executor_cancel_cooperative_stops_before_grace(
    make_executor: Any, log: EventLog, data_endpoint: str
) -> None:
    executor = make_executor(grace_period=10.0)
    executor.submit(_job("a", COOPERATIVE_PIPELINE, data_endpoint))
    log.wait_for("a", "started")

    start = time.monotonic()
    assert executor.cancel("a")
    assert executor.wait("a", timeout=5)
    assert time.monotonic() - start < 5.0
    assert log.wait_for("a", "finished")["status"] == "cancelled"
    assert log.wait_for("a", "exited")["exitcode"] == 0


def test_executor_cancel_terminates_after_grace(
    make_executor: Any, log: EventLog, data_endpoint: str
) -> None:
    executor = make_executor()
    executor.submit(_job("a", SLEEP_PIPELINE, data_endpoint, {"seconds": 60}))
    pid = log.wait_for("a", "started")["pid"]

    start = time.monotonic()
    assert executor.cancel("a")
    assert executor.wait("a", timeout=5)
    elapsed = time.monotonic() - start

    assert log.wait_for("a", "exited")["exitcode"] == -signal.SIGTERM
    assert elapsed >= GRACE
    assert elapsed < GRACE + 1.0
    assert not psutil.pid_exists(pid)


def test_executor_cancel_kills_when_sigterm_ignored(
    make_executor: Any, log: EventLog, data_endpoint: str
) -> None:
    executor = make_executor()
    executor.submit(_job("a", STUBBORN_PIPELINE, data_endpoint))
    log.wait_for("a", "started")
    # Give the pipeline time to install its SIGTERM handler.
    time.sleep(0.3)

    assert executor.cancel("a")
    assert executor.wait("a", timeout=5)
    assert log.wait_for("a", "exited")["exitcode"] == -signal.SIGKILL


def test_executor_segfault_reports_signal(
    make_executor: Any, log: EventLog, data_endpoint: str
) -> None:
    executor = make_executor()
    executor.submit(_job("crash", SEGFAULT_PIPELINE, data_endpoint))
    executor.submit(_job("after", VALUE_PIPELINE, data_endpoint))

    assert executor.wait("crash", timeout=30)
    assert log.wait_for("crash", "exited")["exitcode"] == -signal.SIGSEGV
    assert "finished" not in log.kinds("crash")
    assert executor.wait("after", timeout=30)
    assert log.wait_for("after", "exited")["exitcode"] == 0


def test_executor_cancel_unknown_returns_false(make_executor: Any) -> None:
    executor = make_executor()
    assert not executor.cancel("no-such-execution")


def test_executor_wait_times_out(make_executor: Any, log: EventLog, data_endpoint: str) -> None:
    executor = make_executor()
    executor.submit(_job("a", SLEEP_PIPELINE, data_endpoint, {"seconds": 60}))

    start = time.monotonic()
    assert not executor.wait("a", timeout=0.2)
    assert time.monotonic() - start < 2.0


def test_executor_shutdown_stops_workers_and_rejects_jobs(
    make_executor: Any, log: EventLog, data_endpoint: str
) -> None:
    executor = make_executor()
    executor.submit(_job("a", SLEEP_PIPELINE, data_endpoint, {"seconds": 60}))
    pid = log.wait_for("a", "started")["pid"]

    executor.shutdown(timeout=5.0)

    assert log.wait_for("a", "exited", timeout=1.0)["exitcode"] is not None
    assert not psutil.pid_exists(pid)
    with pytest.raises(ZmqRuntimeError, match="shut down"):
        executor.submit(_job("b", SLEEP_PIPELINE, data_endpoint))


def test_executor_rejects_fork_start_method(log: EventLog) -> None:
    with pytest.raises(ValueError, match="'fork' is not allowed"):
        ProcessExecutor(log, start_method="fork")


def test_executor_worker_start_failure_fails_execution(
    make_executor: Any, log: EventLog, data_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = make_executor(max_workers=1)

    def refuse(self: Any) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    # Running out of processes cannot be arranged here, so start() fails on purpose.
    monkeypatch.setattr(type(executor._mp.Process(target=print)), "start", refuse)
    executor.submit(_job("doomed", SLEEP_PIPELINE, data_endpoint, {"seconds": 0}))

    finished = log.wait_for("doomed", "finished")
    exited = log.wait_for("doomed", "exited")
    assert finished["status"] == "failed"
    assert "could not start" in finished["error"]["message"]
    assert exited["exitcode"] is None
    assert executor.wait("doomed", timeout=5)

"""Releasing the results of an execution that has not ended yet."""

from __future__ import annotations

import time

import pytest

from zmqruntime import ExecutionClient, ExecutionNotFoundError, ExecutionState

from .control_helpers import connected_client, running_server

# Writes one frame every 50 ms, so a release lands while it runs.
SLOW_FRAMES_PIPELINE = """
import time
import numpy as np

def pipeline(ctx, config):
    n = config["n"]
    writer = ctx.declare("stack", (n, 64, 64), "uint16")
    for i in range(n):
        writer.write(i, np.full((1, 64, 64), i, np.uint16))
        time.sleep(0.05)
"""


def _wait_running(client: ExecutionClient, exec_id: str) -> None:
    deadline = time.monotonic() + 20
    while client.get_status(exec_id).state != ExecutionState.RUNNING:
        assert time.monotonic() < deadline, f"{exec_id} did not start within 20 s"
        time.sleep(0.02)


def test_release_running_execution_completes() -> None:
    with running_server() as server, connected_client(server, timeout=30) as client:
        exec_id = client.execute(SLOW_FRAMES_PIPELINE, {"n": 20})
        _wait_running(client, exec_id)
        released = client.release(exec_id)
        final = client.wait(exec_id, timeout=30)

    assert released is True
    assert final.state == ExecutionState.COMPLETED
    assert final.error is None


def test_release_drops_stream_at_end() -> None:
    with running_server() as server, connected_client(server, timeout=30) as client:
        exec_id = client.execute(SLOW_FRAMES_PIPELINE, {"n": 20})
        _wait_running(client, exec_id)
        client.release(exec_id)
        kept_while_running = server._retention.get(exec_id) is not None
        client.wait(exec_id, timeout=30)
        kept_after_end = server._retention.get(exec_id) is not None
        released_again = client.release(exec_id)

    assert kept_while_running
    assert not kept_after_end
    assert released_again is False


def test_release_rejects_new_fetch() -> None:
    with running_server() as server, connected_client(server, timeout=30) as client:
        exec_id = client.execute(SLOW_FRAMES_PIPELINE, {"n": 20})
        _wait_running(client, exec_id)
        client.release(exec_id)
        with pytest.raises(ExecutionNotFoundError, match="released"):
            client.get_results(exec_id)
        client.wait(exec_id, timeout=30)


def test_release_frees_worker_slot() -> None:
    with running_server(max_workers=1) as server, connected_client(server, timeout=30) as client:
        first = client.execute(SLOW_FRAMES_PIPELINE, {"n": 20})
        _wait_running(client, first)
        client.release(first)
        second = client.execute(SLOW_FRAMES_PIPELINE, {"n": 2})
        started = time.monotonic()
        final = client.wait(second, timeout=30)
        waited = time.monotonic() - started

    assert final.state == ExecutionState.COMPLETED
    # The first run needs about 1 s more. A worker whose stream end is never
    # acknowledged keeps the only slot for 60 s.
    assert waited < 15


def test_dropped_stream_end_frees_worker() -> None:
    with running_server(max_workers=1) as server, connected_client(server, timeout=30) as client:
        first = client.execute(SLOW_FRAMES_PIPELINE, {"n": 20})
        _wait_running(client, first)
        # Drops the stream under the running execution, so its stream end
        # arrives for a stream the server no longer has.
        server._retention.release(first)
        second = client.execute(SLOW_FRAMES_PIPELINE, {"n": 2})
        started = time.monotonic()
        client.wait(second, timeout=30)
        waited = time.monotonic() - started

    assert waited < 15


def test_release_running_fetch_completes() -> None:
    with running_server() as server, connected_client(server, timeout=30) as client:
        exec_id = client.execute(SLOW_FRAMES_PIPELINE, {"n": 20})
        _wait_running(client, exec_id)
        events = client.iter_results(exec_id)
        next(events)
        client.release(exec_id)
        kinds = [type(event).__name__ for event in events]
        deadline = time.monotonic() + 10
        while server._retention.get(exec_id) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        dropped = server._retention.get(exec_id) is None

    assert kinds.count("ChunkReceived") == 20
    assert kinds[-1] == "ResultCompleted"
    assert dropped

"""Nice values of the server's data-path threads (Linux only)."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import pytest
import zmq

from zmqruntime._priority import (
    lower_current_thread,
    lower_new_zmq_threads,
    thread_ids,
    zmq_thread_ids,
)

from .control_helpers import FRAMES_PIPELINE, connected_client, running_server

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread nice values are Linux only"
)


def _nice(thread_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread_id)


def test_priority_lower_current_thread() -> None:
    seen: dict[str, int] = {}

    def run() -> None:
        thread_id = threading.get_native_id()
        seen["before"] = _nice(thread_id)
        lower_current_thread(3)
        seen["after"] = _nice(thread_id)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    assert seen["after"] == min(19, seen["before"] + 3)
    assert _nice(threading.get_native_id()) == seen["before"]


def test_priority_lower_new_zmq_threads_only() -> None:
    existing: zmq.Context[Any] = zmq.Context()
    existing.socket(zmq.PULL).close()
    old_threads = thread_ids()
    old_nice = {tid: _nice(tid) for tid in old_threads}

    context: zmq.Context[Any] = zmq.Context()
    socket = context.socket(zmq.PULL)
    lower_new_zmq_threads(old_threads, 5, expected=context.get(zmq.IO_THREADS) + 1)
    new_threads = zmq_thread_ids() - old_threads
    try:
        assert len(new_threads) == context.get(zmq.IO_THREADS) + 1
        assert all(
            _nice(tid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5) for tid in new_threads
        )
        assert {tid: _nice(tid) for tid in old_threads} == old_nice
    finally:
        socket.close(linger=0)
        context.term()
        existing.term()


def test_priority_new_zmq_threads_lowered_before_named() -> None:
    # A libzmq thread names itself only once it runs, which right after the
    # first socket had not happened yet in about 2 % of new contexts.
    target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 2)
    missed = []
    for attempt in range(200):
        before = thread_ids()
        context: zmq.Context[Any] = zmq.Context()
        socket = context.socket(zmq.PULL)
        lower_new_zmq_threads(before, 2, expected=2)
        new_threads = zmq_thread_ids() - before
        if len(new_threads) != 2 or any(_nice(tid) != target for tid in new_threads):
            missed.append(attempt)
        socket.close(linger=0)
        context.term()

    assert missed == []


def test_priority_server_data_threads_niced() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with running_server(data_nice=4) as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 1})
        client.wait(exec_id, timeout=30)
        ingest = next(t for t in threading.enumerate() if t.name == "zmqruntime-ingest")
        assert ingest.native_id is not None
        ingest_nice = _nice(ingest.native_id)
    assert ingest_nice == min(19, base + 4)

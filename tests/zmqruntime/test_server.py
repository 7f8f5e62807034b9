from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import blosc2
import msgpack
import numpy as np
import psutil
import pytest
import zarr
import zmq

from zmqruntime import (
    ExecutionCancelledError,
    ExecutionClient,
    ExecutionNotFoundError,
    ExecutionServer,
    ExecutionState,
    RemoteError,
    ServerConfig,
    ZmqTimeoutError,
)
from zmqruntime._receiver import ChunkReceived

from .control_helpers import (
    ENDLESS_PIPELINE,
    FRAMES_PIPELINE,
    SLEEP_PIPELINE,
    connected_client,
    running_server,
)


def test_server_execute_status_and_results() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 6})
        status = client.wait(exec_id, timeout=30)
        results = client.get_results(exec_id)

    assert status.state is ExecutionState.COMPLETED
    assert status.progress.chunks_done == 6
    assert status.progress.bytes_total == 6 * 32 * 32 * 2
    assert status.values == {"frames": 6, "return": {"shape": (6, 32, 32)}}
    assert status.results["stack"].shape == (6, 32, 32)
    assert status.started_at is not None and status.finished_at is not None
    np.testing.assert_array_equal(results["stack"][:, 0, 0], np.arange(6))


def test_client_unknown_result_name_raises_naming_it() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 2})
        client.wait(exec_id, timeout=30)

        with pytest.raises(ExecutionNotFoundError, match="'nope'") as info:
            client.get_results(exec_id, names=["nope"])
        with pytest.raises(ValueError, match="window_bytes=0"):
            client.get_results(exec_id, window_bytes=0)

    assert "its results are ['stack']" in str(info.value)


def test_server_results_into_memmap_after_run(tmp_path: os.PathLike[str]) -> None:
    target = os.path.join(tmp_path, "out.npy")
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, "n = 3\nsize = 16\n")
        client.wait(exec_id, timeout=30)
        client.get_results(exec_id, target)

    # A path is the base of every result's file, so "stack" goes to out.stack.npy.
    stack = np.load(os.path.join(tmp_path, "out.stack.npy"), mmap_mode="r")
    assert stack.shape == (3, 16, 16)
    assert int(stack[2, 5, 5]) == 2


def test_server_pipeline_reference_and_generator() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute("tests.zmqruntime.pipelines_for_tests:yield_two")
        client.wait(exec_id, timeout=30)
        results = client.get_results(exec_id)
    assert sorted(results) == ["a", "b"]
    np.testing.assert_array_equal(results["b"], np.arange(5.0))


def test_server_pipeline_error_has_type_and_traceback() -> None:
    code = "def pipeline(ctx, config):\n    raise ValueError('bad threshold 7')\n"
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(code)
        status = client.wait(exec_id, timeout=30)
        with pytest.raises(RemoteError) as info:
            client.get_results(exec_id)
    assert status.state is ExecutionState.FAILED
    assert status.error is not None
    assert status.error["type"] == "builtins.ValueError"
    assert "bad threshold 7" in status.error["message"]
    assert "raise ValueError" in status.error["traceback"]
    assert info.value.type_name == "builtins.ValueError"


def test_server_partly_written_result_fails_execution() -> None:
    code = (
        "import numpy as np\n"
        "def pipeline(ctx, config):\n"
        "    writer = ctx.declare('grid', (3, 4), 'float32', chunks=(1, 4))\n"
        "    writer.write(0, np.ones(4, np.float32))\n"
    )
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(code)
        status = client.wait(exec_id, timeout=30)

    assert status.state is ExecutionState.FAILED
    assert status.error is not None
    assert status.error["type"].endswith("IncompleteResultError")
    assert "16 of its 48 bytes" in status.error["message"]


def test_server_survives_segfaulting_pipeline() -> None:
    code = (
        "import os, signal\ndef pipeline(ctx, config):\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(code)
        status = client.wait(exec_id, timeout=30)
        pong = client.ping()
    assert status.state is ExecutionState.FAILED
    assert status.error is not None
    assert status.error["type"] == "WorkerCrashed"
    assert "SIGSEGV" in status.error["message"]
    assert pong["pid"] == os.getpid()


def test_server_cancel_sleeping_pipeline_within_2s() -> None:
    with running_server(max_workers=1) as server, connected_client(server) as client:
        sleeper = client.execute(SLEEP_PIPELINE, {"seconds": 60})
        queued = client.execute(FRAMES_PIPELINE, {"n": 1})
        while client.get_status(sleeper).state is not ExecutionState.RUNNING:
            time.sleep(0.02)
        pid = client.get_status(sleeper).pid

        start = time.monotonic()
        outcome = client.cancel(sleeper)
        status = client.wait(sleeper, timeout=5, poll_interval=0.01)
        elapsed = time.monotonic() - start
        next_status = client.wait(queued, timeout=30)

    assert outcome.accepted
    assert status.state is ExecutionState.CANCELLED
    assert elapsed < 2.0
    assert pid is not None and not psutil.pid_exists(pid)
    assert next_status.started_at is not None and status.finished_at is not None
    assert next_status.started_at - status.finished_at < 1.5
    assert next_status.state is ExecutionState.COMPLETED


def test_server_cancel_finished_and_unknown() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 1})
        client.wait(exec_id, timeout=30)
        outcome = client.cancel(exec_id)
        with pytest.raises(ExecutionNotFoundError, match="no-such-id"):
            client.cancel("no-such-id")
        assert client.ping()["pid"] == os.getpid()
    assert not outcome.accepted
    assert outcome.state is ExecutionState.COMPLETED
    assert "already completed" in outcome.message


def test_server_cancel_queued_execution() -> None:
    with running_server(max_workers=1) as server, connected_client(server) as client:
        sleeper = client.execute(SLEEP_PIPELINE, {"seconds": 60})
        queued = client.execute(FRAMES_PIPELINE, {"n": 1})
        outcome = client.cancel(queued)
        status = client.wait(queued, timeout=5)
        client.cancel(sleeper)
    assert outcome.accepted
    assert outcome.state == "cancelled"
    assert status.state is ExecutionState.CANCELLED
    assert status.started_at is None


def test_server_shutdown_cancels_running_execution() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(SLEEP_PIPELINE, {"seconds": 60})
        deadline = time.monotonic() + 20
        while client.get_status(exec_id).state is not ExecutionState.RUNNING:
            assert time.monotonic() < deadline, "the execution never started"
            time.sleep(0.05)
        server.stop()
        deadline = time.monotonic() + 20
        record = server.execution(exec_id)
        assert record is not None
        while record.state not in {"completed", "failed", "cancelled"}:
            assert time.monotonic() < deadline, "the execution never ended"
            time.sleep(0.05)

    assert record.state == "cancelled"


def test_server_no_chunk_after_cancel_ack() -> None:
    received: list[int] = []
    errors: list[BaseException] = []
    acked = threading.Event()
    after_ack: list[int] = []

    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(ENDLESS_PIPELINE)

        def fetch() -> None:
            try:
                for event in client.iter_results(exec_id, window_bytes=64 << 10):
                    if isinstance(event, ChunkReceived):
                        received.append(event.seq)
                        if acked.is_set():
                            after_ack.append(event.seq)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=fetch)
        thread.start()
        while len(received) < 20:
            time.sleep(0.01)
        outcome = client.cancel(exec_id)
        acked.set()
        chunks_at_cancel = outcome.chunks_done
        thread.join(20)
        status = client.wait(exec_id, timeout=5)

    assert status.state is ExecutionState.CANCELLED
    assert len(errors) == 1
    assert isinstance(errors[0], ExecutionCancelledError)
    # Chunks still in the sockets' queues at the ack may land; no chunk the
    # server received after the ack may.
    assert chunks_at_cancel is None or max(received) < chunks_at_cancel
    assert len(after_ack) <= 16


def test_server_execute_idempotent_request_id() -> None:
    with running_server() as server, connected_client(server) as client:
        first = client.execute(FRAMES_PIPELINE, {"n": 1}, request_id="req-1")
        second = client.execute(FRAMES_PIPELINE, {"n": 1}, request_id="req-1")
        listed = client.list_executions()
    assert first == second
    assert len(listed) == 1


def test_server_request_id_reused_for_other_config_raises() -> None:
    with running_server() as server, connected_client(server) as client:
        client.execute(FRAMES_PIPELINE, {"n": 1}, request_id="req-2")
        with pytest.raises(ValueError, match="request_id 'req-2' was already used") as caught:
            client.execute(FRAMES_PIPELINE, {"n": 2}, request_id="req-2")
        listed = client.list_executions()
    assert "pass a new request_id" in str(caught.value)
    assert len(listed) == 1


def test_server_refetch_after_client_dies_midstream() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 8, "size": 64})
        client.wait(exec_id, timeout=30)
        events = client.iter_results(exec_id, window_bytes=8192)
        for event in events:
            if isinstance(event, ChunkReceived):
                break
        events.close()  # a client that stops reading mid-stream
        with connected_client(server) as other:
            results = other.get_results(exec_id)
    np.testing.assert_array_equal(results["stack"][:, 0, 0], np.arange(8))


def _last_transfer_outcome(server: ExecutionServer, within: float = 3.0) -> str | None:
    deadline = time.monotonic() + within
    while not server.transfer_stats and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.transfer_stats[-1]["outcome"] if server.transfer_stats else None


def test_server_transfer_ends_when_sink_fails() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 4, "size": 64})
        client.wait(exec_id, timeout=30)
        with pytest.raises(ValueError, match="memroy"):
            client.get_results(exec_id, sink="memroy")
        outcome = _last_transfer_outcome(server)
        transfers = client.ping()["transfers"]
    assert outcome == "closed by client"
    assert transfers == 0


def test_server_transfer_ends_when_iterator_closed() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(ENDLESS_PIPELINE, {})
        events = client.iter_results(exec_id)
        next(events)
        events.close()
        outcome = _last_transfer_outcome(server)
        client.cancel(exec_id)
    assert outcome == "closed by client"


def _close_after_chunks(
    client: ExecutionClient, exec_id: str, name: str, sink: Path, count: int
) -> int:
    # Returns the rows the sink had committed when the caller closed the fetch.
    events = client.iter_results(exec_id, sink, names=[name])
    rows = 0
    for event in events:
        if isinstance(event, ChunkReceived):
            rows = max(rows, event.region.stop[0])
            count -= 1
            if count == 0:
                break
    events.close()
    return rows


def test_client_closed_fetch_truncates_growable_memmap(tmp_path: Path) -> None:
    path = tmp_path / "early.npy"
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(ENDLESS_PIPELINE, {})
        rows = _close_after_chunks(client, exec_id, "stream", path, 3)
        client.cancel(exec_id)
    stored = np.load(path, mmap_mode="r")
    assert stored.shape == (rows, 64, 64)


def test_client_closed_fetch_marks_zarr_aborted(tmp_path: Path) -> None:
    path = tmp_path / "early.zarr"
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 40, "size": 64})
        client.wait(exec_id, timeout=30)
        _close_after_chunks(client, exec_id, "stack", path, 3)
    attributes = dict(zarr.open_array(path, mode="r").attrs)["zmqruntime"]
    assert attributes["complete"] is False
    assert "closed the fetch" in attributes["aborted"]


def test_server_window_bounds_bytes_in_flight() -> None:
    chunk = 64 * 64 * 2
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 20, "size": 64})
        client.wait(exec_id, timeout=30)
        client.get_results(exec_id, window_bytes=3 * chunk)
        deadline = time.monotonic() + 5
        while not server.transfer_stats and time.monotonic() < deadline:
            time.sleep(0.01)  # the transfer ends once the client's ack arrives
        stats = list(server.transfer_stats)
    assert stats[-1]["outcome"] == "completed"
    assert 0 < stats[-1]["max_in_flight"] <= 3 * chunk


def test_server_spills_past_memory_limit_and_release_removes(tmp_path: os.PathLike[str]) -> None:
    spill_dir = os.path.join(tmp_path, "spill")
    with (
        running_server(memory_limit=20_000, spill_dir=spill_dir) as server,
        connected_client(server) as client,
    ):
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 10, "size": 64})
        client.wait(exec_id, timeout=30)
        spilled = os.listdir(spill_dir)
        results = client.get_results(exec_id)
        released = client.release(exec_id)
        # The server deletes spill files in the background after a release.
        deadline = time.monotonic() + 5
        while os.listdir(spill_dir) and time.monotonic() < deadline:
            time.sleep(0.01)
        left = os.listdir(spill_dir)
        with pytest.raises(ExecutionNotFoundError, match="released"):
            client.get_results(exec_id)
    assert len(spilled) == 1
    np.testing.assert_array_equal(results["stack"][:, 1, 1], np.arange(10))
    assert released
    assert left == []


def test_server_retention_timeout_removes_results() -> None:
    with running_server(retention_seconds=0.2) as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 1})
        client.wait(exec_id, timeout=30)
        time.sleep(0.6)
        with pytest.raises(ExecutionNotFoundError, match="expired"):
            client.get_results(exec_id)


def test_server_shutdown_removes_spill_files(tmp_path: os.PathLike[str]) -> None:
    spill_dir = os.path.join(tmp_path, "spill")
    with (
        running_server(memory_limit=0, spill_dir=spill_dir) as server,
        connected_client(server) as client,
    ):
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 2})
        client.wait(exec_id, timeout=30)
        before = os.listdir(spill_dir)
    assert len(before) == 1
    assert os.listdir(spill_dir) == []


def test_server_live_fetch_while_running() -> None:
    code = """
import time
import numpy as np

def pipeline(ctx, config):
    writer = ctx.declare("frames", (4, 8), "int32")
    for i in range(4):
        writer.write(i, np.full((1, 8), i, np.int32))
        time.sleep(0.1)
"""
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(code)
        results = client.get_results(exec_id)
        status = client.wait(exec_id, timeout=10)
    np.testing.assert_array_equal(results["frames"][:, 0], np.arange(4))
    assert status.state is ExecutionState.COMPLETED


def test_server_logs_transitions_with_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="zmqruntime")
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 1})
        client.wait(exec_id, timeout=30)
    text = caplog.text
    assert "started: control tcp://127.0.0.1:" in text
    assert f"execution {exec_id}: queued -> running" in text
    assert f"execution {exec_id}: running -> completed" in text
    assert "stopped" in text


def test_server_status_failed_once_client_saw_error() -> None:
    # A non-daemon thread keeps the worker process alive for 2 s after the
    # pipeline failed and its stream end went out.
    code = """
import threading
import time

def pipeline(ctx, config):
    threading.Thread(target=time.sleep, args=(2.0,)).start()
    raise ValueError("bad input")
"""
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(code)
        with pytest.raises(RemoteError, match="bad input"):
            client.get_results(exec_id)
        status = client.get_status(exec_id)
        client.wait(exec_id, timeout=10)
    assert status.state is ExecutionState.FAILED
    assert status.error is not None
    assert status.error["type"] == "builtins.ValueError"
    assert status.finished_at is not None


def test_server_list_has_progress_and_results() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 3})
        client.wait(exec_id, timeout=30)
        (row,) = client.list_executions()
    assert row.exec_id == exec_id
    assert row.progress.chunks_done == 3
    assert row.progress.chunks_total == 3
    assert row.progress.bytes_total == 3 * 32 * 32 * 2
    assert row.results["stack"].shape == (3, 32, 32)
    assert row.results["stack"].dtype == "<u2"
    assert row.results["stack"].complete
    assert row.values == {}


def test_server_killed_leaves_no_worker_behind(tmp_path: os.PathLike[str]) -> None:
    endpoint = f"ipc://{tmp_path}/killed.sock"
    server = _serve_in_subprocess(endpoint, tmp_path)
    try:
        with ExecutionClient(endpoint=endpoint, auto_spawn=False, timeout=10) as client:
            exec_id = client.execute(
                "import time\ndef pipeline(ctx, config):\n    time.sleep(60)\n"
            )
            deadline = time.monotonic() + 20
            while client.get_status(exec_id).state is not ExecutionState.RUNNING:
                assert time.monotonic() < deadline, "the execution never started"
                time.sleep(0.05)
        descendants = psutil.Process(server.pid).children(recursive=True)
        server.kill()
        server.wait(timeout=10)

        _, alive = psutil.wait_procs(descendants, timeout=15)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    assert descendants
    assert alive == []


def test_server_replies_to_undecodable_request() -> None:
    with running_server() as server:
        context = zmq.Context()
        request = context.socket(zmq.REQ)
        request.setsockopt(zmq.RCVTIMEO, 5000)
        request.setsockopt(zmq.LINGER, 0)
        try:
            request.connect(server.endpoint)
            request.send(b"\xc1 not msgpack")
            reply = msgpack.unpackb(request.recv())
        finally:
            request.close()
            context.term()

        with connected_client(server) as client:
            pong = client.ping()

    assert reply["ok"] is False
    assert reply["id"] == ""
    assert pong["pid"] == os.getpid()


def test_server_start_lets_blosc2_release_gil() -> None:
    blosc2.set_releasegil(False)
    with running_server():
        previous = blosc2.set_releasegil(True)
    assert previous is True


def test_server_default_memory_limit_is_share_of_ram() -> None:
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = ServerConfig().memory_limit
    assert limit == max(512 << 20, int(physical * 0.3))


def test_server_ipc_keeps_stream_of_exited_worker(tmp_path: os.PathLike[str]) -> None:
    # libzmq drops messages still unread on an ipc connection once the sending
    # process exits (libzmq GitHub issue 4660), so a worker must wait until the
    # server has its stream.
    endpoint = f"ipc://{tmp_path}/control.sock"
    with (
        running_server(endpoint=endpoint, ingest_hwm=1) as server,
        connected_client(server) as client,
    ):
        exec_ids = [client.execute(FRAMES_PIPELINE, {"n": 400, "size": 8}) for _ in range(3)]
        statuses = [client.wait(exec_id, timeout=60) for exec_id in exec_ids]
        stacks = [client.get_results(exec_id)["stack"] for exec_id in exec_ids]
    assert [status.state for status in statuses] == [ExecutionState.COMPLETED] * 3
    for stack in stacks:
        np.testing.assert_array_equal(stack[:, 0, 0], np.arange(400, dtype=np.uint16))


def test_client_fetch_of_released_results_raises() -> None:
    pipeline = """
import numpy as np

def pipeline(ctx, config):
    writer = ctx.declare("stack", (40, 512, 512), "uint16")
    for i in range(40):
        writer.write(i, np.full((1, 512, 512), i, np.uint16))
"""
    with running_server() as server, connected_client(server, timeout=30) as client:
        exec_id = client.execute(pipeline)
        client.wait(exec_id, timeout=30)
        events = client.iter_results(exec_id, window_bytes=512 * 1024)
        next(events)
        next(events)
        client.release(exec_id)
        started = time.monotonic()
        with pytest.raises(ExecutionNotFoundError, match="released"):
            for _ in events:
                pass
        waited = time.monotonic() - started
    assert waited < 10


def test_client_fetch_from_killed_server_names_it(tmp_path: os.PathLike[str]) -> None:
    endpoint = f"ipc://{tmp_path}/killed-fetch.sock"
    server = _serve_in_subprocess(endpoint, tmp_path)
    try:
        with ExecutionClient(endpoint=endpoint, auto_spawn=False, timeout=3) as client:
            exec_id = client.execute(ENDLESS_PIPELINE)
            events = client.iter_results(exec_id)
            next(events)
            server.kill()
            server.wait(timeout=10)
            with pytest.raises(ZmqTimeoutError, match="does not answer status requests"):
                for _ in events:
                    pass
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _serve_in_subprocess(endpoint: str, tmp_path: os.PathLike[str]) -> subprocess.Popen[bytes]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # A killed server cannot remove its ipc directory, so it goes under tmp_path.
    return subprocess.Popen(
        [sys.executable, "-m", "zmqruntime", "serve", "--endpoint", endpoint],
        cwd=root,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
        stderr=subprocess.DEVNULL,
    )


def test_server_ipc_fetch_of_many_small_chunks(tmp_path: os.PathLike[str]) -> None:
    # Thousands of credits, each far smaller than the window, must not fill the
    # credit socket's queues: an ipc connection buffers little in the kernel.
    endpoint = f"ipc://{tmp_path}/control.sock"
    with (
        running_server(endpoint=endpoint) as server,
        connected_client(server, timeout=30) as client,
    ):
        exec_id = client.execute(FRAMES_PIPELINE, {"n": 3000, "size": 4})
        client.wait(exec_id, timeout=60)
        stack = client.get_results(exec_id)["stack"]
    np.testing.assert_array_equal(stack[:, 0, 0], np.arange(3000, dtype=np.uint16))


def test_server_stop_removes_ipc_socket_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "control.sock")
    with running_server(endpoint=f"ipc://{path}") as server, connected_client(server) as client:
        client.ping()
        existed = os.path.exists(path)
    assert existed
    assert not os.path.exists(path)

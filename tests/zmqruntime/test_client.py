from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from zmqruntime import (
    ControlValueError,
    ExecutionClient,
    ExecutionNotFoundError,
    ExecutionServer,
    ExecutionState,
    PipelineLoadError,
    ProtocolVersionError,
    ServerConfig,
    ZmqTimeoutError,
)

from .control_helpers import FRAMES_PIPELINE, connected_client, running_server


def test_client_no_server_fails_within_timeout(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    client = ExecutionClient(endpoint=endpoint, timeout=0.5, auto_spawn=False)
    start = time.monotonic()
    with pytest.raises(ZmqTimeoutError, match=r"nobody\.sock"):
        client.get_status("abc")
    elapsed = time.monotonic() - start
    client.close()
    assert elapsed < 1.0


def test_client_process_exits_at_once_without_server(tmp_path: Path) -> None:
    script = (
        "import zmqruntime\n"
        f"c = zmqruntime.ExecutionClient(endpoint='ipc://{tmp_path}/x.sock', timeout=0.3, "
        "auto_spawn=False)\n"
        "try:\n    c.execute('def pipeline(ctx, config): pass')\n"
        "except zmqruntime.ZmqTimeoutError as e:\n    print('timeout', e)\n"
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=Path(__file__).resolve().parents[2],
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert "timeout" in done.stdout
    assert elapsed < 5.0  # interpreter start-up included; a linger hang would take forever


def test_client_config_checked_before_sending(tmp_path: Path) -> None:
    client = ExecutionClient(endpoint=f"ipc://{tmp_path}/x.sock", timeout=0.2, auto_spawn=False)
    with pytest.raises(ControlValueError, match=r"config\['limit'\]"):
        client.execute(FRAMES_PIPELINE, {"limit": 2**70})
    with pytest.raises(ControlValueError, match="map key"):
        client.execute(FRAMES_PIPELINE, {"table": {(1, 2): 3}})
    with pytest.raises(PipelineLoadError, match="syntax error"):
        client.execute("def pipeline(ctx, config)\n")
    client.close()


def test_client_lost_reply_retries_then_works_again(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/flaky.sock"
    context = zmq.Context()
    silent = context.socket(zmq.ROUTER)
    silent.bind(endpoint)  # receives the request and never replies, like a killed server
    client = ExecutionClient(endpoint=endpoint, timeout=0.6, retries=1, auto_spawn=False)

    with pytest.raises(ZmqTimeoutError):
        client.ping()
    received = 0
    while silent.poll(0):
        silent.recv_multipart()
        received += 1
    silent.close(linger=0)
    context.term()

    server = ExecutionServer(ServerConfig(endpoint=endpoint))
    thread = server.serve_in_thread()
    try:
        pong = client.ping()
    finally:
        client.close()
        server.stop()
        thread.join(10)
    assert received == 2
    assert pong["endpoint"] == endpoint


def test_client_version_mismatch_names_both(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/old.sock"
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)

    def reply_with_v2() -> None:
        if router.poll(5000):
            envelope = router.recv_multipart()
            request = msgpack.unpackb(envelope[-1])
            reply = {"v": 2, "type": "reply", "id": request["id"], "ok": True, "body": {}}
            router.send_multipart([*envelope[:-1], msgpack.packb(reply)])

    thread = threading.Thread(target=reply_with_v2)
    thread.start()
    client = ExecutionClient(endpoint=endpoint, timeout=5, auto_spawn=False)
    try:
        with pytest.raises(ProtocolVersionError, match=r"version 2.*version 1"):
            client.ping()
    finally:
        client.close()
        thread.join(10)
        router.close(linger=0)
        context.term()


def test_client_status_from_two_clients() -> None:
    with running_server() as server, connected_client(server) as first:
        exec_id = first.execute(FRAMES_PIPELINE, {"n": 2})
        with connected_client(server) as second:
            status = second.wait(exec_id, timeout=30)
            results = second.get_results(exec_id)
    assert status.state is ExecutionState.COMPLETED
    assert results["stack"].shape == (2, 32, 32)


def test_client_callable_pipeline_sent_as_reference() -> None:
    from .pipelines_for_tests import yield_two

    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(yield_two)
        status = client.wait(exec_id, timeout=30)
    assert status.state is ExecutionState.COMPLETED
    assert sorted(status.results) == ["a", "b"]


TWO_RESULTS_PIPELINE = """
import numpy as np

def pipeline(ctx, config):
    yield "a", np.arange(4, dtype=np.uint8)
    yield "b", np.ones(3, np.float32)
"""


def test_client_sink_mapping_fetches_its_keys(tmp_path: Path) -> None:
    with running_server() as server, connected_client(server, timeout=20) as client:
        exec_id = client.execute(TWO_RESULTS_PIPELINE)
        client.wait(exec_id, timeout=20)
        results = client.get_results(exec_id, sink={"a": str(tmp_path / "a.npy")})

    assert list(results) == ["a"]
    assert results["a"].tolist() == [0, 1, 2, 3]


def test_client_sink_mapping_unknown_key_raises() -> None:
    with running_server() as server, connected_client(server, timeout=20) as client:
        exec_id = client.execute(TWO_RESULTS_PIPELINE)
        client.wait(exec_id, timeout=20)
        with pytest.raises(ExecutionNotFoundError, match=r"'c'.*\['a', 'b'\]"):
            client.get_results(exec_id, sink={"a": "memory", "c": "memory"})

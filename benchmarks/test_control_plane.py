"""Control-plane numbers: execute latency, status latency while streaming, auto-spawn, leaks.

Run with ``python tasks.py bench -k control_plane``. Each test prints its
distribution beside its target; the targets are not pass/fail here.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.zmqruntime.control_helpers import FRAMES_PIPELINE, connected_client, running_server
from zmqruntime import ExecutionClient

STREAM_PIPELINE = """
import numpy as np

def pipeline(ctx, config):
    frame = np.ones((1, 2048, 2048), np.uint16)  # 8 MiB per frame
    writer = ctx.declare("big", (config["frames"], 2048, 2048), "uint16")
    for i in range(config["frames"]):
        writer.write(i, frame)
"""


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _status_latencies(client: ExecutionClient, exec_id: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        client.get_status(exec_id)
        samples.append(time.perf_counter() - start)
    return samples


def measure_status_while_streaming(frames: int, samples: int) -> dict[str, float]:
    """Return status p99 in ms with nothing streaming and while ``frames`` x 8 MiB stream."""
    with running_server() as server, connected_client(server) as client:
        idle_id = client.execute(FRAMES_PIPELINE, {"n": 1})
        client.wait(idle_id, timeout=60)
        idle = _status_latencies(client, idle_id, samples)

        exec_id = client.execute(STREAM_PIPELINE, {"frames": frames})
        fetch = threading.Thread(target=lambda: client.get_results(exec_id, "memmap"))
        with connected_client(server) as poller:
            fetch.start()
            busy = _status_latencies(poller, exec_id, samples)
            execute_busy = []
            for _ in range(20):
                start = time.perf_counter()
                poller.execute(FRAMES_PIPELINE, {"n": 1})
                execute_busy.append(time.perf_counter() - start)
            fetch.join(300)
    return {
        "status_p99_idle_ms": 1e3 * _percentile(idle, 0.99),
        "status_p99_streaming_ms": 1e3 * _percentile(busy, 0.99),
        "execute_median_streaming_ms": 1e3 * statistics.median(execute_busy),
    }


def measure_execute_latency(count: int) -> float:
    """Return the median ``execute`` round trip in ms on an idle server."""
    with running_server(max_workers=1) as server, connected_client(server) as client:
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            client.execute("def pipeline(ctx, config):\n    pass\n")
            samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def measure_spawn(tmp_path: Path) -> float:
    """Return seconds from creating a client on a free endpoint to its first answered ping."""
    endpoint = f"ipc://{tmp_path}/bench-spawn.sock"
    start = time.monotonic()
    with ExecutionClient(endpoint=endpoint, timeout=20, idle_timeout=30) as client:
        client.ping()
        elapsed = time.monotonic() - start
        client.shutdown()
    return elapsed


def measure_resources(count: int) -> dict[str, Any]:
    """Run ``count`` tiny executions; return fds, threads and RSS after each tenth of them."""
    process = psutil.Process()
    rows = []
    with running_server() as server, connected_client(server) as client:
        for i in range(count):
            exec_id = client.execute("def pipeline(ctx, config):\n    return 1\n")
            client.wait(exec_id, timeout=60, poll_interval=0.005)
            client.release(exec_id)
            if (i + 1) % max(1, count // 10) == 0:
                rows.append((process.num_fds(), process.num_threads(), process.memory_info().rss))
    return {
        "fds": [r[0] for r in rows],
        "threads": [r[1] for r in rows],
        "rss_mib": [round(r[2] / 2**20, 1) for r in rows],
    }


def test_control_plane_execute_latency(benchmark: Any) -> None:
    median_ms = benchmark.pedantic(measure_execute_latency, args=(200,), rounds=1, iterations=1)
    print(f"\nexecute median {median_ms:.2f} ms (target < 5 ms)")


def test_control_plane_status_while_streaming(benchmark: Any) -> None:
    # 128 frames of 8 MiB = 1 GiB on the data channel.
    numbers = benchmark.pedantic(
        measure_status_while_streaming, args=(128, 500), rounds=1, iterations=1
    )
    print(f"\n{numbers} (targets: status p99 < 10 ms, execute median < 5 ms)")


def test_control_plane_spawn(benchmark: Any, tmp_path: Path) -> None:
    seconds = benchmark.pedantic(measure_spawn, args=(tmp_path,), rounds=1, iterations=1)
    print(f"\nauto-spawn to first answer {seconds:.2f} s (target < 2 s)")


@pytest.mark.slow
def test_control_plane_1000_executions(benchmark: Any) -> None:
    rows = benchmark.pedantic(measure_resources, args=(1000,), rounds=1, iterations=1)
    print(f"\nafter each 100 executions: {rows}")

"""Small runs of benchmarks/test_control_plane.py so the benchmark code keeps working."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.test_control_plane import (
    measure_execute_latency,
    measure_resources,
    measure_spawn,
    measure_status_while_streaming,
)

pytestmark = pytest.mark.benchmark_smoke


def test_smoke_execute_latency() -> None:
    assert measure_execute_latency(20) < 100


def test_smoke_status_while_streaming() -> None:
    numbers = measure_status_while_streaming(frames=4, samples=30)
    assert numbers["status_p99_streaming_5ms_polls_ms"] < 500
    assert numbers["status_p99_streaming_back_to_back_ms"] < 500


def test_smoke_spawn(tmp_path: Path) -> None:
    assert measure_spawn(tmp_path) < 10


def test_smoke_resources_stay_bounded() -> None:
    # 100 executions take about 2 s; the benchmark module runs 1000.
    rows = measure_resources(100)
    assert max(rows["fds"]) - min(rows["fds"]) <= 8
    assert max(rows["threads"]) - min(rows["threads"]) <= 4
    assert max(rows["rss_mib"]) - min(rows["rss_mib"]) <= 32

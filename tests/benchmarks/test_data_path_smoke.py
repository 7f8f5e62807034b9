"""A small run of the data-path benchmarks, so they keep working; targets are not checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.benchmark_smoke
@pytest.mark.timeout(240)
def test_data_path_benchmarks_run_small() -> None:
    env = dict(
        os.environ,
        ZMQRUNTIME_BENCH_SMOKE="1",
        ZMQRUNTIME_BENCH_BYTES=str(32 << 20),
        ZMQRUNTIME_BENCH_RSS_BYTES=str(64 << 20),
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks/test_data_path.py",
        "--benchmark-disable",
        "-q",
        "-p",
        "no:cacheprovider",
    ]

    completed = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=220
    )

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]

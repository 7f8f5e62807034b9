"""A tiny run of the benchmark suite, so that it keeps working; no figure is checked."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.benchmark_smoke
@pytest.mark.timeout(300)
def test_benchmark_suite_smoke_profile(tmp_path: Path) -> None:
    env = dict(os.environ, ZMQRUNTIME_BENCH_PROFILE="smoke", ZMQRUNTIME_BENCH_OUT=str(tmp_path))
    command = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks/test_suite.py",
        "--benchmark-disable",
        "-q",
        "-p",
        "no:cacheprovider",
    ]

    completed = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )

    output = completed.stdout[-3000:] + completed.stderr[-2000:]
    assert completed.returncode == 0, output
    report = (tmp_path / "benchmarks.md").read_text()
    assert "## zmqruntime end to end" in report, report[:2000]
    assert "| memory/none/tcp/microscopy | 16 MiB |" in report, report
    assert "| memory-out/none/ipc/microscopy | 16 MiB |" in report, report
    assert "Dask gather direct" in report, report
    assert "| tcp | 16 MiB |" in report, report
    assert (tmp_path / "benchmarks.png").stat().st_size > 0


def test_token_bucket_proxy_limits_rate() -> None:
    import socket
    import threading
    import time

    from benchmarks._suite_proxy import ThrottledProxy

    # 80 Mbit/s is 10 MB/s, so 3 MB take at least 0.25 s after the first burst.
    payload = bytes(3_000_000)
    received = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def drain() -> None:
            connection, _ = server.accept()
            with connection:
                while chunk := connection.recv(1 << 16):
                    received.extend(chunk)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        with ThrottledProxy(port, 80e6) as proxy:
            started = time.perf_counter()
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sender:
                sender.sendall(payload)
                sender.shutdown(socket.SHUT_WR)
                reader.join(10)
            elapsed = time.perf_counter() - started
            forwarded = proxy.forwarded_bytes

    assert len(received) == len(payload)
    assert forwarded == len(payload)
    assert elapsed >= 0.25, f"3 MB passed an 80 Mbit/s proxy in {elapsed:.3f} s"
    assert elapsed < 5.0, f"3 MB took {elapsed:.3f} s through an 80 Mbit/s proxy"


def test_stack_shape_frames_and_small_sizes() -> None:
    from benchmarks._suite_data import stack_shape

    assert stack_shape(64 << 10) == (1, 16, 2048)
    assert stack_shape(16 << 20) == (2, 2048, 2048)
    with pytest.raises(ValueError, match="multiple of one 8 MiB frame"):
        stack_shape(12 << 20)
    with pytest.raises(ValueError, match="positive multiple of 4096"):
        stack_shape(1000)


def test_report_keeps_analysis_block(tmp_path: Path) -> None:
    from benchmarks._suite_config import load_profile
    from benchmarks._suite_report import (
        ANALYSIS_END,
        ANALYSIS_START,
        Figure,
        Results,
        write_report,
    )

    results = Results(dataclasses.replace(load_profile("smoke"), output_dir=tmp_path))
    results.add(Figure("numpy copyto", "peer", 64 << 10, 10.0))
    (tmp_path / "benchmarks.md").write_text(
        f"old\n{ANALYSIS_START}\nwhy it is slow\n{ANALYSIS_END}\n"
    )

    write_report(results)

    report = (tmp_path / "benchmarks.md").read_text()
    assert "why it is slow" in report
    assert "old\n" not in report
    assert "| numpy copyto | 10.000 |" in report


def test_crossover_from_link_rows() -> None:
    from benchmarks._suite_report import Figure
    from benchmarks._suite_targets import crossovers

    def row(codec: str, bits: float | None, gbps: float, ratio: float) -> Figure:
        figure = Figure(f"{codec} {bits}", "link", 64 << 20, gbps)
        figure.codec, figure.link_bits_per_s, figure.compression_ratio = codec, bits, ratio
        return figure

    figures = [
        row("none", None, 1.6, 1.0),
        row("lz4", None, 0.6, 1.9),
        row("none", 1e9, 0.12, 1.0),
        row("lz4", 1e9, 0.2, 1.9),
        row("zstd", None, 0.5, 1.0),
    ]

    lines = dict(crossovers(figures))

    assert lines["lz4"].startswith("about 4.8 Gbit/s"), lines["lz4"]
    assert "at 1 Gbit/s it wins" in lines["lz4"], lines["lz4"]
    assert lines["zstd"].startswith("never"), lines["zstd"]


def test_preallocated_configuration_needs_memory_sink() -> None:
    from benchmarks._suite_config import EndToEnd

    with pytest.raises(ValueError, match="'zarr'"):
        EndToEnd("zarr", "none", "tcp", "microscopy", preallocated=True)


def test_preallocated_row_is_a_reference_not_a_target(tmp_path: Path) -> None:
    from benchmarks._suite_config import EndToEnd, load_profile
    from benchmarks._suite_report import Figure, Results
    from benchmarks._suite_targets import evaluate_targets

    results = Results(dataclasses.replace(load_profile("smoke"), output_dir=tmp_path))
    label = EndToEnd("memory", "none", "tcp", "microscopy", preallocated=True).label
    results.add(Figure(f"zmqruntime {label}", "e2e", 1 << 30, 3.0))
    results.add(Figure("pyzmq PUSH/PULL tcp", "peer", 1 << 30, 2.0))

    verdicts = [v for v in evaluate_targets(results) if "memory-out" in v.target]

    assert [(v.target, v.measured, v.outcome) for v in verdicts] == [
        (
            "zmqruntime memory-out/none/tcp/microscopy at 1 GiB / pyzmq PUSH/PULL tcp",
            "1.50x (3.000 / 2.000 GB/s)",
            "reference",
        )
    ]

"""Data-path throughput and memory, each as a ratio to a baseline measured in the same run.

Run: ``python3 tasks.py bench benchmarks/test_data_path.py`` (about 3 minutes). Rows that
print a ratio without a target (a preallocated memory sink, the disk) are
references that explain a target.
Sizes: ``ZMQRUNTIME_BENCH_BYTES`` (default 1 GiB) for throughput and
``ZMQRUNTIME_BENCH_RSS_BYTES`` (default 4 GiB) for the memory check. With
``ZMQRUNTIME_BENCH_SMOKE=1`` the targets are reported but not asserted.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from sinks import MemmapSink, MemorySink, ZarrSink

from ._streaming import (
    FRAME_BYTES,
    FRAME_SHAPE,
    RssSampler,
    bound_pull,
    microscopy_frames,
    receive_bare,
    receive_stream,
    start_sender,
)
from ._suite_peers import time_disk_write

TOTAL = int(os.environ.get("ZMQRUNTIME_BENCH_BYTES", 1 << 30))
RSS_TOTAL = int(os.environ.get("ZMQRUNTIME_BENCH_RSS_BYTES", 4 << 30))
SMOKE = os.environ.get("ZMQRUNTIME_BENCH_SMOKE") == "1"
ROUNDS = 1 if SMOKE else 3

# GB/s medians of this run, filled in test order: baselines come first.
RESULTS: dict[str, float] = {}

LZ4: dict[str, Any] = {"cname": "lz4", "clevel": 1, "shuffle": "shuffle"}


def _check(name: str, ratio: float, target: float) -> None:
    print(f"\n{name}: {ratio:.2f}x (target >= {target}x)")
    if not SMOKE:
        assert ratio >= target, f"{name} reached {ratio:.2f}x, below the target {target}x"


def _bench_stream(
    benchmark: Any,
    name: str,
    mode: str,
    receive: Callable[[Any], float],
    compression: Any = None,
    total: int = TOTAL,
    rounds: int = ROUNDS,
) -> float:
    """Time ``receive(pull)`` against a spawned sender; record and return GB/s."""
    seconds: list[float] = []
    context, pull, endpoint = bound_pull()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        sender = start_sender(endpoint, mode, total, compression)
        sender.go()
        return (sender,), {}

    def target(sender: Any) -> None:
        try:
            seconds.append(receive(pull))
        finally:
            sender.finish()

    try:
        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1)
    finally:
        pull.close(linger=0)
        context.term()

    gbps = total / statistics.median(seconds) / 1e9
    RESULTS[name] = gbps
    benchmark.extra_info["GB/s"] = round(gbps, 3)
    print(f"\n{name}: {gbps:.2f} GB/s")
    return gbps


def _receive_into(make_sink: Callable[[], Any]) -> Callable[[Any], float]:
    def receive(pull: Any) -> float:
        seconds, _ = receive_stream(pull, lambda spec: make_sink())
        return seconds

    return receive


def test_transport_ceiling(benchmark: Any) -> None:
    _bench_stream(benchmark, "ceiling", "bare", lambda pull: receive_bare(pull, TOTAL))


def test_memory_sink_uncompressed(benchmark: Any) -> None:
    gbps = _bench_stream(benchmark, "memory", "array", _receive_into(MemorySink))
    _check("memory sink / ceiling", gbps / RESULTS["ceiling"], 0.9)


def test_memory_sink_preallocated_out(benchmark: Any) -> None:
    # Not a target: the array is touched once before the first round and then
    # reused through ``MemorySink(out=...)``, so the ratio shows what receiving
    # costs without faulting in new memory, the share the target row adds.
    out = np.zeros((TOTAL // FRAME_BYTES, *FRAME_SHAPE), np.uint16)
    gbps = _bench_stream(
        benchmark, "memory out", "array", _receive_into(lambda: MemorySink(out=out))
    )
    print(f"\nmemory sink into a preallocated array / ceiling: {gbps / RESULTS['ceiling']:.2f}x")


def test_disk_write_reference(benchmark: Any, tmp_path: Path) -> None:
    # Not a target: O_DIRECT writes of the same bytes in frame-sized pieces,
    # the most the memmap and zarr sinks can reach on this disk.
    seconds: list[float] = []
    benchmark.pedantic(
        lambda: seconds.append(time_disk_write(tmp_path / "disk.bin", TOTAL, FRAME_BYTES)),
        rounds=ROUNDS,
        iterations=1,
    )
    RESULTS["disk"] = TOTAL / statistics.median(seconds) / 1e9
    print(f"\ndisk write: {RESULTS['disk']:.2f} GB/s")


def _print_against_disk(name: str, gbps: float) -> None:
    if "disk" in RESULTS:
        print(f"{name} / disk write: {gbps / RESULTS['disk']:.2f}x")


def test_memmap_sink_uncompressed(benchmark: Any, tmp_path: Path) -> None:
    paths = iter(range(100))

    def make() -> Any:
        return MemmapSink(tmp_path / f"stack{next(paths)}.npy")

    gbps = _bench_stream(benchmark, "memmap", "array", _receive_into(make))
    _print_against_disk("memmap sink", gbps)
    _check("memmap sink / ceiling", gbps / RESULTS["ceiling"], 0.6)


def _zarr_sink(root: Path, compressors: Any) -> Callable[[], Any]:
    paths = iter(range(100))
    return lambda: ZarrSink(root / f"stack{next(paths)}.zarr", compressor=compressors)


def test_zarr_sink_uncompressed(benchmark: Any, tmp_path: Path) -> None:
    gbps = _bench_stream(benchmark, "zarr", "array", _receive_into(_zarr_sink(tmp_path, None)))
    _print_against_disk("zarr sink", gbps)
    _check("zarr sink / ceiling", gbps / RESULTS["ceiling"], 0.5)


def test_zarr_array_api_lz4_baseline(benchmark: Any, tmp_path: Path) -> None:
    frames = microscopy_frames(8)
    count = TOTAL // FRAME_BYTES
    seconds: list[float] = []
    paths = iter(range(100))

    def target() -> None:
        z = zarr.create_array(
            tmp_path / f"api{next(paths)}.zarr",
            shape=(count, *FRAME_SHAPE),
            chunks=(1, *FRAME_SHAPE),
            dtype="uint16",
            compressors=BloscCodec(**LZ4),
        )
        started = time.perf_counter()
        for i in range(count):
            z[i] = frames[i % len(frames)]
        seconds.append(time.perf_counter() - started)

    benchmark.pedantic(target, rounds=ROUNDS, iterations=1)
    RESULTS["zarr_api_lz4"] = TOTAL / statistics.median(seconds) / 1e9
    print(f"\nzarr z[i] = frame, lz4: {RESULTS['zarr_api_lz4']:.2f} GB/s")


def test_zarr_sink_lz4(benchmark: Any, tmp_path: Path) -> None:
    from zmqruntime import Compression

    # The sender compresses in the Blosc1 format zarr's BloscCodec stores, so the
    # sink writes each received chunk to the store as it is.
    compression = Compression("blosc1", **LZ4)
    make = _zarr_sink(tmp_path, BloscCodec(**LZ4))
    gbps = _bench_stream(benchmark, "zarr_lz4", "array", _receive_into(make), compression)
    _check("zarr sink lz4 / zarr z[i] = frame lz4", gbps / RESULTS["zarr_api_lz4"], 3.0)


@pytest.mark.parametrize("sink_kind", ["memmap", "zarr"])
def test_receiver_rss_flat_while_streaming(benchmark: Any, tmp_path: Path, sink_kind: str) -> None:
    if sink_kind == "memmap":
        make: Callable[[], Any] = lambda: MemmapSink(tmp_path / "big.npy", overwrite=True)  # noqa: E731
    else:
        make = _zarr_sink(tmp_path, None)
    growth: list[int] = []

    def receive(pull: Any) -> float:
        with RssSampler() as sampler:
            seconds, _ = receive_stream(pull, lambda spec: make())
        growth.append(sampler.peak - sampler.baseline)
        return seconds

    _bench_stream(benchmark, f"rss_{sink_kind}", "frames", receive, total=RSS_TOTAL, rounds=1)
    peak_mib = max(growth) / (1 << 20)
    benchmark.extra_info["RssAnon growth MiB"] = round(peak_mib, 1)
    print(f"\n{sink_kind}: RssAnon growth {peak_mib:.1f} MiB over {RSS_TOTAL >> 20} MiB")
    if not SMOKE:
        assert peak_mib < 256, f"RssAnon grew {peak_mib:.0f} MiB, above 256 MiB"
    for path in tmp_path.iterdir():
        if path.is_file():
            path.unlink()

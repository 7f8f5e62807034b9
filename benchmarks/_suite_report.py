"""Figures of the benchmark suite and the report it writes: Markdown tables and a PNG plot."""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ._suite_config import GIB, MIB, EndToEnd, Profile, size_label
from ._suite_targets import Verdict, crossovers, evaluate_targets

REPORT_NAME = "benchmarks.md"
PLOT_NAME = "benchmarks.png"

# Hand-written analysis between these markers survives when the suite rewrites the report.
ANALYSIS_START = "<!-- analysis: kept when the suite rewrites this page -->"
ANALYSIS_END = "<!-- end of analysis -->"


@dataclass
class Figure:
    """One measured case: throughput in GB/s (1e9 bytes/s) of ``nbytes`` and optional extras."""

    series: str
    kind: str  # "peer", "e2e" or "link"
    nbytes: int
    gbps: float
    transport: str | None = None
    config: EndToEnd | None = None
    client_rss_mib: float | None = None
    server_rss_mib: float | None = None
    compression_ratio: float | None = None
    # status round trip p50 and p99 in ms, and the number of samples
    status_ms: tuple[float, float, int] | None = None
    codec: str | None = None
    link_bits_per_s: float | None = None
    # GB/s of the reference measured in interleaved rounds (kind "paired").
    reference_gbps: float | None = None

    def extra_info(self) -> dict[str, Any]:
        """Return the figures pytest-benchmark stores beside its own timings."""
        info: dict[str, Any] = {"GB/s": round(self.gbps, 4)}
        if self.client_rss_mib is not None:
            info["client RssAnon growth MiB"] = round(self.client_rss_mib, 1)
        if self.server_rss_mib is not None:
            info["server memory peak MiB"] = round(self.server_rss_mib, 1)
        if self.compression_ratio is not None:
            info["compression ratio"] = round(self.compression_ratio, 3)
        if self.status_ms is not None:
            info["status p50 ms"], info["status p99 ms"], info["status samples"] = self.status_ms
        return info


@dataclass
class Results:
    """Figures collected in one run of the suite."""

    profile: Profile
    figures: list[Figure] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)

    def find(self, series: str, nbytes: int) -> Figure | None:
        """Return the figure of ``series`` at ``nbytes``, or None when it was not measured."""
        for figure in self.figures:
            if figure.series == series and figure.nbytes == nbytes:
                return figure
        return None


def _ratio(value: Figure, base: Figure | None) -> str:
    if base is None or base.gbps <= 0:
        return "-"
    return f"{value.gbps / base.gbps:.2f}"


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def _e2e_table(results: Results) -> list[str]:
    lines = [
        "| configuration | size | GB/s | x transport | x Dask direct | x Dask default "
        "| client RssAnon growth MiB | server memory peak MiB | compression ratio "
        "| status p50 / p99 ms (samples) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for figure in results.figures:
        if figure.kind != "e2e" or figure.config is None:
            continue
        limit = results.find(f"pyzmq PUSH/PULL {figure.transport}", figure.nbytes)
        direct = results.find("Dask gather direct", figure.nbytes)
        default = results.find("Dask gather default", figure.nbytes)
        status = "-"
        if figure.status_ms is not None:
            p50, p99, count = figure.status_ms
            status = f"{_fmt(p50, 2)} / {_fmt(p99, 2)} ({count})"
        lines.append(
            f"| {figure.config.label} | {size_label(figure.nbytes)} | {figure.gbps:.3f} "
            f"| {_ratio(figure, limit)} | {_ratio(figure, direct)} | {_ratio(figure, default)} "
            f"| {_fmt(figure.client_rss_mib)} | {_fmt(figure.server_rss_mib)} "
            f"| {_fmt(figure.compression_ratio, 2)} | {status} |"
        )
    return lines


def _peer_table(results: Results) -> list[str]:
    peers = [f for f in results.figures if f.kind == "peer"]
    series = list(dict.fromkeys(f.series for f in peers))
    sizes = results.profile.sizes
    lines = [
        "| baseline | " + " | ".join(size_label(s) for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name in series:
        cells = [results.find(name, s) for s in sizes]
        lines.append(
            f"| {name} | " + " | ".join("-" if c is None else f"{c.gbps:.3f}" for c in cells) + " |"
        )
    return lines


def _link_table(results: Results) -> list[str]:
    lines = [
        "| codec | link | raw GB/s delivered | compression ratio on the wire |",
        "|---|---|---|---|",
    ]
    for figure in results.figures:
        if figure.kind != "link":
            continue
        bits = figure.link_bits_per_s
        link = "loopback, no limit" if bits is None else f"{bits / 1e9:g} Gbit/s"
        lines.append(
            f"| {figure.codec} | {link} | {figure.gbps:.3f} | {_fmt(figure.compression_ratio, 2)} |"
        )
    return lines


def _paired_table(results: Results) -> list[str]:
    lines = [
        "| transport | size | auto GB/s | none GB/s | auto / none |",
        "|---|---|---|---|---|",
    ]
    for figure in results.figures:
        if figure.kind != "paired" or not figure.reference_gbps:
            continue
        lines.append(
            f"| {figure.transport} | {size_label(figure.nbytes)} | {figure.gbps:.3f} "
            f"| {figure.reference_gbps:.3f} | {figure.gbps / figure.reference_gbps:.2f} |"
        )
    return lines


def _versions() -> str:
    import zmq

    names = ["numpy", "pyzmq", "blosc2", "zarr", "dask", "distributed", "pytest-benchmark"]
    parts = [f"Python {platform.python_version()}"]
    for name in names:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    parts.append(f"libzmq {zmq.zmq_version()}")
    return ", ".join(parts)


def _machine() -> list[str]:
    import psutil

    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = psutil.virtual_memory().total / GIB
    return [
        f"- CPU: {os.cpu_count()} logical cores, {model}",
        f"- Memory: {memory:.1f} GiB; OS: {platform.platform()}",
        f"- Versions: {_versions()}",
    ]


def _verdict_lines(verdicts: list[Verdict]) -> list[str]:
    lines = ["| target | measured | result |", "|---|---|---|"]
    for verdict in verdicts:
        lines.append(f"| {verdict.target} | {verdict.measured} | {verdict.outcome} |")
    return lines


_INTRO = """# Benchmarks

The benchmark suite (`benchmarks/test_suite.py`) writes this page, so rerun it rather than edit
the tables. A rerun keeps the analysis between the two `analysis` comment markers unchanged.
Every table comes from one run on the machine listed. The machine is shared, so a figure can
differ by 30 % or more between runs, and rows measured minutes apart can differ as much.
Compare ratios within one run, and prefer the interleaved comparison where one exists.

## How to run

- `python3 tasks.py bench --profile quick`: sizes 64 KiB, 1 MiB, 16 MiB, 256 MiB and 1 GiB with a
  reduced configuration grid (about 5 minutes on 2 cores).
- `python3 tasks.py bench --profile full`: adds 4 GiB and every combination of sink (memory,
  memmap, zarr), compression (none, lz4, auto), transport (tcp loopback, ipc) and data
  (microscopy-like, random). It took 29 minutes on 2 cores with 23.5 GiB of memory. Its 4 GiB
  cases hold the result in the server's arena and in the client at the same time. Its last
  run is committed in `docs/full/benchmarks.md`, written with `ZMQRUNTIME_BENCH_OUT=docs/full`.
- The same without `tasks.py`: `ZMQRUNTIME_BENCH_PROFILE=quick python -m pytest
  benchmarks/test_suite.py --benchmark-only`. `ZMQRUNTIME_BENCH_OUT=DIR` writes the report into
  `DIR` in place of `docs/`. A run with `-k` writes a report of the selected cases only, so
  point it elsewhere.
- `tests/benchmarks/test_suite_smoke.py` runs a tiny profile in the test suite (marker
  `benchmark_smoke`), so the suite keeps working. It checks no figure.

## What is measured

Arrays are uint16 stacks of 2048 x 2048 frames (8 MiB each). Sizes under 8 MiB are one frame of
2048 columns. Microscopy-like data is a smooth Gaussian background with Poisson noise; random
data is uniform over the uint16 range. GB/s means 1e9 bytes per second of raw array data.

- zmqruntime end to end: an `ExecutionClient` executes a pipeline on a `python -m zmqruntime
  serve` subprocess (1 worker) and fetches the result with `iter_results` into the sink while
  the pipeline writes it. The clock starts when the client signals the pipeline, which has
  made its frames and declared its result, to write. It stops when the last chunk is in the
  sink, so the fetch set-up, both hops (worker to server, server to client) and the sink
  writes count. "lz4" is `compression="blosc2"` (lz4, level 1, byte shuffle), and "auto" lets
  the server decide. By default the payloads pass through the server's shared-memory arena,
  since all processes run on one host. Rows ending in "/sockets" turn the arenas off on both
  ends, so every byte crosses both sockets, as it does for a client on another host.
- Sink "memory-out": the memory sink fills one array through `MemorySink(out=...)`. The array is
  allocated and touched before the first round and reused by every round, as the transport
  baseline's is, so the row shows the engine's own cost. The targets use the "memory" rows,
  which allocate a new array in every round and so pay for faulting its pages in. The Targets
  table lists the "memory-out" ratio to the transport limit with the result "reference": it
  explains a target and is not one. Its ratio to Dask is not like for like, since Dask's
  gather allocates a new array in every round. `python -m benchmarks.first_touch` measures
  how fast new memory faults in.
- Client RssAnon growth: peak anonymous resident memory of the benchmark process above its value
  before the round (the memory sink's array counts; file-backed memmap pages do not). Server
  memory peak: RssAnon of the server process and its worker, summed, including the worker's
  8 source frames, plus the pages of the server's shared-memory arenas.
- Status p50 / p99: `get_status` round trips from a second client in its own process, every
  5 ms during the stream.
- numpy copyto: `np.copyto` into a preallocated, pre-faulted array (the memory limit).
- pyzmq PUSH/PULL: a bare pyzmq stream of the same bytes as 8 MiB messages (one message under
  8 MiB), zero-copy send and `recv_into` a preallocated, pre-faulted array (the transport limit).
- disk write: the same bytes written into a new file in 8 MiB pieces (one piece under 8 MiB)
  with `O_DIRECT`, as the file sinks write large results, then `fsync` (the disk limit). The
  file is in the directory the memmap and zarr sinks write to. The Targets table compares the
  memmap and zarr rows with it in "reference" rows.
- Dask: a LocalCluster with one worker process (threads 1, dashboard off, 127.0.0.1) makes the
  array. The clock covers only `client.gather(future)` or `client.gather(future, direct=True)`.
- pickle-5 pipe: the array pickled with protocol 5 and out-of-band buffers in a spawned process,
  sent over a `multiprocessing` pipe and loaded in the benchmark process.
- Engine on a limited link: zmqruntime's `ResultStream` to a `StreamReceiver` (no server),
  through a thread-based forwarding proxy on 127.0.0.1 that limits the bandwidth with a token
  bucket. The proxy copies every byte in Python threads, so at 10 Gbit/s it is itself a limit.
"""


def _crossover_lines(results: Results) -> list[str]:
    lines = []
    for codec, text in crossovers(results.figures):
        lines.append(f"- {codec}: {text}")
    return lines or ["- not measured in this run"]


def kept_analysis(previous: str) -> list[str]:
    """Return the analysis block of an earlier report, markers included, or no lines."""
    start, end = previous.find(ANALYSIS_START), previous.find(ANALYSIS_END)
    if start < 0 or end < start:
        return []
    return [previous[start : end + len(ANALYSIS_END)], ""]


def render_report(results: Results, plot_name: str | None, analysis: list[str]) -> str:
    """Return the Markdown report of ``results``.

    ``plot_name`` is the PNG beside the report, if any. ``analysis`` lines,
    usually from :func:`kept_analysis`, go after the targets.
    """
    elapsed = (time.time() - results.started) / 60
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sections = [
        _INTRO,
        "## Machine and run",
        "",
        *_machine(),
        f"- Profile `{results.profile.name}`, finished {stamp}, {elapsed:.1f} minutes.",
        "",
        "## Targets (printed, not asserted)",
        "",
        *_verdict_lines(evaluate_targets(results)),
        "",
        *analysis,
        "## zmqruntime end to end",
        "",
        "Ratios divide by the baseline at the same size (transport: the same transport).",
        "",
        *_e2e_table(results),
        "",
        "## Compression auto against none, interleaved rounds (memory sink)",
        "",
        "Rounds alternate between the two settings on one server, so load from other work on",
        "the machine falls on both alike. Medians of the rounds.",
        "",
        *_paired_table(results),
        "",
        "## Baselines (GB/s)",
        "",
        *_peer_table(results),
        "",
        f"## Codecs on a limited link ({size_label(results.profile.proxy_bytes)}, tcp)",
        "",
        *_link_table(results),
        "",
        "Crossover bandwidth below which compression delivers more raw bytes per second:",
        "",
        *_crossover_lines(results),
        "",
    ]
    if plot_name is not None:
        sections += ["## Plot", "", f"![throughput against size]({plot_name})", ""]
    return "\n".join(sections)


def _plot(results: Results, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(11, 6.5))
    series = [f.series for f in results.figures if f.kind in ("e2e", "peer")]
    # tab20 has 20 distinct colours, so the 14 lines of the quick profile do not repeat one.
    colours = [plt.get_cmap("tab20")(i) for i in range(20)]
    for index, name in enumerate(dict.fromkeys(series)):
        points = sorted((f.nbytes, f.gbps) for f in results.figures if f.series == name)
        style = "--" if not name.startswith("zmqruntime") else "-"
        axes.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            style,
            marker="o",
            color=colours[index % len(colours)],
            label=name,
        )

    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    sizes = results.profile.sizes
    axes.set_xticks(list(sizes), [size_label(s) for s in sizes])
    axes.set_xlabel("array size")
    axes.set_ylabel("throughput, GB/s (1e9 bytes/s)")
    axes.set_title(f"zmqruntime and baselines, profile {results.profile.name}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(results: Results) -> list[Path]:
    """Write the Markdown report and the plot into the profile's output directory.

    Returns the paths written. Without figures nothing is written, so a run
    that selected no case leaves an earlier report in place. The analysis
    block of an earlier report is carried over unchanged.
    """
    if not results.figures:
        return []
    directory = results.profile.output_dir
    directory.mkdir(parents=True, exist_ok=True)
    plot_path = directory / PLOT_NAME
    has_plot = _plot(results, plot_path)
    report_path = directory / REPORT_NAME
    previous = report_path.read_text() if report_path.exists() else ""
    text = render_report(results, PLOT_NAME if has_plot else None, kept_analysis(previous))
    report_path.write_text(text)
    return [report_path, plot_path] if has_plot else [report_path]


__all__ = ["MIB", "Figure", "Results", "render_report", "write_report"]

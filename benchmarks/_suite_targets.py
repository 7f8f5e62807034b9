"""Targets of the benchmark suite and the crossover estimate, checked against one run's figures.

Each target is evaluated at every size where all its figures exist and is
reported as met or missed. Nothing here raises on a miss.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._suite_config import MIB, size_label

if TYPE_CHECKING:
    from ._suite_report import Figure, Results

# Sizes the throughput targets apply to: small transfers are dominated by
# per-request latency, which these ratios do not describe.
TARGET_SIZES = (256 * MIB, 1 << 30)
STATUS_P99_LIMIT_MS = 10.0
# "Flat" client memory: the growth at the largest size exceeds the growth at
# 16 MiB by less than this many MiB.
FLAT_RSS_SLACK_MIB = 64.0
AUTO_MIN_RATIO = 0.9

MEMORY = "zmqruntime memory/none/{transport}/microscopy"


@dataclass(frozen=True)
class Verdict:
    """One target: its condition, the measured figure and the outcome.

    The outcome is "met", "missed", "not measured", or "reference" for a
    comparison that explains a target and is not one.
    """

    target: str
    measured: str
    outcome: str


def _ratio_text(value: Figure, reference: Figure) -> str:
    ratio = value.gbps / reference.gbps
    return f"{ratio:.2f}x ({value.gbps:.3f} / {reference.gbps:.3f} GB/s)"


def _ratio_verdict(
    results: Results, name: str, base: str, minimum: float, sizes: Iterable[int]
) -> list[Verdict]:
    verdicts = []
    for nbytes in sizes:
        value, reference = results.find(name, nbytes), results.find(base, nbytes)
        target = f"{name} at {size_label(nbytes)} >= {minimum:g}x {base}"
        if value is None or reference is None or reference.gbps <= 0:
            verdicts.append(Verdict(target, "-", "not measured"))
            continue
        ratio = value.gbps / reference.gbps
        verdicts.append(
            Verdict(target, _ratio_text(value, reference), "met" if ratio >= minimum else "missed")
        )
    return verdicts


def _throughput_targets(results: Results) -> list[Verdict]:
    limit = "pyzmq PUSH/PULL tcp"
    memory = MEMORY.format(transport="tcp")
    checks = [
        (memory, limit, 0.9),
        (memory, "Dask gather direct", 1.0),
        (memory, "Dask gather default", 2.0),
        ("zmqruntime memmap/none/tcp/microscopy", limit, 0.6),
        ("zmqruntime zarr/none/tcp/microscopy", limit, 0.5),
    ]
    verdicts = []
    for name, base, minimum in checks:
        verdicts += _ratio_verdict(results, name, base, minimum, TARGET_SIZES)
    return verdicts


def _flat_rss_targets(results: Results) -> list[Verdict]:
    verdicts = []
    for sink in ("memmap", "zarr"):
        series = f"zmqruntime {sink}/none/tcp/microscopy"
        points = sorted(
            (f.nbytes, f.client_rss_mib)
            for f in results.figures
            if f.series == series and f.client_rss_mib is not None
        )
        target = f"{sink} sink: client RssAnon growth flat as size grows (16 MiB to largest)"
        small = [growth for nbytes, growth in points if nbytes == 16 * MIB]
        if not small or points[-1][0] <= 16 * MIB:
            verdicts.append(Verdict(target, "-", "not measured"))
            continue
        largest, growth = points[-1]
        text = f"{small[0]:.0f} MiB at 16 MiB, {growth:.0f} MiB at {size_label(largest)}"
        met = growth - small[0] < FLAT_RSS_SLACK_MIB
        verdicts.append(Verdict(target, text, "met" if met else "missed"))
    return verdicts


def _status_target(results: Results) -> list[Verdict]:
    loaded = [
        f
        for f in results.figures
        if f.kind == "e2e" and f.status_ms is not None and f.nbytes >= TARGET_SIZES[0]
    ]
    target = f"status p99 < {STATUS_P99_LIMIT_MS:g} ms while a stream of >= 256 MiB runs"
    if not loaded:
        return [Verdict(target, "-", "not measured")]
    worst = max(loaded, key=lambda f: f.status_ms[1] if f.status_ms else 0.0)
    assert worst.status_ms is not None
    p99 = worst.status_ms[1]
    text = f"worst p99 {p99:.2f} ms ({worst.series}, {size_label(worst.nbytes)})"
    return [Verdict(target, text, "met" if p99 < STATUS_P99_LIMIT_MS else "missed")]


def _auto_targets(results: Results) -> list[Verdict]:
    paired = [f for f in results.figures if f.kind == "paired" and f.reference_gbps]
    if paired:
        return [_paired_verdict(f) for f in paired]

    verdicts = []
    for transport in ("tcp", "ipc"):
        auto = f"zmqruntime memory/auto/{transport}/microscopy"
        raw = MEMORY.format(transport=transport)
        sizes = [s for s in results.profile.sizes if s >= 16 * MIB]
        verdicts += _ratio_verdict(results, auto, raw, AUTO_MIN_RATIO, sizes)
    return verdicts


def _paired_verdict(figure: Figure) -> Verdict:
    reference = figure.reference_gbps or float("nan")
    ratio = figure.gbps / reference
    target = (
        f"compression auto >= {AUTO_MIN_RATIO:g}x none, memory sink, {figure.transport}, "
        f"{size_label(figure.nbytes)}, interleaved rounds"
    )
    text = f"{ratio:.2f}x ({figure.gbps:.3f} / {reference:.3f} GB/s)"
    return Verdict(target, text, "met" if ratio >= AUTO_MIN_RATIO else "missed")


def _reference_ratios(results: Results) -> list[Verdict]:
    # Not targets. "memory-out" receives into memory touched before the clock
    # starts, as the transport baseline does, so its ratio shows the engine's
    # cost alone. The file sinks are compared with the disk's own write rate.
    pairs = [
        (f"zmqruntime memory-out/none/{t}/microscopy", f"pyzmq PUSH/PULL {t}")
        for t in ("tcp", "ipc")
    ]
    pairs += [
        (f"zmqruntime {sink}/none/tcp/microscopy", "disk write") for sink in ("memmap", "zarr")
    ]
    verdicts = []
    for name, base in pairs:
        for nbytes in TARGET_SIZES:
            value, reference = results.find(name, nbytes), results.find(base, nbytes)
            if value is None or reference is None or reference.gbps <= 0:
                continue
            target = f"{name} at {size_label(nbytes)} / {base}"
            verdicts.append(Verdict(target, _ratio_text(value, reference), "reference"))
    return verdicts


def evaluate_targets(results: Results) -> list[Verdict]:
    """Return every target with its measured figure and outcome.

    Rows with the outcome "reference" are comparisons that explain a target
    rather than targets of their own.
    """
    return [
        *_throughput_targets(results),
        *_reference_ratios(results),
        *_flat_rss_targets(results),
        *_status_target(results),
        *_auto_targets(results),
    ]


def crossovers(figures: list[Figure]) -> list[tuple[str, str]]:
    """Estimate, per codec, the link bandwidth below which it beats sending raw.

    Model: on a link of B bytes/s, raw data arrives at min(R, B). A codec with
    compression ratio r delivers min(C, r * B) raw bytes/s. C and R are what
    the codec and raw sending reach on loopback with no limit. For B below R,
    the codec wins while B < C (given r > 1), so C is the crossover. The
    measured rows at 1 and 10 Gbit/s are shown beside the estimate as a check.
    """
    links = [f for f in figures if f.kind == "link"]
    unlimited = {f.codec or "none": f for f in links if f.link_bits_per_s is None}
    limited = [f for f in links if f.link_bits_per_s is not None]
    raw = unlimited.get("none")
    lines = []
    for codec, figure in unlimited.items():
        if codec == "none" or raw is None:
            continue
        ratio = figure.compression_ratio or 1.0
        if ratio <= 1.0:
            lines.append((codec, f"never (compression ratio {ratio:.2f})"))
            continue
        crossover = min(figure.gbps, raw.gbps)
        checks = []
        for row in limited:
            if row.codec != codec or row.link_bits_per_s is None:
                continue
            plain = next(
                (
                    f
                    for f in limited
                    if f.codec == "none" and f.link_bits_per_s == row.link_bits_per_s
                ),
                None,
            )
            if plain is not None:
                verdict = "wins" if row.gbps > plain.gbps else "loses"
                checks.append(
                    f"at {row.link_bits_per_s / 1e9:g} Gbit/s it {verdict} "
                    f"({row.gbps:.3f} against {plain.gbps:.3f} GB/s raw)"
                )
        text = (
            f"about {crossover * 8:.1f} Gbit/s ({crossover:.3f} GB/s raw, ratio {ratio:.2f}); "
            + ("measured: " + "; ".join(checks) if checks else "no limited-link rows")
        )
        lines.append((codec, text))
    return lines

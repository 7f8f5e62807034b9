"""Profiles of the benchmark suite: sizes, configurations and rounds.

The profile comes from ``ZMQRUNTIME_BENCH_PROFILE``: ``quick`` (the default,
a reduced configuration grid), ``full`` (every configuration, 4 GiB added)
or ``smoke`` (tiny sizes, for the test suite). ``ZMQRUNTIME_BENCH_OUT`` sets
the directory the report goes to (default: ``docs/`` of the repository).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class EndToEnd:
    """One configuration of the end-to-end benchmark (ExecutionClient against a server).

    ``compression`` is what ``get_results(compression=...)`` receives:
    ``"none"`` sends raw chunks, ``"blosc2"`` compresses with lz4 level 1 and
    byte shuffle, ``"blosc1"`` the same in the format zarr stores as it is,
    and ``"auto"`` lets the server decide per chunk from a sample.

    ``sockets`` turns the shared-memory arenas off on both ends (``serve
    --no-shared-memory``, ``ExecutionClient(shared_memory=False)``), so every
    byte crosses both sockets, as it does when the client is on another host.

    ``preallocated`` (memory sink only) receives into one array that was
    allocated and touched before the first round and is reused by every round,
    through ``MemorySink(out=...)``. The transport baseline receives the same
    way, so this row compares the engine with the transport on equal terms,
    without the cost of faulting in new memory.

    NOTE: ``get_results`` takes only a mode string, so zstd cannot be
    requested end to end. zstd is measured only in the engine-level link rows.
    """

    sink: str
    compression: str
    transport: str
    data: str
    sockets: bool = False
    preallocated: bool = False

    def __post_init__(self) -> None:
        if self.preallocated and self.sink != "memory":
            raise ValueError(f"preallocated needs the memory sink, not sink {self.sink!r}")

    @property
    def label(self) -> str:
        codec = {"blosc2": "lz4", "blosc1": "lz4-blosc1"}.get(self.compression, self.compression)
        sink = "memory-out" if self.preallocated else self.sink
        label = f"{sink}/{codec}/{self.transport}/{self.data}"
        return f"{label}/sockets" if self.sockets else label

    @property
    def server_key(self) -> str:
        """Which server subprocess runs the case: its transport, and whether arenas are off."""
        return f"{self.transport}-sockets" if self.sockets else self.transport


@dataclass(frozen=True)
class Profile:
    """Sizes, configurations and rounds of one profile."""

    name: str
    sizes: tuple[int, ...]
    configs: tuple[EndToEnd, ...]
    proxy_bytes: int
    proxy_codecs: tuple[str, ...]
    # Link limits of the forwarding proxy, in bits per second.
    proxy_bits_per_s: tuple[float, ...]
    output_dir: Path
    # Size and round pairs of the interleaved "auto" against "none" comparison.
    paired_bytes: int = 256 * MIB
    paired_rounds: int = 5

    def rounds(self, nbytes: int) -> int:
        """Return the timed rounds per case: 3, so that the median skips one outlier."""
        if self.name == "smoke":
            return 1
        return 3


def _quick_configs() -> tuple[EndToEnd, ...]:
    micro = "microscopy"
    return (
        EndToEnd("memory", "none", "tcp", micro),
        EndToEnd("memory", "none", "tcp", micro, sockets=True),
        EndToEnd("memory", "none", "ipc", micro),
        EndToEnd("memory", "none", "tcp", micro, preallocated=True),
        EndToEnd("memory", "blosc2", "tcp", micro),
        EndToEnd("memory", "auto", "tcp", micro),
        EndToEnd("memory", "auto", "ipc", micro),
        EndToEnd("memmap", "none", "tcp", micro),
        EndToEnd("zarr", "none", "tcp", micro),
        EndToEnd("memory", "blosc2", "tcp", "random"),
    )


def _full_configs() -> tuple[EndToEnd, ...]:
    sinks = ("memory", "memmap", "zarr")
    codecs = ("none", "blosc2", "auto")
    grid = itertools.product(sinks, codecs, ("tcp", "ipc"), ("microscopy", "random"))
    configs = [EndToEnd(*combination) for combination in grid]
    # The zarr sink stores blosc1 chunks as they arrive, without decompressing.
    configs.append(EndToEnd("zarr", "blosc1", "tcp", "microscopy"))
    configs += [EndToEnd(sink, "none", "tcp", "microscopy", sockets=True) for sink in sinks]
    configs += [
        EndToEnd("memory", "none", t, "microscopy", preallocated=True) for t in ("tcp", "ipc")
    ]
    return tuple(configs)


def load_profile(name: str | None = None) -> Profile:
    """Return the profile named ``name`` or by ``ZMQRUNTIME_BENCH_PROFILE`` (default quick)."""
    name = name or os.environ.get("ZMQRUNTIME_BENCH_PROFILE", "quick")
    output_dir = Path(os.environ.get("ZMQRUNTIME_BENCH_OUT", ROOT / "docs"))
    gbit = (1e9, 10e9)

    sizes: tuple[int, ...]
    if name == "quick":
        sizes = (64 * KIB, 1 * MIB, 16 * MIB, 256 * MIB, 1 * GIB)
        return Profile(
            name, sizes, _quick_configs(), 64 * MIB, ("none", "lz4", "zstd"), gbit, output_dir
        )
    if name == "full":
        sizes = (64 * KIB, 1 * MIB, 16 * MIB, 256 * MIB, 1 * GIB, 4 * GIB)
        return Profile(
            name, sizes, _full_configs(), 256 * MIB, ("none", "lz4", "zstd"), gbit, output_dir
        )
    if name == "smoke":
        configs = (
            EndToEnd("memory", "none", "tcp", "microscopy"),
            EndToEnd("memory", "none", "ipc", "microscopy", preallocated=True),
            EndToEnd("memmap", "auto", "ipc", "microscopy"),
            EndToEnd("zarr", "blosc2", "tcp", "random"),
        )
        return Profile(
            name,
            (64 * KIB, 16 * MIB),
            configs,
            16 * MIB,
            ("none", "lz4"),
            gbit,
            output_dir,
            16 * MIB,
            1,
        )
    raise ValueError(
        f"benchmark profile {name!r} is not one of 'quick', 'full', 'smoke'; "
        "set ZMQRUNTIME_BENCH_PROFILE to one of them"
    )


def size_label(nbytes: int) -> str:
    """Return a size as ``64 KiB``, ``16 MiB`` or ``1 GiB``."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit} {name}"
    return f"{nbytes} B"

"""Benchmark suite: zmqruntime end to end against its peers and the hardware limits, by size.

Run ``python3 tasks.py bench --profile quick`` (about 5 minutes on 2 cores) or
``--profile full``; ``docs/benchmarks.md`` describes the profiles and figures.
Every figure is measured in this run. The module's teardown writes the
Markdown report and the plot; targets are printed there, never asserted.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from sinks import MemorySink
from zmqruntime import ExecutionClient

from ._suite_config import EndToEnd, Profile, load_profile, size_label
from ._suite_data import full_stack, stack_shape
from ._suite_e2e import (
    EndToEndRound,
    ServerProcess,
    StatusPoller,
    percentile,
    run_round,
    running_server,
)
from ._suite_peers import (
    HWM,
    PeerSender,
    SenderSpec,
    StreamRound,
    prefaulted,
    receive_engine_stream,
    receive_pickle,
    receive_zmq,
    start_peer_sender,
    time_copyto,
    time_disk_write,
)
from ._suite_proxy import ThrottledProxy
from ._suite_report import Figure, Results, write_report

PROFILE: Profile = load_profile()
RESULTS = Results(PROFILE)
MIB = 1 << 20
# One 2048 x 2048 uint16 frame, the chunk the end-to-end pipelines write, in bytes.
FRAME_BYTES = 2048 * 2048 * 2

# Distributed's LocalCluster may warn about its own clean-up, which is not ours to fix.
# A 4 GiB case of the full profile runs for minutes, beyond the test suite's 120 s timeout.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning"),
    pytest.mark.timeout(1800),
]


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[Results]:
    """Write the report once every selected case of this module has run."""
    RESULTS.started = time.time()
    yield RESULTS
    paths = write_report(RESULTS)
    print(f"\nbenchmark report written to {', '.join(str(p) for p in paths)}")


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A short temporary directory, so ipc paths stay under the 107-byte socket path limit."""
    path = Path(tempfile.mkdtemp(prefix="zr-suite-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _record(benchmark: Any, figure: Figure) -> None:
    RESULTS.add(figure)
    benchmark.extra_info.update(figure.extra_info())
    print(f"\n{figure.series} {size_label(figure.nbytes)}: {figure.gbps:.3f} GB/s")


def _gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


# ---------------------------------------------------------------- memory limit


@pytest.mark.parametrize("nbytes", PROFILE.sizes, ids=size_label)
def test_numpy_copyto(benchmark: Any, nbytes: int) -> None:
    source = full_stack(stack_shape(nbytes), "microscopy")
    dest = prefaulted(nbytes).view(np.uint16).reshape(source.shape)
    seconds: list[float] = []
    benchmark.pedantic(
        lambda: seconds.append(time_copyto(source, dest)),
        rounds=max(3, PROFILE.rounds(nbytes)),
        iterations=1,
    )
    _record(benchmark, Figure("numpy copyto", "peer", nbytes, _gbps(nbytes, seconds)))


# ---------------------------------------------------------------- disk limit


@pytest.mark.parametrize("nbytes", PROFILE.sizes, ids=size_label)
def test_disk_write_limit(benchmark: Any, workdir: Path, nbytes: int) -> None:
    # One frame, or the whole result when it is smaller, written over and over,
    # so the disk gets writes of the sizes the memmap sink issues.
    piece_bytes = min(nbytes, FRAME_BYTES)
    seconds: list[float] = []
    benchmark.pedantic(
        lambda: seconds.append(time_disk_write(workdir / "disk.bin", nbytes, piece_bytes)),
        rounds=PROFILE.rounds(nbytes),
        iterations=1,
    )
    _record(benchmark, Figure("disk write", "peer", nbytes, _gbps(nbytes, seconds)))


# ---------------------------------------------------------------- transport limit


def _bound_pull(transport: str, workdir: Path) -> tuple[zmq.Context[Any], zmq.Socket[Any], str]:
    context: zmq.Context[Any] = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, HWM)
    if transport == "ipc":
        endpoint = f"ipc://{workdir}/pull-{time.monotonic_ns()}.sock"
        pull.bind(endpoint)
    else:
        endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    return context, pull, endpoint


@contextlib.contextmanager
def _peer(spec: SenderSpec) -> Iterator[PeerSender]:
    sender = start_peer_sender(spec)
    try:
        yield sender
    finally:
        sender.stop()


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
@pytest.mark.parametrize("nbytes", PROFILE.sizes, ids=size_label)
def test_transport_limit(benchmark: Any, workdir: Path, transport: str, nbytes: int) -> None:
    context, pull, endpoint = _bound_pull(transport, workdir)
    dest = prefaulted(nbytes)
    seconds: list[float] = []
    try:
        with _peer(SenderSpec("zmq", stack_shape(nbytes), endpoint=endpoint)) as sender:
            benchmark.pedantic(
                lambda: seconds.append(receive_zmq(pull, sender, dest)),
                rounds=PROFILE.rounds(nbytes),
                iterations=1,
            )
    finally:
        pull.close(linger=0)
        context.term()

    figure = Figure(f"pyzmq PUSH/PULL {transport}", "peer", nbytes, _gbps(nbytes, seconds))
    figure.transport = transport
    _record(benchmark, figure)


# ---------------------------------------------------------------- pickle and Dask


@pytest.mark.parametrize("nbytes", PROFILE.sizes, ids=size_label)
def test_pickle5_pipe(benchmark: Any, nbytes: int) -> None:
    seconds: list[float] = []
    with _peer(SenderSpec("pickle", stack_shape(nbytes))) as sender:

        def one_round() -> None:
            elapsed, array = receive_pickle(sender)
            seconds.append(elapsed)
            assert array.nbytes == nbytes

        benchmark.pedantic(one_round, rounds=PROFILE.rounds(nbytes), iterations=1)
    _record(benchmark, Figure("pickle-5 pipe", "peer", nbytes, _gbps(nbytes, seconds)))


# Class scope closes the cluster before the end-to-end rounds, whose client
# would otherwise share its process and the GIL with the idle scheduler.
@pytest.fixture(scope="class")
def dask_client() -> Iterator[Any]:
    """A Dask client of a LocalCluster with one worker process, on 127.0.0.1 only."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        # The scheduler starts an HTTP server for its metrics even with the
        # dashboard off, on port 8787 of every interface unless configured otherwise.
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        silence_logs=40,
    )
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


class TestDask:
    """Dask's gather of a worker-made array, default and direct."""

    @pytest.mark.parametrize("direct", [False, True], ids=["default", "direct"])
    @pytest.mark.parametrize("nbytes", PROFILE.sizes, ids=size_label)
    def test_dask_gather(self, benchmark: Any, dask_client: Any, direct: bool, nbytes: int) -> None:
        from distributed import wait

        future = dask_client.submit(full_stack, stack_shape(nbytes), "microscopy", pure=False)
        wait(future)  # type: ignore[no-untyped-call]
        seconds: list[float] = []

        def one_round() -> None:
            started = time.perf_counter()
            array = dask_client.gather(future, direct=direct)
            seconds.append(time.perf_counter() - started)
            assert array.nbytes == nbytes

        try:
            benchmark.pedantic(one_round, rounds=PROFILE.rounds(nbytes), iterations=1)
        finally:
            future.release()
        name = "Dask gather direct" if direct else "Dask gather default"
        _record(benchmark, Figure(name, "peer", nbytes, _gbps(nbytes, seconds)))


# ---------------------------------------------------------------- zmqruntime end to end


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ServerProcess]]:
    """Server subprocesses by ``EndToEnd.server_key``, started on first use, stopped at the end."""
    with contextlib.ExitStack() as stack:

        class _Lazy(dict[str, ServerProcess]):
            def __missing__(self, key: str) -> ServerProcess:
                # Stored in the dict itself, so each key starts one server for
                # the whole module rather than one per test.
                transport, _, sockets = key.partition("-")
                args = ["--no-shared-memory"] if sockets else []
                self[key] = stack.enter_context(running_server(transport, args))
                return self[key]

        yield _Lazy()


def _e2e_cases() -> list[Any]:
    return [
        pytest.param(config, nbytes, id=f"{config.label}-{size_label(nbytes)}".replace(" ", ""))
        for config in PROFILE.configs
        for nbytes in PROFILE.sizes
    ]


@pytest.mark.parametrize(("config", "nbytes"), _e2e_cases())
def test_end_to_end(
    benchmark: Any, servers: dict[str, ServerProcess], config: EndToEnd, nbytes: int
) -> None:
    server = servers[config.server_key]
    rounds: list[EndToEndRound] = []
    # Touched before the clock starts, like the transport baseline's destination.
    out = None
    if config.preallocated:
        out = prefaulted(nbytes).view(np.uint16).reshape(stack_shape(nbytes))
    poller = StatusPoller(server.endpoint)
    try:
        with ExecutionClient(
            endpoint=server.endpoint,
            auto_spawn=False,
            timeout=60,
            shared_memory=not config.sockets,
        ) as client:

            def one_round() -> None:
                tag = f"r{len(rounds)}"
                rounds.append(run_round(server, client, poller, config, nbytes, tag, out))

            benchmark.pedantic(one_round, rounds=PROFILE.rounds(nbytes), iterations=1)
    finally:
        poller.close()

    status = [s for r in rounds for s in r.status_samples]
    figure = Figure(
        f"zmqruntime {config.label}", "e2e", nbytes, _gbps(nbytes, [r.seconds for r in rounds])
    )
    figure.config = config
    figure.transport = config.transport
    figure.client_rss_mib = max(r.client_rss_growth for r in rounds) / MIB
    figure.server_rss_mib = max(r.server_rss_peak for r in rounds) / MIB
    figure.compression_ratio = rounds[0].raw_bytes / max(1, rounds[0].wire_bytes)
    figure.status_ms = (1e3 * percentile(status, 0.5), 1e3 * percentile(status, 0.99), len(status))
    _record(benchmark, figure)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_auto_against_none_interleaved(
    benchmark: Any, servers: dict[str, ServerProcess], transport: str
) -> None:
    nbytes = PROFILE.paired_bytes
    server = servers[transport]
    modes = {mode: EndToEnd("memory", mode, transport, "microscopy") for mode in ("none", "auto")}
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    poller = StatusPoller(server.endpoint)
    try:
        with ExecutionClient(endpoint=server.endpoint, auto_spawn=False, timeout=60) as client:

            def one_pair() -> None:
                for mode, config in modes.items():
                    tag = f"{mode}{len(seconds[mode])}"
                    result = run_round(server, client, poller, config, nbytes, tag)
                    seconds[mode].append(result.seconds)

            benchmark.pedantic(one_pair, rounds=PROFILE.paired_rounds, iterations=1)
    finally:
        poller.close()

    figure = Figure(
        f"auto against none {transport}", "paired", nbytes, _gbps(nbytes, seconds["auto"])
    )
    figure.transport = transport
    figure.reference_gbps = _gbps(nbytes, seconds["none"])
    _record(benchmark, figure)


# ---------------------------------------------------------------- codecs on limited links


def _engine_rounds(
    benchmark: Any, workdir: Path, codec: str, bits_per_s: float | None
) -> tuple[list[StreamRound], int]:
    nbytes = PROFILE.proxy_bytes
    context, pull, endpoint = _bound_pull("tcp", workdir)
    target_port = int(endpoint.rsplit(":", 1)[1])
    rounds: list[StreamRound] = []
    forwarded = 0
    with contextlib.ExitStack() as stack:
        stack.callback(context.term)
        stack.callback(pull.close, 0)
        if bits_per_s is not None:
            proxy = stack.enter_context(ThrottledProxy(target_port, bits_per_s))
            endpoint = f"tcp://127.0.0.1:{proxy.port}"
        spec = SenderSpec("stream", stack_shape(nbytes), endpoint=endpoint, codec=codec)
        sender = stack.enter_context(_peer(spec))
        benchmark.pedantic(
            lambda: rounds.append(receive_engine_stream(pull, sender, lambda s: MemorySink())),
            rounds=1 if PROFILE.name != "full" else 2,
            iterations=1,
        )
        if bits_per_s is not None:
            forwarded = proxy.forwarded_bytes
    return rounds, forwarded


@pytest.mark.parametrize("codec", PROFILE.proxy_codecs)
@pytest.mark.parametrize(
    "bits_per_s",
    [None, *PROFILE.proxy_bits_per_s],
    ids=lambda b: "direct" if b is None else f"{b / 1e9:g}Gbit",
)
def test_codec_on_link(benchmark: Any, workdir: Path, codec: str, bits_per_s: float | None) -> None:
    nbytes = PROFILE.proxy_bytes
    rounds, _ = _engine_rounds(benchmark, workdir, codec, bits_per_s)
    gbps = _gbps(nbytes, [r.seconds for r in rounds])
    link = "loopback" if bits_per_s is None else f"{bits_per_s / 1e9:g} Gbit/s"
    figure = Figure(f"engine {codec} over {link}", "link", nbytes, gbps)
    figure.codec = codec
    figure.link_bits_per_s = bits_per_s
    figure.compression_ratio = rounds[0].raw_bytes / max(1, rounds[0].wire_bytes)
    _record(benchmark, figure)

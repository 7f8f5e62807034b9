"""Command-line interface: ``python -m zmqruntime serve|status|list|cancel|results|shutdown``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from sinks import SinkExistsError

from ._client import ExecutionClient
from ._errors import ZmqRuntimeError
from ._execution import ServerConfig, default_memory_limit
from ._server import ExecutionServer
from ._status import ExecutionState, ExecutionStatus

__all__ = ["main"]

_MIB = 1 << 20

_Number = TypeVar("_Number", int, float)

# GIL switch interval of a server process started by ``serve``, in seconds.
SERVER_SWITCH_INTERVAL = 0.001


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", type=int, default=5555, help="server port on --host (default: %(default)s)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="server address (default: %(default)s)")
    parser.add_argument(
        "--endpoint",
        default=None,
        help="full control endpoint, e.g. ipc:///tmp/zr.sock; overrides "
        "--host and --port (default: tcp://HOST:PORT)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds a request may take, retries included (default: %(default)s)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zmqruntime",
        description="Run a zmqruntime server or talk to one.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run a server in the foreground",
        description="Run a server until Ctrl-C, SIGTERM, a shutdown request or the idle timeout.",
    )
    _add_connection_options(serve)
    serve.add_argument(
        "--workers",
        type=_positive(int),
        default=2,
        help="executions that run at once (default: %(default)s)",
    )
    serve.add_argument(
        "--max-queued",
        type=_positive(int),
        default=1000,
        help="executions that may wait for a worker (default: %(default)s)",
    )
    serve.add_argument(
        "--memory-limit-mib",
        type=_at_least_zero(float),
        default=None,
        help="MiB of retained results kept in memory before spilling to "
        "disk (default: 30%% of physical memory, at least 512)",
    )
    serve.add_argument(
        "--spill-dir",
        default=None,
        help="directory for spill files (default: the system temp directory)",
    )
    serve.add_argument(
        "--retention",
        type=_positive(float),
        default=3600.0,
        help="seconds results stay after their execution ended, unless "
        "released (default: %(default)s)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_at_least_zero(float),
        default=0.0,
        help="seconds without requests or work before the server exits; "
        "0 never exits (default: %(default)s)",
    )
    serve.add_argument(
        "--grace-period",
        type=_at_least_zero(float),
        default=1.0,
        help="seconds a cancelled pipeline gets before SIGTERM, then as long "
        "again at most before SIGKILL (default: %(default)s)",
    )
    serve.add_argument(
        "--window-mib",
        type=_positive(float),
        default=32,
        help="default flow-control window of a fetch, in MiB (default: %(default)s)",
    )
    serve.add_argument(
        "--data-nice",
        type=int,
        default=0,
        help="nice increment of the server's data-path threads, Linux only; 0 leaves "
        "them at the control loop's priority (default: %(default)s)",
    )
    serve.add_argument(
        "--no-shared-memory",
        dest="shared_memory",
        action="store_false",
        help="send every payload over sockets, even between processes of this host "
        "(by default large payloads pass through shared memory on Linux)",
    )
    serve.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)"
    )

    status = commands.add_parser("status", help="print the status of an execution as JSON")
    status.add_argument("exec_id", help="execution id that execute returned")
    _add_connection_options(status)

    listing = commands.add_parser("list", help="list the executions the server knows")
    listing.add_argument(
        "--state",
        action="append",
        default=None,
        choices=[state.value for state in ExecutionState],
        help="only this state; repeat for several (default: all)",
    )
    _add_connection_options(listing)

    cancel = commands.add_parser("cancel", help="cancel an execution")
    cancel.add_argument("exec_id", help="execution id that execute returned")
    _add_connection_options(cancel)

    results = commands.add_parser(
        "results",
        help="fetch an execution's results into a sink",
        description="Fetch results with a progress bar (stderr) and print where they went.",
    )
    results.add_argument("exec_id", help="execution id that execute returned")
    results.add_argument(
        "--sink",
        default="memmap",
        help="memmap, zarr, memory, or a path ending in .npy or .zarr (missing "
        "directories are created); memmap and "
        "zarr write new files named zmqruntime-<result>-<random> in the system "
        "temp directory, memory only prints shape and dtype (default: %(default)s)",
    )
    results.add_argument(
        "--name",
        action="append",
        default=None,
        help="fetch only this result; repeat for several (default: all)",
    )
    results.add_argument(
        "--release",
        action="store_true",
        help="release the results on the server after a complete fetch",
    )
    results.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_connection_options(results)

    shutdown = commands.add_parser("shutdown", help="stop the server")
    _add_connection_options(shutdown)
    return parser


def _endpoint(args: argparse.Namespace) -> str:
    return str(args.endpoint or f"tcp://{args.host}:{args.port}")


def _positive(kind: Callable[[str], _Number]) -> Callable[[str], _Number]:
    """Return an argparse type that parses ``kind`` and requires a value above 0."""
    return _bounded(kind, lambda value: value > 0, "above 0")


def _at_least_zero(kind: Callable[[str], _Number]) -> Callable[[str], _Number]:
    """Return an argparse type that parses ``kind`` and requires a value of 0 or more."""
    return _bounded(kind, lambda value: value >= 0, "0 or more")


def _bounded(
    kind: Callable[[str], _Number], accept: Callable[[_Number], bool], expected: str
) -> Callable[[str], _Number]:
    def parse(text: str) -> _Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text} is invalid: the value must be {expected}")
        return value

    return parse


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = ServerConfig(
        endpoint=_endpoint(args),
        max_workers=args.workers,
        max_queued=args.max_queued,
        memory_limit=(
            default_memory_limit()
            if args.memory_limit_mib is None
            else int(args.memory_limit_mib * _MIB)
        ),
        spill_dir=args.spill_dir,
        retention_seconds=args.retention,
        idle_timeout=args.idle_timeout or None,
        grace_period=args.grace_period,
        kill_after=args.grace_period,
        window_bytes=int(args.window_mib * _MIB),
        data_nice=args.data_nice,
        shared_memory=args.shared_memory,
    )
    # This process is the server alone, so it may tune the interpreter: with
    # the ingest and transfer threads busy, a control request waits for the
    # GIL up to one switch interval per hand-over (5 ms by default).
    sys.setswitchinterval(SERVER_SWITCH_INTERVAL)
    server = ExecutionServer(config)
    server.start()

    def stop(signum: int, frame: Any) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    return 0


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _run_client_command(args: argparse.Namespace) -> int:
    with ExecutionClient(
        endpoint=_endpoint(args), timeout=args.timeout, auto_spawn=False
    ) as client:
        if args.command == "status":
            _print_json(asdict(client.get_status(args.exec_id)))
        elif args.command == "list":
            for status in client.list_executions(args.state):
                print(_list_row(status))
        elif args.command == "cancel":
            outcome = client.cancel(args.exec_id)
            print(outcome.message)
            return 0 if outcome.accepted else 1
        elif args.command == "results":
            _make_npy_parent(args.sink)
            values = client.get_results(
                args.exec_id,
                args.sink,
                names=args.name,
                progress=not args.no_progress,
                release=args.release,
            )
            for name, handle in values.items():
                where = _result_location(handle)
                print(f"{name}: shape {tuple(handle.shape)} dtype {handle.dtype} -> {where}")
        elif args.command == "shutdown":
            client.shutdown()
            print(f"server on {client.endpoint} is stopping")
    return 0


def _list_row(status: ExecutionStatus) -> str:
    submitted = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.submitted_at))
    progress = status.progress
    chunks = f"{progress.chunks_done}/{_or_unknown(progress.chunks_total)} chunks"
    mib = f"{progress.bytes_done / _MIB:.1f}/{_mib_or_unknown(progress.bytes_total)} MiB"
    results = ", ".join(
        f"{name} {list(summary.shape)} {summary.dtype}" for name, summary in status.results.items()
    )
    row = f"{status.exec_id}  {status.state.value:<10}  submitted {submitted}  {chunks}  {mib}"
    return f"{row}  results: {results}" if results else row


def _or_unknown(value: int | None) -> str:
    return "?" if value is None else str(value)


def _mib_or_unknown(value: int | None) -> str:
    return "?" if value is None else f"{value / _MIB:.1f}"


def _make_npy_parent(sink: str) -> None:
    # A zarr store creates its own directories, so a .npy path gets the same.
    path = Path(sink)
    if path.suffix.lower() == ".npy":
        path.parent.mkdir(parents=True, exist_ok=True)


def _result_location(handle: Any) -> str:
    # A memmap has its file name. A zarr array has its store and its own
    # path inside it, because the group's path alone does not name the array.
    # Both are printed absolute, so the line names the same place from any
    # working directory.
    filename = getattr(handle, "filename", None)
    if filename:
        return str(filename)
    store_path = getattr(handle, "store_path", None)
    if store_path is None:
        return "memory"
    root = getattr(store_path.store, "root", None)
    if root is None:
        return str(store_path)
    root = Path(root).resolve()
    return str(root / store_path.path) if store_path.path else str(root)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            return _serve(args)
        except (ZmqRuntimeError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        return _run_client_command(args)
    except SinkExistsError as exc:
        # The sink's own advice (overwrite=True) is for Python callers.
        print(f"error: {exc}", file=sys.stderr)
        print(
            "the results command never replaces a file or store: pass --sink with a new "
            "path, or remove the existing one first",
            file=sys.stderr,
        )
        return 1
    except (ZmqRuntimeError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

"""The screening job: submit the pipeline, stream its results into OME-Zarr, report.

:func:`run_job` checks the config on this side first (so a bad option or an
unreadable input fails at once with an :class:`InputError`), then submits
``zmqruntime.demo.screening:pipeline`` to a zmqruntime server (started on
127.0.0.1 when none replies), fetches the results while the run goes on,
writes images and labels into an OME-Zarr store and the measurement tables to
CSV, renders a preview montage and returns a :class:`JobReport`. The
execution's results are released on the server once the job is done with
them, whether it completed, failed or was interrupted. With
``in_process=True`` the same pipeline runs in this process instead, with the
same outputs.

A server that the job started is stopped at the end unless
``JobOptions.keep_server`` is set or another execution is on it.

Ctrl-C (KeyboardInterrupt) cancels the execution: the store keeps every
image already written, its root attributes record
``complete: false``, the measurements received so far go to CSV, and
:class:`JobInterrupted` carries the partial report.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sinks import ArraySpec, Sink
from zmqruntime import (
    CancelResult,
    ExecutionClient,
    ExecutionState,
    TransportError,
    ZmqRuntimeError,
    ZmqTimeoutError,
)
from zmqruntime.demo._local import LocalContext, TableSink, run_local
from zmqruntime.demo._omezarr import OmeZarrWriter
from zmqruntime.demo._preview import write_preview
from zmqruntime.demo.screening import check_config

__all__ = [
    "PIPELINE",
    "JobInterrupted",
    "JobOptions",
    "JobReport",
    "PortInUseError",
    "run_job",
    "write_table_csv",
]

logger = logging.getLogger(__name__)

PIPELINE = "zmqruntime.demo.screening:pipeline"

# Seconds to wait for a ping reply on a port that something listens on,
# before deciding that it is not a zmqruntime server.
PING_TIMEOUT = 2.0

# Seconds each clean-up request (cancel, release) may take, so an
# unresponsive server delays the exit by seconds, not minutes.
CLEANUP_TIMEOUT = 5.0

# Files the job writes beside the store. They are removed with an old store of
# this job, so an interrupted run never leaves the previous run's tables behind.
EXTRA_OUTPUTS = ("fields.csv", "objects.csv", "preview.png")


class PortInUseError(TransportError):
    """The server port is in use by a program that does not reply to a zmqruntime ping."""


@dataclass
class JobOptions:
    """What to run and where to put the output.

    Attributes
    ----------
    config:
        The pipeline config (see :mod:`zmqruntime.demo.screening`).
    output:
        Output directory. The store, tables and preview go inside it.
    in_process:
        Run the pipeline in this process instead of on a server.
    port:
        TCP port of the server on 127.0.0.1; one is started if none replies.
    overwrite:
        Replace an existing store even if zmqruntime did not write it.
    progress:
        Show a tqdm progress bar on stderr.
    preview:
        Write ``preview.png``.
    keep_server:
        Leave a server that this job started running after the job. By
        default the job stops it, once no other execution is on it.
    """

    config: dict[str, Any] = field(default_factory=dict)
    output: Path = Path("screening-output")
    in_process: bool = False
    port: int = 5555
    overwrite: bool = False
    progress: bool = True
    preview: bool = True
    keep_server: bool = False


@dataclass
class JobReport:
    """Outcome of one job: what was written where, and how fast.

    ``status`` is ``"completed"``, ``"cancelled"`` (Ctrl-C cancelled the
    execution) or ``"interrupted"`` (Ctrl-C stopped the fetch, but the
    execution had already ended on the server or the cancel request failed).
    ``tables_partial`` is True when the tables hold only the measurements
    received before Ctrl-C. ``notes`` explain an interrupted run.
    """

    status: str
    execution_id: str
    store: Path
    images_expected: int
    images_written: int
    channels: list[str]
    bytes_written: int
    seconds: float
    objects: int = 0
    fields_csv: Path | None = None
    objects_csv: Path | None = None
    preview: Path | None = None
    error: str | None = None
    fields: npt.NDArray[Any] | None = None
    object_table: npt.NDArray[Any] | None = None
    tables_partial: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Return the multi-line summary printed at the end of a run."""
        planes = self.images_written * max(1, len(self.channels))
        rate = self.images_written / self.seconds if self.seconds > 0 else 0.0
        megabytes = self.bytes_written / 1e6
        lines = [
            f"Screening run {self.status} (execution {self.execution_id})",
            f"  images      {self.images_written} of {self.images_expected} fields, "
            f"{planes} planes ({', '.join(self.channels)})",
            f"  objects     {self._objects_text()}",
            f"  data        {megabytes:.1f} MB of images and labels written",
            f"  time        {self.seconds:.1f} s, {rate:.1f} images/s, "
            f"{megabytes / self.seconds if self.seconds > 0 else 0.0:.1f} MB/s",
            f"  store       {self.store}",
            f"  tables      {self._tables_text()}",
        ]
        if self.preview is not None:
            lines.append(f"  preview     {self.preview}")
        if self.error:
            lines.append(f"  error       {self.error}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)

    def _objects_text(self) -> str:
        if self.fields is None:
            return "none measured"
        if self.tables_partial:
            return f"{self.objects} nuclei in the {self.fields.shape[0]} images measured so far"
        return f"{self.objects} nuclei"

    def _tables_text(self) -> str:
        if self.fields_csv is None:
            return "none written: no measurements arrived before the run stopped"
        text = f"{self.fields_csv}, {self.objects_csv}"
        if self.tables_partial and self.fields is not None:
            text += f" (partial: {self.fields.shape[0]} of {self.images_expected} images)"
        return text


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the job after it cleaned up; :attr:`report` describes what was written."""

    def __init__(self, report: JobReport) -> None:
        super().__init__(f"screening run {report.status}")
        self.report = report


def write_table_csv(table: npt.NDArray[Any], path: Path, channels: list[str]) -> Path:
    """Write a structured array as CSV; a per-channel field ``f`` becomes ``f_<channel>``."""
    assert table.dtype.names is not None, "write_table_csv needs a structured array"
    header: list[str] = []
    for name in table.dtype.names:
        if table.dtype[name].shape:
            header += [f"{name}_{channel}" for channel in channels]
        else:
            header.append(name)

    with path.open("w", newline="") as stream:
        out = csv.writer(stream)
        out.writerow(header)
        for row in table:
            values: list[Any] = []
            for name in table.dtype.names:
                value = row[name]
                values += [v.item() for v in value] if np.ndim(value) else [value.item()]
            out.writerow(values)
    return path


def _prepare_output(options: JobOptions, store: Path) -> None:
    """Delete an old store at ``store`` (and its tables and preview) when allowed.

    Allowed when this package wrote the store or the user passed overwrite.
    """
    if not store.exists():
        return
    root = store / "zarr.json"
    written_by_us = False
    if root.is_file():
        try:
            written_by_us = "zmqruntime" in json.loads(root.read_text()).get("attributes", {})
        except (OSError, ValueError):
            written_by_us = False
    if not (written_by_us or options.overwrite):
        raise FileExistsError(
            f"{store} exists and was not written by this job; pass --overwrite to replace it "
            "or choose another --output directory"
        )
    shutil.rmtree(store)
    for name in EXTRA_OUTPUTS:
        (store.parent / name).unlink(missing_ok=True)


def _store_name(config: Mapping[str, Any]) -> str:
    source = config.get("input")
    if source is None:
        return "plate.ome.zarr"
    return f"{Path(str(source)).stem or 'stack'}.ome.zarr"


class _Router:
    """Chooses a sink per result: images and labels to the store, tables to memory.

    Called with the result's name (as the client's ``sink=`` factories are)
    or with its :class:`~sinks.ArraySpec` (as :class:`LocalContext` does).
    Keeps the table sinks so an interrupted run can still save what arrived.
    """

    def __init__(self, writer: OmeZarrWriter) -> None:
        self.writer = writer
        self.tables: dict[str, TableSink] = {}

    def __call__(self, result: str | ArraySpec) -> Sink:
        name = result if isinstance(result, str) else result.name
        if name in ("images", "labels"):
            return self.writer.sink(name)
        sink = TableSink()
        self.tables[name] = sink
        return sink

    def received_tables(self) -> dict[str, npt.NDArray[Any]]:
        """Return the rows of each table received so far (see :meth:`TableSink.received`)."""
        received = {name: sink.received() for name, sink in self.tables.items()}
        return {name: rows for name, rows in received.items() if rows is not None}


@dataclass
class _ServerRun:
    """State the job learned from the server, read after an interruption."""

    execution_id: str | None = None
    cancel: CancelResult | None = None
    cancel_error: str | None = None
    released: bool = False


def _progress_bar(enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=None, unit="image", desc="screening", disable=not enabled, leave=True)


def _port_is_free(port: int) -> bool:
    """Return whether nothing listens on 127.0.0.1:``port``, by binding it as ZeroMQ would."""
    with socket.socket() as probe:
        # ZeroMQ sets SO_REUSEADDR, so a port with connections in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise TransportError(
                f"cannot use port {port} on 127.0.0.1 ({exc}); pass a --port from 1024 to 65535"
            ) from exc
    return True


def _open_client(port: int) -> tuple[ExecutionClient, bool]:
    """Return a client for the server on 127.0.0.1:``port``, and whether this job starts it.

    The client starts a server when the port is free, on its first request.

    Raises
    ------
    PortInUseError
        Another program listens on the port, so a server could not bind it.
    """
    endpoint = f"tcp://127.0.0.1:{port}"
    if not _port_is_free(port):
        probe = ExecutionClient(port=port, auto_spawn=False, timeout=PING_TIMEOUT, retries=0)
        try:
            probe.ping()
        except ZmqTimeoutError:
            raise PortInUseError(
                f"port {port} is in use by a program that is not a zmqruntime server "
                f"(no reply to a ping on {endpoint} within {PING_TIMEOUT} s); "
                "pass another --port or stop that program"
            ) from None
        finally:
            probe.close()
        return ExecutionClient(port=port), False
    return ExecutionClient(port=port), True


def _run_in_process(
    options: JobOptions, router: _Router, started: Callable[[str], None]
) -> dict[str, Any]:
    from zmqruntime.demo.screening import pipeline

    context = LocalContext(router, execution_id="in-process")
    started(context.execution_id)
    results, _ = run_local(pipeline, options.config, context)
    return results


def _run_on_server(
    options: JobOptions, router: _Router, started: Callable[[str], None], run: _ServerRun
) -> dict[str, Any]:
    """Submit the job, fetch its results, and always release them on the server.

    On any exception but a timeout (the server no longer answers) the
    execution is cancelled first; ``run`` records the cancel outcome.
    """
    client, starts_server = _open_client(options.port)
    reachable = True
    try:
        # NOTE: a Ctrl-C while execute() waits for its reply may leave an
        # execution running on the server whose id this job never learned.
        execution_id = str(client.execute(PIPELINE, options.config))
        run.execution_id = execution_id
        try:
            started(execution_id)
            return dict(client.get_results(execution_id, sink=router))
        except BaseException as exc:
            reachable = not isinstance(exc, ZmqTimeoutError)
            if reachable:
                _cancel(client, run)
            raise
        finally:
            if reachable:
                run.released = _release(client, execution_id)
    finally:
        if starts_server and reachable and run.execution_id and not options.keep_server:
            _stop_own_server(client, run.execution_id)
        client.close()


def _stop_own_server(client: ExecutionClient, execution_id: str) -> None:
    """Stop the server this job started, unless it has a record of another execution.

    Another program may have submitted work to the server while the job ran.
    A shutdown would cancel that work and drop its results, so in that case
    the server keeps running and exits after its idle timeout.
    """
    try:
        executions = client.list_executions(timeout=CLEANUP_TIMEOUT)
        others = [status for status in executions if status.exec_id != execution_id]
        if others:
            logger.info(
                "not stopping the server on %s: it has %d other execution(s)",
                client.endpoint,
                len(others),
            )
            return
        client.shutdown(timeout=CLEANUP_TIMEOUT)
    except ZmqRuntimeError as exc:
        logger.warning("could not stop the server this job started on %s: %s", client.endpoint, exc)


def _cancel(client: ExecutionClient, run: _ServerRun) -> None:
    assert run.execution_id is not None
    logger.info("cancelling execution %s", run.execution_id)
    try:
        run.cancel = client.cancel(run.execution_id, timeout=CLEANUP_TIMEOUT)
    except ZmqRuntimeError as exc:
        run.cancel_error = str(exc)
        logger.warning("could not cancel execution %s: %s", run.execution_id, exc)


def _release(client: ExecutionClient, execution_id: str) -> bool:
    try:
        client.release(execution_id, timeout=CLEANUP_TIMEOUT)
    except ZmqRuntimeError as exc:
        logger.warning(
            "could not release the results of execution %s on %s: %s; the server frees "
            "them when they expire",
            execution_id,
            client.endpoint,
            exc,
        )
        return False
    logger.info("released the results of execution %s on %s", execution_id, client.endpoint)
    return True


def _describe_interruption(in_process: bool, run: _ServerRun) -> tuple[str, list[str]]:
    """Return the report status and the explanation lines for a run stopped by Ctrl-C.

    The status is ``"cancelled"`` only when the execution was really cancelled
    or never started. It is ``"interrupted"`` when the execution had already
    ended on the server or the cancel request failed.
    """
    kept = "The store is kept and marked incomplete."
    if in_process:
        return "cancelled", [f"The pipeline stopped between two images. {kept}"]
    if run.execution_id is None:
        return "cancelled", ["Ctrl-C arrived before the job reached the server; nothing ran."]

    released = " Its results on the server were released." if run.released else ""
    if run.cancel is None:
        reason = run.cancel_error or "no cancel request was sent"
        return "interrupted", [
            f"The cancel request failed ({reason}); the execution may still be running "
            f"on the server. {kept}"
        ]
    if run.cancel.accepted or run.cancel.state in (
        ExecutionState.CANCELLING,
        ExecutionState.CANCELLED,
    ):
        return "cancelled", [
            f"The execution was cancelled; the server is still running.{released} {kept}"
        ]
    return "interrupted", [
        f"The execution had already {run.cancel.state.value} on the server when Ctrl-C "
        f"arrived, so there was nothing to cancel.{released} The fetch stopped early. {kept}"
    ]


def run_job(options: JobOptions) -> JobReport:
    """Run the screening job (see the module docstring) and return its report.

    Raises
    ------
    InputError
        An option is out of range or the input cannot be read; nothing was
        submitted and no output was touched.
    FileExistsError
        The output store exists and was not written by this job.
    PortInUseError
        Another program uses the server port.
    JobInterrupted
        Ctrl-C stopped the run; the store is marked incomplete and the partial
        report is attached.
    """
    check_config(options.config)
    output = options.output.expanduser().resolve()
    store = output / _store_name(options.config)
    _prepare_output(options, store)
    output.mkdir(parents=True, exist_ok=True)

    writer = OmeZarrWriter(store, name=store.name.removesuffix(".ome.zarr"))
    router = _Router(writer)
    server = _ServerRun()
    bar = _progress_bar(options.progress)

    def on_image(index: int) -> None:
        if bar.total is None:
            bar.reset(total=writer.count)
        bar.update(1)

    def started(execution_id: str) -> None:
        writer.execution_id = execution_id
        bar.set_postfix_str(f"execution {execution_id}")

    writer.on_image = on_image
    begin = time.perf_counter()
    try:
        if options.in_process:
            results = _run_in_process(options, router, started)
        else:
            results = _run_on_server(options, router, started, server)
    except KeyboardInterrupt as interrupt:
        status, notes = _describe_interruption(options.in_process, server)
        writer.mark(f"stopped by the user (Ctrl-C); run {status}")
        bar.close()
        report = _report(status, writer, begin, options, router.received_tables(), partial=True)
        report.notes = notes
        raise JobInterrupted(report) from interrupt
    except BaseException as exc:
        # The sinks were aborted with the reason already when the stream
        # reached them; this covers failures before or between results.
        writer.mark(f"{type(exc).__name__}: {exc}")
        bar.close()
        raise
    bar.close()
    return _report("completed", writer, begin, options, results, partial=False)


def _report(
    status: str,
    writer: OmeZarrWriter,
    begin: float,
    options: JobOptions,
    tables: Mapping[str, Any],
    *,
    partial: bool,
) -> JobReport:
    """Build the report and write the tables (when any row arrived) and the preview."""
    output = writer.path.parent
    report = JobReport(
        status=status,
        execution_id=writer.execution_id or "in-process",
        store=writer.path,
        images_expected=writer.count,
        images_written=writer.images_written,
        channels=writer.channels,
        bytes_written=writer.bytes_written,
        seconds=time.perf_counter() - begin,
        tables_partial=partial,
    )
    fields = tables.get("fields")
    objects = tables.get("objects")
    if isinstance(fields, np.ndarray) and isinstance(objects, np.ndarray):
        report.fields, report.object_table = fields, objects
        report.objects = int(objects.shape[0])
        if fields.shape[0]:
            report.fields_csv = write_table_csv(fields, output / "fields.csv", writer.channels)
            report.objects_csv = write_table_csv(objects, output / "objects.csv", writer.channels)
    if options.preview and writer.images_written:
        report.preview = write_preview(writer, output / "preview.png")
    return report

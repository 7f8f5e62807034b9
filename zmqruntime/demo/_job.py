"""The screening job: submit the pipeline, stream its results into OME-Zarr, report.

:func:`run_job` submits ``zmqruntime.demo.screening:pipeline`` to a zmqruntime
server (started on 127.0.0.1 when none replies), fetches the results while
the run goes on, writes images and labels into an OME-Zarr store and the
measurement tables to CSV, renders a preview montage and returns a
:class:`JobReport`. With ``in_process=True`` the same pipeline runs in this
process instead, with the same outputs.

Ctrl-C (KeyboardInterrupt) cancels the execution: the server keeps running,
the store keeps every image already written and its root attributes say
``complete: false``.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sinks import ArraySpec, Sink
from zmqruntime.demo._local import LocalContext, TableSink, run_local
from zmqruntime.demo._omezarr import OmeZarrWriter
from zmqruntime.demo._preview import write_preview

__all__ = ["PIPELINE", "JobOptions", "JobReport", "run_job", "write_table_csv"]

logger = logging.getLogger(__name__)

PIPELINE = "zmqruntime.demo.screening:pipeline"


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
    """

    config: dict[str, Any] = field(default_factory=dict)
    output: Path = Path("screening-output")
    in_process: bool = False
    port: int = 5555
    overwrite: bool = False
    progress: bool = True
    preview: bool = True


@dataclass
class JobReport:
    """Outcome of one job: what was written where, and how fast."""

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

    def summary(self) -> str:
        """Return the multi-line summary printed at the end of a run."""
        planes = self.images_written * max(1, len(self.channels))
        rate = self.images_written / self.seconds if self.seconds > 0 else 0.0
        megabytes = self.bytes_written / 1e6
        lines = [
            f"Screening run {self.status} (execution {self.execution_id})",
            f"  images      {self.images_written} of {self.images_expected} fields, "
            f"{planes} planes ({', '.join(self.channels)})",
            f"  objects     {self.objects} nuclei",
            f"  data        {megabytes:.1f} MB of images and labels written",
            f"  time        {self.seconds:.1f} s, {rate:.1f} images/s, "
            f"{megabytes / self.seconds if self.seconds > 0 else 0.0:.1f} MB/s",
            f"  store       {self.store}",
        ]
        if self.fields_csv is not None:
            lines.append(f"  tables      {self.fields_csv}, {self.objects_csv}")
        if self.preview is not None:
            lines.append(f"  preview     {self.preview}")
        if self.error:
            lines.append(f"  error       {self.error}")
        return "\n".join(lines)


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
    """Delete an old store at ``store`` when this package wrote it or the user allows it."""
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


def _store_name(config: Mapping[str, Any]) -> str:
    source = config.get("input")
    if source is None:
        return "plate.ome.zarr"
    return f"{Path(str(source)).stem or 'stack'}.ome.zarr"


class _Router:
    """Chooses a sink per result: images and labels to the store, tables to memory.

    Called with the result's name (as the client's ``sink=`` factories are)
    or with its :class:`~sinks.ArraySpec` (as :class:`LocalContext` does).
    """

    def __init__(self, writer: OmeZarrWriter) -> None:
        self.writer = writer

    def __call__(self, result: str | ArraySpec) -> Sink:
        name = result if isinstance(result, str) else result.name
        if name in ("images", "labels"):
            return self.writer.sink(name)
        return TableSink()


def _progress_bar(enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=None, unit="image", desc="screening", disable=not enabled, leave=True)


def _run_in_process(
    options: JobOptions, router: _Router, started: Callable[[str], None]
) -> dict[str, Any]:
    from zmqruntime.demo.screening import pipeline

    context = LocalContext(router, execution_id="in-process")
    started(context.execution_id)
    results, _ = run_local(pipeline, options.config, context)
    return results


def _run_on_server(
    options: JobOptions, router: _Router, started: Callable[[str], None]
) -> dict[str, Any]:
    from zmqruntime import ExecutionClient

    client = ExecutionClient(port=options.port)
    try:
        execution_id = str(client.execute(PIPELINE, options.config))
        started(execution_id)
        try:
            results = dict(client.get_results(execution_id, sink=router))
        except KeyboardInterrupt:
            logger.info("cancelling execution %s after Ctrl-C", execution_id)
            client.cancel(execution_id)
            raise
        return results
    finally:
        client.close()


def run_job(options: JobOptions) -> JobReport:
    """Run the screening job (see the module docstring) and return its report.

    Raises KeyboardInterrupt again after a Ctrl-C has cancelled the execution
    and marked the store incomplete; the partial report is attached to it as
    ``report``.
    """
    output = options.output.expanduser().resolve()
    store = output / _store_name(options.config)
    _prepare_output(options, store)
    output.mkdir(parents=True, exist_ok=True)

    writer = OmeZarrWriter(store, name=store.name.removesuffix(".ome.zarr"))
    router = _Router(writer)
    bar = _progress_bar(options.progress)

    def on_image(index: int) -> None:
        if bar.total is None:
            bar.reset(total=writer.count)
        bar.update(1)

    writer.on_image = on_image

    def started(execution_id: str) -> None:
        writer.execution_id = execution_id
        bar.set_postfix_str(f"execution {execution_id}")

    begin = time.perf_counter()
    run = _run_in_process if options.in_process else _run_on_server
    try:
        results = run(options, router, started)
    except KeyboardInterrupt as interrupt:
        reason = "cancelled by the user (Ctrl-C)"
        writer.mark(reason)
        bar.close()
        interrupt.report = _report(  # type: ignore[attr-defined]
            "cancelled", writer, begin, options, {}, reason
        )
        raise
    except BaseException as exc:
        # The sinks were aborted with the reason already when the stream
        # reached them; this covers failures before or between results.
        writer.mark(f"{type(exc).__name__}: {exc}")
        bar.close()
        raise
    bar.close()
    return _report("completed", writer, begin, options, results, None)


def _report(
    status: str,
    writer: OmeZarrWriter,
    begin: float,
    options: JobOptions,
    results: Mapping[str, Any],
    error: str | None,
) -> JobReport:
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
        error=error,
    )
    fields = results.get("fields")
    objects = results.get("objects")
    if isinstance(fields, np.ndarray) and isinstance(objects, np.ndarray):
        report.fields, report.object_table = fields, objects
        report.objects = int(objects.shape[0])
        report.fields_csv = write_table_csv(fields, output / "fields.csv", writer.channels)
        report.objects_csv = write_table_csv(objects, output / "objects.csv", writer.channels)
    if options.preview and writer.images_written:
        report.preview = write_preview(writer, output / "preview.png")
    return report

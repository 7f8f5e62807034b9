"""End-to-end tests of the screening job: in-process, through a real server, and Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05.hcs import HCS, HCSAttrs
from ome_zarr_models.v05.image import Image

from zmqruntime.demo import PIPELINE, JobOptions, run_job
from zmqruntime.demo.__main__ import main

ROOT = Path(__file__).resolve().parents[2]

SMALL_PLATE = {"rows": 2, "columns": 3, "fields": 2, "image_size": 96, "seed": 5}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(**plate: Any) -> dict[str, Any]:
    return {"plate": {**SMALL_PLATE, **plate}, "min_area": 15}


def _root_status(store: Path) -> dict[str, Any]:
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    return dict(attrs["zmqruntime"])


@pytest.fixture
def server_port() -> Iterator[int]:
    """A port for an auto-spawned server; the server is shut down afterwards."""
    from zmqruntime import ExecutionClient, ZmqTimeoutError

    port = _free_port()
    yield port
    # A test that failed early may have started no server: nothing to stop then.
    with (
        ExecutionClient(port=port, auto_spawn=False, timeout=5) as client,
        contextlib.suppress(ZmqTimeoutError),
    ):
        client.shutdown()


def test_job_in_process_small_plate(tmp_path: Path) -> None:
    report = run_job(JobOptions(config=_config(), output=tmp_path, in_process=True, progress=False))

    assert report.status == "completed"
    assert report.images_written == 12
    assert report.fields is not None
    assert report.fields.shape == (12,)
    assert report.objects == int(report.fields["count"].sum())
    assert _root_status(report.store)["complete"] is True
    assert report.preview is not None
    assert report.preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    HCS.from_zarr(zarr.open_group(report.store, mode="r"))


def test_job_tables_written_as_csv(tmp_path: Path) -> None:
    report = run_job(JobOptions(config=_config(), output=tmp_path, in_process=True, progress=False))
    assert report.fields_csv is not None
    lines = report.fields_csv.read_text().splitlines()
    assert lines[0].startswith("image,well,field,count")
    assert "mean_intensity_DAB" in lines[0]
    assert len(lines) == 13


def test_job_rerun_replaces_own_store(tmp_path: Path) -> None:
    options = JobOptions(config=_config(), output=tmp_path, in_process=True, progress=False)
    run_job(options)
    report = run_job(options)
    assert report.status == "completed"


def test_job_on_server_matches_in_process(tmp_path: Path, server_port: int) -> None:
    served = run_job(
        JobOptions(config=_config(), output=tmp_path / "served", port=server_port, progress=False)
    )
    local = run_job(
        JobOptions(config=_config(), output=tmp_path / "local", in_process=True, progress=False)
    )

    assert served.status == "completed"
    assert served.execution_id != "in-process"
    assert served.fields is not None and local.fields is not None
    assert served.object_table is not None and local.object_table is not None
    assert np.array_equal(served.fields, local.fields)
    assert np.array_equal(served.object_table, local.object_table)

    for path in ("A/1/0/0", "B/3/1/0", "B/2/0/labels/nuclei/0"):
        remote = zarr.open_array(served.store / path, mode="r")[:]
        direct = zarr.open_array(local.store / path, mode="r")[:]
        assert np.array_equal(remote, direct), path
    assert _root_status(served.store)["execution_id"] == served.execution_id


def test_job_on_server_releases_results(tmp_path: Path, server_port: int) -> None:
    from zmqruntime import ExecutionClient

    options = JobOptions(
        config=_config(), output=tmp_path, port=server_port, progress=False, keep_server=True
    )
    report = run_job(options)

    with ExecutionClient(port=server_port, auto_spawn=False, timeout=5) as client:
        # False: the job released the results already, so none were left.
        assert client.release(report.execution_id) is False


def _server_gone(port: int, timeout: float) -> bool:
    """Return whether the server on ``port`` stops replying to pings within ``timeout`` seconds."""
    from zmqruntime import ExecutionClient, ZmqTimeoutError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with ExecutionClient(port=port, auto_spawn=False, timeout=0.5, retries=0) as client:
            try:
                client.ping()
            except ZmqTimeoutError:
                return True
        time.sleep(0.1)
    return False


def test_job_stops_server_it_started(tmp_path: Path, server_port: int) -> None:
    report = run_job(
        JobOptions(config=_config(), output=tmp_path, port=server_port, progress=False)
    )

    assert report.status == "completed"
    assert _server_gone(server_port, timeout=10)


def test_job_keeps_existing_server(tmp_path: Path, server_port: int) -> None:
    from zmqruntime import ExecutionClient

    with ExecutionClient(port=server_port, timeout=10) as client:
        pid = client.ping()["pid"]
        run_job(JobOptions(config=_config(), output=tmp_path, port=server_port, progress=False))
        assert client.ping()["pid"] == pid


def test_stop_own_server_other_execution(server_port: int) -> None:
    from zmqruntime import ExecutionClient
    from zmqruntime.demo._job import _stop_own_server

    with ExecutionClient(port=server_port, timeout=10) as client:
        other = client.execute(PIPELINE, _config(rows=1, columns=1, fields=1))
        _stop_own_server(client, execution_id="not-" + other)
        assert client.get_status(other).exec_id == other


def _wait_for_root_status(store: Path, process: subprocess.Popen[str], images: int) -> None:
    """Wait until the store's root records ``images`` written images, or fail."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the job exited before it was interrupted"
        with contextlib.suppress(OSError, KeyError, ValueError):
            if _root_status(store).get("images_written", 0) >= images:
                return
        time.sleep(0.02)
    pytest.fail(f"{store} recorded fewer than {images} images within 60 s")


def test_job_ctrl_c_cancels_and_marks_store(tmp_path: Path, server_port: int) -> None:
    from zmqruntime import ExecutionClient

    # 384 fields of 384 x 384 pixels take the server about 30 ms each, so
    # after the first few images it still needs seconds and the interrupt
    # arrives while it runs. The status check below fails the test otherwise.
    command = [
        sys.executable, "-m", "zmqruntime.demo", "--port", str(server_port),
        "--rows", "8", "--columns", "12", "--fields", "4", "--image-size", "384",
        "--output", str(tmp_path), "--quiet", "--no-preview", "--keep-server",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    store = tmp_path / "plate.ome.zarr"
    try:
        # The root records a second count only after the first, and only once
        # images and tables of the first images have arrived.
        _wait_for_root_status(store, process, images=2)
        execution_id = _root_status(store)["execution_id"]
        with ExecutionClient(port=server_port, auto_spawn=False, timeout=5) as client:
            before = client.get_status(execution_id)
        assert before.state == "running"
        assert before.progress.done is not None and before.progress.done < 300
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 130, stderr
    assert "Screening run cancelled" in stdout
    assert "partial:" in stdout
    status = _root_status(store)
    assert status["complete"] is False
    assert status["status"] == "incomplete"
    assert 2 <= status["images_written"] < 384
    # Validating the whole 384-field plate with HCS.from_zarr takes about 18 s,
    # so this checks the plate metadata, a written field and an unwritten one.
    root = json.loads((store / "zarr.json").read_text())["attributes"]
    HCSAttrs.model_validate(root["ome"])
    for field_path in ("A/1/0", "H/12/3"):
        Image.from_zarr(zarr.open_group(store / field_path, mode="r"))
    fields_rows = (tmp_path / "fields.csv").read_text().splitlines()[1:]
    assert len(fields_rows) >= 1

    # The server is still up, the execution ends as cancelled (it may still be
    # "cancelling" for a moment after the job exits) and its results are released.
    with ExecutionClient(port=server_port, auto_spawn=False, timeout=5) as client:
        assert client.ping()["pid"] != os.getpid()
        final = client.wait(execution_id, timeout=10)
        released_again = client.release(execution_id)
    assert final.state == "cancelled"
    assert released_again is False


def test_interruption_after_server_completed(tmp_path: Path, server_port: int) -> None:
    from zmqruntime import ExecutionClient
    from zmqruntime.demo._job import _describe_interruption, _ServerRun

    # A real cancel reply for an execution that had already completed.
    with ExecutionClient(port=server_port, timeout=10) as client:
        execution_id = client.execute(PIPELINE, _config(rows=1, columns=1, fields=1))
        client.wait(execution_id, timeout=30)
        cancel = client.cancel(execution_id)
    run = _ServerRun(execution_id=execution_id, cancel=cancel, released=True)

    status, notes = _describe_interruption(False, run)

    assert status == "interrupted"
    assert "had already completed" in notes[0]
    assert "cancelled" not in notes[0]


def test_interruption_cancel_failed() -> None:
    from zmqruntime.demo._job import _describe_interruption, _ServerRun

    run = _ServerRun(execution_id="abc", cancel_error="no reply within 5 s")
    status, notes = _describe_interruption(False, run)
    assert status == "interrupted"
    assert "may still be running" in notes[0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--input", "missing.tif"], "not found"),
        (["--input", "empty"], "no .tif or .tiff files"),
        (["--input", "line.npy"], "has shape (10,)"),
        (["--input", "text.tif"], "cannot read"),
        (["--rows", "27"], "--rows"),
        (["--columns", "49"], "--columns"),
        (["--image-size", "600"], "--image-size"),
        (["--fields", "0"], "--fields"),
        (["--segment-channel", "5"], "choose 0 to 1"),
        (["--pixel-size", "0"], "--pixel-size"),
        (["--pixel-size", "-0.5"], "--pixel-size"),
        (["--min-area", "-1"], "--min-area"),
        (["--background-size", "2"], "--background-size"),
    ],
)
def test_main_rejects_bad_option_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    arguments: list[str],
    message: str,
) -> None:
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "line.npy", np.arange(10))
    (tmp_path / "text.tif").write_text("not a TIFF")
    monkeypatch.chdir(tmp_path)
    port = _free_port()

    code = main(["--port", str(port), "--output", "out", "--quiet", *arguments])

    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1, error
    assert error.startswith("error: ")
    assert message in error
    # The check ran before any server was started on the port.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_main_port_held_by_other_program(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        code = main(["--port", str(port), "--output", str(tmp_path), "--quiet"])

    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1, error
    assert f"tcp://127.0.0.1:{port}" in error


def test_table_sink_received_rows_in_order() -> None:
    from sinks import ArraySpec, Region
    from zmqruntime.demo import TableSink

    sink = TableSink()
    sink.open(ArraySpec("fields", (5,), np.dtype("<u4"), (1,), {}))
    sink.write(Region((2,), (3,)), np.array([20], "<u4"))
    sink.write(Region((0,), (2,)), np.array([0, 10], "<u4"))
    sink.abort("cancelled")

    received = sink.received()
    assert received is not None
    assert received.tolist() == [0, 10, 20]
    assert sink.abort_reason == "cancelled"


def test_main_input_error_on_server_releases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server_port: int
) -> None:
    import tifffile

    from zmqruntime import ExecutionClient

    # The client checks only the first image, so the server finds the second.
    folder = tmp_path / "tiffs"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", np.zeros((32, 32), np.uint16))
    tifffile.imwrite(folder / "b.tif", np.zeros((32, 40), np.uint16))
    output = tmp_path / "out"

    code = main(
        [
            "--port",
            str(server_port),
            "--input",
            str(folder),
            "--output",
            str(output),
            "--keep-server",
        ]
    )

    error = capsys.readouterr().err
    assert code == 2
    assert error.splitlines()[-1].startswith("error: ")
    assert "b.tif" in error.splitlines()[-1]
    assert "Traceback" not in error
    with ExecutionClient(port=server_port, auto_spawn=False, timeout=5) as client:
        (execution,) = client.list_executions()
        assert execution.state == "failed"
        assert client.release(execution.exec_id) is False
    status = _root_status(output / "tiffs.ome.zarr")
    assert status["complete"] is False

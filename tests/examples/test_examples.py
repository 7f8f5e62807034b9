"""Each example in examples/ runs to the end against its own server on a free port."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an example on a free port and return the finished process."""
    command = [sys.executable, str(EXAMPLES / script), "--port", str(_free_port()), *args]
    # The project may not be installed: make the checkout importable as well.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)


def _run(script: str, *args: str) -> str:
    """Run an example with its own server, which it shuts down; return its stdout."""
    done = _start(script, *args, "--shutdown")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quickstart_fills_three_sinks(tmp_path: Path) -> None:
    out = _run("quickstart.py", "--output", str(tmp_path))
    assert "finished: completed" in out
    assert "memmap:" in out and "equal=True" in out
    assert np.load(tmp_path / "stack.npy", mmap_mode="r").shape == (20, 128, 128)
    assert "zarr:   " in out
    assert out.count("equal=True") == 2


def test_tiff_to_zarr_copies_pages(tmp_path: Path) -> None:
    tiff, store = tmp_path / "sample.tif", tmp_path / "sample.zarr"
    _run("tiff_to_zarr.py", str(tiff), str(store), "--make-sample")
    copied = zarr.open_array(store, mode="r")[:]
    assert np.array_equal(copied, tifffile.imread(tiff))


def test_tiff_to_zarr_default_output_path(tmp_path: Path) -> None:
    tiff = tmp_path / "sample.tif"
    out = _run("tiff_to_zarr.py", str(tiff), "--make-sample")
    assert "no output path given" in out
    copied = zarr.open_array(tmp_path / "sample.zarr", mode="r")[:]
    assert np.array_equal(copied, tifffile.imread(tiff))


def test_tiff_to_zarr_missing_input(tmp_path: Path) -> None:
    # Exits before it connects, so no server is started on the port.
    done = _start("tiff_to_zarr.py", str(tmp_path / "missing.tif"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: TIFF file")
    assert "not found" in done.stderr


def test_tiff_to_zarr_existing_output(tmp_path: Path) -> None:
    tiff, store = tmp_path / "sample.tif", tmp_path / "sample.zarr"
    _run("tiff_to_zarr.py", str(tiff), str(store), "--make-sample")
    done = _start("tiff_to_zarr.py", str(tiff), str(store))
    assert done.returncode == 2
    assert "exists" in done.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("napari") is not None, reason="napari is installed here"
)
def test_live_streaming_napari_missing() -> None:
    done = _start("live_streaming.py", "--napari")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "not installed" in done.stderr
    assert "pip install" in done.stderr


def test_live_streaming_headless_viewer(tmp_path: Path) -> None:
    out = _run("live_streaming.py", "--output", str(tmp_path))
    assert "viewer saw 16 images" in out
    assert (tmp_path / "live.png").read_bytes()[:4] == b"\x89PNG"


def test_cancel_and_errors_example() -> None:
    out = _run("cancel_and_errors.py")
    assert "final state cancelled" in out
    assert "ValueError: threshold -1 is negative" in out
    assert "no server: ZmqTimeoutError" in out

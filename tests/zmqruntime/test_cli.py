from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from zmqruntime import ExecutionClient
from zmqruntime._cli import main

from .control_helpers import FRAMES_PIPELINE, SLEEP_PIPELINE, connected_client, running_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", ["serve", "status", "list", "cancel", "results", "shutdown"])
def test_cli_help_names_defaults(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    assert "default" in text
    assert "seconds" in text


def test_cli_status_list_results_cancel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "stack.npy"
    with running_server() as server, connected_client(server) as client:
        done = client.execute(FRAMES_PIPELINE, {"n": 3})
        client.wait(done, timeout=30)
        sleeper = client.execute(SLEEP_PIPELINE)
        common = ["--endpoint", server.endpoint]

        assert main(["status", done, *common]) == 0
        status_text = capsys.readouterr().out
        assert main(["list", *common]) == 0
        list_text = capsys.readouterr().out
        assert main(["results", done, "--sink", str(out), "--no-progress", *common]) == 0
        results_text = capsys.readouterr().out
        named = ["results", done, "--sink", str(out), "--name", "stack", "--no-progress"]
        assert main([*named, *common]) == 0
        named_text = capsys.readouterr().out
        assert main(["cancel", sleeper, *common]) == 0
        assert main(["cancel", "missing", *common]) == 1
        cancel_err = capsys.readouterr().err

    assert '"state": "completed"' in status_text
    assert done in list_text and sleeper in list_text
    assert "3/3 chunks" in list_text
    assert "results: stack [3, 32, 32] <u2" in list_text
    assert "stack: shape (3, 32, 32)" in results_text
    # A path is a base for every result unless --name picks exactly one.
    assert np.load(tmp_path / "stack.stack.npy").shape == (3, 32, 32)
    assert str(out) in named_text
    assert np.load(out).shape == (3, 32, 32)
    assert "missing" in cancel_err


def test_cli_serve_and_shutdown(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/cli.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "zmqruntime", "serve", "--endpoint", endpoint],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with ExecutionClient(endpoint=endpoint, auto_spawn=False, timeout=10) as client:
            pong = client.ping()
        assert main(["shutdown", "--endpoint", endpoint]) == 0
        _, log = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert pong["pid"] == server.pid
    assert server.returncode == 0
    assert f"control {endpoint}" in log
    assert "stopped" in log


def test_cli_client_command_without_server_fails(tmp_path: Path) -> None:
    start = time.monotonic()
    code = main(["status", "x", "--endpoint", f"ipc://{tmp_path}/none.sock", "--timeout", "0.3"])
    assert code == 1
    assert time.monotonic() - start < 1.0


def test_cli_results_zarr_prints_array_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.zarr"
    code = (
        "import numpy as np\n"
        "def pipeline(ctx, config):\n"
        "    yield 'a', np.ones((2, 3), np.uint8)\n"
        "    yield 'b', np.arange(4.0)\n"
    )
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(code)
        client.wait(exec_id, timeout=30)
        common = ["--endpoint", server.endpoint, "--no-progress"]
        assert main(["results", exec_id, "--sink", str(out), *common]) == 0
        text = capsys.readouterr().out

    assert f"a: shape (2, 3) dtype uint8 -> {out / 'a'}" in text
    assert f"b: shape (4,) dtype float64 -> {out / 'b'}" in text


def test_cli_results_relative_zarr_prints_absolute_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = "import numpy as np\ndef pipeline(ctx, config):\n    yield 'a', np.ones(3, np.uint8)\n"
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(code)
        client.wait(exec_id, timeout=30)
        common = ["--endpoint", server.endpoint, "--no-progress"]
        assert main(["results", exec_id, "--sink", "out/x.zarr", *common]) == 0
        text = capsys.readouterr().out

    assert f"-> {tmp_path.resolve() / 'out' / 'x.zarr' / 'a'}" in text


def test_cli_results_npy_creates_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "new" / "x.npy"
    code = "import numpy as np\ndef pipeline(ctx, config):\n    yield 'a', np.ones(3, np.uint8)\n"
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(code)
        client.wait(exec_id, timeout=30)
        common = ["--endpoint", server.endpoint, "--no-progress"]
        assert main(["results", exec_id, "--sink", str(target), *common]) == 0
        capsys.readouterr()

    assert (tmp_path / "new" / "x.a.npy").exists()


def test_cli_results_existing_store_explains_cli_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = str(tmp_path / "x.zarr")
    code = "import numpy as np\ndef pipeline(ctx, config):\n    yield 'a', np.ones(3, np.uint8)\n"
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(code)
        client.wait(exec_id, timeout=30)
        common = ["--endpoint", server.endpoint, "--no-progress"]
        assert main(["results", exec_id, "--sink", target, *common]) == 0
        second = main(["results", exec_id, "--sink", target, *common])
        error = capsys.readouterr().err

    assert second == 1
    assert "already contains a node" in error
    assert "pass --sink with a new path" in error

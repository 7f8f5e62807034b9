"""Set up a virtual environment for zmqruntime and run its demo, tests or checks.

Usage: ``python3 tasks.py demo | test | lint | bench [pytest arguments]``.
``bench --profile quick|full [pytest arguments]`` runs the benchmark suite of
``benchmarks/test_suite.py`` in that profile and writes ``docs/benchmarks.md``.

The first call creates ``.venv`` beside this file and installs the project with
its ``dev`` extras into it; later calls reuse it and reinstall only when
``pyproject.toml`` changed. Only Python 3.11 or newer is needed beforehand.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
STAMP = VENV / ".zmqruntime-installed"


def _pyproject_digest() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_venv() -> None:
    """Create the virtual environment and install the project when needed."""
    # This script runs under whatever python3 the user has, which may be older
    # than the project's minimum, so the check is not dead code.
    if sys.version_info < (3, 11):  # noqa: UP036
        sys.exit(f"zmqruntime needs Python 3.11 or newer; this is {sys.version.split()[0]}")

    if not PYTHON.exists():
        print(f"Creating a virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)

    digest = _pyproject_digest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return

    print("Installing zmqruntime and its development dependencies", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(digest)


def run(*args: str) -> int:
    return subprocess.run([str(PYTHON), *args], cwd=ROOT).returncode


def bench(extra: list[str]) -> int:
    """Run every benchmark, or with ``--profile NAME`` the suite in that profile."""
    if "--profile" not in extra:
        return run("-m", "pytest", "benchmarks", "--benchmark-only", *extra)

    at = extra.index("--profile")
    if at + 1 >= len(extra) or extra[at + 1] not in {"quick", "full"}:
        print("bench --profile needs quick or full, e.g. python3 tasks.py bench --profile quick")
        return 2
    profile = extra[at + 1]
    rest = extra[:at] + extra[at + 2 :]
    env = dict(os.environ, ZMQRUNTIME_BENCH_PROFILE=profile)
    command = [str(PYTHON), "-m", "pytest", "benchmarks/test_suite.py", "--benchmark-only"]
    return subprocess.run([*command, "-s", *rest], cwd=ROOT, env=env).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "lint", "bench"}:
        print(__doc__)
        return 2

    command, extra = argv[0], argv[1:]
    ensure_venv()

    if command == "demo":
        return run("-m", "zmqruntime.demo", *extra)
    if command == "test":
        return run("-m", "pytest", *extra)
    if command == "bench":
        return bench(extra)

    for step in (
        ["-m", "ruff", "check", "zmqruntime", "sinks", "tests", "benchmarks", "examples"],
        [
            "-m",
            "ruff",
            "format",
            "--check",
            "zmqruntime",
            "sinks",
            "tests",
            "benchmarks",
            "examples",
        ],
        ["-m", "mypy"],
    ):
        code = run(*step)
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Shared helpers for the control-plane tests: a real server on loopback in a thread."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from zmqruntime import ExecutionClient, ExecutionServer, ServerConfig

# Pipelines used across tests, as source code the server runs in its workers.
FRAMES_PIPELINE = """
import numpy as np

def pipeline(ctx, config):
    n, size = config["n"], config.get("size", 32)
    writer = ctx.declare("stack", (n, size, size), "uint16")
    for i in range(n):
        writer.write(i, np.full((1, size, size), i, np.uint16))
        ctx.progress(i + 1, n)
    ctx.set_value("frames", n)
    return {"shape": (n, size, size)}
"""

SLEEP_PIPELINE = """
import time

def pipeline(ctx, config):
    time.sleep(config.get("seconds", 60))
"""

ENDLESS_PIPELINE = """
import numpy as np

def pipeline(ctx, config):
    size = (config or {}).get("size", 64)
    writer = ctx.declare("stream", (None, size, size), "uint8")
    frame = np.zeros((1, size, size), np.uint8)
    for i in range(100_000):
        writer.append(frame)
        ctx.check_cancelled()
"""


@contextlib.contextmanager
def running_server(**overrides: object) -> Iterator[ExecutionServer]:
    """Run a server on a random loopback port in a thread; stop it on exit."""
    config = dataclasses.replace(
        ServerConfig(endpoint="tcp://127.0.0.1:*", grace_period=0.5, kill_after=0.5),
        **overrides,  # type: ignore[arg-type]
    )
    server = ExecutionServer(config)
    thread = server.serve_in_thread()
    try:
        yield server
    finally:
        server.stop()
        thread.join(15)
        assert not thread.is_alive(), "server thread did not stop"


@contextlib.contextmanager
def connected_client(server: ExecutionServer, **kwargs: object) -> Iterator[ExecutionClient]:
    """A client of ``server`` with auto-spawn off."""
    client = ExecutionClient(endpoint=server.endpoint, auto_spawn=False, **kwargs)  # type: ignore[arg-type]
    try:
        yield client
    finally:
        client.close()

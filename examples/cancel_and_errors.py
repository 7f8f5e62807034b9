"""Cancel a running execution, and handle a pipeline error and an absent server.

Run: ``python examples/cancel_and_errors.py [--port 5555] [--shutdown]``.
"""

from __future__ import annotations

import argparse
import socket
import time

from zmqruntime import ExecutionClient, RemoteError, ZmqRuntimeError

SLOW = """
import time

def pipeline(ctx, config):
    for step in range(600):
        ctx.check_cancelled()      # cooperative cancellation point
        ctx.progress(step, 600)
        time.sleep(0.1)
"""

FAILING = """
def pipeline(ctx, config):
    raise ValueError(f"threshold {config['threshold']} is negative")
"""


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5555, help="server port (default 5555)")
    parser.add_argument("--shutdown", action="store_true", help="stop the server at the end")
    args = parser.parse_args()

    with ExecutionClient(port=args.port) as client:
        # 1. Cancel: wait until the pipeline runs, then cancel it.
        exec_id = client.execute(SLOW)
        while client.get_status(exec_id).state in ("queued",):
            time.sleep(0.05)
        outcome = client.cancel(exec_id)
        final = client.wait(exec_id, timeout=10)
        print(f"cancel accepted={outcome.accepted}; final state {final.state}")

        # 2. A pipeline that raises: the error comes back with its traceback.
        exec_id = client.execute(FAILING, {"threshold": -1})
        try:
            client.get_results(exec_id)
        except RemoteError as error:
            print(f"pipeline failed: {error.type_name}: {error.remote_message}")

        if args.shutdown:
            client.shutdown()

    # 3. No server and auto-spawn off: the call fails within its timeout.
    with ExecutionClient(port=unused_port(), auto_spawn=False, timeout=1.0) as lonely:
        try:
            lonely.ping()
        except ZmqRuntimeError as error:
            print(f"no server: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()

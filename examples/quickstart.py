"""Quickstart: submit a pipeline, poll its status, fetch its result into each of the three sinks.

Run: ``python examples/quickstart.py [--port 5555] [--output DIR] [--shutdown]``.
A server is started on 127.0.0.1 when none replies on the port; it exits by
itself after five idle minutes, or at once with ``--shutdown``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from sinks import MemmapSink, ZarrSink
from zmqruntime import ExecutionClient

# Pipeline source: runs in a worker process on the server. It streams a stack
# of 20 frames, one at a time, and stores a small value.
PIPELINE = """
import numpy as np

def pipeline(ctx, config):
    frames, size = config["frames"], config["size"]
    writer = ctx.declare("stack", (frames, size, size), np.uint16)
    y, x = np.mgrid[0:size, 0:size]
    for index in range(frames):
        ctx.check_cancelled()
        frame = (1000 * np.exp(-((y - 2 * index) ** 2 + (x - 64) ** 2) / 200)).astype(np.uint16)
        writer.write(index, frame[np.newaxis])
        ctx.progress(index + 1, frames, "frames")
    ctx.set_value("peak", int(frame.max()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5555, help="server port (default 5555)")
    parser.add_argument("--output", type=Path, help="folder for the .npy and .zarr outputs")
    parser.add_argument("--shutdown", action="store_true", help="stop the server at the end")
    args = parser.parse_args()
    output = args.output or Path(tempfile.mkdtemp(prefix="zmqruntime-quickstart-"))
    output.mkdir(parents=True, exist_ok=True)

    with ExecutionClient(port=args.port) as client:
        exec_id = client.execute(PIPELINE, {"frames": 20, "size": 128})
        print(f"submitted execution {exec_id}")

        # Poll until the execution reaches a final state.
        while not (status := client.get_status(exec_id)).done:
            progress = status.progress
            if progress.total is None:
                print(f"  {status.state}")
            else:
                print(f"  {status.state}: {progress.done:.0f} of {progress.total:.0f} frames")
            time.sleep(0.05)
        print(f"finished: {status.state}, values {dict(status.values)}")

        # The server keeps the results until released, so fetch them three times:
        # every result by sink name, then the result "stack" into sink objects
        # that replace the files of an earlier run.
        in_memory = client.get_results(exec_id, sink="memory")["stack"]
        on_disk = client.get_result(
            exec_id, "stack", sink=MemmapSink(output / "stack.npy", overwrite=True)
        )
        in_zarr = client.get_result(
            exec_id, "stack", sink=ZarrSink(output / "stack.zarr", overwrite=True), release=True
        )

        print(f"memory: {type(in_memory).__name__} {in_memory.shape} {in_memory.dtype}")
        print(f"memmap: {output / 'stack.npy'} equal={np.array_equal(on_disk, in_memory)}")
        print(f"zarr:   {output / 'stack.zarr'} equal={np.array_equal(in_zarr[:], in_memory)}")

        if args.shutdown:
            client.shutdown()


if __name__ == "__main__":
    main()

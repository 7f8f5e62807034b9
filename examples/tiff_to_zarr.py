"""Stream your own multi-page TIFF into a zarr v3 array, one page at a time.

Run: ``python examples/tiff_to_zarr.py STACK.tif [OUT.zarr] [--port 5555] [--shutdown]``.
Without OUT.zarr the store is written beside the input as ``STACK.zarr``. Add
``--make-sample`` to first write a small test stack to STACK.tif. The pipeline
reads the file on the server, which runs on this machine, so give a path it can
read. To segment and measure the images instead, run
``python -m zmqruntime.demo --input STACK.tif``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from zmqruntime import ExecutionClient

# Runs on the server: one page in memory at a time, however large the file.
PIPELINE = """
import numpy as np
import tifffile

def pipeline(ctx, config):
    with tifffile.TiffFile(config["path"]) as tiff:
        pages = tiff.pages
        first = pages[0].asarray()
        writer = ctx.declare("stack", (len(pages), *first.shape), first.dtype)
        for index in range(len(pages)):
            ctx.check_cancelled()
            writer.write(index, pages[index].asarray()[np.newaxis])
            ctx.progress(index + 1, len(pages), "pages")
"""


def make_sample(path: Path) -> None:
    """Write a 16-page uint16 TIFF of drifting Gaussian spots."""
    import tifffile

    y, x = np.mgrid[0:200, 0:240]
    pages = [
        (800 * np.exp(-((y - 50 - 6 * i) ** 2 + (x - 120) ** 2) / 300)).astype(np.uint16)
        for i in range(16)
    ]
    tifffile.imwrite(path, np.stack(pages), photometric="minisblack")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tiff", type=Path, help="multi-page TIFF to read")
    parser.add_argument(
        "zarr",
        type=Path,
        nargs="?",
        help="zarr store to write (a .zarr folder); default: the TIFF path with suffix .zarr",
    )
    parser.add_argument(
        "--make-sample", action="store_true", help="first write a sample TIFF to the TIFF path"
    )
    parser.add_argument("--port", type=int, default=5555, help="server port (default 5555)")
    parser.add_argument("--shutdown", action="store_true", help="stop the server at the end")
    args = parser.parse_args()

    if args.make_sample:
        make_sample(args.tiff)
        print(f"wrote sample stack {args.tiff}")
    if not args.tiff.is_file():
        print(
            f"error: TIFF file {args.tiff} not found; pass an existing multi-page TIFF, "
            "or add --make-sample to write a sample stack there first",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.zarr is None:
        args.zarr = args.tiff.with_suffix(".zarr")
        print(f"no output path given; writing {args.zarr}")
    if args.zarr.exists():
        print(f"error: {args.zarr} exists; remove it or pass another output path", file=sys.stderr)
        sys.exit(2)

    with ExecutionClient(port=args.port) as client:
        exec_id = client.execute(PIPELINE, {"path": str(args.tiff.resolve())})
        # Naming the result up front keeps OUT.zarr itself the array; without
        # names, a fetch of a running execution writes OUT.zarr/<result name>.
        array = client.get_results(
            exec_id, sink=str(args.zarr), names=["stack"], progress=True, release=True
        )
        print(f"{args.zarr}: {array['stack'].shape} {array['stack'].dtype}")
        if args.shutdown:
            client.shutdown()


if __name__ == "__main__":
    main()

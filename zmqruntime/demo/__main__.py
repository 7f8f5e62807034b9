"""Command line of the screening job: ``python -m zmqruntime.demo [options]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from zmqruntime.demo._job import JobOptions, run_job
from zmqruntime.demo._plate import InputError, PlateSpec

__all__ = ["main"]

# Exit status after Ctrl-C, as shells report a process ended by SIGINT.
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the screening job."""
    parser = argparse.ArgumentParser(
        prog="python -m zmqruntime.demo",
        description=(
            "Run a high-content-screening job on a zmqruntime server: segment and measure "
            "nuclei in every image, stream the processed images into an OME-Zarr store and "
            "write the measurement tables and a preview montage. Without --input it builds "
            "a plate from the ihc.png image shipped with scikit-image."
        ),
    )
    source = parser.add_argument_group("input")
    source.add_argument(
        "--input",
        type=Path,
        help="your images instead of the synthetic plate: a multi-page TIFF, a folder of "
        "TIFF files or a .npy file of shape (n, y, x) or (n, channels, y, x)",
    )
    plate = PlateSpec()
    source.add_argument(
        "--rows", type=int, default=plate.rows, help=f"plate rows, 1 to 26 (default {plate.rows})"
    )
    source.add_argument(
        "--columns",
        type=int,
        default=plate.columns,
        help=f"plate columns, 1 to 48 (default {plate.columns})",
    )
    source.add_argument(
        "--fields", type=int, default=plate.fields, help=f"fields per well (default {plate.fields})"
    )
    source.add_argument(
        "--image-size",
        type=int,
        default=plate.image_size,
        help=f"field edge in pixels, 16 to 512 (default {plate.image_size})",
    )
    source.add_argument(
        "--seed",
        type=int,
        default=plate.seed,
        help=f"seed of crops and noise (default {plate.seed})",
    )

    processing = parser.add_argument_group("processing")
    processing.add_argument(
        "--segment-channel", type=int, default=0, help="channel to segment (default 0)"
    )
    processing.add_argument(
        "--background-size",
        type=int,
        default=31,
        help="edge of the background opening square in pixels (default 31)",
    )
    processing.add_argument(
        "--smoothing-sigma", type=float, default=1.5, help="Gaussian sigma in pixels (default 1.5)"
    )
    processing.add_argument(
        "--min-area", type=int, default=20, help="smallest object kept, in pixels (default 20)"
    )
    processing.add_argument(
        "--pixel-size",
        type=float,
        default=0.5,
        help="pixel size in micrometres, stored in the OME-Zarr metadata (default 0.5)",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--output",
        type=Path,
        default=Path("screening-output"),
        help="output directory (default ./screening-output)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store that this job did not write",
    )
    run.add_argument(
        "--port",
        type=int,
        default=5555,
        help="server port on 127.0.0.1; a server is started if none replies (default 5555)",
    )
    run.add_argument(
        "--in-process", action="store_true", help="run the pipeline in this process, no server"
    )
    run.add_argument("--no-preview", action="store_true", help="skip preview.png")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def options_from_args(args: argparse.Namespace) -> JobOptions:
    """Turn parsed arguments into :class:`JobOptions`."""
    config: dict[str, Any] = {
        "segment_channel": args.segment_channel,
        "background_size": args.background_size,
        "smoothing_sigma": args.smoothing_sigma,
        "min_area": args.min_area,
        "pixel_size_um": args.pixel_size,
    }
    if args.input is not None:
        config["input"] = str(args.input.expanduser().resolve())
    else:
        config["plate"] = {
            "rows": args.rows,
            "columns": args.columns,
            "fields": args.fields,
            "image_size": args.image_size,
            "seed": args.seed,
        }
    return JobOptions(
        config=config,
        output=args.output,
        in_process=args.in_process,
        port=args.port,
        overwrite=args.overwrite,
        progress=not args.quiet,
        preview=not args.no_preview,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the job; return 0 on success, 1 on failure, 130 after Ctrl-C."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        report = run_job(options_from_args(args))
    except KeyboardInterrupt as interrupt:
        partial = getattr(interrupt, "report", None)
        if partial is not None:
            print(partial.summary())
            print("  The store is kept and marked incomplete; the server is still running.")
        return EXIT_INTERRUPTED
    except (InputError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

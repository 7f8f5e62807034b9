"""Command line of the screening job: ``python -m zmqruntime.demo [options]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from zmqruntime import RemoteError, ZmqRuntimeError
from zmqruntime.demo._job import JobInterrupted, JobOptions, PortInUseError, run_job
from zmqruntime.demo._plate import InputError, PlateSpec

__all__ = ["main"]

EXIT_FAILED = 1
# As argparse exits for an invalid command line.
EXIT_USAGE = 2
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
    run.add_argument(
        "--keep-server",
        action="store_true",
        help="leave a server that this job started running (default: stop it at the end)",
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
        keep_server=args.keep_server,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the job and return the exit status.

    0 on success; 2 for an invalid option, an unreadable input, an output
    store this job did not write or a server port held by another program
    (one ``error:`` line on stderr); 1 when the run failed; 130 after Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a TCP port; pass 1024 to 65535")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        report = run_job(options_from_args(args))
    except JobInterrupted as interrupted:
        print(interrupted.report.summary())
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("Screening run interrupted before it started.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (InputError, FileExistsError, PortInUseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RemoteError as exc:
        # The server checks each image as it reads it, so an input problem
        # can still surface there, e.g. a later TIFF of another shape.
        if exc.type_name.endswith(".InputError"):
            print(f"error: {exc.remote_message}", file=sys.stderr)
            return EXIT_USAGE
        print(f"error: the pipeline failed on the server: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ZmqRuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED

    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The screening demo: nuclei segmentation on a plate of real images, streamed into OME-Zarr.

Run it with ``python -m zmqruntime.demo`` (``--help`` lists the options) or
from Python with :func:`run_job`. The pipeline itself is
``zmqruntime.demo.screening:pipeline``; this package also contains the pieces it
is built from, which the examples and tests reuse.
"""

from __future__ import annotations

from zmqruntime.demo._job import (
    PIPELINE,
    JobInterrupted,
    JobOptions,
    JobReport,
    PortInUseError,
    run_job,
    write_table_csv,
)
from zmqruntime.demo._local import LocalContext, TableSink, run_local
from zmqruntime.demo._omezarr import NGFF_VERSION, OmeZarrWriter, pyramid_shapes
from zmqruntime.demo._plate import (
    CHANNEL_NAMES,
    InputError,
    PlateSpec,
    StackSource,
    SyntheticPlate,
    open_source,
)
from zmqruntime.demo._preview import write_preview

__all__ = [
    "CHANNEL_NAMES",
    "NGFF_VERSION",
    "PIPELINE",
    "InputError",
    "JobInterrupted",
    "JobOptions",
    "JobReport",
    "LocalContext",
    "OmeZarrWriter",
    "PlateSpec",
    "PortInUseError",
    "StackSource",
    "SyntheticPlate",
    "TableSink",
    "open_source",
    "pyramid_shapes",
    "run_job",
    "run_local",
    "write_preview",
    "write_table_csv",
]

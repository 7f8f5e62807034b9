"""The screening pipeline: segment nuclei in every field and measure them.

Reference it as ``"zmqruntime.demo.screening:pipeline"``. For each image
(one field of view, all channels) it:

1. subtracts the background of each channel, estimated by a grey-level
   morphological opening with a square of ``background_size`` pixels
   (objects narrower than the square are removed, the slowly varying
   background stays) and smoothed by a Gaussian;
2. smooths the corrected channels with a Gaussian of ``smoothing_sigma`` pixels;
3. thresholds the smoothed segmentation channel with Otsu's method;
4. labels the connected foreground regions (8-connectivity) and drops those
   smaller than ``min_area`` pixels;
5. measures each object (area, centroid, mean background-corrected intensity
   per channel) and the image as a whole (object count, areas, intensities).

It streams four results, one image at a time:

- ``images``: the smoothed, background-corrected stack, float32
  ``(n, channels, y, x)``;
- ``labels``: the nuclei label images, uint32 ``(n, y, x)``, 0 is background;
- ``fields``: one row of per-image measurements per image (:func:`field_dtype`);
- ``objects``: one row per object (:func:`object_dtype`), length unknown
  until the end.

Config keys (all optional): ``input`` (path to user images, see
:func:`zmqruntime.demo._plate.open_source`), ``plate`` (plate size),
``segment_channel`` (default 0), ``background_size`` (default 31),
``smoothing_sigma`` (default 1.5), ``min_area`` (default 20),
``pixel_size_um`` (default 0.5, stored in the OME-Zarr metadata).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from zmqruntime.demo._plate import InputError, StackSource, SyntheticPlate, open_source

__all__ = [
    "CONFIG_KEYS",
    "ProcessingOptions",
    "Segmentation",
    "check_config",
    "field_dtype",
    "measure",
    "object_dtype",
    "pipeline",
    "pixel_size_from_config",
    "process_image",
]

logger = logging.getLogger(__name__)

# Keys a job config may contain; the module docstring describes each.
CONFIG_KEYS = frozenset(
    {
        "input",
        "plate",
        "segment_channel",
        "background_size",
        "smoothing_sigma",
        "min_area",
        "pixel_size_um",
    }
)

DEFAULT_PIXEL_SIZE_UM = 0.5

# 8-connectivity: diagonal neighbours belong to the same object.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


class _Writer(Protocol):
    def write(self, start: int, data: npt.NDArray[Any]) -> None: ...

    def append(self, data: npt.NDArray[Any]) -> None: ...


class _Context(Protocol):
    """The part of the pipeline context this pipeline uses."""

    execution_id: str

    def declare(
        self,
        name: str,
        shape: tuple[int | None, ...],
        dtype: Any,
        *,
        chunks: tuple[int, ...] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> _Writer: ...

    def progress(self, done: int, total: int | None = None, message: str | None = None) -> None: ...

    def check_cancelled(self) -> None: ...

    def set_value(self, key: str, value: Any) -> None: ...


@dataclass(frozen=True)
class ProcessingOptions:
    """Parameters of :func:`process_image`, lengths in pixels."""

    segment_channel: int = 0
    background_size: int = 31
    smoothing_sigma: float = 1.5
    min_area: int = 20

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ProcessingOptions:
        """Read the options from a job config, with defaults for missing keys.

        Raises :class:`InputError` for a value out of range. Whether
        ``segment_channel`` exists depends on the images; :func:`check_config`
        checks that.
        """
        options = cls(
            segment_channel=int(config.get("segment_channel", cls.segment_channel)),
            background_size=int(config.get("background_size", cls.background_size)),
            smoothing_sigma=float(config.get("smoothing_sigma", cls.smoothing_sigma)),
            min_area=int(config.get("min_area", cls.min_area)),
        )
        if options.segment_channel < 0:
            raise InputError(
                f"segment_channel (--segment-channel) is {options.segment_channel}; "
                "channels are numbered from 0"
            )
        if options.background_size < 3:
            raise InputError(
                f"background_size (--background-size) is {options.background_size} pixels; "
                "it must be at least 3"
            )
        if not (math.isfinite(options.smoothing_sigma) and options.smoothing_sigma >= 0):
            raise InputError(
                f"smoothing_sigma (--smoothing-sigma) is {options.smoothing_sigma} pixels; "
                "it must be 0 (no smoothing) or more"
            )
        if options.min_area < 0:
            raise InputError(
                f"min_area (--min-area) is {options.min_area} pixels; "
                "it must be 0 (keep every object) or more"
            )
        return options


def pixel_size_from_config(config: Mapping[str, Any]) -> float:
    """Return ``config["pixel_size_um"]`` (default 0.5) after checking that it is positive."""
    pixel_size = float(config.get("pixel_size_um", DEFAULT_PIXEL_SIZE_UM))
    if not (math.isfinite(pixel_size) and pixel_size > 0):
        raise InputError(
            f"pixel_size_um (--pixel-size) is {pixel_size} micrometres; "
            "it must be a positive number, such as 0.5"
        )
    return pixel_size


def check_config(
    config: Mapping[str, Any],
) -> tuple[SyntheticPlate | StackSource, ProcessingOptions]:
    """Check every option of a job config and open the image source it names.

    The job runs this on the client before it submits anything, and the
    pipeline runs it again before it declares its results. Opening a user
    file reads its first image.

    Raises
    ------
    InputError
        An unknown key, a value out of range, an unreadable input or a
        ``segment_channel`` the images do not have. The message names the
        value and what is accepted.
    """
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise InputError(
            f"unknown config key(s) {unknown}; the screening pipeline accepts {sorted(CONFIG_KEYS)}"
        )
    options = ProcessingOptions.from_config(config)
    pixel_size_from_config(config)
    source = open_source(config)

    channels = source.image_shape[0]
    if options.segment_channel >= channels:
        raise InputError(
            f"segment_channel (--segment-channel) is {options.segment_channel}, but the "
            f"images have {channels} channel(s); choose 0 to {channels - 1}"
        )
    return source, options


@dataclass(frozen=True)
class Segmentation:
    """Result of :func:`process_image` for one image.

    Attributes
    ----------
    corrected:
        Background-corrected channels, float32 ``(channels, y, x)``; intensities
        are measured on these.
    smoothed:
        ``corrected`` after Gaussian smoothing; this is the streamed image.
    labels:
        uint32 ``(y, x)``, objects numbered 1..count, 0 is background.
    count:
        Number of objects.
    threshold:
        Otsu threshold of the smoothed segmentation channel.
    background:
        Mean estimated background of each channel.
    """

    corrected: npt.NDArray[np.float32]
    smoothed: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint32]
    count: int
    threshold: float
    background: npt.NDArray[np.float32]


def field_dtype(channels: int) -> np.dtype[Any]:
    """Return the dtype of one row of the per-image table for ``channels`` channels."""
    return np.dtype(
        [
            ("image", "<u4"),
            ("well", "<U4"),
            ("field", "<u2"),
            ("count", "<u4"),
            ("total_area_px", "<u8"),
            ("mean_area_px", "<f8"),
            ("threshold", "<f4"),
            ("background", "<f4", (channels,)),
            ("mean_intensity", "<f4", (channels,)),
            ("object_mean_intensity", "<f4", (channels,)),
        ]
    )


def object_dtype(channels: int) -> np.dtype[Any]:
    """Return the dtype of one row of the per-object table for ``channels`` channels."""
    return np.dtype(
        [
            ("image", "<u4"),
            ("label", "<u4"),
            ("area_px", "<u4"),
            ("centroid_y", "<f4"),
            ("centroid_x", "<f4"),
            ("mean_intensity", "<f4", (channels,)),
        ]
    )


def process_image(image: npt.NDArray[Any], options: ProcessingOptions) -> Segmentation:
    """Correct, smooth, threshold and label one ``(channels, y, x)`` image.

    ``image`` is only read. Every returned array is newly allocated.
    """
    from skimage.filters import threshold_otsu

    if not 0 <= options.segment_channel < image.shape[0]:
        raise InputError(
            f"segment_channel {options.segment_channel} does not exist; the image has "
            f"{image.shape[0]} channel(s), numbered from 0"
        )

    pixels = image.astype(np.float32)
    size = (1, options.background_size, options.background_size)
    background = ndimage.grey_opening(pixels, size=size)
    background = ndimage.gaussian_filter(background, sigma=(0, 2.0, 2.0))
    corrected = np.maximum(pixels - background, 0.0, dtype=np.float32)
    sigma = (0.0, options.smoothing_sigma, options.smoothing_sigma)
    smoothed = ndimage.gaussian_filter(corrected, sigma=sigma).astype(np.float32, copy=False)

    # Otsu needs at least two distinct values; a flat image has no foreground.
    target = smoothed[options.segment_channel]
    low, high = float(target.min()), float(target.max())
    threshold = float(threshold_otsu(target)) if high > low else high  # type: ignore[no-untyped-call]
    labels, _ = ndimage.label(target > threshold, structure=_CONNECTIVITY)

    # Drop small objects, then renumber the rest 1..count in scan order.
    areas = np.bincount(labels.ravel())
    keep = areas >= options.min_area
    keep[0] = False
    new_ids = np.zeros(areas.size, dtype=np.uint32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    relabelled = new_ids[labels]

    return Segmentation(
        corrected=corrected,
        smoothed=smoothed,
        labels=relabelled,
        count=int(keep.sum()),
        threshold=threshold,
        background=background.mean(axis=(1, 2), dtype=np.float64).astype(np.float32),
    )


def measure(
    segmentation: Segmentation, image_index: int, well: str, field: int
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Measure one processed image.

    Returns the per-image row (shape ``()``, :func:`field_dtype`) and the
    per-object rows (shape ``(count,)``, :func:`object_dtype`, ordered by label).
    """
    corrected = segmentation.corrected
    channels, height, width = corrected.shape
    labels = segmentation.labels.ravel()
    count = segmentation.count
    bins = count + 1

    areas = np.bincount(labels, minlength=bins).astype(np.float64)
    rows, cols = np.indices((height, width))
    sum_y = np.bincount(labels, weights=rows.ravel(), minlength=bins)
    sum_x = np.bincount(labels, weights=cols.ravel(), minlength=bins)
    sums = np.stack(
        [np.bincount(labels, weights=corrected[c].ravel(), minlength=bins) for c in range(channels)]
    )

    objects = np.zeros(count, dtype=object_dtype(channels))
    objects["image"] = image_index
    objects["label"] = np.arange(1, bins)
    objects["area_px"] = areas[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        objects["centroid_y"] = sum_y[1:] / areas[1:]
        objects["centroid_x"] = sum_x[1:] / areas[1:]
        objects["mean_intensity"] = (sums[:, 1:] / areas[1:]).T

    total_area = float(areas[1:].sum())
    row = np.zeros((), dtype=field_dtype(channels))
    row["image"] = image_index
    row["well"] = well
    row["field"] = field
    row["count"] = count
    row["total_area_px"] = int(total_area)
    row["mean_area_px"] = total_area / count if count else 0.0
    row["threshold"] = segmentation.threshold
    row["background"] = segmentation.background
    row["mean_intensity"] = corrected.mean(axis=(1, 2), dtype=np.float64)
    object_sums = sums[:, 1:].sum(axis=1)
    row["object_mean_intensity"] = object_sums / total_area if count else 0.0
    return row, objects


def _well_and_field(layout: Mapping[str, Any], index: int) -> tuple[str, int]:
    if layout["kind"] != "plate":
        return "", 0
    well, field = divmod(index, int(layout["fields"]))
    row, column = divmod(well, len(layout["columns"]))
    return f"{layout['rows'][row]}{layout['columns'][column]}", field


def pipeline(ctx: _Context, config: Mapping[str, Any]) -> None:
    """Run the screening pipeline on the images ``config`` names (see the module docstring).

    Stores a small summary (image and object counts, seconds spent) with
    ``ctx.set_value("summary", ...)``. Raises
    the context's cancellation error between two images when the execution is
    cancelled; images already written stay written.
    """
    started = time.perf_counter()
    source, options = check_config(config)
    channels, height, width = source.image_shape
    layout = source.layout()
    ngff = {
        "layout": layout,
        "channels": list(source.channels),
        "pixel_size_um": pixel_size_from_config(config),
    }
    logger.info("screening %d images of shape %s from %s", source.count, source.image_shape, layout)

    images = ctx.declare(
        "images",
        (source.count, channels, height, width),
        np.float32,
        chunks=(1, channels, height, width),
        attrs={"ngff": ngff, "content": "background-corrected, smoothed intensities"},
    )
    labels = ctx.declare(
        "labels",
        (source.count, height, width),
        np.uint32,
        chunks=(1, height, width),
        attrs={"ngff": ngff, "content": "nuclei labels", "label_name": "nuclei"},
    )
    fields = ctx.declare("fields", (source.count,), field_dtype(channels))
    objects = ctx.declare("objects", (None,), object_dtype(channels))

    total_objects = 0
    for index in range(source.count):
        ctx.check_cancelled()
        segmentation = process_image(source.read(index), options)
        well, field = _well_and_field(layout, index)
        row, rows = measure(segmentation, index, well, field)

        images.write(index, segmentation.smoothed[np.newaxis])
        labels.write(index, segmentation.labels[np.newaxis])
        fields.write(index, row[np.newaxis])
        if rows.size:
            objects.append(rows)
        total_objects += rows.size
        ctx.progress(index + 1, source.count, f"{well or 'image'} field {field}")

    summary = {
        "images": source.count,
        "objects": total_objects,
        "seconds": time.perf_counter() - started,
    }
    ctx.set_value("summary", summary)

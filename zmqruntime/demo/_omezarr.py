"""Write the screening results as an OME-Zarr (NGFF 0.5) store on zarr v3.

Two layouts, chosen by the ``layout`` the pipeline puts in its result attributes:

``plate``
    An HCS plate: ``<row>/<column>/<field>/`` is one multiscale image with
    axes ``c, y, x``, and ``<row>/<column>/<field>/labels/nuclei/`` its label
    image with axes ``c, y, x`` (one channel). The root group has the ``plate``
    metadata, each well group the ``well`` metadata.
``stack``
    One multiscale image with axes ``t, c, y, x`` at the root (one time point
    per input image) and ``labels/nuclei/`` with axes ``t, c, y, x``.

Each image has a pyramid: level ``k`` halves the previous level's ``y`` and
``x`` (2 x 2 mean for intensities, the top-left sample of each 2 x 2 block for
labels), down to about 64 pixels, 4 levels at most.

Every group and array is created when the first result is opened, before any
pixel arrives, so a viewer can open the store while the run is going: missing
images read as the fill value (NaN for intensities, 0 for labels). The root's
``zmqruntime`` attribute records ``complete: false`` until every result that
was opened has been finalized. While images arrive it also records
``images_written``, rewritten at most every ``PROGRESS_INTERVAL`` seconds and
exact once the run ends.

Metadata documents are written as JSON files, so the store must be a local
directory. Documents that change during a run are replaced through a rename,
so a reader never sees a partly written one. Chunks are written through zarr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr

from sinks import ArraySpec, Region, Sink

__all__ = ["NGFF_VERSION", "OmeZarrWriter", "pyramid_shapes"]

logger = logging.getLogger(__name__)

NGFF_VERSION = "0.5"

# The pyramid stops before an edge would drop below this many pixels.
MIN_LEVEL_SIZE = 64
MAX_LEVELS = 4

LABEL_NAME = "nuclei"

# Seconds between two rewrites of the root attributes while images arrive:
# often enough for a viewer to follow, rare enough that rewriting a large
# plate document does not slow the run down.
PROGRESS_INTERVAL = 0.5

# Display colours (RRGGBB) of the channels in viewers, in channel order.
CHANNEL_COLORS = ("2F7FFF", "FF8C1A", "3CDC3C", "DC3CDC", "FFFFFF", "FFE01A", "1AE0E0", "E01A1A")


def pyramid_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Return the ``(y, x)`` shape of every pyramid level, full resolution first."""
    shapes = [(height, width)]
    while len(shapes) < MAX_LEVELS:
        y, x = shapes[-1]
        if min(y, x) // 2 < MIN_LEVEL_SIZE:
            break
        shapes.append((y // 2, x // 2))
    return shapes


def downsample_mean(image: npt.NDArray[Any], shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Bin the last two axes of ``image`` 2 x 2 by their mean, cropping to ``shape``."""
    y, x = shape
    cropped = image[..., : 2 * y, : 2 * x].astype(np.float32, copy=False)
    blocks = cropped.reshape(*cropped.shape[:-2], y, 2, x, 2)
    return np.asarray(blocks.mean(axis=(-3, -1), dtype=np.float32), dtype=np.float32)


def downsample_nearest(labels: npt.NDArray[Any], shape: tuple[int, int]) -> npt.NDArray[Any]:
    """Take the top-left sample of each 2 x 2 block of the last two axes."""
    y, x = shape
    return np.ascontiguousarray(labels[..., 0 : 2 * y : 2, 0 : 2 * x : 2])


def _axes(leading: Sequence[str]) -> list[dict[str, str]]:
    kinds = {"t": "time", "c": "channel"}
    axes = [{"name": name, "type": kinds[name]} for name in leading]
    axes += [{"name": name, "type": "space", "unit": "micrometer"} for name in ("y", "x")]
    return axes


def multiscale_metadata(
    name: str, leading: Sequence[str], levels: int, pixel_size_um: float, binned: bool
) -> dict[str, Any]:
    """Return one ``multiscales`` entry.

    Level ``k`` has scale ``2**k * pixel_size_um`` on ``y`` and ``x``. A binned
    (mean) level also gets a translation of ``(2**k - 1) / 2`` input pixels,
    because its first pixel is centred between the first ``2**k`` input pixels.
    """
    datasets = []
    for level in range(levels):
        factor = 2**level
        scale = [1.0] * len(leading) + [pixel_size_um * factor] * 2
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if binned and level > 0:
            shift = pixel_size_um * (factor - 1) / 2
            transforms.append(
                {"type": "translation", "translation": [0.0] * len(leading) + [shift, shift]}
            )
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    return {"name": name, "axes": _axes(leading), "datasets": datasets}


def omero_metadata(
    channels: Sequence[str], windows: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """Return the ``omero`` rendering hints: channel names, colours and display windows."""
    entries = []
    for index, (label, (start, end)) in enumerate(zip(channels, windows, strict=True)):
        entries.append(
            {
                "label": label,
                "color": CHANNEL_COLORS[index % len(CHANNEL_COLORS)],
                "active": True,
                "window": {"min": 0.0, "max": float(end), "start": float(start), "end": float(end)},
            }
        )
    return {"channels": entries, "rdefs": {"model": "color"}}


def plate_metadata(layout: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Return the ``plate`` metadata: rows, columns, wells and the number of fields."""
    rows, columns = list(layout["rows"]), list(layout["columns"])
    wells = [
        {"path": f"{row}/{column}", "rowIndex": r, "columnIndex": c}
        for r, row in enumerate(rows)
        for c, column in enumerate(columns)
    ]
    return {
        # ome-zarr-models 1.7 warns when the plate lacks its own version key,
        # although the "ome" namespace carries one as well.
        "version": NGFF_VERSION,
        "name": name,
        "rows": [{"name": row} for row in rows],
        "columns": [{"name": column} for column in columns],
        "wells": wells,
        "field_count": int(layout["fields"]),
        "acquisitions": [{"id": 0, "name": name}],
    }


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "zarr.json").write_text(json.dumps(document, indent=2, allow_nan=False))


def _replace_json(path: Path, document: Mapping[str, Any]) -> None:
    """Rewrite ``path/zarr.json`` through a temporary file and a rename.

    A reader (or a Ctrl-C in the middle) gets the old or the new document,
    never a truncated one.
    """
    text = json.dumps(document, indent=2, allow_nan=False)
    descriptor, temporary = tempfile.mkstemp(dir=path, prefix=".zarr.json.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text)
        os.replace(temporary, path / "zarr.json")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C until the block ends, then raise KeyboardInterrupt.

    Only the main thread may set signal handlers, so in another thread, or
    when SIGINT already has a handler other than Python's default, the block
    runs without this protection.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _group_document(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {"zarr_format": 3, "node_type": "group", "attributes": dict(attributes)}


def _array_document(
    shape: Sequence[int], dtype: np.dtype[Any], chunks: Sequence[int], names: Sequence[str]
) -> dict[str, Any]:
    """Return a zarr v3 array document: blosc lz4 with byte shuffle, fill NaN or 0."""
    fill: Any = "NaN" if dtype.kind == "f" else 0
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {
                "name": "blosc",
                "configuration": {
                    "typesize": dtype.itemsize,
                    "cname": "lz4",
                    "clevel": 5,
                    "shuffle": "shuffle",
                    "blocksize": 0,
                },
            },
        ],
        "attributes": {},
        "dimension_names": list(names),
    }


class OmeZarrWriter:
    """Owner of one OME-Zarr output store; hands out the sinks that fill it.

    :meth:`sink` returns a sink for the ``images`` result (float32
    ``(n, channels, y, x)``) and one for the ``labels`` result (uint32
    ``(n, y, x)``). Both read the layout from their declaration's ``ngff``
    attribute, so they may be opened in either order. The two sinks may be
    driven from different threads; each one from a single thread.

    Parameters
    ----------
    path:
        Directory of the store. It must not exist yet unless ``overwrite``.
    name:
        Name recorded in the plate and multiscales metadata.
    overwrite:
        Delete an existing store at ``path`` first.
    """

    def __init__(self, path: Path, *, name: str = "screen", overwrite: bool = False) -> None:
        self.path = Path(path)
        self.name = name
        self.execution_id: str | None = None
        self.images_written = 0
        self.bytes_written = 0
        # Called with the image index after each image is written (progress bars).
        self.on_image: Callable[[int], None] | None = None
        self._overwrite = overwrite
        self._lock = threading.Lock()
        # Serializes rewrites of group documents, so an older snapshot of the
        # root attributes never replaces a newer one.
        self._metadata_lock = threading.Lock()
        self._root_written_at = 0.0
        self._created = False
        self._layout: dict[str, Any] = {}
        self._channels: list[str] = []
        self._count = 0
        self._levels: list[tuple[int, int]] = []
        self._root_attrs: dict[str, Any] = {}
        self._image_attrs: dict[str, dict[str, Any]] = {}
        self._arrays: dict[str, zarr.Array[Any]] = {}
        self._open_sinks: set[str] = set()
        self._failure: str | None = None
        self._windows: list[tuple[float, float]] = []

    @property
    def created(self) -> bool:
        """Whether the store's groups and arrays exist (a sink has been opened)."""
        return self._created

    @property
    def kind(self) -> str:
        """``"plate"`` or ``"stack"``, known once a sink has been opened."""
        return str(self._layout.get("kind", ""))

    @property
    def channels(self) -> list[str]:
        """Channel names, known once a sink has been opened."""
        return list(self._channels)

    @property
    def count(self) -> int:
        """Number of images the store has room for."""
        return self._count

    @property
    def levels(self) -> list[tuple[int, int]]:
        """``(y, x)`` shape of each pyramid level."""
        return list(self._levels)

    @property
    def layout(self) -> dict[str, Any]:
        """The layout the pipeline declared (``kind``, and rows, columns, fields for a plate)."""
        return dict(self._layout)

    @property
    def fields_per_well(self) -> int:
        """Fields of view per well of a plate; 1 for a stack."""
        return int(self._layout.get("fields", 1))

    @property
    def windows(self) -> list[tuple[float, float]]:
        """Display window ``(start, end)`` of each channel, as in the ``omero`` metadata."""
        return list(self._windows)

    def sink(self, name: str) -> Sink:
        """Return a new sink for the result called ``name`` (``"images"`` or ``"labels"``)."""
        if name == "images":
            return _ImageSink(self)
        if name == "labels":
            return _LabelSink(self)
        raise ValueError(
            f"OmeZarrWriter stores the 'images' and 'labels' results, not {name!r}; "
            "send other results to another sink"
        )

    def image_group(self, index: int) -> str:
        """Return the store path of the image group that holds image ``index``."""
        if self.kind == "plate":
            well, field = divmod(index, int(self._layout["fields"]))
            row, column = divmod(well, len(self._layout["columns"]))
            return f"{self._layout['rows'][row]}/{self._layout['columns'][column]}/{field}"
        return ""

    def image_groups(self) -> list[str]:
        """Return every image group path, in image order (one path for a stack)."""
        if self.kind == "plate":
            return [self.image_group(i) for i in range(self._count)]
        return [""]

    def array(self, path: str) -> zarr.Array[Any]:
        """Return the zarr array at ``path`` inside the store, opened once and cached."""
        with self._lock:
            array = self._arrays.get(path)
            if array is None:
                array = zarr.open_array(self.path / path, mode="r+")
                self._arrays[path] = array
            return array

    # -- creation --------------------------------------------------------

    def _open(self, sink_name: str, spec: ArraySpec) -> None:
        with self._lock:
            self._open_sinks.add(sink_name)
            if not self._created:
                # Ctrl-C during creation would leave groups without arrays.
                with _sigint_deferred():
                    self._create(spec)
                self._created = True

    def _create(self, spec: ArraySpec) -> None:
        ngff = spec.attrs.get("ngff")
        if not isinstance(ngff, Mapping):
            raise ValueError(
                f"result {spec.name!r} has no 'ngff' attribute (layout, channels, pixel size); "
                "declare it with attrs={'ngff': ...} as zmqruntime.demo.screening does"
            )
        if spec.shape[0] is None:
            raise ValueError(f"result {spec.name!r} has an unknown length; OME-Zarr needs it")

        if self.path.exists():
            if not self._overwrite:
                raise FileExistsError(
                    f"output store {self.path} exists; choose another path or pass overwrite"
                )
            import shutil

            shutil.rmtree(self.path)

        self._layout = dict(ngff["layout"])
        self._channels = [str(c) for c in ngff["channels"]]
        self._count = int(spec.shape[0])
        height, width = (int(n or 0) for n in spec.shape[-2:])
        self._levels = pyramid_shapes(height, width)
        self._windows = [(0.0, 1.0)] * len(self._channels)
        pixel_size = float(ngff.get("pixel_size_um", 1.0))

        self._root_attrs = {"zmqruntime": self._running_status()}
        if self.kind == "plate":
            self._create_plate(pixel_size)
        else:
            self._create_image("", ("t", "c"), pixel_size)
        logger.info(
            "created OME-Zarr %s store at %s for %d images", self.kind, self.path, self._count
        )

    def _create_plate(self, pixel_size: float) -> None:
        layout = self._layout
        self._root_attrs["ome"] = {
            "version": NGFF_VERSION,
            "plate": plate_metadata(layout, self.name),
        }
        _write_json(self.path, _group_document(self._root_attrs))

        fields = int(layout["fields"])
        images = [{"path": str(f), "acquisition": 0} for f in range(fields)]
        for row in layout["rows"]:
            _write_json(self.path / row, _group_document({}))
            for column in layout["columns"]:
                well = {"version": NGFF_VERSION, "well": {"images": images}}
                _write_json(self.path / row / column, _group_document({"ome": well}))
        for group in self.image_groups():
            self._create_image(group, ("c",), pixel_size)

    def _create_image(self, group: str, leading: tuple[str, ...], pixel_size: float) -> None:
        base = self.path / group
        channels = len(self._channels)
        lead_shape = [self._count, channels] if leading == ("t", "c") else [channels]
        lead_chunks = [1] * len(leading)
        names = [*leading, "y", "x"]
        label_lead = [self._count, 1] if leading == ("t", "c") else [1]

        ome = {
            "version": NGFF_VERSION,
            "multiscales": [
                multiscale_metadata(
                    group or self.name, leading, len(self._levels), pixel_size, True
                )
            ],
            "omero": omero_metadata(self._channels, self._windows),
        }
        attrs = {"ome": ome} if group else {**self._root_attrs, "ome": ome}
        self._image_attrs[group] = attrs
        if not group:
            self._root_attrs = attrs
        _write_json(base, _group_document(attrs))

        labels_ome = {"version": NGFF_VERSION, "labels": [LABEL_NAME]}
        _write_json(base / "labels", _group_document({"ome": labels_ome}))
        label_ome = {
            "version": NGFF_VERSION,
            "image-label": {"source": {"image": "../../"}},
            "multiscales": [
                multiscale_metadata(LABEL_NAME, leading, len(self._levels), pixel_size, False)
            ],
        }
        _write_json(base / "labels" / LABEL_NAME, _group_document({"ome": label_ome}))

        for level, (y, x) in enumerate(self._levels):
            image_doc = _array_document(
                [*lead_shape, y, x], np.dtype(np.float32), [*lead_chunks, y, x], names
            )
            _write_json(base / str(level), image_doc)
            label_doc = _array_document(
                [*label_lead, y, x], np.dtype(np.uint32), [*lead_chunks, y, x], names
            )
            _write_json(base / "labels" / LABEL_NAME / str(level), label_doc)

    # -- writing ---------------------------------------------------------

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self._count:
            raise IndexError(f"image index {index} is outside the store's 0..{self._count - 1}")

    def write_image(self, index: int, image: npt.NDArray[Any]) -> None:
        """Write image ``index`` (``(channels, y, x)``) and its pyramid levels."""
        self._check_index(index)
        group = self.image_group(index)
        prefix = () if self.kind == "plate" else (index,)
        level_image: npt.NDArray[Any] = image.astype(np.float32, copy=False)
        for level, shape in enumerate(self._levels):
            if level:
                level_image = downsample_mean(level_image, shape)
            self.array(f"{group}/{level}".lstrip("/"))[prefix] = level_image

        first = False
        with self._lock:
            first = self.images_written == 0
            self.images_written += 1
            self.bytes_written += image.nbytes
        if first:
            self.update_windows([image])
        self._record_progress()
        if self.on_image is not None:
            self.on_image(index)

    def write_labels(self, index: int, labels: npt.NDArray[Any]) -> None:
        """Write the label image ``index`` (``(y, x)``) and its pyramid levels."""
        self._check_index(index)
        group = self.image_group(index)
        prefix: tuple[int, ...] = (0,) if self.kind == "plate" else (index, 0)
        level_labels: npt.NDArray[Any] = labels
        for level, shape in enumerate(self._levels):
            if level:
                level_labels = downsample_nearest(level_labels, shape)
            path = f"{group}/labels/{LABEL_NAME}/{level}".lstrip("/")
            self.array(path)[prefix] = level_labels
        with self._lock:
            self.bytes_written += labels.nbytes

    def update_windows(self, samples: Sequence[npt.NDArray[Any]]) -> None:
        """Set each channel's display window to 0 .. its 99.9th percentile in ``samples``."""
        if not samples:
            return
        stacked = np.stack([np.asarray(s, dtype=np.float32) for s in samples], axis=1)
        windows = []
        for plane in stacked.reshape(stacked.shape[0], -1):
            finite = plane[np.isfinite(plane)]
            high = float(np.percentile(finite, 99.9)) if finite.size else 1.0
            windows.append((0.0, high if high > 0 else 1.0))
        self._windows = windows
        with self._metadata_lock:
            for group, attrs in self._image_attrs.items():
                attrs["ome"]["omero"] = omero_metadata(self._channels, windows)
                _replace_json(self.path / group, _group_document(attrs))

    def _running_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "complete": False,
            "status": "running",
            "images_written": self.images_written,
            "images_expected": self._count,
        }
        if self.execution_id is not None:
            status["execution_id"] = self.execution_id
        return status

    def _record_progress(self) -> None:
        """Rewrite ``images_written`` in the root attributes, at most every PROGRESS_INTERVAL s."""
        now = time.monotonic()
        if now - self._root_written_at < PROGRESS_INTERVAL:
            return
        with self._metadata_lock:
            # A store already marked by mark() keeps its final status.
            if self._root_attrs.get("zmqruntime", {}).get("status") != "running":
                return
            self._root_attrs["zmqruntime"] = self._running_status()
            _replace_json(self.path, _group_document(self._root_attrs))
            self._root_written_at = now

    # -- completion ------------------------------------------------------

    def _close(self, sink_name: str, failure: str | None) -> None:
        with self._lock:
            self._open_sinks.discard(sink_name)
            if failure is not None and self._failure is None:
                self._failure = failure
            remaining = bool(self._open_sinks)
        if not remaining:
            self._refresh_windows()
            self.mark(self._failure)

    def _refresh_windows(self) -> None:
        """Recompute the display windows from up to 16 images spread over the store."""
        if not self._created or self.images_written == 0:
            return
        step = max(1, self._count // 16)
        samples = []
        for index in range(0, self._count, step):
            group = self.image_group(index)
            prefix = () if self.kind == "plate" else (index,)
            samples.append(np.asarray(self.array(f"{group}/0".lstrip("/"))[prefix]))
        self.update_windows(samples)

    def mark(self, failure: str | None) -> None:
        """Record in the root attributes whether the store is complete (``failure`` is None)."""
        status: dict[str, Any] = {
            "complete": failure is None and self.images_written == self._count,
            "status": "completed" if failure is None else "incomplete",
            "images_written": self.images_written,
            "images_expected": self._count,
        }
        if failure is not None:
            status["reason"] = failure
        if self.execution_id is not None:
            status["execution_id"] = self.execution_id
        with self._metadata_lock:
            self._root_attrs["zmqruntime"] = status
            if self._created:
                _replace_json(self.path, _group_document(self._root_attrs))


class _StoreSink(Sink):
    """Common part of the two sinks: open, abort and finalize through the writer."""

    sink_name = ""

    def __init__(self, writer: OmeZarrWriter) -> None:
        self.writer = writer
        self._frame_shape: tuple[int, ...] = ()
        self._dtype: np.dtype[Any] = np.dtype(np.float32)
        # Images that arrived in several regions: index -> (buffer, elements filled).
        self._partial: dict[int, tuple[npt.NDArray[Any], int]] = {}

    def open(self, spec: ArraySpec) -> None:
        self._frame_shape = tuple(int(n) for n in spec.shape[1:] if n is not None)
        self._dtype = spec.dtype
        self.writer._open(self.sink_name, spec)

    def write(self, region: Region, data: npt.NDArray[Any]) -> None:
        if region.shape[1:] == self._frame_shape:
            for offset in range(region.shape[0]):
                self._write_one(region.start[0] + offset, data[offset])
            return

        # A region smaller than a frame (a large frame split into bands): keep
        # the pieces until the frame is whole, because pyramid levels and the
        # display window need whole frames.
        frame_size = int(np.prod(self._frame_shape))
        for offset in range(region.shape[0]):
            index = region.start[0] + offset
            buffer, filled = self._partial.get(index, (np.empty(self._frame_shape, self._dtype), 0))
            buffer[region.slices[1:]] = data[offset]
            filled += int(np.prod(region.shape[1:]))
            if filled < frame_size:
                self._partial[index] = (buffer, filled)
            else:
                self._partial.pop(index, None)
                self._write_one(index, buffer)

    def _write_one(self, index: int, data: npt.NDArray[Any]) -> None:
        raise NotImplementedError

    def finalize(self, shape: tuple[int, ...]) -> Path:
        self.writer._close(self.sink_name, None)
        return self.writer.path

    def abort(self, reason: str) -> None:
        self.writer._close(self.sink_name, reason)


class _ImageSink(_StoreSink):
    sink_name = "images"

    def _write_one(self, index: int, data: npt.NDArray[Any]) -> None:
        self.writer.write_image(index, data)


class _LabelSink(_StoreSink):
    sink_name = "labels"

    def _write_one(self, index: int, data: npt.NDArray[Any]) -> None:
        self.writer.write_labels(index, data)

"""Image sources for the screening job: a synthetic plate built from real images, or user files.

The plate starts from ``ihc.png``, an immunohistochemistry section (hematoxylin
stains the nuclei blue, DAB stains the target protein brown) that ships inside
scikit-image's wheel, so no network access is needed. Colour deconvolution
(:func:`skimage.color.rgb2hed`) turns it into two real fluorescence-like
channels, and each field of view is a random crop of them, flipped or rotated,
with a per-well DAB dose factor and Poisson shot noise. Every field is drawn
from its own seeded random generator, so a field's pixels depend only on the
seed and its position on the plate, never on the order in which it is read.

User input (a multi-page TIFF, a folder of TIFF files, or a ``.npy`` file) is
read one image at a time, so a stack larger than memory can be processed.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from zmqruntime._errors import ZmqRuntimeError

__all__ = [
    "CHANNEL_NAMES",
    "ImageSource",
    "InputError",
    "PlateSpec",
    "StackSource",
    "SyntheticPlate",
    "open_source",
]

# Channel order of the synthetic plate. Channel 0 is the one that is segmented.
CHANNEL_NAMES = ("hematoxylin", "DAB")

# Field edge in pixels: a crop cannot be larger than ihc.png (512 x 512).
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 512

# Plate columns: 48 is the width of a 1536-well plate.
MAX_COLUMNS = 48

# Camera model for the synthetic plate, in detected photo-electrons per pixel:
# a dark offset plus a signal whose brightest pixels reach about PEAK_SIGNAL.
DARK_OFFSET = 100.0
PEAK_SIGNAL = 3000.0

TIFF_SUFFIXES = (".tif", ".tiff")


class InputError(ZmqRuntimeError, ValueError):
    """The job's input (plate options, processing options or a user file) is invalid."""


class ImageSource(Protocol):
    """A sequence of multichannel 2-D images, read one at a time.

    Attributes
    ----------
    count:
        Number of images.
    channels:
        Channel names, one per plane of each image.
    image_shape:
        ``(channels, y, x)`` of every image.
    dtype:
        Pixel dtype of the images :meth:`read` returns.
    """

    count: int
    channels: tuple[str, ...]
    image_shape: tuple[int, int, int]
    dtype: np.dtype[Any]

    def read(self, index: int) -> npt.NDArray[Any]:
        """Return image ``index`` as a new ``(channels, y, x)`` array."""
        ...

    def layout(self) -> dict[str, Any]:
        """Return the JSON-compatible description of how images map to the output store."""
        ...


@dataclass(frozen=True)
class PlateSpec:
    """Size of a synthetic plate.

    Attributes
    ----------
    rows, columns:
        Plate rows (named A, B, ...) and columns (named 1, 2, ...).
        8 x 12 is a 96-well plate, 16 x 24 a 384-well plate.
    fields:
        Fields of view (sites) imaged per well.
    image_size:
        Edge of each square field in pixels, 16 to 512.
    seed:
        Seed of the random crops, transforms and noise.
    """

    rows: int = 8
    columns: int = 12
    fields: int = 9
    image_size: int = 384
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.rows <= len(string.ascii_uppercase):
            raise InputError(f"plate rows (--rows) is {self.rows}; it must be 1 to 26 (A to Z)")
        if not 1 <= self.columns <= MAX_COLUMNS:
            raise InputError(
                f"plate columns (--columns) is {self.columns}; it must be 1 to {MAX_COLUMNS}"
            )
        if self.fields < 1:
            raise InputError(f"fields per well (--fields) is {self.fields}; it must be 1 or more")
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise InputError(
                f"image size (--image-size) is {self.image_size} pixels; it must be "
                f"{MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, the size of the source image"
            )
        if self.seed < 0:
            raise InputError(f"seed (--seed) is {self.seed}; it must be 0 or more")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PlateSpec:
        """Build a spec from a config mapping, rejecting unknown keys."""
        known = {"rows", "columns", "fields", "image_size", "seed"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown plate option(s) {unknown}; expected some of {sorted(known)}")
        return cls(**{key: int(value) for key, value in values.items()})

    @property
    def wells(self) -> int:
        """Number of wells on the plate."""
        return self.rows * self.columns

    @property
    def images(self) -> int:
        """Number of fields of view on the plate."""
        return self.wells * self.fields


@cache
def _ihc_channels() -> npt.NDArray[np.float32]:
    """Return ihc.png deconvolved into (hematoxylin, DAB), each scaled to 0..1."""
    from importlib.resources import as_file, files

    from skimage import color, io

    # Read the file straight from the installed package rather than through
    # skimage.data, whose loaders may try to download images missing locally.
    with as_file(files("skimage.data") / "ihc.png") as path:
        rgb = io.imread(path)
    hed = color.rgb2hed(rgb)
    planes = []
    for index in (0, 2):
        plane = hed[..., index]
        low, high = np.percentile(plane, (0.5, 99.9))
        planes.append(np.clip((plane - low) / (high - low), 0.0, 1.0))
    return np.stack(planes).astype(np.float32)


class SyntheticPlate:
    """A plate of two-channel fields cut from ihc.png, see the module docstring.

    Image ``i`` is field ``i % fields`` of well ``i // fields``; wells are
    numbered row by row (A1, A2, ..., B1, ...). Column ``c`` of the plate has a
    DAB dose factor rising linearly from 0.25 (first column) to 1.75 (last), so
    the per-well DAB intensity in the measurements shows a dose response.
    Reading is thread safe: each call uses its own random generator.
    """

    def __init__(self, spec: PlateSpec) -> None:
        self.spec = spec
        self.count = spec.images
        self.channels = CHANNEL_NAMES
        self.image_shape = (len(CHANNEL_NAMES), spec.image_size, spec.image_size)
        self.dtype = np.dtype(np.uint16)

    def dose(self, column: int) -> float:
        """Return the DAB dose factor of plate column ``column`` (0-based)."""
        if self.spec.columns == 1:
            return 1.0
        return 0.25 + 1.5 * column / (self.spec.columns - 1)

    def read(self, index: int) -> npt.NDArray[np.uint16]:
        """Return field ``index`` as a new (2, size, size) uint16 array of photo-electron counts."""
        if not 0 <= index < self.count:
            raise IndexError(f"field index {index} is outside the plate's 0..{self.count - 1}")

        well, field = divmod(index, self.spec.fields)
        column = well % self.spec.columns
        rng = np.random.default_rng([self.spec.seed, well, field])

        # Random crop, then one of the eight flips and right-angle rotations.
        source = _ihc_channels()
        size = self.spec.image_size
        top = int(rng.integers(0, source.shape[1] - size + 1))
        left = int(rng.integers(0, source.shape[2] - size + 1))
        crop = source[:, top : top + size, left : left + size]
        crop = np.rot90(crop, k=int(rng.integers(0, 4)), axes=(1, 2))
        if rng.integers(0, 2):
            crop = crop[:, :, ::-1]

        expected = np.empty(crop.shape, dtype=np.float64)
        expected[0] = DARK_OFFSET + PEAK_SIGNAL * crop[0]
        expected[1] = DARK_OFFSET + PEAK_SIGNAL * self.dose(column) * crop[1]
        counts = rng.poisson(expected)
        return np.minimum(counts, np.iinfo(np.uint16).max).astype(np.uint16)

    def layout(self) -> dict[str, Any]:
        """Return the plate layout: row and column names, fields per well."""
        return {
            "kind": "plate",
            "rows": list(string.ascii_uppercase[: self.spec.rows]),
            "columns": [str(c + 1) for c in range(self.spec.columns)],
            "fields": self.spec.fields,
        }


class StackSource:
    """Images from a multi-page TIFF, a folder of TIFF files, or a ``.npy`` file.

    Accepted shapes: a TIFF page or file is ``(y, x)``, ``(y, x, samples)`` with
    3 or 4 samples (RGB), or ``(channels, y, x)`` with up to 8 channels. A
    ``.npy`` file is ``(y, x)`` (one image), ``(n, y, x)`` or ``(n, channels, y, x)``
    and is memory-mapped, so only the image being read is loaded.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._files: list[Path] = []
        self._npy: npt.NDArray[Any] | None = None

        if not path.exists():
            raise InputError(f"input {path} not found")
        if path.is_dir():
            self._files = sorted(
                p for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()
            )
            if not self._files:
                raise InputError(f"no .tif or .tiff files found in folder {path}")
            self.count = len(self._files)
        elif path.suffix.lower() == ".npy":
            self._npy = _open_npy(path)
            self.count = self._npy.shape[0]
        elif path.suffix.lower() in TIFF_SUFFIXES:
            self.count = _tiff_page_count(path)
        else:
            raise InputError(
                f"input {path} is not a .npy file, a .tif/.tiff file or a folder of TIFF files"
            )

        first = self.read(0)
        self.image_shape = (int(first.shape[0]), int(first.shape[1]), int(first.shape[2]))
        self.dtype = first.dtype
        self.channels = tuple(f"channel {c}" for c in range(first.shape[0]))

    def read(self, index: int) -> npt.NDArray[Any]:
        """Return image ``index`` as a new ``(channels, y, x)`` array."""
        if not 0 <= index < self.count:
            raise IndexError(f"image index {index} is outside 0..{self.count - 1} of {self.path}")

        if self._npy is not None:
            image = np.array(self._npy[index])
            origin = f"{self.path} image {index}"
        elif self._files:
            image = _read_tiff(self._files[index], page=0)
            origin = str(self._files[index])
        else:
            image = _read_tiff(self.path, page=index)
            origin = f"{self.path} page {index}"

        image = _as_channels_first(image, origin)
        expected = getattr(self, "image_shape", None)
        if expected is not None and image.shape != expected:
            raise InputError(
                f"{origin} has shape {image.shape} but the first image has {expected}; "
                "all images of one input must have the same shape and channel count"
            )
        return image

    def layout(self) -> dict[str, Any]:
        """Return the stack layout: images along a time axis of one OME-Zarr image."""
        return {"kind": "stack", "name": self.path.name}


def _open_npy(path: Path) -> npt.NDArray[Any]:
    try:
        array: npt.NDArray[Any] = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        # numpy raises ValueError for a file that is not .npy or contains Python objects.
        raise InputError(
            f"cannot read {path} as a .npy array ({exc}); save it with numpy.save "
            "from a numeric array"
        ) from exc
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim not in (3, 4) or array.shape[0] == 0:
        raise InputError(
            f"{path} has shape {array.shape}; expected (y, x), (n, y, x) or (n, channels, y, x)"
        )
    return array


def _tiff_page_count(path: Path) -> int:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            count = len(tiff.pages)
    except (OSError, tifffile.TiffFileError) as exc:
        raise _tiff_input_error(path, exc) from exc
    if count == 0:
        raise InputError(f"{path} contains no TIFF pages")
    return count


def _read_tiff(path: Path, page: int) -> npt.NDArray[Any]:
    import tifffile

    # NOTE: the file is reopened for every image. That costs a header parse per
    # page but keeps reads independent, so no file handle outlives a call.
    try:
        with tifffile.TiffFile(path) as tiff:
            return np.asarray(tiff.pages[page].asarray())
    except (OSError, tifffile.TiffFileError) as exc:
        raise _tiff_input_error(path, exc) from exc


def _tiff_input_error(path: Path, exc: Exception) -> InputError:
    return InputError(
        f"cannot read {path} as a TIFF file ({exc}); pass a readable .tif/.tiff file, "
        "a folder of them or a .npy file"
    )


def _as_channels_first(image: npt.NDArray[Any], origin: str) -> npt.NDArray[Any]:
    if image.dtype.kind not in "uif" or image.dtype.itemsize > 8:
        raise InputError(
            f"{origin} has pixel dtype {image.dtype}; expected integer or float pixels"
        )
    if image.ndim == 2:
        return image[np.newaxis]
    if image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[0] > 8:
        return np.ascontiguousarray(np.moveaxis(image, 2, 0))
    if image.ndim == 3 and image.shape[0] <= 8:
        return image
    raise InputError(
        f"{origin} has shape {image.shape}; expected (y, x), (y, x, 3 or 4 samples) "
        "or (up to 8 channels, y, x)"
    )


def open_source(config: Mapping[str, Any]) -> SyntheticPlate | StackSource:
    """Open the image source a job config names.

    ``config["input"]`` is a path to user data; without it, ``config["plate"]``
    (a mapping of :class:`PlateSpec` fields, all optional) sizes a synthetic plate.
    """
    path = config.get("input")
    if path is not None:
        return StackSource(Path(str(path)).expanduser())
    return SyntheticPlate(PlateSpec.from_mapping(config.get("plate", {})))

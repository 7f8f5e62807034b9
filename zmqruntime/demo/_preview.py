"""A PNG montage of an OME-Zarr store written by :class:`OmeZarrWriter`.

One tile per well (its first field) for a plate, laid out as on the plate;
one tile per image for a stack (at most :data:`MAX_STACK_TILES`). Each tile is
the coarsest pyramid level, channels blended in their display colours, with
the outlines of the nuclei labels drawn in white. Images never written (NaN)
stay black.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from zmqruntime.demo._omezarr import CHANNEL_COLORS, LABEL_NAME, OmeZarrWriter

__all__ = ["MAX_STACK_TILES", "write_preview"]

MAX_STACK_TILES = 48

# Grey pixels between tiles.
GAP = 2


def _tile(
    image: npt.NDArray[Any], labels: npt.NDArray[Any], windows: list[tuple[float, float]]
) -> npt.NDArray[np.uint8]:
    """Blend a ``(channels, y, x)`` image into RGB and outline its labels."""
    rgb = np.zeros((*image.shape[1:], 3), dtype=np.float32)
    for index, plane in enumerate(image):
        start, end = windows[index]
        scaled = np.clip((np.nan_to_num(plane, nan=start) - start) / (end - start), 0.0, 1.0)
        color = CHANNEL_COLORS[index % len(CHANNEL_COLORS)]
        weights = np.array([int(color[i : i + 2], 16) / 255 for i in (0, 2, 4)], np.float32)
        rgb += scaled[..., np.newaxis] * weights
    rgb = np.clip(rgb, 0.0, 1.0)

    # A pixel is on an outline when a 4-neighbour carries another label.
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    rgb[edge & (labels > 0)] = 1.0
    return (rgb * 255).astype(np.uint8)


def write_preview(writer: OmeZarrWriter, path: Path) -> Path:
    """Write the montage of ``writer``'s store to ``path`` (PNG) and return ``path``."""
    from PIL import Image

    level = len(writer.levels) - 1
    tile_y, tile_x = writer.levels[level]
    windows = writer.windows

    if writer.kind == "plate":
        fields = writer.fields_per_well
        columns = len(writer.layout["columns"])
        rows = len(writer.layout["rows"])
        indices = list(range(0, writer.count, fields))
    else:
        indices = list(range(min(writer.count, MAX_STACK_TILES)))
        columns = math.ceil(math.sqrt(len(indices)))
        rows = math.ceil(len(indices) / columns)

    canvas = np.full(
        (rows * (tile_y + GAP) + GAP, columns * (tile_x + GAP) + GAP, 3), 64, dtype=np.uint8
    )
    for position, index in enumerate(indices):
        group = writer.image_group(index)
        prefix: tuple[int, ...] = () if writer.kind == "plate" else (index,)
        image = np.asarray(writer.array(f"{group}/{level}".lstrip("/"))[prefix])
        label_path = f"{group}/labels/{LABEL_NAME}/{level}".lstrip("/")
        labels = np.asarray(writer.array(label_path)[(*prefix, 0)])

        row, column = divmod(position, columns)
        top, left = GAP + row * (tile_y + GAP), GAP + column * (tile_x + GAP)
        canvas[top : top + tile_y, left : left + tile_x] = _tile(image, labels, windows)

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path

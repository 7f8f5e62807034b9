"""Tests of the OME-Zarr writer: NGFF metadata against the spec, pyramids, completeness."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url  # type: ignore[import-untyped]
from ome_zarr.reader import Plate, Reader  # type: ignore[import-untyped]
from ome_zarr_models.v05.hcs import HCS
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel

from sinks import ArraySpec, Region
from zmqruntime.demo import OmeZarrWriter, pyramid_shapes

PLATE_LAYOUT = {"kind": "plate", "rows": ["A", "B"], "columns": ["1", "2", "3"], "fields": 2}


def _specs(count: int, size: int, layout: dict[str, Any]) -> tuple[ArraySpec, ArraySpec]:
    ngff = {"layout": layout, "channels": ["nuclei", "marker"], "pixel_size_um": 0.5}
    images = ArraySpec(
        "images", (count, 2, size, size), np.dtype(np.float32), (1, 2, size, size), {"ngff": ngff}
    )
    labels = ArraySpec(
        "labels", (count, size, size), np.dtype(np.uint32), (1, size, size), {"ngff": ngff}
    )
    return images, labels


def _image(index: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    return rng.random((2, size, size), dtype=np.float32) * 100


def _labels(index: int, size: int) -> np.ndarray:
    labels = np.zeros((size, size), np.uint32)
    labels[4:12, 4:12] = index + 1
    return labels


def _write_all(writer: OmeZarrWriter, count: int, size: int, layout: dict[str, Any]) -> None:
    image_spec, label_spec = _specs(count, size, layout)
    images, labels = writer.sink("images"), writer.sink("labels")
    images.open(image_spec)
    labels.open(label_spec)
    for index in range(count):
        images.write(
            Region((index, 0, 0, 0), (index + 1, 2, size, size)), _image(index, size)[None]
        )
        labels.write(Region((index, 0, 0), (index + 1, size, size)), _labels(index, size)[None])
    images.finalize((count, 2, size, size))
    labels.finalize((count, size, size))


def _root_attrs(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "zarr.json").read_text())["attributes"])


def test_pyramid_shapes_stop_at_64() -> None:
    assert pyramid_shapes(256, 256) == [(256, 256), (128, 128), (64, 64)]
    assert pyramid_shapes(100, 300) == [(100, 300)]
    assert len(pyramid_shapes(4096, 4096)) == 4


def test_plate_metadata_valid_ngff(tmp_path: Path) -> None:
    store = tmp_path / "plate.ome.zarr"
    _write_all(OmeZarrWriter(store, name="test"), 12, 128, PLATE_LAYOUT)

    plate = HCS.from_zarr(zarr.open_group(store, mode="r"))
    assert len(plate.ome_attributes.plate.wells) == 6
    assert plate.ome_attributes.plate.field_count == 2

    field = Image.from_zarr(zarr.open_group(store / "B" / "3" / "1", mode="r"))
    axes = [axis.name for axis in field.ome_attributes.multiscales[0].axes]
    assert axes == ["c", "y", "x"]
    assert len(field.ome_attributes.multiscales[0].datasets) == 2

    ImageLabel.from_zarr(zarr.open_group(store / "B" / "3" / "1" / "labels" / "nuclei", mode="r"))


def test_plate_opens_with_ome_zarr_reader(tmp_path: Path) -> None:
    store = tmp_path / "plate.ome.zarr"
    _write_all(OmeZarrWriter(store), 12, 64, PLATE_LAYOUT)

    nodes = list(Reader(parse_url(str(store)))())
    assert any(isinstance(spec, Plate) for spec in nodes[0].specs)
    # The plate node stitches the first field of every well into one 2 x 3 grid.
    assert nodes[0].data[0].shape == (2, 2 * 64, 3 * 64)


def test_plate_field_pixels_and_pyramid(tmp_path: Path) -> None:
    store = tmp_path / "plate.ome.zarr"
    _write_all(OmeZarrWriter(store), 12, 128, PLATE_LAYOUT)

    # Image 7 is field 1 of well 3 (row B, column 1).
    full = np.asarray(zarr.open_array(store / "B" / "1" / "1" / "0", mode="r")[:])
    assert np.array_equal(full, _image(7, 128))
    half = np.asarray(zarr.open_array(store / "B" / "1" / "1" / "1", mode="r")[:])
    assert half.shape == (2, 64, 64)
    assert half[1, 3, 5] == pytest.approx(full[1, 6:8, 10:12].mean(), rel=1e-6)

    labels = np.asarray(
        zarr.open_array(store / "B" / "1" / "1" / "labels" / "nuclei" / "1", mode="r")[:]
    )
    assert labels.shape == (1, 64, 64)
    assert int(labels[0, 3, 3]) == 8


def test_stack_metadata_valid_ngff(tmp_path: Path) -> None:
    store = tmp_path / "stack.ome.zarr"
    _write_all(OmeZarrWriter(store), 3, 128, {"kind": "stack", "name": "s"})

    image = Image.from_zarr(zarr.open_group(store, mode="r"))
    axes = [axis.name for axis in image.ome_attributes.multiscales[0].axes]
    assert axes == ["t", "c", "y", "x"]
    ImageLabel.from_zarr(zarr.open_group(store / "labels" / "nuclei", mode="r"))
    assert np.array_equal(zarr.open_array(store / "0", mode="r")[2], _image(2, 128))


def test_store_complete_after_finalize(tmp_path: Path) -> None:
    store = tmp_path / "plate.ome.zarr"
    _write_all(OmeZarrWriter(store, name="x"), 12, 32, PLATE_LAYOUT)
    status = _root_attrs(store)["zmqruntime"]
    assert status["complete"] is True
    assert status["images_written"] == 12


def test_store_incomplete_after_abort_keeps_images(tmp_path: Path) -> None:
    store = tmp_path / "plate.ome.zarr"
    writer = OmeZarrWriter(store)
    image_spec, _ = _specs(12, 32, PLATE_LAYOUT)
    sink = writer.sink("images")
    sink.open(image_spec)
    sink.write(Region((0, 0, 0, 0), (1, 2, 32, 32)), _image(0, 32)[None])
    sink.abort("cancelled")

    status = _root_attrs(store)["zmqruntime"]
    assert status["complete"] is False
    assert status["reason"] == "cancelled"
    assert np.array_equal(zarr.open_array(store / "A" / "1" / "0" / "0")[:], _image(0, 32))
    # A field never written reads as NaN, and the metadata is still valid.
    assert np.isnan(zarr.open_array(store / "A" / "2" / "0" / "0")[:]).all()
    HCS.from_zarr(zarr.open_group(store, mode="r"))


def test_store_incomplete_while_running(tmp_path: Path) -> None:
    store = tmp_path / "plate.ome.zarr"
    writer = OmeZarrWriter(store)
    image_spec, _ = _specs(12, 32, PLATE_LAYOUT)
    writer.sink("images").open(image_spec)
    assert _root_attrs(store)["zmqruntime"]["complete"] is False


def test_store_counts_images_while_running(tmp_path: Path) -> None:
    store = tmp_path / "plate.ome.zarr"
    writer = OmeZarrWriter(store)
    writer.execution_id = "e1"
    image_spec, _ = _specs(12, 32, PLATE_LAYOUT)
    sink = writer.sink("images")
    sink.open(image_spec)
    before = _root_attrs(store)["zmqruntime"]
    sink.write(Region((0, 0, 0, 0), (1, 2, 32, 32)), _image(0, 32)[None])
    after_first = _root_attrs(store)["zmqruntime"]

    assert before["images_written"] == 0
    assert before["images_expected"] == 12
    assert after_first["images_written"] == 1
    assert after_first["status"] == "running"
    assert after_first["execution_id"] == "e1"
    # The plate metadata stays in the rewritten root document.
    assert "plate" in _root_attrs(store)["ome"]


def test_store_rewrites_leave_no_temporary_files(tmp_path: Path) -> None:
    store = tmp_path / "plate.ome.zarr"
    _write_all(OmeZarrWriter(store, name="x"), 12, 32, PLATE_LAYOUT)
    assert not list(store.rglob("*.tmp"))


def test_image_sink_joins_split_frames(tmp_path: Path) -> None:
    store = tmp_path / "plate.ome.zarr"
    writer = OmeZarrWriter(store)
    image_spec, _ = _specs(12, 32, PLATE_LAYOUT)
    sink = writer.sink("images")
    sink.open(image_spec)
    image = _image(3, 32)
    sink.write(Region((3, 0, 16, 0), (4, 2, 32, 32)), image[None, :, 16:])
    assert writer.images_written == 0
    sink.write(Region((3, 0, 0, 0), (4, 2, 16, 32)), image[None, :, :16])

    assert writer.images_written == 1
    assert np.array_equal(zarr.open_array(store / "A" / "2" / "1" / "0")[:], image)


def test_writer_refuses_foreign_directory(tmp_path: Path) -> None:
    store = tmp_path / "plate.ome.zarr"
    store.mkdir()
    image_spec, _ = _specs(12, 32, PLATE_LAYOUT)
    with pytest.raises(FileExistsError, match="overwrite"):
        OmeZarrWriter(store).sink("images").open(image_spec)


def test_writer_rejects_other_results(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'fields'"):
        OmeZarrWriter(tmp_path / "x.zarr").sink("fields")

"""Tests of the demo's image sources: the synthetic plate and user files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from zmqruntime.demo import InputError, PlateSpec, StackSource, SyntheticPlate, open_source
from zmqruntime.demo._plate import _ihc_channels


def test_plate_field_reproducible_and_order_free() -> None:
    plate = SyntheticPlate(PlateSpec(rows=2, columns=2, fields=2, image_size=64, seed=3))
    later = plate.read(5)
    first = plate.read(0)

    again = SyntheticPlate(PlateSpec(rows=2, columns=2, fields=2, image_size=64, seed=3))
    assert np.array_equal(again.read(0), first)
    assert np.array_equal(again.read(5), later)
    assert not np.array_equal(first, later)


def test_plate_pixels_come_from_ihc_image() -> None:
    # Without shot noise a field is an affine map of a crop of the real image;
    # with it, the field must still correlate strongly with some crop.
    plate = SyntheticPlate(PlateSpec(rows=1, columns=1, fields=1, image_size=128, seed=0))
    field = plate.read(0)[0].astype(np.float64)
    source = _ihc_channels()[0]

    rng = np.random.default_rng([0, 0, 0])
    top, left = int(rng.integers(0, 512 - 128 + 1)), int(rng.integers(0, 512 - 128 + 1))
    crop = source[top : top + 128, left : left + 128]
    candidates = [np.rot90(crop, k) for k in range(4)]
    candidates += [c[:, ::-1] for c in candidates]
    best = max(np.corrcoef(c.ravel(), field.ravel())[0, 1] for c in candidates)
    assert best > 0.95


def test_plate_dose_rises_across_columns() -> None:
    plate = SyntheticPlate(PlateSpec(rows=1, columns=4, fields=1, image_size=64))
    assert plate.dose(0) == pytest.approx(0.25)
    assert plate.dose(3) == pytest.approx(1.75)


def test_plate_shape_and_dtype() -> None:
    plate = SyntheticPlate(PlateSpec(rows=1, columns=2, fields=3, image_size=32))
    assert plate.count == 6
    assert plate.read(0).shape == (2, 32, 32)
    assert plate.read(0).dtype == np.uint16


@pytest.mark.parametrize(
    "options",
    [
        {"rows": 0},
        {"rows": 27},
        {"columns": 49},
        {"fields": 0},
        {"image_size": 8},
        {"image_size": 600},
    ],
)
def test_plate_spec_rejects_bad_size(options: dict[str, int]) -> None:
    with pytest.raises(InputError):
        PlateSpec(**options)


def test_plate_spec_rejects_unknown_option() -> None:
    with pytest.raises(InputError, match="wells"):
        PlateSpec.from_mapping({"wells": 96})


def test_stack_multipage_tiff(tmp_path: Path) -> None:
    stack = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")

    source = StackSource(path)
    assert source.count == 3
    assert source.image_shape == (1, 20, 30)
    assert np.array_equal(source.read(2)[0], stack[2])


def test_stack_folder_of_tiffs_sorted(tmp_path: Path) -> None:
    for index in (2, 0, 1):
        tifffile.imwrite(tmp_path / f"img_{index}.tif", np.full((8, 9), index, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")

    source = StackSource(tmp_path)
    assert source.count == 3
    assert [int(source.read(i)[0, 0, 0]) for i in range(3)] == [0, 1, 2]


def test_stack_rgb_tiff_becomes_channels(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 2] = 7
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")

    source = StackSource(tmp_path / "rgb.tif")
    assert source.image_shape == (3, 16, 16)
    assert int(source.read(0)[2, 0, 0]) == 7


def test_stack_npy_four_dimensional(tmp_path: Path) -> None:
    data = np.random.default_rng(1).random((4, 2, 10, 12)).astype(np.float32)
    np.save(tmp_path / "data.npy", data)

    source = open_source({"input": str(tmp_path / "data.npy")})
    assert source.count == 4
    assert source.image_shape == (2, 10, 12)
    assert np.array_equal(source.read(3), data[3])


def test_stack_rejects_mismatched_tiffs(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((8, 9), np.uint8))
    source = StackSource(tmp_path)
    with pytest.raises(InputError, match=r"b\.tif"):
        source.read(1)


def test_stack_rejects_bad_npy_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "flat.npy", np.zeros(10))
    with pytest.raises(InputError, match=r"\(10,\)"):
        StackSource(tmp_path / "flat.npy")


def test_stack_missing_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        StackSource(tmp_path / "missing.tif")


def test_stack_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no \.tif"):
        StackSource(tmp_path)


def test_stack_rejects_non_tiff_file(tmp_path: Path) -> None:
    (tmp_path / "notes.tif").write_text("plain text, not a TIFF")
    with pytest.raises(InputError, match=r"cannot read .*notes\.tif as a TIFF"):
        StackSource(tmp_path / "notes.tif")


def test_stack_rejects_corrupt_npy(tmp_path: Path) -> None:
    (tmp_path / "broken.npy").write_bytes(b"not numpy data")
    with pytest.raises(InputError, match=r"cannot read .*broken\.npy"):
        StackSource(tmp_path / "broken.npy")


def test_plate_spec_rejects_negative_seed() -> None:
    with pytest.raises(InputError, match="--seed"):
        PlateSpec(seed=-1)

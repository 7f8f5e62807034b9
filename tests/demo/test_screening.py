"""Tests of the screening pipeline's image processing and measurements."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import regionprops

from zmqruntime.demo import InputError, PlateSpec, SyntheticPlate
from zmqruntime.demo.screening import ProcessingOptions, check_config, measure, process_image


def _disks_image() -> np.ndarray:
    """Two channels: channel 0 has three bright disks on a sloped background."""
    y, x = np.mgrid[0:96, 0:96]
    image = np.zeros((2, 96, 96), dtype=np.float64)
    image[0] = 200 + y  # slowly varying background
    image[1] = 50
    for cy, cx, r in ((20, 20, 6), (60, 30, 7), (40, 75, 5)):
        disk = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
        image[0][disk] += 1000
        image[1][disk] += 300
    return image.astype(np.uint16)


def test_process_image_finds_disks() -> None:
    segmentation = process_image(_disks_image(), ProcessingOptions(min_area=10))
    assert segmentation.count == 3
    assert segmentation.labels.dtype == np.uint32
    assert int(segmentation.labels.max()) == 3


def test_process_image_removes_sloped_background() -> None:
    segmentation = process_image(_disks_image(), ProcessingOptions(min_area=10))
    far_from_disks = segmentation.corrected[0, 85:, 5:15]
    assert float(far_from_disks.max()) < 20.0


def test_process_image_drops_small_objects() -> None:
    image = _disks_image()
    segmentation = process_image(image, ProcessingOptions(min_area=130))
    # Only the radius-7 disk (about 150 px after smoothing) stays.
    assert segmentation.count == 1


def test_process_image_flat_image_has_no_objects() -> None:
    image = np.full((1, 32, 32), 500, dtype=np.uint16)
    segmentation = process_image(image, ProcessingOptions())
    assert segmentation.count == 0
    assert int(segmentation.labels.max()) == 0


def test_process_image_rejects_missing_channel() -> None:
    with pytest.raises(ValueError, match="segment_channel 2"):
        process_image(np.zeros((2, 16, 16), np.uint16), ProcessingOptions(segment_channel=2))


def test_measure_matches_regionprops_on_plate_field() -> None:
    field = SyntheticPlate(PlateSpec(rows=1, columns=1, fields=1, image_size=128)).read(0)
    segmentation = process_image(field, ProcessingOptions())
    row, objects = measure(segmentation, 0, "A1", 0)

    props = regionprops(segmentation.labels.astype(np.int64))  # type: ignore[no-untyped-call]
    assert len(props) == segmentation.count
    assert objects.shape == (segmentation.count,)
    for prop, obj in zip(props, objects, strict=True):
        assert obj["label"] == prop.label
        assert obj["area_px"] == prop.area
        assert obj["centroid_y"] == pytest.approx(prop.centroid[0], abs=1e-3)
        assert obj["centroid_x"] == pytest.approx(prop.centroid[1], abs=1e-3)
        for channel in range(2):
            expected = segmentation.corrected[channel][prop.coords[:, 0], prop.coords[:, 1]].mean()
            assert obj["mean_intensity"][channel] == pytest.approx(expected, rel=1e-4)

    assert row["count"] == segmentation.count
    assert row["total_area_px"] == sum(p.area for p in props)
    assert row["well"] == "A1"


def test_measure_empty_image_row() -> None:
    segmentation = process_image(np.full((2, 32, 32), 9, np.uint16), ProcessingOptions())
    row, objects = measure(segmentation, 4, "B2", 1)
    assert objects.shape == (0,)
    assert row["count"] == 0
    assert row["mean_area_px"] == 0.0
    assert row["image"] == 4


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"min_area": -1}, "min_area"),
        ({"pixel_size_um": 0}, "pixel_size_um"),
        ({"pixel_size_um": float("nan")}, "pixel_size_um"),
        ({"smoothing_sigma": -0.5}, "smoothing_sigma"),
        ({"segment_channel": -1}, "numbered from 0"),
        ({"segment_channel": 2}, "choose 0 to 1"),
        ({"thresold": 3}, "unknown config key"),
        ({"plate": {"rows": 27}}, "--rows"),
    ],
)
def test_check_config_rejects(config: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        check_config(config)


def test_check_config_opens_plate() -> None:
    source, options = check_config({"plate": {"rows": 1, "columns": 2}, "min_area": 0})
    assert source.count == 18
    assert options.min_area == 0

from __future__ import annotations

import math

import pytest

from sinks import Region
from zmqruntime import MAX_CHUNK_BYTES, ChunkingError, default_chunks
from zmqruntime._chunking import iter_regions, regions_within, validate_chunks


def test_default_chunks_whole_frame_for_image_stack() -> None:
    assert default_chunks((256, 2048, 2048), 2, group_frames=False) == (1, 2048, 2048)


def test_default_chunks_groups_small_frames() -> None:
    chunks = default_chunks((100, 256, 256), 2)

    assert chunks == (32, 256, 256)


def test_default_chunks_splits_large_frame_into_row_bands() -> None:
    chunks = default_chunks((4, 8192, 8192), 4)

    assert chunks[0] == 1
    assert chunks[2] == 8192
    assert math.prod(chunks) * 4 <= 4 << 20


def test_default_chunks_split_array_above_two_gib_without_allocating() -> None:
    shape = (2**31 + 16,)

    chunks = default_chunks(shape, 1)
    regions = list(iter_regions(shape, chunks))

    assert max(math.prod(r.shape) for r in regions) <= MAX_CHUNK_BYTES
    assert sum(math.prod(r.shape) for r in regions) == 2**31 + 16
    assert regions[-1].stop == shape


def test_validate_chunks_rejects_chunk_of_two_gib() -> None:
    with pytest.raises(ChunkingError, match="above the limit"):
        validate_chunks((2**31 + 16,), (2**31 + 16,), 1)


def test_validate_chunks_rejects_wrong_axis_count() -> None:
    with pytest.raises(ChunkingError, match="axes"):
        validate_chunks((4, 4), (4,), 1)


def test_iter_regions_zero_size_yields_nothing() -> None:
    assert list(iter_regions((3, 0, 5), (1, 1, 5))) == []


def test_iter_regions_zero_d_yields_one_region() -> None:
    assert list(iter_regions((), ())) == [Region((), ())]


def test_iter_regions_edge_chunks_cover_shape() -> None:
    regions = list(iter_regions((5, 7), (2, 3)))

    assert len(regions) == 9
    assert regions[-1] == Region((4, 6), (5, 7))


def test_regions_within_rejects_misaligned_region() -> None:
    with pytest.raises(ChunkingError, match="chunk grid"):
        list(regions_within(Region((1, 0), (2, 4)), (4, 4), (2, 4)))


def test_regions_within_growable_axis_accepts_whole_cells() -> None:
    cells = list(regions_within(Region((2, 0), (4, 4)), (None, 4), (1, 4)))

    assert cells == [Region((2, 0), (3, 4)), Region((3, 0), (4, 4))]

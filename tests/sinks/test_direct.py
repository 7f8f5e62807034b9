"""Direct (``O_DIRECT``) writes through a staging buffer, on real files."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from sinks._direct import ALIGN, Staging, open_direct


def _direct_fd(path: Path) -> int:
    fd = open_direct(path, os.O_WRONLY | os.O_CREAT)
    if fd is None:
        pytest.skip(f"{path.parent} does not support O_DIRECT")
    return fd


def test_staging_aligned_payload_written_without_staging(tmp_path: Path) -> None:
    source = mmap.mmap(-1, 3 * ALIGN)
    source.write(np.arange(3 * ALIGN, dtype=np.uint8).tobytes())
    path = tmp_path / "aligned.bin"
    fd = _direct_fd(path)
    staging = Staging()

    try:
        staging.write_at(fd, ALIGN, memoryview(source))
    finally:
        os.close(fd)

    data = path.read_bytes()
    assert data[ALIGN:] == bytes(source)
    # The staging buffer keeps its first size when the payload needed no copy.
    assert len(staging._buffer) == ALIGN
    staging.close()


def test_staging_unaligned_payload_padded(tmp_path: Path) -> None:
    backing = np.arange(2 * ALIGN + 101, dtype=np.uint8)
    payload = memoryview(backing)[1:]  # starts one byte past the allocation, so not aligned
    path = tmp_path / "unaligned.bin"
    fd = _direct_fd(path)
    staging = Staging()

    try:
        staging.write_at(fd, 0, payload)
    finally:
        os.close(fd)

    data = path.read_bytes()
    assert data[: payload.nbytes] == payload.tobytes()
    assert len(data) == 3 * ALIGN
    staging.close()

"""Test arrays of the benchmark suite: uint16 stacks of microscopy-like or random frames.

This module imports only numpy and the standard library because the
end-to-end benchmark sends its text, followed by a pipeline function, to the
server as pipeline source (see ``pipeline_source`` in ``_suite_e2e``).
"""

from __future__ import annotations

import numpy as np

FRAME_ROWS = 2048
FRAME_COLS = 2048
ITEMSIZE = 2
FRAME_BYTES = FRAME_ROWS * FRAME_COLS * ITEMSIZE

# Distinct frames made per stack; later frames repeat them. Poisson sampling
# costs about 0.1 s per 2048 x 2048 frame, so a whole 1 GiB stack of distinct
# frames would take longer to make than to send. Blosc compresses each chunk
# on its own, so the repeats do not raise the compression ratio.
DISTINCT_FRAMES = 8


def stack_shape(nbytes: int) -> tuple[int, int, int]:
    """Return the uint16 stack shape of ``nbytes``: 2048 x 2048 frames, or one narrower frame.

    Sizes below one frame (8 MiB) become a single frame of 2048 columns, so
    ``nbytes`` must be a multiple of 4096 there and of 8 MiB above.
    """
    if nbytes >= FRAME_BYTES:
        if nbytes % FRAME_BYTES:
            raise ValueError(f"size {nbytes} is not a multiple of one 8 MiB frame")
        return (nbytes // FRAME_BYTES, FRAME_ROWS, FRAME_COLS)

    row_bytes = FRAME_COLS * ITEMSIZE
    if nbytes <= 0 or nbytes % row_bytes:
        raise ValueError(f"size {nbytes} is not a positive multiple of {row_bytes} bytes")
    return (1, nbytes // row_bytes, FRAME_COLS)


def distinct_frames(shape: tuple[int, int, int], kind: str, seed: int = 0) -> np.ndarray:
    """Make up to ``DISTINCT_FRAMES`` frames of ``shape[1:]`` with data of ``kind``.

    ``"microscopy"`` is a smooth Gaussian background of about 300 to 500
    counts with Poisson noise. ``"random"`` is uniform over the whole uint16
    range, which blosc cannot compress.
    """
    count = min(shape[0], DISTINCT_FRAMES)
    rows, cols = shape[1], shape[2]
    rng = np.random.default_rng(seed)
    frames = np.empty((count, rows, cols), np.uint16)

    if kind == "random":
        for i in range(count):
            frames[i] = rng.integers(0, 1 << 16, (rows, cols), dtype=np.uint16)
        return frames
    if kind != "microscopy":
        raise ValueError(f"data kind {kind!r} is not 'microscopy' or 'random'")

    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    for i in range(count):
        cy, cx = rng.uniform(0.25, 0.75, 2) * (rows, cols)
        width = 0.35 * max(rows, cols)
        background = 300 + 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
        frames[i] = rng.poisson(background).astype(np.uint16)
    return frames


def full_stack(shape: tuple[int, int, int], kind: str, seed: int = 0) -> np.ndarray:
    """Make the whole stack in one array; frame ``i`` is distinct frame ``i % DISTINCT_FRAMES``."""
    frames = distinct_frames(shape, kind, seed)
    stack = np.empty(shape, np.uint16)
    for i in range(shape[0]):
        stack[i] = frames[i % len(frames)]
    return stack

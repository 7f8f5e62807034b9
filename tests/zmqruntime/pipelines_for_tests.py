"""Importable pipelines for the control-plane tests (referenced as 'module:function')."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def yield_two(ctx: Any, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray[Any, Any]]]:
    """Yield two whole arrays, each sent as its own result."""
    yield "a", np.ones((2, 3), np.uint8)
    yield "b", np.arange(5.0)

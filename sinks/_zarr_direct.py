"""Chunk files of a local zarr store written past the page cache.

zarr's ``LocalStore`` writes each chunk through the page cache. For large
results this module writes the same bytes to the same file names with
``O_DIRECT`` (see :mod:`sinks._direct` for why and what it measured), through
a temporary file that is renamed into place, as ``LocalStore`` does. A
viewer that reads the store while it fills therefore reads whole chunks only.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, cast

import numpy as np

from ._direct import Staging, write_file_direct

logger = logging.getLogger(__name__)

__all__ = ["DirectChunkWriter"]


class DirectChunkWriter:
    """Writes encoded chunks of one local store as files, bypassing the page cache.

    Thread safe: each writing thread gets its own staging buffer.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._local = threading.local()
        self._lock = threading.Lock()
        self._made_dirs: set[Path] = set()
        self._stagings: list[Staging] = []
        self._supported = True

    @classmethod
    def for_store(cls, store: Any) -> DirectChunkWriter | None:
        """Return a writer for a ``LocalStore``, None for any other store."""
        from zarr.storage import LocalStore

        if not isinstance(store, LocalStore):
            return None
        return cls(Path(store.root))

    def put(self, key: str, data: Any) -> bool:
        """Write ``data`` (a zarr Buffer or a uint8 ndarray) as the file of ``key``.

        Returns False, writing nothing, when the file system has no
        ``O_DIRECT``; every later call then returns False at once.
        """
        if not self._supported:
            return False
        array = data if isinstance(data, np.ndarray) else data.as_numpy_array()
        payload = memoryview(cast(Any, np.ascontiguousarray(array).reshape(-1).view(np.uint8)))

        path = self.root / key
        self._make_parent(path.parent)
        if write_file_direct(path, payload, self._staging()):
            return True
        self._supported = False
        logger.debug("no O_DIRECT under %s; chunks go through the page cache", self.root)
        return False

    def close(self) -> None:
        """Release the staging buffers; call once no thread writes any more."""
        with self._lock:
            for staging in self._stagings:
                staging.close()
            self._stagings.clear()

    def _staging(self) -> Staging:
        staging: Staging | None = getattr(self._local, "staging", None)
        if staging is None:
            staging = Staging()
            self._local.staging = staging
            with self._lock:
                self._stagings.append(staging)
        return staging

    def _make_parent(self, directory: Path) -> None:
        with self._lock:
            if directory in self._made_dirs:
                return
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._made_dirs.add(directory)

"""Large result arrays whose pages are faulted in by a background thread.

A fresh anonymous page costs a page fault and a zeroing in the kernel the
first time it is written. Receiving into a fresh 1 GiB array therefore ran at
0.5 to 0.7 GB/s on a 2-core test machine, against 2.6 GB/s into memory that
was already touched. This module maps the array with ``mmap`` and lets a
thread fault its pages in ahead of the receiver with
``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14 and later), a single system call
per step that runs without the GIL. With it the same stream ran at 2.4 GB/s.

Transparent huge pages are turned off for these mappings. The test machine
is a virtual machine whose balloon device reports free memory to the host.
There, huge pages faulted in at 11 to 12 GB/s when the memory had been freed
less than a second before. Once it had lain free for a few seconds (1 to 6 s
in four runs), the host had taken it back and had to supply it again, and
huge pages faulted in at 0.6 to 2.2 GB/s. 4 KiB pages faulted in at 3.5 GB/s
after any pause, as the repository's ``python -m benchmarks.first_touch``
shows. A new result array usually comes from memory that lay free for
seconds, so 4 KiB pages are faster there.

NOTE: on bare metal, or on a VM without free page reporting, huge pages would
likely fault in about three times faster. The module does not detect which
case applies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import sys
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

__all__ = ["PREFAULT_MIN_BYTES", "Prefaulter", "allocate_zeroed"]

# Below this size the fault cost is small against the stream and a thread is
# not worth starting, in bytes.
PREFAULT_MIN_BYTES = 64 << 20

# Bytes faulted in per system call: small enough that stop() returns quickly,
# large enough that the call overhead is negligible.
_STEP_BYTES = 32 << 20

# From <linux/mman.h>; Python's mmap module does not export it before 3.13.
_MADV_POPULATE_WRITE = 23


def _load_madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def allocate_zeroed(
    shape: tuple[int, ...], dtype: np.dtype[Any]
) -> tuple[npt.NDArray[Any], Prefaulter | None]:
    """Return a zeroed, writable, C-ordered array and the thread filling in its pages.

    The array is backed by a private anonymous mapping when it has at least
    :data:`PREFAULT_MIN_BYTES` and the platform has ``madvise``; the mapping
    lives as long as the array (its ``base``). The returned
    :class:`Prefaulter` is already started; stop it once the array is
    complete or abandoned. Smaller arrays come from ``np.zeros`` and no thread.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < PREFAULT_MIN_BYTES or _madvise is None:
        return np.zeros(shape, dtype=dtype), None

    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    array = np.frombuffer(mapping, dtype=dtype).reshape(shape)
    prefaulter = Prefaulter(mapping, nbytes)
    prefaulter.start()
    return array, prefaulter


class Prefaulter:
    """Faults in the pages of one anonymous mapping from a daemon thread.

    Holds a reference to the mapping, so the memory stays mapped while the
    thread runs. Faulting a page in does not change its contents, so the
    receiver may write anywhere at any time. Thread safe: :meth:`stop` may be
    called from any thread, more than once.
    """

    def __init__(self, mapping: mmap.mmap, nbytes: int) -> None:
        self._mapping: mmap.mmap | None = mapping
        self._nbytes = nbytes
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sinks-prefault", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop after its current step and wait for it.

        Returns within one step (32 MiB of faults, a few milliseconds).
        """
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._mapping = None

    def _run(self) -> None:
        mapping = self._mapping
        assert mapping is not None and _madvise is not None
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))

        for offset in range(0, self._nbytes, _STEP_BYTES):
            if self._stopped.is_set():
                return
            length = min(_STEP_BYTES, self._nbytes - offset)
            if _madvise(address + offset, length, _MADV_POPULATE_WRITE) != 0:
                # Kernels before 5.14 return EINVAL. The receiver's own writes
                # then fault the pages in as before, only slower.
                logger.debug(
                    "madvise(MADV_POPULATE_WRITE) failed with errno %d; pages fault on write",
                    ctypes.get_errno(),
                )
                return

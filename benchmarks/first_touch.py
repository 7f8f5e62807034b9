"""Fault-in rate of new memory, by page size and by how long the memory lay free.

Run: ``python -m benchmarks.first_touch`` (Linux 5.14 or later, about 30 s).

Each step maps 1 GiB of anonymous memory, faults all of it in with
``madvise(MADV_POPULATE_WRITE)`` and unmaps it, then waits before the next
step. It prints GB/s for 4 KiB pages and for transparent huge pages after each
pause. On a virtual machine whose balloon device reports free pages to the
host, memory that lay free for more than 1 to 3 s has been handed back, and
the host must supply it again on the next touch. This is why a receiver's
first write to a new result array costs more there than on bare metal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
import time
from typing import Any

NBYTES = 1 << 30
STEP = 32 << 20
PAUSES_S = (0.0, 0.2, 1.0, 3.0, 6.0)
# The value from <linux/mman.h>. Python's mmap module exports it only from 3.13.
MADV_POPULATE_WRITE = 23


def _populate_gbps(madvise: Any, huge: bool) -> float:
    mapping = mmap.mmap(-1, NBYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))

    started = time.perf_counter()
    for offset in range(0, NBYTES, STEP):
        if madvise(address + offset, STEP, MADV_POPULATE_WRITE) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE) failed")
    seconds = time.perf_counter() - started

    # The exported pointer must be gone before the mapping can close.
    del address
    mapping.close()
    return NBYTES / seconds / 1e9


def main() -> int:
    """Print the fault-in rate for each page size and pause, and return the exit status."""
    if not sys.platform.startswith("linux"):
        print("first_touch needs Linux (madvise with MADV_POPULATE_WRITE)")
        return 1
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int

    print("page size   pause before (s)   fault-in GB/s")
    for huge in (False, True):
        for pause in PAUSES_S:
            # The warm-up step frees 1 GiB that the timed step may get back.
            _populate_gbps(madvise, huge)
            time.sleep(pause)
            gbps = _populate_gbps(madvise, huge)
            print(f"{'2 MiB' if huge else '4 KiB':9s}   {pause:16.1f}   {gbps:13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

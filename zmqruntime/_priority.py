"""Lower the CPU priority of the server's data-path threads.

On a busy machine a control request and its reply pass through several
threads (the client's, libzmq's I/O threads and the server's control loop),
and each one waits for a CPU behind the threads that move result data. Giving
the data-path threads a higher nice value lets the control path run first.
Nice values only matter while the CPUs are saturated, so an idle machine
streams as fast as before.

Linux applies nice values per thread (``setpriority`` with a thread id), and a
new thread inherits its creator's value. Elsewhere these functions do nothing.
A higher nice value never needs privileges; a failure is logged and ignored.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

__all__ = ["lower_current_thread", "lower_new_zmq_threads", "thread_ids", "zmq_thread_ids"]

logger = logging.getLogger(__name__)

# Highest nice value Linux accepts.
_MAX_NICE = 19

_TASK_DIR = "/proc/self/task"


def _supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "setpriority")


def _lower(thread_id: int, increment: int) -> None:
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(_MAX_NICE, current + increment))
    except OSError as exc:
        logger.debug("could not raise the nice value of thread %d: %s", thread_id, exc)


def lower_current_thread(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (capped at 19); 0 does nothing."""
    if increment > 0 and _supported():
        _lower(threading.get_native_id(), increment)


def thread_ids() -> set[int]:
    """Return the ids of all of this process's threads, or an empty set where unsupported."""
    if not _supported():
        return set()
    return {int(name) for name in os.listdir(_TASK_DIR)}


def zmq_thread_ids() -> set[int]:
    """Return the ids of this process's libzmq background threads (named ``ZMQbg/...``)."""
    if not _supported():
        return set()
    found = set()
    for name in os.listdir(_TASK_DIR):
        try:
            with open(f"{_TASK_DIR}/{name}/comm") as comm:
                if comm.read().startswith("ZMQbg/"):
                    found.add(int(name))
        except OSError:
            continue  # the thread ended meanwhile
    return found


def lower_new_zmq_threads(
    before: set[int], increment: int, expected: int, timeout: float = 1.0
) -> None:
    """Raise the nice value of libzmq threads that are not in ``before`` by ``increment``.

    Take ``before`` with :func:`thread_ids` just before the first socket of a
    context is created (libzmq starts a context's threads then), and call
    this right after with ``expected``, the number of threads the context
    starts (its I/O threads plus one reaper), so only that context's threads
    are changed. Each libzmq thread names itself ``ZMQbg/...`` once it runs,
    so right after the socket is created a new thread may not carry its name
    yet. This waits up to ``timeout`` seconds for ``expected`` new named
    threads, then lowers those it found. ``before`` contains every thread, named
    or not, so threads of an earlier context that were still unnamed then are
    never taken for new ones.
    """
    if increment <= 0 or not _supported():
        return
    deadline = time.monotonic() + timeout
    new = zmq_thread_ids() - before
    while len(new) < expected and time.monotonic() < deadline:
        time.sleep(0.001)
        new = zmq_thread_ids() - before
    if len(new) < expected:
        logger.debug("found %d of %d new libzmq threads to lower", len(new), expected)
    for thread_id in new:
        _lower(thread_id, increment)

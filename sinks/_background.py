"""A background thread that stores chunks, with a bound on the bytes queued."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["BackgroundWriter"]


class BackgroundWriter:
    """Runs store calls in order in one thread while the caller goes on receiving.

    :meth:`submit` blocks while more than ``max_pending_bytes`` are queued, so
    a slow disk slows the receiver instead of filling memory. A single job
    larger than the bound is still accepted when nothing else is queued. The
    first exception a job raises is kept: every later :meth:`submit` raises it
    again at once, and :meth:`drain` returns it.

    Thread safe.
    """

    def __init__(self, name: str, max_pending_bytes: int) -> None:
        self._max_pending = max(1, max_pending_bytes)
        self._pending = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name
        )

    @property
    def error(self) -> BaseException | None:
        """The first exception a job raised, or None."""
        return self._error

    def submit(self, nbytes: int, function: Callable[..., Any], *args: Any) -> None:
        """Queue ``function(*args)``, which stores ``nbytes`` bytes.

        The arguments must stay unchanged until the job has run: the caller
        hands their memory over. Raises the first error of an earlier job
        instead of queueing.
        """
        with self._cond:
            while (
                self._error is None and self._pending and self._pending + nbytes > self._max_pending
            ):
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._pending += nbytes
        self._executor.submit(self._run, nbytes, function, args)

    def drain(self) -> BaseException | None:
        """Wait until every queued job has run; return the first error, if any."""
        with self._cond:
            while self._pending:
                self._cond.wait()
            return self._error

    def close(self) -> BaseException | None:
        """Drain, stop the thread and return the first error, if any."""
        error = self.drain()
        self._executor.shutdown(wait=True)
        return error

    def _must_wait(self, nbytes: int) -> bool:
        full = self._pending > 0 and self._pending + nbytes > self._max_pending
        return full and self._error is None

    def _run(self, nbytes: int, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            if self._error is None:
                function(*args)
        except BaseException as exc:
            with self._cond:
                if self._error is None:
                    self._error = exc
        finally:
            with self._cond:
                self._pending -= nbytes
                self._cond.notify_all()

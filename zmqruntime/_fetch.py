"""The client end of one fetch: its data and credit sockets, and the arena it may read."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import zmq

from ._arena import ArenaReader
from ._receiver import DEFAULT_HWM
from ._transfer import pack_arena_reply, pack_closed, pack_credit, pack_done

logger = logging.getLogger(__name__)

__all__ = ["FetchSockets", "early_end_reason"]


# How long closing a fetch early may wait for its last message to leave, in ms.
_CLOSED_LINGER_MS = 200


class FetchSockets:
    """The client end of one transfer: a PULL for data, a PUSH for credits, maybe an arena."""

    def __init__(self, context: zmq.Context[Any], reply: Mapping[str, Any], exec_id: str) -> None:
        self.data = context.socket(zmq.PULL)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.setsockopt(zmq.RCVHWM, DEFAULT_HWM)
        self.data.connect(reply["data_endpoint"])
        self._credits = context.socket(zmq.PUSH)
        self._credits.setsockopt(zmq.LINGER, 0)
        self._credits.connect(reply["credit_endpoint"])
        self.arena: ArenaReader | None = None
        self._unsent_credit = 0

        locator = reply.get("arena")
        if locator:
            try:
                self.arena = ArenaReader(locator, exec_id)
            except (OSError, KeyError, ValueError, TypeError) as exc:
                # Another host or another user: the socket carries the payloads.
                logger.debug("execution %s: arena not readable here: %s", exec_id, exc)
            self._credits.send(pack_arena_reply(self.arena is not None))

    def credit(self, nbytes: int) -> None:
        # Never blocks: credits the socket cannot take now are added to the next.
        self._unsent_credit += nbytes
        try:
            self._credits.send(pack_credit(self._unsent_credit), zmq.NOBLOCK)
        except zmq.Again:
            return
        self._unsent_credit = 0

    def done(self) -> None:
        # A short linger so the acknowledgement leaves before the socket closes.
        if self._unsent_credit:
            self._credits.send(pack_credit(self._unsent_credit))
        self._credits.send(pack_done())
        self._credits.close(linger=1000)

    def __enter__(self) -> FetchSockets:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.data.close(linger=0)
        if not self._credits.closed:
            # Ended early (a sink error, or the iterator closed): without this
            # message the server would keep the transfer until its timeout.
            try:
                self._credits.send(pack_closed(), zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                logger.debug("could not notify the server that the fetch ended early: %s", exc)
            self._credits.close(linger=_CLOSED_LINGER_MS)
        if self.arena is not None:
            self.arena.close()


def early_end_reason(exc: BaseException) -> str:
    """Return the reason an aborted fetch records, from the exception that ended it."""
    if isinstance(exc, GeneratorExit):
        return "the caller closed the fetch before the stream end"
    return f"the fetch stopped before the stream end: {type(exc).__name__}: {exc}"

"""Small helpers around pyzmq shared by the sending and receiving sides."""

from __future__ import annotations

from typing import Any

import zmq

__all__ = ["endpoint_of"]


def endpoint_of(socket: zmq.Socket[Any]) -> str:
    """Return the endpoint a socket last bound or connected to, for error messages."""
    try:
        endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
    except zmq.ZMQError:
        return "<unknown endpoint>"
    text = endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
    return text or "<unbound socket>"

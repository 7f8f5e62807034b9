"""A forwarding TCP proxy on 127.0.0.1 that limits bandwidth with a token bucket.

The proxy listens on a random loopback port and forwards every connection to
one loopback target. Both directions share the configured rate, and each
direction is capped on its own (the ZMTP handshake and zmqruntime credits
going back are tiny). Threads do the copying, so the proxy itself costs CPU:
on 2 cores it cannot forward much more than about 1 GB/s, and a 10 Gbit/s
limit is an upper bound rather than what the link delivers.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

logger = logging.getLogger(__name__)

_BLOCK_BYTES = 256 << 10
_MAX_CONNECTIONS = 8
_ACCEPT_POLL_S = 0.2


class TokenBucket:
    """Releases bytes at ``rate`` bytes per second with bursts of at most ``burst`` bytes.

    Thread safe: several relay threads may take from one bucket.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0:
            raise ValueError(f"rate {rate} bytes/s must be positive")
        self.rate = rate
        self.burst = max(burst, _BLOCK_BYTES)
        self._tokens = float(self.burst)
        self._stamp = time.perf_counter()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        """Block until ``nbytes`` tokens are available, then remove them."""
        while True:
            with self._lock:
                now = time.perf_counter()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= nbytes:
                    self._tokens -= nbytes
                    return
                wait = (nbytes - self._tokens) / self.rate
            time.sleep(wait)


class ThrottledProxy:
    """Forwards connections from ``self.port`` to ``target_port``, both on 127.0.0.1.

    ``forwarded_bytes`` counts bytes sent towards the target (the data
    direction of a PUSH that connects through the proxy). Use as a context
    manager; leaving it closes the listener and every connection.
    """

    def __init__(self, target_port: int, bits_per_s: float) -> None:
        rate = bits_per_s / 8
        # A burst of 2 ms of traffic keeps sleeps coarse enough for time.sleep.
        self._forward = TokenBucket(rate, int(rate * 0.002))
        self._backward = TokenBucket(rate, int(rate * 0.002))
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_ACCEPT_POLL_S)
        self.port: int = self._listener.getsockname()[1]
        self.forwarded_bytes = 0
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> ThrottledProxy:
        accept = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set() and len(self._sockets) < 2 * _MAX_CONNECTIONS:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError as error:
                logger.warning("proxy could not connect to %s: %s", self._target, error)
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            self._relay(client, upstream, self._forward, counted=True)
            self._relay(upstream, client, self._backward, counted=False)

    def _relay(
        self, source: socket.socket, dest: socket.socket, bucket: TokenBucket, counted: bool
    ) -> None:
        thread = threading.Thread(
            target=self._copy, args=(source, dest, bucket, counted), name="proxy-relay", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _copy(
        self, source: socket.socket, dest: socket.socket, bucket: TokenBucket, counted: bool
    ) -> None:
        block = bytearray(_BLOCK_BYTES)
        view = memoryview(block)
        try:
            while not self._stop.is_set():
                nbytes = source.recv_into(block)
                if nbytes == 0:
                    break
                bucket.take(nbytes)
                dest.sendall(view[:nbytes])
                if counted:
                    with self._count_lock:
                        self.forwarded_bytes += nbytes
        except OSError:
            # The other side closed or __exit__ shut the sockets down.
            pass
        finally:
            with contextlib.suppress(OSError):
                dest.shutdown(socket.SHUT_WR)

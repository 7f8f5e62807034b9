"""Turn the ``sink=`` argument of a fetch into one sink per result.

The rules are those of :func:`sinks.resolve_sinks` (one argument, one sink per
result name). Unless the caller names the results it fetches, every result
gets its per-result target (``out.<name>.npy``, ``out.zarr/<name>``), one
result alone included, so the layout never depends on whether the fetch
began before or after the run ended. With exactly one name in ``names=``
the path is used as given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sinks import ArraySpec, Sink, resolve_result_sink, resolve_sink, resolve_sinks

__all__ = ["SinkArgument", "make_sink_factory"]

SinkArgument = Any


def make_sink_factory(
    sink: SinkArgument, known_names: Sequence[str] | None = None
) -> Callable[[ArraySpec], Sink]:
    """Return ``sink_for(spec) -> Sink`` for one fetch.

    ``known_names`` are the result names the fetch will carry, when known;
    with several of them, a path argument such as ``out.npy`` becomes
    ``out.<name>.npy`` per result (see :func:`sinks.resolve_sinks`). Without
    them, every result gets its per-result target, one result alone included
    (see :func:`sinks.resolve_result_sink`); a single Sink instance is used
    for the first result only.

    Raises
    ------
    sinks.SinkConfigError
        The argument names no sink; the message lists the valid ones.
    """
    resolved: dict[str, Sink] = {}
    if known_names:
        resolved = resolve_sinks(sink, list(known_names))

    def sink_for(spec: ArraySpec) -> Sink:
        if spec.name in resolved:
            return resolved.pop(spec.name)
        if isinstance(sink, Sink):
            return resolve_sink(sink, spec_name=spec.name)
        return resolve_result_sink(sink, spec.name)

    return sink_for

"""Turn a user's ``sink=`` argument into :class:`Sink` objects.

Accepted arguments, checked in this order:

- a :class:`Sink` instance: used as it is (one result only);
- a :class:`Sink` subclass: instantiated without arguments;
- a name: ``"memory"``, ``"memmap"``, ``"zarr"``, a name added with
  :func:`register_sink`, or a name another installed package registers in the
  entry-point group ``zmqruntime.sinks``;
- a ``str`` or ``os.PathLike`` ending in ``.npy`` (memmap) or ``.zarr`` (zarr);
- a zarr store object (``zarr.abc.store.Store``): a zarr array in that store;
- any other callable: called with the result name, it must return a new sink.

``"memmap"`` and ``"zarr"`` without a path write to a new file or directory in
the system temporary directory (``tempfile.gettempdir()``, which honours
``TMPDIR``), named ``zmqruntime-<result>-<random>.npy`` or ``.zarr``. Nothing
deletes it: the caller owns it and finds its path in the sink's ``path``
attribute, the returned memmap's ``filename`` or the zarr array's store.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._base import Sink, SinkConfigError
from ._memmap import MemmapSink
from ._memory import MemorySink
from ._zarr import ZarrSink

logger = logging.getLogger(__name__)

__all__ = ["ENTRY_POINT_GROUP", "available_sinks", "register_sink", "resolve_sink", "resolve_sinks"]

ENTRY_POINT_GROUP = "zmqruntime.sinks"

_PATH_SUFFIXES = (".npy", ".zarr")

# Result names become file names and zarr array paths, so they must be safe as both.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

_registered: dict[str, Callable[[], Sink]] = {}


def _temporary_memmap(label: str) -> Sink:
    fd, name = tempfile.mkstemp(prefix=f"zmqruntime-{label}-", suffix=".npy")
    os.close(fd)
    logger.info("result %r goes to temporary memmap file %s; delete it when done", label, name)
    return MemmapSink(name, overwrite=True)


def _temporary_zarr(label: str) -> Sink:
    directory = tempfile.mkdtemp(prefix=f"zmqruntime-{label}-", suffix=".zarr")
    logger.info("result %r goes to temporary zarr store %s; delete it when done", label, directory)
    return ZarrSink(directory, overwrite=True)


_BUILTIN: dict[str, Callable[[str], Sink]] = {
    "memory": lambda label: MemorySink(),
    "memmap": _temporary_memmap,
    "zarr": _temporary_zarr,
}


def register_sink(name: str, factory: Callable[[], Sink]) -> None:
    """Make ``name`` resolve to ``factory()`` in this process.

    Names registered here take precedence over entry points of the same name,
    but the built-in names cannot be replaced.
    """
    if name in _BUILTIN:
        raise SinkConfigError(f"sink name {name!r} is built in and cannot be registered again")
    _registered[name] = factory


def available_sinks() -> list[str]:
    """Return every sink name that :func:`resolve_sink` accepts, sorted."""
    names = set(_BUILTIN) | set(_registered) | set(_entry_points())
    return sorted(names)


def resolve_sink(sink: object, *, spec_name: str | None = None) -> Sink:
    """Return a new sink (or ``sink`` itself) for one result.

    ``spec_name`` is the result's name. It labels temporary files, names the
    array inside a zarr store object, and is passed to a callable factory. A
    path is used exactly as given; to derive one path per result, use
    :func:`resolve_sinks`.

    Raises
    ------
    SinkConfigError
        For an unknown name or suffix (the message lists the valid ones), a
        failing entry point, or a factory that returns no :class:`Sink`.
    """
    label = spec_name or "result"
    if isinstance(sink, Sink):
        return sink
    if isinstance(sink, type) and issubclass(sink, Sink):
        return sink()
    if isinstance(sink, str) and not _looks_like_path(sink):
        return _from_name(sink, label)
    if isinstance(sink, str | os.PathLike):
        return _from_path(Path(sink), array_path="")
    if _is_zarr_store(sink):
        return ZarrSink(sink, path=spec_name or "")
    if callable(sink):
        return _checked_product(sink(label), f"factory {sink!r}")
    raise SinkConfigError(
        f"sink={sink!r} is not supported; pass a Sink, a name ({_names_text()}), "
        "a path ending in .npy or .zarr, a zarr store, or a callable that returns a Sink"
    )


def resolve_sinks(sink: object, names: Sequence[str]) -> dict[str, Sink]:
    """Return one new sink per result name from one user argument.

    With a single name this is :func:`resolve_sink`, and paths are used as
    given. With several names:

    - a mapping gives each result its own argument and must contain every name;
    - ``out.npy`` becomes ``out.<name>.npy`` beside it;
    - ``out.zarr`` becomes one array per result at path ``<name>`` inside the
      zarr group ``out.zarr``;
    - a sink name, class, store or callable makes one sink per result;
    - a :class:`Sink` instance is rejected, because it stores one result.
    """
    if isinstance(sink, Mapping):
        return _from_mapping(sink, names)
    if len(names) == 1:
        return {names[0]: resolve_sink(sink, spec_name=names[0])}

    for name in names:
        _check_result_name(name)
    if isinstance(sink, Sink):
        raise SinkConfigError(
            f"one {type(sink).__name__} instance stores one result, but {len(names)} results "
            f"arrive ({', '.join(names)}); pass a mapping of result name to sink, a sink "
            "name, or a path"
        )
    return {n: resolve_result_sink(sink, n) for n in names}


def resolve_result_sink(sink: object, name: str) -> Sink:
    """Return the sink for result ``name`` of a fetch that may carry several results.

    Paths get per-result targets even when ``name`` turns out to be the only
    result, so the layout never depends on how many results have arrived:
    ``out.npy`` becomes ``out.<name>.npy`` and ``out.zarr`` a group holding
    the array ``<name>``. Other arguments resolve as in :func:`resolve_sink`.
    """
    _check_result_name(name)
    if isinstance(sink, Sink):
        raise SinkConfigError(
            f"one {type(sink).__name__} instance stores one result, but this fetch may carry "
            "several; pass a mapping of result name to sink, a sink name, or a path"
        )
    if isinstance(sink, str | os.PathLike) and _looks_like_path(os.fspath(sink)):
        path = Path(sink)
        if path.suffix.lower() == ".npy":
            return MemmapSink(path.with_name(f"{path.stem}.{name}{path.suffix}"))
        return _from_path(path, array_path=name)
    return resolve_sink(sink, spec_name=name)


def _from_mapping(sinks: Mapping[Any, Any], names: Sequence[str]) -> dict[str, Sink]:
    missing = [n for n in names if n not in sinks]
    extra = [key for key in sinks if key not in names]
    if missing or extra:
        raise SinkConfigError(
            f"the sink mapping has keys {sorted(map(str, sinks))}, but the fetch asks for "
            f"{list(names)}; give exactly one entry per requested result (missing {missing}, "
            f"not requested {extra})"
        )
    return {n: resolve_sink(sinks[n], spec_name=n) for n in names}


def _from_name(name: str, label: str) -> Sink:
    if name in _BUILTIN:
        return _BUILTIN[name](_safe_label(label))
    if name in _registered:
        return _checked_product(_registered[name](), f"registered sink {name!r}")

    entry_point = _entry_points().get(name)
    if entry_point is None:
        raise SinkConfigError(
            f"unknown sink {name!r}; valid names are {_names_text()}, or pass a path "
            "ending in .npy or .zarr"
        )
    try:
        factory = entry_point.load()
    except Exception as exc:  # any import error of a third-party plugin
        raise SinkConfigError(
            f"loading sink {name!r} from entry point {entry_point.value!r} failed: {exc!r}; "
            "check that the package providing it is installed correctly"
        ) from exc
    return _checked_product(factory(), f"entry point {name!r} ({entry_point.value})")


def _from_path(path: Path, *, array_path: str) -> Sink:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return MemmapSink(path)
    if suffix == ".zarr":
        return ZarrSink(path, path=array_path)
    raise SinkConfigError(
        f"sink path {path} has suffix {path.suffix!r}; use .npy for a memmap file or "
        ".zarr for a zarr store"
    )


def _looks_like_path(text: str) -> bool:
    return text.lower().endswith(_PATH_SUFFIXES) or os.sep in text or "/" in text


def _is_zarr_store(value: object) -> bool:
    # Only an already imported zarr can have made a store object.
    if "zarr" not in sys.modules:
        return False
    from zarr.abc.store import Store

    return isinstance(value, Store)


def _checked_product(product: object, source: str) -> Sink:
    if not isinstance(product, Sink):
        raise SinkConfigError(
            f"{source} returned {type(product).__name__}, not a sinks.Sink; it must return a "
            "new Sink instance"
        )
    return product


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep for ep in found if ep.name not in _BUILTIN}


def _names_text() -> str:
    return ", ".join(repr(n) for n in available_sinks())


def _check_result_name(name: str) -> None:
    if not _SAFE_NAME.fullmatch(name):
        raise SinkConfigError(
            f"result name {name!r} cannot name a file or zarr array; use letters, digits, "
            "'_', '-' and '.', not starting with '.' or '-'"
        )


def _safe_label(label: str) -> str:
    return label if _SAFE_NAME.fullmatch(label) else "result"

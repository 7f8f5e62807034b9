"""The pipeline contract: loading pipeline code and config, and the context a pipeline gets.

A pipeline is a function ``pipeline(ctx, config)``. It comes either as Python
source code that defines it, or as an importable reference
``"package.module:function"``. The config is a mapping, or Python source whose
``config`` variable (if defined) or whose public top-level names form the
mapping. See ``docs/pipelines.md`` for the contract as users read it.
"""

from __future__ import annotations

import importlib
import linecache
import re
import textwrap
import threading
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._control import check_value
from ._errors import ExecutionCancelledError, ZmqRuntimeError

if TYPE_CHECKING:
    from ._sender import ResultStream, ResultWriter

__all__ = [
    "PipelineContext",
    "PipelineLoadError",
    "is_pipeline_reference",
    "load_config",
    "load_pipeline",
]

PipelineFunction = Callable[["PipelineContext", dict[str, Any]], Any]

_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class PipelineLoadError(ZmqRuntimeError, ValueError):
    """Pipeline code or config cannot be loaded (syntax error, missing name, failed import)."""


def is_pipeline_reference(pipeline: str) -> bool:
    """Return whether ``pipeline`` is a ``"module:function"`` reference, not source code."""
    return _REFERENCE.match(pipeline.strip()) is not None


def check_pipeline_source(pipeline: str) -> None:
    """Compile pipeline source (without running it) so syntax errors surface early.

    Raises
    ------
    PipelineLoadError
        The source does not compile.
    """
    if is_pipeline_reference(pipeline):
        return
    try:
        compile(textwrap.dedent(pipeline), "<pipeline>", "exec")
    except SyntaxError as exc:
        raise PipelineLoadError(
            f"pipeline source has a syntax error at line {exc.lineno}: {exc.msg}; "
            "pass Python source defining pipeline(ctx, config) or a 'module:function' reference"
        ) from exc


def load_pipeline(pipeline: str) -> PipelineFunction:
    """Return the pipeline function that ``pipeline`` names or defines.

    Source code (common indentation removed) runs in a fresh module namespace
    named ``__zmqruntime_pipeline__``.

    Raises
    ------
    PipelineLoadError
        The reference does not import, the source does not compile, or no
        callable ``pipeline`` results.
    """
    if is_pipeline_reference(pipeline):
        return _import_reference(pipeline.strip())

    check_pipeline_source(pipeline)
    source = textwrap.dedent(pipeline)
    # Registering the source with linecache puts its lines into tracebacks.
    filename = "<pipeline>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType("__zmqruntime_pipeline__")
    exec(compile(source, filename, "exec"), module.__dict__)

    function = module.__dict__.get("pipeline")
    if not callable(function):
        raise PipelineLoadError(
            "pipeline source defines no callable named 'pipeline'; "
            "define def pipeline(ctx, config): ..."
        )
    return function  # type: ignore[no-any-return]


def _import_reference(reference: str) -> PipelineFunction:
    module_name, _, attribute = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineLoadError(
            f"pipeline reference {reference!r}: module {module_name!r} does not import ({exc}); "
            "install it where the server runs"
        ) from exc

    for part in attribute.split("."):
        if not hasattr(target, part):
            raise PipelineLoadError(
                f"pipeline reference {reference!r}: {module_name!r} has no attribute {attribute!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise PipelineLoadError(f"pipeline reference {reference!r} is not callable")
    return target  # type: ignore[no-any-return]


def load_config(config: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the config mapping from a mapping, from config source, or ``{}`` for None.

    Source runs in a fresh namespace. If it defines ``config`` as a mapping, that
    is the result; otherwise the result holds every top-level name that does not
    start with ``_`` and is not a module, function or class.

    Raises
    ------
    PipelineLoadError
        The source does not compile or raises while running.
    """
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)

    try:
        code = compile(textwrap.dedent(config), "<config>", "exec")
    except SyntaxError as exc:
        raise PipelineLoadError(
            f"config source has a syntax error at line {exc.lineno}: {exc.msg}"
        ) from exc
    namespace: dict[str, Any] = {"__name__": "__zmqruntime_config__"}
    exec(code, namespace)

    explicit = namespace.get("config")
    if isinstance(explicit, Mapping):
        return dict(explicit)
    skipped = (types.ModuleType, types.FunctionType, type)
    return {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_") and not isinstance(value, skipped)
    }


class PipelineContext:
    """What a running pipeline uses to send results, report progress and see cancellation.

    One context exists per execution, inside its worker process. Methods may be
    called from the pipeline's thread only (the result stream's socket is not
    thread safe), except :attr:`cancelled`, which any thread may read.

    Parameters
    ----------
    execution_id:
        Id of the running execution.
    stream:
        The result stream that carries results to the server.
    report:
        Called with a small msgpack-able map for progress and values.
    cancel_event:
        Set when the server asks the execution to stop.
    """

    def __init__(
        self,
        execution_id: str,
        stream: ResultStream,
        report: Callable[[dict[str, Any]], None],
        cancel_event: threading.Event,
    ) -> None:
        self._execution_id = execution_id
        self._stream = stream
        self._report = report
        self._cancel_event = cancel_event

    @property
    def execution_id(self) -> str:
        """Id of this execution, as the client saw it from ``execute``."""
        return self._execution_id

    @property
    def cancelled(self) -> bool:
        """Whether the execution was asked to stop; check it between steps."""
        return self._cancel_event.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`ExecutionCancelledError` if the execution was asked to stop."""
        if self._cancel_event.is_set():
            raise ExecutionCancelledError(f"execution {self._execution_id} was cancelled")

    def declare(
        self,
        name: str,
        shape: tuple[int | None, ...],
        dtype: npt.DTypeLike,
        *,
        chunks: tuple[int, ...] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> ResultWriter:
        """Declare result ``name`` and return the writer that sends it chunk by chunk.

        ``shape[0]`` may be None when the length along axis 0 is not known in
        advance; ``writer.append`` then grows it. ``writer.write(start, data)``
        returns once ``data``'s buffer may be reused.
        """
        return self._stream.declare(name, shape, np.dtype(dtype), chunks=chunks, attrs=attrs)

    def send_array(
        self, name: str, array: npt.ArrayLike, *, attrs: Mapping[str, Any] | None = None
    ) -> None:
        """Send a whole array as result ``name``, split into chunks for the caller."""
        self._stream.send_array(name, np.asarray(array), attrs=attrs)

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report progress in the pipeline's own units (images, steps ...); status shows it."""
        self._report(
            {
                "kind": "progress",
                "done": check_value(done, "progress done"),
                "total": check_value(total, "progress total"),
                "message": message,
            }
        )

    def set_value(self, key: str, value: Any) -> None:
        """Store a small value (number, string, list, dict) under ``key``; status returns it.

        Raises
        ------
        ControlValueError
            ``value`` cannot travel through msgpack unchanged.
        """
        if not isinstance(key, str):
            raise TypeError(f"value key {key!r} is a {type(key).__name__}, expected a str")
        self._report({"kind": "value", "key": key, "value": check_value(value, f"value {key!r}")})

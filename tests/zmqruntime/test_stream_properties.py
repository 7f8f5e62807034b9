"""Property tests: any dtype, shape, layout and chunking survives a real PUSH/PULL stream."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sinks import ArraySpec, MemorySink, Sink
from zmqruntime import Compression, ResultStream, StreamReceiver

DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="="),
    hnp.integer_dtypes(endianness=">"),
    hnp.unsigned_integer_dtypes(endianness="<"),
    hnp.floating_dtypes(endianness="="),
    hnp.floating_dtypes(endianness=">"),
    hnp.complex_number_dtypes(),
    hnp.byte_string_dtypes(max_len=6),
    hnp.unicode_string_dtypes(max_len=4),
    hnp.datetime64_dtypes(),
    hnp.timedelta64_dtypes(),
    hnp.array_dtypes(hnp.scalar_dtypes(), min_size=1, max_size=3),
)


@st.composite
def arrays_with_layout(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    base = draw(hnp.arrays(dtype, shape, elements=None, fill=st.nothing()))
    layout = draw(st.sampled_from(["c", "fortran", "transposed", "strided"]))
    if layout == "fortran":
        return np.asfortranarray(base)
    if layout == "transposed":
        return base.T
    if layout == "strided" and base.ndim:
        step = draw(st.sampled_from([-2, -1, 2]))
        return base[::step]
    return base


@st.composite
def chunk_shapes(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(draw(st.integers(1, max(1, n))) for n in shape)


def _stream(array: np.ndarray, chunks: tuple[int, ...], compression: str | None) -> np.ndarray:
    context: zmq.Context[Any] = zmq.Context()
    pull = context.socket(zmq.PULL)
    push = context.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        errors: list[BaseException] = []

        def send() -> None:
            try:
                stream = ResultStream(push, "prop", compression=compression, timeout=10)
                stream.send_array("a", array, chunks=chunks)
                stream.close()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()

        def sink_for(_: ArraySpec) -> Sink:
            return MemorySink()

        received: np.ndarray = StreamReceiver(pull, "prop", sink_for, timeout=10).run()["a"]
        thread.join(10)
        assert not errors, errors
        return received
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        context.term()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stream_any_array_round_trips(data: st.DataObject) -> None:
    array = data.draw(arrays_with_layout())
    chunks = data.draw(chunk_shapes(array.shape))
    compression = data.draw(st.sampled_from([None, "blosc2", "blosc1"]))

    received = _stream(array, chunks, compression)

    assert received.dtype == array.dtype
    assert received.shape == array.shape
    assert received.tobytes() == np.ascontiguousarray(array).tobytes()


def test_compression_typesize_capped_for_wide_structured_dtype() -> None:
    dtype = np.dtype([("blob", "S300"), ("n", "<i4")])
    array = np.zeros(5, dtype)
    array["n"] = np.arange(5)

    received = _stream(array, (2,), "blosc2")

    assert received.tobytes() == array.tobytes()


def test_auto_compression_round_trips_on_declared_slow_link() -> None:
    array = np.zeros((8, 64, 64), np.uint16)

    context: zmq.Context[Any] = zmq.Context()
    try:
        assert (
            Compression("auto", link_bytes_per_s=1e6).for_link(local=True).link_bytes_per_s == 1e6
        )
    finally:
        context.term()
    received = _stream(array, (1, 64, 64), "auto")

    np.testing.assert_array_equal(received, array)

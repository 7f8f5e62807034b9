"""Shared-memory arenas: the module itself, and a server and client passing payloads through one."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from zmqruntime import FrameCountError, PayloadSizeError, ProtocolError
from zmqruntime._arena import (
    ARENA_HEADER_BYTES,
    ARENA_MARKER,
    MIN_ARENA_PAYLOAD,
    PAGE,
    Arena,
    ArenaPool,
    ArenaReader,
    ArenaWriter,
    arenas_supported,
    is_marker,
    open_arena,
    pack_ref,
    unpack_ref,
)
from zmqruntime._receiver import StreamReceiver
from zmqruntime._sender import ResultStream
from zmqruntime._wire import ChunkHeader, encode_message

from .control_helpers import ENDLESS_PIPELINE, SLEEP_PIPELINE, connected_client, running_server

pytestmark = pytest.mark.skipif(not arenas_supported(), reason="arenas need Linux memfd_create")

# 512 x 512 uint16 frames: 512 KiB each, above MIN_ARENA_PAYLOAD.
BIG_FRAMES_PIPELINE = """
import numpy as np

def pipeline(ctx, config):
    n = config["n"]
    writer = ctx.declare("stack", (n, 512, 512), "uint16")
    for i in range(n):
        writer.write(i, np.full((1, 512, 512), i, np.uint16) + np.arange(512, dtype=np.uint16))
"""


def _expected_stack(n: int) -> np.ndarray[Any, Any]:
    rows = np.arange(n, dtype=np.uint16)[:, None, None] + np.arange(512, dtype=np.uint16)
    return np.broadcast_to(rows, (n, 512, 512))


@pytest.fixture
def arena() -> Any:
    created = Arena("0123456789abcdef")
    yield created
    created.close()


def _payload(nbytes: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def test_arena_writer_and_reader_round_trip(arena: Arena) -> None:
    writer = ArenaWriter(arena.locator, limit=1 << 30)
    reader = ArenaReader(arena.locator, "0123456789abcdef")
    payloads = [_payload(300_000, seed) for seed in range(3)]
    refs = [writer.put(p) for p in payloads]
    copied = bytearray(300_000)
    reader.read_into(refs[1], memoryview(copied))
    mapped = reader.view(refs[2], 300_000)

    assert all(ref is not None and unpack_ref(ref)[0] % PAGE == 0 for ref in refs)
    assert bytes(copied) == payloads[1]
    assert mapped.tobytes() == payloads[2]
    writer.close()
    reader.close()


def test_arena_open_rejects_wrong_token(arena: Arena) -> None:
    locator = {**arena.locator, "token": "00" * 16}
    with pytest.raises(OSError, match="token differs"):
        open_arena(locator, writable=False)


def test_arena_reader_rejects_reference_outside_arena(arena: Arena) -> None:
    writer = ArenaWriter(arena.locator, limit=1 << 30)
    writer.put(_payload(MIN_ARENA_PAYLOAD))
    reader = ArenaReader(arena.locator, "0123456789abcdef")
    with pytest.raises(ProtocolError, match="outside the arena"):
        reader.view(pack_ref(1 << 30, 100), 100)
    reader.close()
    writer.close()


def test_arena_reader_rejects_size_other_than_header(arena: Arena) -> None:
    writer = ArenaWriter(arena.locator, limit=1 << 30)
    ref = writer.put(_payload(MIN_ARENA_PAYLOAD))
    reader = ArenaReader(arena.locator, "0123456789abcdef")
    with pytest.raises(PayloadSizeError, match="header states 10"):
        reader.view(ref, 10)
    reader.close()
    writer.close()


def test_arena_reference_frame_of_wrong_length() -> None:
    with pytest.raises(FrameCountError, match="expected 16"):
        unpack_ref(b"short")


def test_arena_marker_recognized_only_exactly() -> None:
    assert is_marker(ARENA_MARKER)
    assert not is_marker(ARENA_MARKER + b"x")


def test_arena_writer_past_limit_returns_none(arena: Arena) -> None:
    writer = ArenaWriter(arena.locator, limit=PAGE + MIN_ARENA_PAYLOAD)
    first = writer.put(_payload(MIN_ARENA_PAYLOAD))
    second = writer.put(_payload(MIN_ARENA_PAYLOAD))
    writer.close()
    assert first is not None
    assert second is None


def test_arena_spill_copies_and_frees_pages(arena: Arena, tmp_path: Path) -> None:
    writer = ArenaWriter(arena.locator, limit=1 << 30)
    data = _payload(4 * MIN_ARENA_PAYLOAD)
    offset, nbytes = unpack_ref(writer.put(data))
    probe = open_arena(arena.locator, writable=False)
    blocks_before = os.fstat(probe).st_blocks
    spill = os.open(tmp_path / "spill", os.O_RDWR | os.O_CREAT, 0o600)

    arena.spill(spill, 0, offset, nbytes)

    blocks_after = os.fstat(probe).st_blocks
    spilled = os.pread(spill, nbytes, 0)
    os.close(spill)
    os.close(probe)
    writer.close()
    assert spilled == data
    assert blocks_after < blocks_before


def test_arena_payload_equal_to_marker_stays_inline(
    push_pull: tuple[zmq.Socket[Any], zmq.Socket[Any]], arena: Arena
) -> None:
    push, pull = push_pull
    values = np.array([ARENA_MARKER], dtype=f"S{len(ARENA_MARKER)}")
    stream = ResultStream(push, "e1", timeout=10)
    stream.send_array("name", values)
    stream.close()

    reader = ArenaReader(arena.locator, "e1")
    result = StreamReceiver(pull, "e1", lambda spec: _memory(), timeout=10, arena=reader).run()
    reader.close()
    assert result["name"].tobytes() == ARENA_MARKER


def _memory() -> Any:
    from sinks import MemorySink

    return MemorySink()


def test_server_live_fetch_reads_payloads_from_arena() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(BIG_FRAMES_PIPELINE, {"n": 6})
        stack = client.get_results(exec_id)["stack"]
        stats = _last_transfer(server)
    np.testing.assert_array_equal(stack, _expected_stack(6))
    assert stats["arena_chunks"] == 6


def test_client_without_shared_memory_gets_payloads_over_socket(tmp_path: Path) -> None:
    with running_server() as server, connected_client(server, shared_memory=False) as client:
        exec_id = client.execute(BIG_FRAMES_PIPELINE, {"n": 4})
        client.wait(exec_id, timeout=30)
        stack = np.asarray(client.get_result(exec_id, "stack", tmp_path / "out.npy"))
        stats = _last_transfer(server)
    np.testing.assert_array_equal(stack, _expected_stack(4))
    assert stats["arena_chunks"] == 0


def test_server_without_shared_memory_sends_over_socket(tmp_path: Path) -> None:
    with running_server(shared_memory=False) as server, connected_client(server) as client:
        exec_id = client.execute(BIG_FRAMES_PIPELINE, {"n": 4})
        stack = client.get_results(exec_id, tmp_path / "out.zarr")["stack"][:]
        stats = _last_transfer(server)
    np.testing.assert_array_equal(stack, _expected_stack(4))
    assert stats["arena_chunks"] == 0


def test_server_spills_arena_payloads_past_memory_limit(tmp_path: Path) -> None:
    spill_dir = tmp_path / "spill"
    with (
        running_server(memory_limit=2 * 512 * 1024, spill_dir=str(spill_dir)) as server,
        connected_client(server) as client,
    ):
        exec_id = client.execute(BIG_FRAMES_PIPELINE, {"n": 8})
        client.wait(exec_id, timeout=30)
        spill_size = sum(path.stat().st_size for path in spill_dir.iterdir())
        stack = client.get_results(exec_id)["stack"]
        stats = _last_transfer(server)
    np.testing.assert_array_equal(stack, _expected_stack(8))
    assert spill_size == 6 * 512 * 1024
    assert stats["arena_chunks"] == 2


def test_server_drops_arena_reference_outside_arena() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(SLEEP_PIPELINE, {"seconds": 30})
        header = ChunkHeader(exec_id, "stack", 0, (0,), (1024,), 1024, None, 1024)
        context = zmq.Context.instance()
        push = context.socket(zmq.PUSH)
        push.connect(client.ping()["data_endpoint"])
        push.send_multipart([encode_message(header), ARENA_MARKER, pack_ref(1 << 30, 1024)])
        push.close(linger=2000)
        deadline = time.monotonic() + 5
        while server._ingest.dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        status = client.get_status(exec_id)
        client.cancel(exec_id)
    assert server._ingest.dropped == 1
    assert status.progress.chunks_done == 0


def _last_transfer(server: Any) -> dict[str, Any]:
    # A transfer's stats are recorded when its thread ends.
    deadline = time.monotonic() + 5
    while not server.transfer_stats and time.monotonic() < deadline:
        time.sleep(0.01)
    stats: dict[str, Any] = server.transfer_stats[-1]
    return stats


def test_arena_pool_reuses_given_arena() -> None:
    pool = ArenaPool(1 << 30)
    first = pool.take("e1")
    ArenaWriter(first.locator, limit=1 << 30).put(_payload(MIN_ARENA_PAYLOAD))
    old_locator = first.locator
    pool.give(first)
    second = pool.take("e2")

    assert second is first
    assert pool.reused == 1
    with pytest.raises(OSError, match="token differs"):
        open_arena(old_locator, writable=False)
    pool.close()
    second.close()


def test_arena_pool_closes_arena_beyond_max_bytes() -> None:
    pool = ArenaPool(max_bytes=0)
    arena = pool.take("e1")
    ArenaWriter(arena.locator, limit=1 << 30).put(_payload(MIN_ARENA_PAYLOAD))
    pool.give(arena)
    assert pool.pooled_bytes == 0
    with pytest.raises(KeyError):
        arena.view(ARENA_HEADER_BYTES, 1)


def test_arena_pool_trim_closes_idle_arenas() -> None:
    pool = ArenaPool(1 << 30, idle_seconds=10)
    arena = pool.take("e1")
    pool.give(arena)
    pool.trim(now=time.monotonic() + 5)
    pooled_before_trim = pool.pooled_bytes
    pool.trim(now=time.monotonic() + 20)
    assert pooled_before_trim > 0
    assert pool._idle == []
    with pytest.raises(KeyError):
        arena.view(ARENA_HEADER_BYTES, 1)


def _wait_pooled(server: Any, expected: bool) -> int:
    # Released arenas go back to the pool from the server's cleanup thread.
    pool = server._retention.arena_pool
    deadline = time.monotonic() + 5
    while bool(pool.pooled_bytes) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    pooled: int = pool.pooled_bytes
    return pooled


def test_server_reuses_arena_after_acknowledged_fetch() -> None:
    with running_server() as server, connected_client(server) as client:
        first = client.execute(BIG_FRAMES_PIPELINE, {"n": 4})
        client.get_results(first, release=True)
        pooled = _wait_pooled(server, True)
        second = client.execute(BIG_FRAMES_PIPELINE, {"n": 6})
        stack = client.get_results(second)["stack"]
        reused = server._retention.arena_pool.reused
    np.testing.assert_array_equal(stack, _expected_stack(6))
    assert pooled >= 4 * 512 * 1024
    assert reused == 1


def test_server_closes_arena_of_cancelled_execution() -> None:
    with running_server() as server, connected_client(server) as client:
        exec_id = client.execute(ENDLESS_PIPELINE, {"size": 1024})
        deadline = time.monotonic() + 10
        while client.get_status(exec_id).progress.chunks_done < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        client.cancel(exec_id)
        client.wait(exec_id, timeout=10)
        client.release(exec_id)
        time.sleep(0.3)  # the cleanup thread runs after the release reply
        pooled = server._retention.arena_pool.pooled_bytes
    assert pooled == 0


def test_server_closes_arena_after_abandoned_fetch() -> None:
    with (
        running_server(transfer_timeout=0.5, window_bytes=1 << 20) as server,
        connected_client(server) as client,
    ):
        exec_id = client.execute(BIG_FRAMES_PIPELINE, {"n": 8})
        client.wait(exec_id, timeout=30)
        events = client.iter_results(exec_id)
        next(events)
        next(events)
        events.close()
        client.release(exec_id)
        outcome = _last_transfer(server)["outcome"]
        time.sleep(0.3)  # the arena is closed or pooled as the transfer thread ends
        pooled = server._retention.arena_pool.pooled_bytes
    assert outcome != "completed"
    assert pooled == 0

"""RetentionStore and RetainedStream: memory bound, spill files, release and expiry."""

from __future__ import annotations

import time
from pathlib import Path

from zmqruntime._retention import RetentionStore


def _spill_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_retention_spills_past_memory_limit(tmp_path: Path) -> None:
    store = RetentionStore(memory_limit=10, spill_dir=tmp_path)
    stream = store.create("e1")

    assert stream.append(b"h0", b"0123456789")
    assert stream.append(b"h1", b"abcdef")
    first = stream.wait_record(0, 0.1)
    second = stream.wait_record(1, 0.1)

    assert first is not None and second is not None
    assert first.payload == b"0123456789"
    assert second.payload is None
    assert bytes(stream.read_payload(second)) == b"abcdef"
    assert store.memory_used == 10
    assert len(_spill_files(tmp_path)) == 1
    store.close()


def test_retention_release_deletes_spill_file(tmp_path: Path) -> None:
    store = RetentionStore(memory_limit=0, spill_dir=tmp_path)
    stream = store.create("e1")
    stream.append(b"h0", b"payload")

    assert store.release("e1")
    assert not store.release("e1")
    assert _spill_files(tmp_path) == []
    assert stream.released
    assert not stream.append(b"h1", b"late")
    store.close()


def test_retention_background_release_done_by_close(tmp_path: Path) -> None:
    store = RetentionStore(memory_limit=4, spill_dir=tmp_path)
    for exec_id in ("e1", "e2"):
        stream = store.create(exec_id)
        stream.append(b"h", b"in-memory"[:4])
        stream.append(b"h", b"spilled")

    assert store.release("e1", background=True)
    assert store.memory_used == 0
    store.close()
    assert _spill_files(tmp_path) == []


def test_retention_background_release_deletes_soon(tmp_path: Path) -> None:
    store = RetentionStore(memory_limit=0, spill_dir=tmp_path)
    store.create("e1").append(b"h", b"spilled")

    assert store.release("e1", background=True)
    deadline = time.monotonic() + 5
    while _spill_files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _spill_files(tmp_path) == []
    store.close()


def test_retention_cut_stream_rejects_chunks(tmp_path: Path) -> None:
    store = RetentionStore(memory_limit=1 << 20, spill_dir=tmp_path)
    stream = store.create("e1")
    stream.cut_stream()

    assert not stream.append(b"chunk", b"data")
    assert stream.append(b"declaration")
    assert stream.seal(b"end")
    assert not stream.seal(b"end again")
    assert len(stream) == 2
    store.close()


def test_retention_cut_stream_counts_chunks(tmp_path: Path) -> None:
    # Spilled and in-memory chunks count alike; the declaration does not.
    store = RetentionStore(memory_limit=4, spill_dir=tmp_path)
    stream = store.create("e1")
    stream.append(b"declaration")
    for _ in range(3):
        stream.append(b"chunk", b"data")

    counted = stream.cut_stream()

    assert counted == 3
    store.close()


def test_retention_expire_releases_only_old_sealed(tmp_path: Path) -> None:
    store = RetentionStore(memory_limit=1 << 20, spill_dir=tmp_path)
    store.create("open")
    store.create("sealed").seal(b"end")

    assert store.expire(60.0) == []
    assert store.expire(60.0, now=time.monotonic() + 61.0) == ["sealed"]
    assert store.get("sealed") is None
    assert store.get("open") is not None
    store.close()

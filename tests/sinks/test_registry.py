"""resolve_sink / resolve_sinks: names, paths, entry points, one sink per result."""

from __future__ import annotations

import os
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage

import sinks
from sinks import (
    ArraySpec,
    MemmapSink,
    MemorySink,
    SinkConfigError,
    ZarrSink,
    _registry,
    available_sinks,
    register_sink,
    resolve_sink,
    resolve_sinks,
)
from sinks.testing import stream


@pytest.fixture
def clean_registrations() -> Iterator[None]:
    saved = dict(_registry._registered)
    yield
    _registry._registered.clear()
    _registry._registered.update(saved)


def test_resolve_sink_memory_name() -> None:
    assert isinstance(resolve_sink("memory"), MemorySink)


@pytest.mark.parametrize(
    ("name", "kind", "suffix"), [("memmap", MemmapSink, ".npy"), ("zarr", ZarrSink, ".zarr")]
)
def test_resolve_sink_file_names_use_temporary_paths(name: str, kind: type, suffix: str) -> None:
    sink = resolve_sink(name, spec_name="frames")

    assert isinstance(sink, kind)
    location = Path(os.fspath(sink.path if isinstance(sink, MemmapSink) else sink.store_or_path))
    try:
        assert location.name.startswith("zmqruntime-frames-")
        assert location.suffix == suffix
        assert location.parent == Path(tempfile.gettempdir())
    finally:
        if location.is_dir():
            location.rmdir()
        else:
            location.unlink()


def test_resolve_sink_temporary_memmap_is_usable() -> None:
    sink = resolve_sink("memmap", spec_name="x")
    assert isinstance(sink, MemmapSink)
    data = np.arange(6, dtype="<f4")
    try:
        result = stream(sink, ArraySpec("x", (6,), data.dtype, (4,)), data)
        np.testing.assert_array_equal(result, data)
    finally:
        sink.path.unlink()


@pytest.mark.parametrize(
    ("argument", "kind"),
    [
        ("out.npy", MemmapSink),
        ("out.NPY", MemmapSink),
        ("out.zarr", ZarrSink),
        ("sub/dir/out.zarr", ZarrSink),
    ],
)
def test_resolve_sink_path_by_suffix(tmp_path: Path, argument: str, kind: type) -> None:
    assert isinstance(resolve_sink(str(tmp_path / argument)), kind)
    assert isinstance(resolve_sink(tmp_path / argument), kind)


def test_resolve_sink_unknown_suffix_raises(tmp_path: Path) -> None:
    with pytest.raises(SinkConfigError, match=r"\.npy.*\.zarr"):
        resolve_sink(tmp_path / "out.h5")


def test_resolve_sink_unknown_name_lists_valid_names() -> None:
    with pytest.raises(SinkConfigError, match="unknown sink 'hdf5'") as info:
        resolve_sink("hdf5")

    for name in ("'memory'", "'memmap'", "'zarr'"):
        assert name in str(info.value)


def test_resolve_sink_instance_is_returned_unchanged() -> None:
    sink = MemorySink()

    assert resolve_sink(sink) is sink


def test_resolve_sink_class_is_instantiated() -> None:
    assert isinstance(resolve_sink(MemorySink), MemorySink)


def test_resolve_sink_callable_receives_result_name() -> None:
    seen: list[str] = []

    def factory(name: str) -> MemorySink:
        seen.append(name)
        return MemorySink()

    resolve_sink(factory, spec_name="labels")

    assert seen == ["labels"]


def test_resolve_sink_callable_returning_other_type_raises() -> None:
    with pytest.raises(SinkConfigError, match=r"not a sinks\.Sink"):
        resolve_sink(lambda name: "memory")


def test_resolve_sink_zarr_store_object() -> None:
    store = zarr.storage.MemoryStore()

    sink = resolve_sink(store, spec_name="frames")

    assert isinstance(sink, ZarrSink)
    assert sink.path == "frames"


def test_resolve_sink_unsupported_type_raises() -> None:
    with pytest.raises(SinkConfigError, match="is not supported"):
        resolve_sink(42)


@pytest.mark.usefixtures("clean_registrations")
def test_register_sink_adds_name() -> None:
    register_sink("scratch", MemorySink)

    assert "scratch" in available_sinks()
    assert isinstance(resolve_sink("scratch"), MemorySink)


def test_register_sink_rejects_builtin_name() -> None:
    with pytest.raises(SinkConfigError, match="built in"):
        register_sink("memory", MemorySink)


def _install_plugin(root: Path, module: str, body: str, entry: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[zmqruntime.sinks]\n{entry}\n")


def test_resolve_sink_finds_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = """
        from sinks import MemorySink

        class PluginSink(MemorySink):
            pass
    """
    _install_plugin(tmp_path, "plugin_sink_ok", body, "plugin-memory = plugin_sink_ok:PluginSink")
    monkeypatch.syspath_prepend(str(tmp_path))

    sink = resolve_sink("plugin-memory")

    assert type(sink).__name__ == "PluginSink"
    assert "plugin-memory" in available_sinks()
    monkeypatch.delitem(sys.modules, "plugin_sink_ok", raising=False)


def test_resolve_sink_broken_entry_point_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_plugin(
        tmp_path,
        "plugin_sink_bad",
        "import missing_dependency_xyz\n",
        "broken = plugin_sink_bad:Sink",
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(SinkConfigError, match=r"loading sink 'broken'.*plugin_sink_bad:Sink"):
        resolve_sink("broken")


def test_resolve_sinks_single_name_uses_path_as_given(tmp_path: Path) -> None:
    result = resolve_sinks(tmp_path / "out.npy", ["frames"])

    sink = result["frames"]
    assert isinstance(sink, MemmapSink)
    assert sink.path == tmp_path / "out.npy"


def test_resolve_sinks_npy_path_per_result(tmp_path: Path) -> None:
    result = resolve_sinks(tmp_path / "out.npy", ["frames", "labels"])

    paths = {name: sink.path for name, sink in result.items() if isinstance(sink, MemmapSink)}
    assert paths == {"frames": tmp_path / "out.frames.npy", "labels": tmp_path / "out.labels.npy"}


def test_resolve_sinks_zarr_path_makes_arrays_in_group(tmp_path: Path) -> None:
    path = tmp_path / "out.zarr"
    result = resolve_sinks(str(path), ["frames", "labels"])
    data = np.arange(4, dtype="<i2")

    for name, sink in result.items():
        stream(sink, ArraySpec(name, (4,), data.dtype, (2,)), data)

    group = zarr.open_group(path, mode="r")
    assert sorted(group.array_keys()) == ["frames", "labels"]


def test_resolve_sinks_name_makes_separate_sinks() -> None:
    result = resolve_sinks("memory", ["a", "b"])

    assert result["a"] is not result["b"]


def test_resolve_sinks_mapping_per_result(tmp_path: Path) -> None:
    result = resolve_sinks({"a": "memory", "b": tmp_path / "b.npy"}, ["a", "b"])

    assert isinstance(result["a"], MemorySink)
    assert isinstance(result["b"], MemmapSink)


def test_resolve_sinks_mapping_with_missing_name_raises() -> None:
    with pytest.raises(SinkConfigError, match=r"missing \['b'\]"):
        resolve_sinks({"a": "memory"}, ["a", "b"])


def test_resolve_sinks_one_instance_for_several_results_raises() -> None:
    with pytest.raises(SinkConfigError, match="stores one result"):
        resolve_sinks(MemorySink(), ["a", "b"])


def test_resolve_sinks_unsafe_result_name_raises(tmp_path: Path) -> None:
    with pytest.raises(SinkConfigError, match=r"result name '\.\./x'"):
        resolve_sinks(tmp_path / "out.npy", ["../x", "b"])


def test_package_never_imports_zmqruntime() -> None:
    source = Path(sinks.__file__).parent
    for module in source.glob("*.py"):
        assert "zmqruntime" not in {
            line.split()[1].split(".")[0]
            for line in module.read_text().splitlines()
            if line.startswith(("import ", "from "))
        }, module.name

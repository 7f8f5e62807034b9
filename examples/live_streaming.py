"""Watch results while they are produced: per-chunk iteration and a callback sink.

Run: ``python examples/live_streaming.py [--port 5555] [--napari] [--shutdown]``.

The screening pipeline runs on a small plate. ``iter_results`` yields an event
after each chunk lands; a callback sink hands every processed image to a
viewer as it arrives. With ``--napari`` (and napari installed) the viewer is
napari; otherwise a headless stand-in keeps the latest image, prints running
statistics and writes ``live.png`` every few images.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sinks import ArraySpec, MemorySink, Region, Sink
from zmqruntime import ChunkReceived, ExecutionClient, ResultCompleted, ResultDeclared

CONFIG = {"plate": {"rows": 2, "columns": 4, "fields": 2, "image_size": 128}}


class CallbackSink(Sink):
    """Passes every received image (one ``(channels, y, x)`` frame) to ``callback``.

    Nothing is stored; ``finalize`` returns the number of frames seen.
    """

    def __init__(self, callback: Callable[[int, npt.NDArray[Any]], None]) -> None:
        self.callback = callback
        self.frames = 0

    def open(self, spec: ArraySpec) -> None:
        self.frames = 0

    def write(self, region: Region, data: npt.NDArray[Any]) -> None:
        # ``data`` is only valid during this call; a viewer that keeps it must copy.
        for offset in range(region.shape[0]):
            self.callback(region.start[0] + offset, data[offset])
            self.frames += 1

    def finalize(self, shape: tuple[int, ...]) -> int:
        return self.frames

    def abort(self, reason: str) -> None:
        print(f"stream aborted: {reason}")


class HeadlessViewer:
    """Stand-in for a viewer: keeps the latest image and saves it as a PNG now and then."""

    def __init__(self, path: Path, every: int = 4) -> None:
        self.path = path
        self.every = every
        self.latest: npt.NDArray[np.float32] | None = None
        self.updates = 0

    def show(self, index: int, image: npt.NDArray[Any]) -> None:
        self.latest = np.array(image, dtype=np.float32)
        self.updates += 1
        if self.updates % self.every == 0:
            self.save()

    def save(self) -> None:
        from PIL import Image

        if self.latest is None:
            return
        plane = self.latest[0]
        scaled = np.clip(plane / max(float(np.percentile(plane, 99.5)), 1e-6), 0, 1)
        Image.fromarray((scaled * 255).astype(np.uint8)).save(self.path)


def sink_for(show: Callable[[int, npt.NDArray[Any]], None]) -> Callable[[str], Sink]:
    """Route the ``images`` result to the viewer and every other result to memory."""

    def choose(name: str) -> Sink:
        return CallbackSink(show) if name == "images" else MemorySink()

    return choose


def run_headless(client: ExecutionClient, exec_id: str, output: Path) -> None:
    viewer = HeadlessViewer(output / "live.png")
    chunks = 0
    for event in client.iter_results(exec_id, sink_for(viewer.show)):
        if isinstance(event, ResultDeclared):
            print(f"declared {event.spec.name} {event.spec.shape} {event.spec.dtype}")
        elif isinstance(event, ChunkReceived):
            chunks += 1
        elif isinstance(event, ResultCompleted):
            print(f"completed {event.name} after {chunks} chunks in total")
    viewer.save()
    print(f"viewer saw {viewer.updates} images; last one in {viewer.path}")


def run_napari(client: ExecutionClient, exec_id: str) -> None:
    # NOTE: not run by the tests, because napari is not installed there.
    import napari  # type: ignore[import-not-found]
    from napari.qt.threading import thread_worker  # type: ignore[import-not-found]

    viewer = napari.Viewer()
    layer = viewer.add_image(np.zeros((2, 128, 128), np.float32), channel_axis=0)

    @thread_worker  # type: ignore[untyped-decorator]
    def fetch() -> Any:
        frames: list[npt.NDArray[Any]] = []
        sink = sink_for(lambda index, image: frames.append(np.array(image)))
        for event in client.iter_results(exec_id, sink):
            while frames:
                yield frames.pop(0)
            del event

    worker = fetch()

    def update(image: npt.NDArray[Any]) -> None:
        for channel, channel_layer in enumerate(layer):
            channel_layer.data = image[channel]

    worker.yielded.connect(update)
    worker.start()
    napari.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5555, help="server port (default 5555)")
    parser.add_argument("--napari", action="store_true", help="show the images in napari")
    parser.add_argument("--output", type=Path, help="folder for live.png")
    parser.add_argument("--shutdown", action="store_true", help="stop the server at the end")
    args = parser.parse_args()
    # Checked before any server starts, so a missing viewer costs nothing.
    if args.napari and importlib.util.find_spec("napari") is None:
        print(
            "error: --napari needs napari, which is not installed; install it with "
            "pip install 'napari[all]', or run without --napari for the headless viewer",
            file=sys.stderr,
        )
        sys.exit(2)
    output = args.output or Path(tempfile.mkdtemp(prefix="zmqruntime-live-"))
    output.mkdir(parents=True, exist_ok=True)

    with ExecutionClient(port=args.port) as client:
        exec_id = client.execute("zmqruntime.demo.screening:pipeline", CONFIG)
        if args.napari:
            run_napari(client, exec_id)
        else:
            run_headless(client, exec_id, output)
        client.release(exec_id)
        if args.shutdown:
            client.shutdown()


if __name__ == "__main__":
    main()

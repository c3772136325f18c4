"""Videos in `handpose predict`: their frames as units of the input stream, cut into chunks with
the photos, and the overlay videos.

The input stream (`predict_inputs`) holds a video as one `VideoInput`. `chunks` cuts the stream
into chunks of `size` units and, at a video, decodes it (`video.decoded_frames`) and puts each
kept frame (every `every`-th, from frame 0) in the chunks as a `Source` of its own: `file` the
video, `frame` its number, `time` its seconds, `pixels` its RGB image. Chunks are numbered as the
stream runs, so every rank and every re-run cuts the same chunks; only the frames of the chunks
this rank predicts now (`wanted`) are converted to RGB, the others are decoded and passed over
(a resumed run decodes the frames it had done again, but does not convert them). A video that
cannot be opened or decoded, or stops before its header's frames, is one BadInput line after
the frames it gave (those keep their predictions); so is a video without PyAV installed.

Under torchrun every rank decodes every video (a chunk's frames cannot be found without decoding
the frames before them); only its own chunks' frames are converted and predicted.

`--overlay-video`: at the end, rank 0 decodes each video again and writes OUT/overlays/NAME.mp4
with the skeletons of predictions.jsonl drawn on the kept frames (`write_overlay_videos`).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw

from handpose.errors import HandposeError
from handpose.predict_inputs import BadInput, Source, Unit, VideoInput
from handpose.skeleton import draw_skeleton
from handpose.video import VideoError, VideoWriter, decoded_frames, iter_frames, probe

T = TypeVar("T")
OVERLAY_DIR = "overlays"


def chunks(
    units: Iterator[Unit], size: int, *, every: int = 1, wanted: Callable[[int], bool] = lambda c: True
) -> Iterator[tuple[int, list[Unit]]]:
    """(chunk id, units) of `size` units each, in stream order, a video's kept frames one unit
    each; every unit renumbered by its position (`ordinal`). Frames of chunks that are not
    `wanted` carry no pixels (not converted)."""
    chunk: list[Unit] = []
    filling = [0]  # the id of the chunk being filled, read as each frame is decoded
    for unit in _expanded(units, every, lambda: wanted(filling[0])):
        cid = filling[0]
        chunk.append(dataclasses.replace(unit, ordinal=cid * size + len(chunk)))
        if len(chunk) == size:
            yield cid, chunk
            filling[0], chunk = cid + 1, []
    if chunk:
        yield filling[0], chunk


def _expanded(units: Iterator[Unit], every: int, convert: Callable[[], bool]) -> Iterator[Unit]:
    """The stream with each video replaced by its frames (then a BadInput if it failed);
    `convert()` says, as each frame comes, whether the chunk it falls in wants its pixels."""
    for unit in units:
        if not isinstance(unit, VideoInput):
            yield unit
            continue
        try:
            for f in decoded_frames(unit.path, every=every):
                yield Source(
                    ordinal=0,
                    path=unit.path,
                    file=unit.path,
                    name=f"{unit.name}#{f.index}",
                    stamp=unit.stamp,
                    frame=f.index,
                    time=f.time,
                    pixels=f.rgb() if convert() else None,
                )
        except (VideoError, HandposeError) as e:  # HandposeError: PyAV is not installed
            yield BadInput(0, unit.path, e.reason if isinstance(e, VideoError) else str(e))


def prefetch(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """`items`, produced by a thread up to `depth` ahead: a video's next chunk is decoded while
    the model runs on this one (PyAV, Pillow and PyTorch release the GIL while they work). An
    exception in the producer is raised here, in order."""
    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put(("end", None))
        except BaseException as e:  # handed to the consumer, which raises it
            box.put(("error", e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator left part way: its video files are closed now
                close()

    thread = threading.Thread(target=produce, name="predict-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = box.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # let the producer see `stop` (it may wait on a full queue)
            try:
                box.get(timeout=0.1)
            except queue.Empty:
                pass


def frame_image(path: str, index: int) -> np.ndarray:
    """Frame `index` of a video, RGB (the overlays and the report's gallery draw it again)."""
    for frame in iter_frames(path, start=index):
        return frame.image
    raise VideoError(path, f"has no frame {index}")


# ---------------------------------------------------------------------------------------------
# Overlay videos


def overlay_name(k: int, video: str) -> str:
    """The overlay video of the k-th video input (k numbers the videos: names stay unique)."""
    return f"{OVERLAY_DIR}/video-{k:03d}-{Path(video).stem}.mp4"


def write_overlay_videos(final: Path, predictions: Path, videos: list[str], every: int) -> list[str]:
    """Per video: its kept frames with every predicted hand's skeleton, as an H.264 mp4 at the
    video's rate / every, in final/overlays/. A video that fails part way keeps the frames before
    the failure. Returns the names written (relative to final)."""
    hands = _frame_hands(predictions, set(videos))
    names = []
    for k, video in enumerate(videos):
        if video not in hands:
            continue  # no frame predicted: the video failed at once (its line is in errors.jsonl)
        name = overlay_name(k, video)
        (final / OVERLAY_DIR).mkdir(parents=True, exist_ok=True)
        fps = probe(video).fps or 25.0
        writer = VideoWriter(final / name, Fraction(fps).limit_denominator(1001) / every)
        try:
            for frame in iter_frames(video, every=every):
                writer.write(draw_hands(frame.image, hands[video].get(frame.index, [])))
        except VideoError:
            pass  # the frames before the failure are written; errors.jsonl has the reason
        except BaseException:
            writer.abort()
            raise
        writer.close()
        if (final / name).exists():
            names.append(name)
    return names


def draw_hands(image: np.ndarray, hands: list[np.ndarray]) -> np.ndarray:
    """The image with each hand's (21, 2) keypoints drawn (`skeleton.draw_skeleton`), dots and
    lines sized to the frame."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    scale = max(1, round(min(image.shape[:2]) / 240))
    for uv in hands:
        draw_skeleton(draw, uv, radius=2 + scale, width=1 + scale)
    return np.asarray(canvas)


def _frame_hands(predictions: Path, videos: set[str]) -> dict[str, dict[int, list[np.ndarray]]]:
    """{video: {frame: [keypoints (21, 2), ...]}} from predictions.jsonl."""
    found: dict[str, dict[int, list[np.ndarray]]] = {}
    with open(predictions, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("frame") is None or rec["path"] not in videos:
                continue
            uv = np.asarray(rec["keypoints"], np.float64)[:, :2]
            found.setdefault(rec["path"], {}).setdefault(int(rec["frame"]), []).append(uv)
    return found

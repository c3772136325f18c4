"""Video files through PyAV (its wheels carry FFmpeg; the optional extra `handpose[video]`):
frames in, as RGB uint8 with their position and time, and an mp4 writer for overlay videos.

- `iter_frames(path, every=N, start=k)`: the frames of the first video stream in display order,
  each a `Frame(index, time, image)`: `index` counts decoded frames from 0 (the frame number a
  player shows), `time` is seconds from the stream's start (its timestamps; index / fps where a
  frame has none), `image` is (H, W, 3) uint8 RGB as displayed (a rotation in the container's
  display matrix, as phones record portrait video, is applied; mirror flags are not). Frames
  with index % every == 0 and index >= start are yielded: a run resumes at frame k and keeps
  the same every-Nth frames. Frames are always decoded from the first one: seeking lands on key
  frames, and numbering from a seek would go wrong on variable frame rates, edit lists and
  streams without timestamps; frames before `start` or between the kept ones are decoded but
  not converted to RGB (the dearer half of the work, see `handpose bench video`).
- A file that cannot be opened, has no video stream, fails to decode, or ends before the frames
  its header lists (truncated) raises `VideoError`: one line naming the file. It is a ValueError,
  so predict's per-input data errors record it and go on; frames already yielded stay valid.
- `VideoWriter`: H.264 mp4 (yuv420p, +faststart) under a temp name, renamed onto its path when
  closed; a crash leaves no half-written video there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from handpose.atomic import tmp_name
from handpose.errors import HandposeError

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
INSTALL = "pip install 'handpose[video]'"


class VideoError(HandposeError, ValueError):
    """A video that cannot be read (corrupt, truncated, unsupported): `reason` is one line, and
    the message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    index: int  # position in display order, from 0
    time: float  # seconds from the start of the stream
    image: np.ndarray  # uint8 (H, W, 3) RGB, as displayed


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream (before decoding anything)."""

    width: int  # as displayed (a 90 degree rotation swaps the coded sides)
    height: int
    fps: float | None  # average frame rate, None where the container does not know
    frames: int | None  # frames the header lists, None where it does not
    duration: float | None  # seconds
    codec: str


def is_video(path: str | os.PathLike) -> bool:
    """Whether `path` has a video file's suffix (VIDEO_SUFFIXES)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def require_av() -> Any:
    """The PyAV module, or one line saying how to install it."""
    try:
        import av
    except ImportError:
        raise HandposeError(f"reading and writing videos needs PyAV: {INSTALL}") from None
    return av


def probe(path: str | os.PathLike) -> VideoInfo:
    """The first video stream's size as displayed, rate, listed frame count and duration (its
    first frame is decoded for the size and rotation); VideoError if there is none."""
    path = Path(path)
    av = require_av()
    with _open(path) as (container, stream):
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise VideoError(path, _reason(e)) from None
        if first is None:
            raise VideoError(path, "no frame could be decoded")
        turned = _quarter_turns(first.rotation) % 2 == 1
        fps = _rate(stream)
        duration = float(stream.duration * stream.time_base) if stream.duration else None
        return VideoInfo(
            width=first.height if turned else first.width,
            height=first.width if turned else first.height,
            fps=float(fps) if fps else None,
            frames=int(stream.frames) or None,
            duration=duration,
            codec=stream.codec_context.name,
        )


def iter_frames(
    path: str | os.PathLike, *, every: int = 1, start: int = 0, frame_threads: bool = False
) -> Iterator[Frame]:
    """The frames with index % every == 0 and index >= start (see the module docstring).

    frame_threads: FFmpeg decodes several frames at once on every core (frames still come out in
    display order). Off by default: on 2 busy cores, where the model wants them too, they did
    not pay (`handpose bench video`); beside a GPU, with idle cores, they may."""
    if start < 0:
        raise HandposeError(f"start frame {start}: must be >= 0")
    for frame in decoded_frames(path, every=every, frame_threads=frame_threads):
        if frame.index >= start:
            yield Frame(frame.index, frame.time, frame.rgb())


@dataclass(frozen=True)
class Decoded:
    """A decoded frame not yet converted to RGB (`rgb()` converts it: the dearer half of the work,
    which a caller skips for frames it does not keep)."""

    index: int
    time: float
    frame: Any  # PyAV's VideoFrame

    def rgb(self) -> np.ndarray:
        """uint8 (H, W, 3) RGB as displayed."""
        return _rgb(self.frame)


def decoded_frames(
    path: str | os.PathLike, *, every: int = 1, frame_threads: bool = False
) -> Iterator[Decoded]:
    """The frames with index % every == 0, decoded and not yet converted (`iter_frames` is this
    with the conversion; predict converts only the frames of its own chunks). VideoError as
    `iter_frames`."""
    if every < 1:
        raise HandposeError(f"--every {every}: must be >= 1")
    path = Path(path)
    av = require_av()
    with _open(path, frame_threads=frame_threads) as (container, stream):
        rate = _rate(stream)
        origin = stream.start_time  # pts of the first frame in display order (FFmpeg's start_time)
        index, last = 0, None
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.FFmpegError as e:
                listed = f" of the {stream.frames} frames its header lists" if stream.frames else " frames"
                raise VideoError(path, f"decoding failed after {index}{listed} ({_reason(e)})") from None
            if origin is None and frame.pts is not None:
                origin = frame.pts
            if index % every == 0:
                yield Decoded(index, _time(frame, index, origin, rate, path), frame)
            index, last = index + 1, frame
        _check_complete(path, stream, index, last, rate)


class VideoWriter:
    """An H.264 mp4 written frame by frame: `write(image)` (uint8 (H, W, 3) RGB; the first frame
    sets the size, odd sides are padded by one edge pixel for yuv420p), `close()` renames the
    finished file onto `path`. As a context manager an exception discards the temp file."""

    def __init__(self, path: str | os.PathLike, fps: float | Fraction, *, crf: int = 23) -> None:
        self.av = require_av()
        self.path = Path(path)
        self.tmp = tmp_name(self.path)
        self.rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
        if self.rate <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.crf = crf
        self.container: Any = None
        self.stream: Any = None
        self.size: tuple[int, int] | None = None  # (height, width) of the frames written
        self.frames = 0

    def write(self, image: np.ndarray) -> None:
        """Append one frame."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        if self.container is None:
            self._start(image.shape[0], image.shape[1])
        elif image.shape[:2] != self.size:
            raise ValueError(f"frame {self.frames} is {image.shape[:2]}, the video is {self.size}")
        h, w = image.shape[:2]
        image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") if h % 2 or w % 2 else image
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = self.frames
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder, close the file and rename it onto `path` (a video without frames is
        not written)."""
        if self.container is None:
            return
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
            self.container = None
            os.replace(self.tmp, self.path)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop and delete the temp file (nothing at `path` changes)."""
        if self.container is not None:
            self.container.close()
            self.container = None
        if self.tmp.exists():
            self.tmp.unlink()

    def _start(self, height: int, width: int) -> None:
        self.container = self.av.open(str(self.tmp), "w", format="mp4", options={"movflags": "+faststart"})
        stream = self.container.add_stream("libx264", rate=self.rate)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.time_base = 1 / self.rate
        stream.options = {"crf": str(self.crf), "preset": "veryfast"}
        self.stream, self.size = stream, (height, width)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------
# Helpers


class _open:
    """`with _open(path) as (container, stream)`: the container and its first video stream (with
    FFmpeg's frame threads if asked); every failure is a VideoError."""

    def __init__(self, path: Path, *, frame_threads: bool = False) -> None:
        self.path, self.frame_threads = path, frame_threads
        self.container: Any = None

    def __enter__(self) -> tuple[Any, Any]:
        av = require_av()
        if not self.path.exists():
            raise VideoError(self.path, "video file not found")
        if not self.path.is_file():
            raise VideoError(self.path, "is not a file")
        try:
            self.container = av.open(str(self.path))
        except av.FFmpegError as e:
            raise VideoError(self.path, f"cannot be opened as a video ({_reason(e)})") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(self.path, "holds no video stream")
        stream = self.container.streams.video[0]
        if self.frame_threads:
            stream.thread_type = "AUTO"
        return self.container, stream

    def __exit__(self, *exc: object) -> None:
        if self.container is not None:
            self.container.close()


def _reason(e: Exception) -> str:
    """FFmpeg's error in words, without the errno and the path it repeats."""
    text = getattr(e, "strerror", None) or str(e)
    text = re.sub(r"^\[Errno -?\d+\] ", "", str(text))
    return " ".join(text.split()) or type(e).__name__


def _rate(stream: Any) -> Fraction | None:
    rate = stream.average_rate or stream.guessed_rate
    return Fraction(rate) if rate else None


def _quarter_turns(degrees: float) -> int:
    return int(round(degrees / 90.0)) % 4


def _rgb(frame: Any) -> np.ndarray:
    """The frame as displayed: RGB uint8, turned by its display matrix (counter-clockwise
    degrees, as np.rot90 turns)."""
    image = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(frame.rotation)
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def _time(frame: Any, index: int, origin: int | None, rate: Fraction | None, path: Path) -> float:
    if frame.pts is not None and origin is not None:
        return float((frame.pts - origin) * frame.time_base)
    if rate:
        return float(index / rate)
    raise VideoError(path, f"frame {index} has no timestamp and the stream no frame rate")


def _check_complete(path: Path, stream: Any, decoded: int, last: Any, rate: Fraction | None) -> None:
    """No frame at all, or fewer frames than the header lists with the last one ending more than
    a frame before the stream's end: the file was cut short. (Fewer frames alone is not enough:
    an edit list can drop frames at the start.)"""
    listed = int(stream.frames or 0)
    if decoded == 0:
        listing = f" of the {listed} its header lists: truncated or damaged" if listed else ""
        raise VideoError(path, f"no frame could be decoded{listing}")
    if decoded >= listed or not stream.duration or last is None or last.pts is None or not rate:
        return
    origin = stream.start_time or 0
    end = float((stream.duration + origin) * stream.time_base)
    last_end = float(last.pts * last.time_base) + float(1 / rate)
    if end - last_end > 1.0 / float(rate):
        raise VideoError(
            path,
            f"truncated: the stream stops after {decoded} of the {listed} frames its header lists "
            f"(at {last_end:.3f} s of {end:.3f} s)",
        )

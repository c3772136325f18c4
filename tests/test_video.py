"""Video files: frames, their numbers and times from clips PyAV encodes here, every-Nth and
resumed iteration, damaged files as one line, the display rotation, and the mp4 writer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from handpose.errors import HandposeError
from handpose.video import VideoError, VideoWriter, is_video, iter_frames, probe

FPS = 12
N = 26
W, H = 64, 48


def _level(i: int) -> int:
    """Frame i's grey level: far apart from its neighbours' after lossy coding."""
    return 20 + 8 * i


def _encode(path: Path, n: int = N, *, fps: int = FPS, faststart: bool = False, rotation: int = 0) -> None:
    """n flat grey frames (frame i at _level(i), a white square top-left) with B-frames and a
    key frame every 5 frames, encoded by PyAV's libx264 into an mp4."""
    import av

    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.gop_size = 5
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(n):
            image = np.full((H, W, 3), _level(i), np.uint8)
            image[:16, :16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    _encode(path)
    return path


def _grey(image: np.ndarray) -> float:
    return float(image[24:, 24:].mean())  # away from the white square


def test_frames_numbers_and_times(clip: Path) -> None:
    frames = list(iter_frames(clip))
    assert [f.index for f in frames] == list(range(N))
    assert [f.time for f in frames] == pytest.approx([i / FPS for i in range(N)], abs=1e-9)
    for f in frames:  # display order, each frame its own picture
        assert f.image.shape == (H, W, 3) and f.image.dtype == np.uint8
        assert abs(_grey(f.image) - _level(f.index)) < 3, f.index
        assert f.image[:16, :16].mean() > 240
    info = probe(clip)
    assert (info.width, info.height, info.fps, info.frames, info.codec) == (W, H, FPS, N, "h264")
    assert info.duration == pytest.approx(N / FPS)
    assert is_video(clip) and is_video("a/B.MOV") and not is_video("a/b.jpg")


def test_every_nth_and_resuming(clip: Path) -> None:
    """every=N keeps frames 0, N, 2N, ...; start=k resumes at frame k with the same frames (same
    pixels) as the full pass."""
    full = {f.index: f for f in iter_frames(clip)}
    threaded = list(iter_frames(clip, frame_threads=True))  # the same frames, in the same order
    assert [(f.index, f.time) for f in threaded] == [(f.index, f.time) for f in full.values()]
    assert all(np.array_equal(f.image, full[f.index].image) for f in threaded)
    assert [f.index for f in iter_frames(clip, every=5)] == [0, 5, 10, 15, 20, 25]
    resumed = list(iter_frames(clip, every=5, start=7))
    assert [f.index for f in resumed] == [10, 15, 20, 25]
    assert [f.index for f in iter_frames(clip, start=N - 2)] == [N - 2, N - 1]
    assert list(iter_frames(clip, start=N)) == []
    for f in resumed:
        assert f.time == full[f.index].time and np.array_equal(f.image, full[f.index].image)
    for kw, needle in (({"every": 0}, "--every 0: must be >= 1"), ({"start": -1}, "must be >= 0")):
        with pytest.raises(HandposeError, match=needle):
            list(iter_frames(clip, **kw))


def test_damaged_and_unsupported_files_are_one_line(clip: Path, tmp_path: Path) -> None:
    """Each is a VideoError (a ValueError: predict's data errors) of one line naming the file; a
    file cut short in its frames gives the frames before the cut, then the error."""
    import av

    data = clip.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: lost
    fast = tmp_path / "fast.mp4"
    _encode(fast, faststart=True)  # the index first, then the frames
    fast_data = fast.read_bytes()
    (tmp_path / "fastcut.mp4").write_bytes(fast_data[: int(len(fast_data) * 0.8)])
    (tmp_path / "text.mp4").write_text("not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with av.open(str(tmp_path / "audio.m4a"), "w", format="mp4") as container:  # no video stream
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    cases = {
        "cut.mp4": r"cannot be opened as a video \(Invalid data found when processing input\)",
        "fastcut.mp4": f"after \\d+ of the {N} frames its header lists",
        "text.mp4": "cannot be opened as a video",
        "empty.mp4": "cannot be opened as a video",
        "audio.m4a": "holds no video stream",
        "missing.mp4": "video file not found",
    }
    for name, needle in cases.items():
        got = []
        with pytest.raises(VideoError, match=needle) as e:
            got.extend(iter_frames(tmp_path / name))
        message = str(e.value)
        assert isinstance(e.value, ValueError) and message.startswith(str(tmp_path / name) + ": ")
        assert "\n" not in message and e.value.reason == message.split(": ", 1)[1]
        if name == "fastcut.mp4":  # the frames before the cut came out intact
            assert 0 < len(got) < N and [f.index for f in got] == list(range(len(got)))
            assert all(abs(_grey(f.image) - _level(f.index)) < 3 for f in got)
    with pytest.raises(VideoError, match="cannot be opened"):
        probe(tmp_path / "text.mp4")
    # With frame threads the decoder drops the cut packet silently: the frame count against the
    # header's still finds the cut, after the same frames.
    got = []
    with pytest.raises(VideoError, match=f"truncated: the stream stops after \\d+ of the {N} frames"):
        got.extend(iter_frames(tmp_path / "fastcut.mp4", frame_threads=True))
    assert 0 < len(got) < N and [f.index for f in got] == list(range(len(got)))


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    """A portrait phone video stores landscape frames and a display rotation: frames come out as
    displayed, like photos with their EXIF orientation."""
    path = tmp_path / "turned.mp4"
    _encode(path, n=3, rotation=90)  # 90 degrees counter-clockwise
    frame = next(iter_frames(path))
    assert frame.image.shape == (W, H, 3)
    assert frame.image[-16:, :16].mean() > 240  # the top-left square, turned to the bottom-left
    assert frame.image[:16, :16].mean() < 100
    info = probe(path)
    assert (info.width, info.height) == (H, W)


def test_writer_round_trip_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "overlay.mp4"
    with VideoWriter(path, 10) as writer:  # odd sides: padded by one edge pixel
        for i in range(12):
            writer.write(np.full((47, 63, 3), _level(i), np.uint8))
            assert not path.exists()  # written under a temp name until closed
    frames = list(iter_frames(path))
    assert [f.index for f in frames] == list(range(12))
    assert [f.time for f in frames] == pytest.approx([i / 10 for i in range(12)])
    assert frames[0].image.shape == (48, 64, 3)
    assert all(abs(_grey(f.image) - _level(f.index)) < 3 for f in frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.mp4"]

    with pytest.raises(RuntimeError, match="stop"), VideoWriter(tmp_path / "broken.mp4", 10) as writer:
        writer.write(np.zeros((32, 32, 3), np.uint8))
        raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.mp4"]  # no file, no temp file
    with pytest.raises(ValueError, match="frame 1 is"), VideoWriter(tmp_path / "sizes.mp4", 10) as writer:
        writer.write(np.zeros((32, 32, 3), np.uint8))
        writer.write(np.zeros((16, 32, 3), np.uint8))
    assert not (tmp_path / "sizes.mp4").exists()


def test_without_pyav_is_one_line(clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)
    for call in (
        lambda: list(iter_frames(clip)),
        lambda: probe(clip),
        lambda: VideoWriter(tmp_path / "o.mp4", 5),
    ):
        with pytest.raises(HandposeError, match=r"needs PyAV: pip install 'handpose\[video\]'") as e:
            call()
        assert not isinstance(e.value, ValueError)  # a setup problem: predict must stop, not skip the file


def test_bench_video_measures_every_way(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark runs end to end on tiny clips: every clip and way has a row (no timing is
    checked), and it writes only its clips into the work folder."""
    import json

    from handpose.bench.video import SIZES, bench_video

    rows = bench_video(tmp_path, frames=3, rounds=1)
    assert [(r["clip"], r["way"]) for r in rows] == [
        (clip, way)
        for clip in SIZES
        for way in ("decode", "decode, frame threads", "iter_frames", "iter_frames every 5")
    ]
    assert all(r["frames_per_s"] > 0 for r in rows)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-1280x720.mp4", "clip-224x224.mp4"]
    assert [f.index for f in iter_frames(tmp_path / "clip-224x224.mp4")] == [0, 1, 2]

"""Videos in `handpose predict`: a clip PyAV encodes here (a bright dot moving frame by frame)
gives one row per kept frame with its number and time, the dot found where it was drawn; a
truncated or foreign video is one errors.jsonl line while the other inputs go on; an interrupted
run resumes to the bytes of an uninterrupted one; --overlay-video writes the kept frames."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from predictkit import WARP, IntensityModel, RaisingModel, dot_image, encode

from handpose.errors import HandposeError
from handpose.predict import predict
from handpose.predict_staging import STAGING
from handpose.video import iter_frames, probe

FPS = 10
W, H = 96, 64
ROOT = Path(__file__).resolve().parents[1]


def _dot(i: int) -> tuple[float, float]:
    """Where frame i's dot is (pixel-centre convention): it walks across and down the frame."""
    return 20.0 + 1.5 * i, 16.0 + 0.8 * i


def _encode(path: Path, n: int, *, faststart: bool = True) -> None:
    """n frames, frame i a Gaussian dot at _dot(i) on black, H.264 (crf 12, a key frame every 8)."""
    import av

    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.gop_size = 8
        stream.options = {"crf": "12"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(dot_image(W, H, *_dot(i), 3.0), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


SPEC = WARP  # whole frames letterboxed into 128 px; the IntensityModel finds the dot


@pytest.mark.parametrize("every", [1, 3])
def test_one_row_per_kept_frame_with_its_number_and_time(tmp_path: Path, every: int) -> None:
    """A video next to a photo in a folder: the photo's row, then one row per kept frame (0, N,
    2N, ...) in order, each with its frame number, time = number / fps, the frame's size, and the
    dot found where that frame drew it."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(dot_image(50, 40, 10.0, 12.0, 2.0)))
    _encode(folder / "b.mp4", 20)
    predict((IntensityModel(), SPEC), [folder], tmp_path / "out", every=every, refine=0, quiet=True)
    rows = _rows(tmp_path / "out")
    assert rows[0]["path"] == str(folder / "a.png") and "frame" not in rows[0]
    frames = rows[1:]
    assert [r["frame"] for r in frames] == list(range(0, 20, every))
    assert [r["time"] for r in frames] == pytest.approx([i / FPS for i in range(0, 20, every)], abs=1e-6)
    for r in frames:
        assert r["path"] == str(folder / "b.mp4") and (r["width"], r["height"]) == (W, H)
        found = np.array(r["keypoints"])[:, :2].mean(axis=0)
        assert np.abs(found - _dot(r["frame"])).max() < 0.6, (r["frame"], found)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["images"] == 1 + len(frames) and run["videos"] == 1 and run["every"] == every


def test_truncated_and_foreign_videos_are_one_line_each(tmp_path: Path) -> None:
    """A clip cut short keeps the rows of the frames before the cut and adds one error line; a
    file that is no video is one line; the photo after them is predicted."""
    folder = tmp_path / "in"
    folder.mkdir()
    _encode(tmp_path / "whole.mp4", 40)
    data = (tmp_path / "whole.mp4").read_bytes()
    (folder / "a-cut.mp4").write_bytes(data[: int(len(data) * 0.8)])  # faststart: the index survives
    (folder / "b-text.mp4").write_bytes(b"no video here\n" * 50)
    (folder / "c.png").write_bytes(encode(dot_image(50, 40, 10.0, 12.0, 2.0)))
    predict((IntensityModel(), SPEC), [folder], tmp_path / "out", refine=0, quiet=True)
    rows, errors = _rows(tmp_path / "out"), _errors(tmp_path / "out")
    cut = [r for r in rows if r["path"].endswith("a-cut.mp4")]
    assert 0 < len(cut) < 40 and [r["frame"] for r in cut] == list(range(len(cut)))
    assert [e["path"] for e in errors] == [str(folder / "a-cut.mp4"), str(folder / "b-text.mp4")]
    assert "40 frames its header lists" in errors[0]["reason"]
    assert "cannot be opened as a video" in errors[1]["reason"]
    assert rows[-1]["path"] == str(folder / "c.png")


def test_interrupted_video_run_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    """Ctrl-C in the second chunk of frames: the re-run continues after the first chunk (32
    frames not predicted again) and writes what an uninterrupted run writes."""
    _encode(tmp_path / "clip.mp4", 75)  # 3 chunks of 32 frames at batch 4
    opts = {"batch_size": 4, "refine": 0, "quiet": True, "overlays": 2}
    predict((IntensityModel(), SPEC), [tmp_path / "clip.mp4"], tmp_path / "clean", **opts)
    out = tmp_path / "out"
    raising = RaisingModel(IntensityModel(), after=12)  # 8 batches per chunk: in the second
    with pytest.raises(KeyboardInterrupt):
        predict((raising, SPEC), [tmp_path / "clip.mp4"], out, **opts)
    assert json.loads((out / STAGING / "rank-0" / "progress.json").read_text())["chunks"] == 1
    counting = RaisingModel(IntensityModel(), after=-1)
    predict((counting, SPEC), [tmp_path / "clip.mp4"], out, **opts)
    assert counting.calls == 8 + 3  # chunks 2 and 3 only (19 batches from the start)
    for name in ("predictions.jsonl", "errors.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert len(_rows(out)) == 75


def test_overlay_video_holds_the_kept_frames(tmp_path: Path) -> None:
    """--overlay-video: OUT/overlays/video-000-clip.mp4 has the kept frames at fps / every, the
    skeleton drawn on each where its dot was found; run.json lists it."""
    _encode(tmp_path / "clip.mp4", 12)
    out = tmp_path / "out"
    predict(
        (IntensityModel(), SPEC),
        [tmp_path / "clip.mp4"],
        out,
        every=2,
        overlay_video=True,
        refine=0,
        quiet=True,
    )
    name = "overlays/video-000-clip.mp4"
    assert name in json.loads((out / "run.json").read_text())["files"]
    info = probe(out / name)
    assert (info.width, info.height, info.frames) == (W, H, 6) and info.fps == pytest.approx(FPS / 2)
    source = {f.index: f.image for f in iter_frames(tmp_path / "clip.mp4", every=2)}
    for k, frame in enumerate(iter_frames(out / name)):
        x, y = (int(v) for v in _dot(2 * k))
        # every joint is at the dot: their discs, in the fingers' colours, cover its white pixel
        assert np.abs(frame.image[y, x].astype(int) - source[2 * k][y, x].astype(int)).max() > 40


def test_video_options_need_a_video(tmp_path: Path) -> None:
    """--every and --overlay-video without a video, --boxes with one, --every 0: one line each,
    before anything is written."""
    (tmp_path / "a.png").write_bytes(encode(dot_image(50, 40, 10.0, 12.0, 2.0)))
    _encode(tmp_path / "clip.mp4", 3)
    (tmp_path / "boxes.json").write_text("[]")
    model = (IntensityModel(), SPEC)
    for kwargs, inputs, needle in (
        ({"every": 2}, ["a.png"], "--every: applies to videos; none is among the inputs"),
        ({"overlay_video": True}, ["a.png"], "--overlay-video: applies to videos"),
        ({"boxes": tmp_path / "boxes.json"}, ["clip.mp4"], "is a video (predict videos without --boxes)"),
        ({"every": 0}, ["clip.mp4"], "--every 0: must be >= 1"),
    ):
        with pytest.raises(HandposeError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            predict(model, [tmp_path / i for i in inputs], tmp_path / "out", quiet=True, **kwargs)
        assert not (tmp_path / "out").exists()


def _checkpoint(path: Path) -> None:
    """A small strided checkpoint (random weights), trained on box crops: predict refines once."""
    import torch

    from handpose import checkpoint
    from handpose.model import model_from_config

    torch.manual_seed(0)
    config = {"arch": "strided", "width": 4, "depth": 1, "image_size": 32, "sigma": 2.0, "loss": "l1"}
    state = {
        "model": model_from_config(config).state_dict(),
        "config": config,
        "norm": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]},
        "epoch": 1,
        "step": 1,
        "sets": [{"crop": "box"}],
    }
    checkpoint.save(path, state)


def test_bench_video_with_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`handpose bench video --model`: per clip a model-only and a predict row, predict's ratio to
    the slower of decoding and the model (no timing is checked)."""
    from handpose.bench.video import SIZES, bench_video

    _checkpoint(tmp_path / "m.pt")
    rows = bench_video(tmp_path / "clips", frames=3, rounds=1, model=tmp_path / "m.pt", device="cpu")
    ways = ("decode", "decode, frame threads", "iter_frames", "iter_frames every 5", "model only", "predict")
    assert [(r["clip"], r["way"]) for r in rows] == [(clip, way) for clip in SIZES for way in ways]
    for r in (r for r in rows if r["way"] == "predict"):
        same = {x["way"]: x["frames_per_s"] for x in rows if x["clip"] == r["clip"]}
        slower, serial = (
            min(same["iter_frames"], same["model only"]),
            1 / (1 / same["iter_frames"] + 1 / same["model only"]),
        )
        assert r["predict_vs_slower"] == pytest.approx(r["frames_per_s"] / slower, rel=1e-2, abs=1e-3)
        assert r["predict_vs_serial"] == pytest.approx(r["frames_per_s"] / serial, rel=1e-2, abs=1e-3)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == rows


@pytest.mark.slow
def test_torchrun_two_ranks_split_a_video_like_one_process(tmp_path: Path) -> None:
    """Two ranks cut the same chunks of one video (each decodes it, converts its own chunks'
    frames) and rank 0 merges the result one process writes."""
    _checkpoint(tmp_path / "m.pt")
    _encode(tmp_path / "clip.mp4", 50)
    args = [
        "-m",
        "handpose",
        "predict",
        str(tmp_path / "m.pt"),
        str(tmp_path / "clip.mp4"),
        "--batch-size",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "one")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    two = subprocess.run(
        cmd + ["--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr[-3000:]
    got = (tmp_path / "two" / "predictions.jsonl").read_bytes()
    assert got == (tmp_path / "one" / "predictions.jsonl").read_bytes() and got.count(b"\n") == 50

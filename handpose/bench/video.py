"""`handpose bench video`: decoding frames/s of generated clips, 224 x 224 and 1280 x 720.

Clips: `frames` frames at 30 fps of a smooth random texture panning a few pixels a frame (motion
an encoder must follow, not noise), H.264 written by `video.VideoWriter` into WORKDIR. Rows:
  decode                  FFmpeg's decoder alone as `iter_frames` opens the file, no conversion:
                          the floor of any video input
  decode, frame threads   the same with FFmpeg's frame threads (`iter_frames(frame_threads=True)`)
  iter_frames             `video.iter_frames`: decode + RGB uint8, as predict receives frames
  iter_frames every 5     frames kept 1 in 5: the others are decoded but not converted
With a MODEL (`--model`), per clip also:
  model only              the model's forward passes on the clip's first frame as predict crops
                          it (whole frame), ready in memory, at predict's batch size, divided by
                          the passes predict makes per frame (1 + its refinement passes)
  predict                 `predict(MODEL, clip)` end to end (decode, crops, forward, refinement,
                          the lines and their checkpoints, the commit; model load included)
  and `predict_vs_slower`: predict's frames/s against the slower of iter_frames and model only;
  `predict_vs_serial`: against both one after the other, 1 / (1 / iter_frames + 1 / model only).
Rows are timed in interleaved rounds and keep their best. Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.table import Table

from handpose.console import make_console
from handpose.errors import HandposeError
from handpose.video import VideoWriter, iter_frames, require_av

FPS = 30
SIZES = {"224 px": (224, 224), "720p": (1280, 720)}


def bench_video(
    workdir: str | os.PathLike = "bench-out/video",
    *,
    frames: int = 150,
    rounds: int = 3,
    model: str | os.PathLike | None = None,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Frames/s of each way of reading each generated clip (with `model`: and of predicting it);
    returns one row per clip and way."""
    if frames < 1 or rounds < 1:
        raise HandposeError("--frames and --rounds must be >= 1")
    av = require_av()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timers: list[tuple[dict[str, Any], Callable[[], int]]] = []
    for name, (w, h) in SIZES.items():
        clip = workdir / f"clip-{w}x{h}.mp4"
        make_clip(clip, w, h, frames)

        def decode(path: Path = clip, threads: bool = False) -> int:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                if threads:
                    stream.thread_type = "AUTO"
                return sum(1 for _ in container.decode(stream))

        def rgb(path: Path = clip, every: int = 1) -> int:
            return sum(1 for _ in iter_frames(path, every=every))

        def decode_threads(path: Path = clip) -> int:
            return decode(path, True)

        def rgb_5(path: Path = clip) -> int:
            return rgb(path, 5)

        row = {"clip": name, "width": w, "height": h, "frames": frames}
        timers += [
            ({**row, "way": "decode"}, decode),
            ({**row, "way": "decode, frame threads"}, decode_threads),
            ({**row, "way": "iter_frames"}, rgb),
            ({**row, "way": "iter_frames every 5"}, rgb_5),
        ]
        if model is not None:
            timers += _model_timers(model, clip, row, frames, device)
    best = [0.0] * len(timers)
    for _ in range(rounds):
        for k, (_, call) in enumerate(timers):
            start = time.perf_counter()
            call()
            best[k] = max(best[k], frames / (time.perf_counter() - start))  # every frame is decoded
    rows = [{**row, "frames_per_s": round(rate, 1)} for (row, _), rate in zip(timers, best, strict=True)]
    for row in rows:
        base = next(r for r in rows if r["clip"] == row["clip"] and r["way"] == "decode")
        row["vs_decode"] = round(row["frames_per_s"] / base["frames_per_s"], 3)
        if row["way"] == "predict":
            same = {r["way"]: r["frames_per_s"] for r in rows if r["clip"] == row["clip"]}
            row["predict_vs_slower"] = round(
                row["frames_per_s"] / min(same["iter_frames"], same["model only"]), 3
            )
            # Decoding and the model one after the other, each at its own full-machine rate: on a
            # CPU both use the same cores, so predict can beat this only by overlapping them.
            serial = 1.0 / (1.0 / same["iter_frames"] + 1.0 / same["model only"])
            row["predict_vs_serial"] = round(row["frames_per_s"] / serial, 3)
    _print(rows, rounds)
    return rows


def _model_timers(
    model: str | os.PathLike, clip: Path, row: dict[str, Any], frames: int, device: str | None
) -> list[tuple[dict[str, Any], Callable[[], int]]]:
    """The model-only and predict rows of one clip (see the module docstring). A timer returns the
    frames it stands for: model only, frames / passes per frame."""
    import tempfile

    import torch

    from handpose.inference import crops_of, default_batch_size, default_refine, forward
    from handpose.models import is_onnx, load_model, pick_device
    from handpose.predict import predict

    dev = pick_device(device, onnx=is_onnx(model))
    net, spec = load_model(model, dev)
    first = next(iter_frames(clip)).image
    (crop,) = crops_of(first, first.shape[1], first.shape[0], [None], spec)
    batch_size = default_batch_size(dev)
    batch = torch.from_numpy(np.stack([crop.input] * batch_size))  # type: ignore[list-item]
    passes = 1 + default_refine(spec)

    def model_only() -> int:
        with torch.inference_mode():
            forward(net, batch, spec)  # warm-up
            for _ in range(0, frames * passes, batch_size):
                forward(net, batch, spec)
        return frames

    def predict_clip() -> int:
        with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
            # the keypoint model's path, as the model-only row times it (no bundled detector)
            predict(model, [clip], tmp, quiet=True, device=str(dev), batch_size=batch_size, detector=False)
        return frames

    return [({**row, "way": "model only"}, model_only), ({**row, "way": "predict"}, predict_clip)]


def make_clip(path: Path, width: int, height: int, frames: int, seed: int = 0) -> None:
    """A panning smooth random texture, H.264 at FPS (written atomically)."""
    rng = np.random.default_rng(seed)
    pan = 3 * frames  # 3 px a frame to the right
    small = rng.integers(0, 256, ((height + 31) // 32 + 1, (width + pan + 31) // 32 + 1, 3)).astype(np.uint8)
    texture = np.asarray(
        Image.fromarray(small).resize((small.shape[1] * 32, small.shape[0] * 32), Image.Resampling.BICUBIC)
    )
    with VideoWriter(path, FPS) as writer:
        for i in range(frames):
            writer.write(np.ascontiguousarray(texture[:height, 3 * i : 3 * i + width]))


def _print(rows: list[dict[str, Any]], rounds: int) -> None:
    table = Table(title=f"video decoding, frames/s; best of {rounds} interleaved rounds")
    for col in (
        "clip",
        "frames",
        "way",
        "frames/s",
        "x decode",
        "x slower of iter_frames, model",
        "x both serial",
    ):
        table.add_column(col, justify="left" if col in ("clip", "way") else "right")
    for r in rows:
        slower = f"{r['predict_vs_slower']:.2f}" if "predict_vs_slower" in r else ""
        serial = f"{r['predict_vs_serial']:.2f}" if "predict_vs_serial" in r else ""
        table.add_row(
            r["clip"],
            str(r["frames"]),
            r["way"],
            f"{r['frames_per_s']:.1f}",
            f"{r['vs_decode']:.2f}",
            slower,
            serial,
        )
    make_console().print(table)
    print(json.dumps({"bench": "video", "rows": rows}), flush=True)

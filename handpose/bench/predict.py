"""`handpose bench predict`: predict's images/s end to end against two baselines in the same run.

- model only: the same model's forward pass alone on ready batches (channels_last, inference
  mode) at the same batch size: the ceiling end to end can approach.
- tutorial loop: the tutorial's way, one image at a time: PIL open, resize, numpy normalise,
  an NCHW forward at batch 1, numpy post-processing.
- end to end: the real `predict()` (listing, decode, crop, forward, mapping back, the staged
  predictions.jsonl with its checkpoints, the commit) into a scratch folder, timed around the
  whole call (model load included, so it amortises over --limit images);
  plus one row with a speed-up switched off (channels_last), one with a decode thread, and
  model-only rows for NCHW and batch 1, so each win is measured.
- API: `handpose.load(MODEL)` and one call on the list of all images (the same Runner, batched
  inside), load included as in end to end: the Python API against the command's path.
- with `onnx`: the model exported (`handpose export`) and run on onnxruntime: model only, end to
  end (`predict model.onnx`) and API rows, against PyTorch's same rows.

With --detector, the detector path instead (`predict(..., detector=...)`: every photo through the
detector, each box it gives through the keypoint model), against the two models' forward
passes alone on ready batches in the same run: the detector's photos/s D and the keypoint
model's crops/s K combine into 1 / (1/D + k/K) photos/s for the k keypoint passes per photo the
end-to-end run made (run.json's `crops` x (1 + `refine`): each box the detector gave, refined;
the hands kept are fewer, those under --min-score being dropped after their passes); rows with
1 torch thread and with a decode thread show what the CPU defaults cost; the whole-image path's
end to end is the reference row. The image work alone (each photo decoded and letterboxed for
the detector; keypoint crops cut from the decoded photo, as a found box and its refinement are)
combines the same way into photos/s I, and 1 / (1/F + 1/I) with F the forward passes alone is
the serial bound: the rate of the path if it did nothing but its image work and its forward
passes, one after the other. On a CPU where the models already use every core the two can
overlap only where the models leave a core idle, so end to end stays near or below that bound.

Prints a table, then one JSON line with images_per_s, model_only_images_per_s,
tutorial_loop_images_per_s, api_images_per_s (with onnx the onnxruntime figures and ratios; with
--detector: detector_images_per_s, forward_only_images_per_s, detector_vs_forward_only,
ranks_vs_forward_only (a CPU of several cores: one torchrun rank per core, the run's own rate),
ranks_vs_forward_per_core (the same rate against the cores x the forward passes alone at 1
thread: each rank against its own core's), serial_bound_1_thread_vs_forward_only (what one rank
per core could reach with nothing but its image work around its forward passes),
hands_per_photo, whole_image_images_per_s).
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.table import Table

from handpose.api import load
from handpose.console import make_console
from handpose.cpu import keep_freed_memory
from handpose.detector import DetectorSpec, load_detector, photo_input
from handpose.errors import HandposeError
from handpose.export import export
from handpose.imageio import DecodeCache
from handpose.inference import crops_of, default_batch_size, image_size_of
from handpose.model import ModelSpec, normalized_input
from handpose.models import load_model, pick_device
from handpose.onnx_model import OnnxModel, load_onnx
from handpose.predict import predict
from handpose.predict_inputs import suffix_list
from handpose.sources.files import is_image, walk

TUTORIAL = "tutorial loop (batch 1, NCHW, PIL, numpy)"
MODEL_ONLY = "model only (channels_last)"
IMAGE_WORK = "image work alone"
RUN_RATE = "detector + keypoints, `handpose predict` run's own rate (run.json)"
IMAGE_ROWS = ("decode + detector input alone (photos/s)", "keypoint crops alone, photos decoded (crops/s)")
END_TO_END = "end to end"
DETECTOR_E2E = "detector + keypoints, end to end"
FORWARD_ONLY = "forward passes alone (detector + keypoints)"
API = "API (handpose.load, one call on every image)"
ONNX_MODEL_ONLY = "model only, onnxruntime"
ONNX_END_TO_END = "end to end, onnxruntime (predict model.onnx)"
ONNX_API = "API, onnxruntime"


def _e2e_options(batch_size: int, workers: int | None, dev: torch.device) -> dict[str, Any]:
    """predict()'s options in every end-to-end row: the keypoint model's own path unless a row
    asks for a detector (a bundled model's detector is not run by default here)."""
    return dict(batch_size=batch_size, workers=workers, device=str(dev), quiet=True, detector=False)


def bench_predict(
    model: str | os.PathLike,
    images: str | os.PathLike,
    *,
    detector: str | os.PathLike | None = None,
    min_score: float | None = None,
    max_hands: int | None = None,
    batch_size: int | None = None,
    limit: int = 512,
    workers: int | None = None,
    device: str | None = None,
    repeats: int = 3,
    onnx: bool = False,
) -> dict[str, Any]:
    """Time predict on up to `limit` images of the folder `images`; print a table and a JSON line.
    With `detector`: the detector path (see the module docstring). onnx: also the model exported
    and run on onnxruntime (rows and ratios against PyTorch's)."""
    if detector is not None:
        return bench_detector_path(
            model,
            images,
            detector,
            min_score=min_score,
            max_hands=max_hands,
            batch_size=batch_size,
            limit=limit,
            workers=workers,
            device=device,
            repeats=repeats,
        )
    console = make_console()
    keep_freed_memory()  # as predict runs: every row under the same allocator
    dev = pick_device(device)
    net, spec = load_model(model, dev)
    if isinstance(net, OnnxModel):
        raise HandposeError(f"{model}: give the PyTorch model (--onnx exports it and times both)")
    files = _images(Path(images), limit)
    n = len(files)
    for f in files:  # every row reads from the page cache, none from the disk
        f.read_bytes()

    batch_size = batch_size or default_batch_size(dev)
    batch = _ready_batch(files, spec, batch_size)
    batches = max(3, math.ceil(n / batch_size))

    def e2e(subset: list[Path] = files, source: str | os.PathLike = model, **kw: Any) -> float:
        opts = _e2e_options(batch_size, workers, dev)
        with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
            start = time.perf_counter()
            predict(source, subset, tmp, **(opts | kw))
            return len(subset) / (time.perf_counter() - start)

    def api(source: str | os.PathLike = model) -> float:
        start = time.perf_counter()
        load(source, detector=False, device=str(dev), batch_size=batch_size)(files)
        return len(files) / (time.perf_counter() - start)

    measures = {
        TUTORIAL: lambda: tutorial_loop(net, spec, files),
        MODEL_ONLY: lambda: model_only(net, spec, batch, batches, True),
        "model only, NCHW": lambda: model_only(net, spec, batch, batches, False),
        "model only, batch 1": lambda: model_only(net, spec, batch[:1], min(n, 64), True),
        END_TO_END: e2e,
        "end to end, NCHW": lambda: e2e(channels_last=False),
        "end to end, 1 decode thread": lambda: e2e(workers=1),
        "end to end, batch 1": lambda: e2e(files[:64], batch_size=1),  # batch-1 rows: 64 images
        API: api,
    }
    scratch = tempfile.TemporaryDirectory(prefix="bench-predict-onnx-")
    if onnx:
        exported = Path(scratch.name) / "model.onnx"
        export(model, exported, quiet=True)
        runtime, _ = load_onnx(exported, device=str(dev), threads=torch.get_num_threads())
        measures |= {
            ONNX_MODEL_ONLY: lambda: onnx_model_only(runtime, batch, batches),
            ONNX_END_TO_END: lambda: e2e(source=exported),
            ONNX_API: lambda: api(exported),
        }
    # Rounds interleave the rows and each row keeps its best: on a shared machine a neighbour's
    # burst then slows one sample of a row, not a whole row.
    rows = {name: 0.0 for name in measures}
    with scratch:
        for _ in range(repeats):
            for name, measure in measures.items():
                rows[name] = max(rows[name], measure())

    ref_model, ref_tutorial = rows[MODEL_ONLY], rows[TUTORIAL]
    threads = torch.get_num_threads()
    table = Table(title=f"predict: {n} images from {images}, batch {batch_size}, {dev}, {threads} threads")
    table.add_column("")
    table.add_column("images/s", justify="right")
    table.add_column("x model only", justify="right")
    table.add_column("x tutorial", justify="right")
    for name, rate in rows.items():
        table.add_row(name, f"{rate:.1f}", f"{rate / ref_model:.2f}", f"{rate / ref_tutorial:.2f}")
    console.print(table)
    result = {
        "bench": "predict",
        "images": n,
        "batch_size": batch_size,
        "device": str(dev),
        "threads": threads,
        "images_per_s": round(rows[END_TO_END], 2),
        "model_only_images_per_s": round(ref_model, 2),
        "tutorial_loop_images_per_s": round(ref_tutorial, 2),
        "end_to_end_vs_model_only": round(rows[END_TO_END] / ref_model, 3),
        "end_to_end_vs_tutorial": round(rows[END_TO_END] / ref_tutorial, 3),
        "api_images_per_s": round(rows[API], 2),
        "api_vs_end_to_end": round(rows[API] / rows[END_TO_END], 3),
        "rows": {k: round(v, 2) for k, v in rows.items()},
    }
    if onnx:
        result |= {
            "onnx_images_per_s": round(rows[ONNX_END_TO_END], 2),
            "onnx_vs_pytorch_end_to_end": round(rows[ONNX_END_TO_END] / rows[END_TO_END], 3),
            "onnx_vs_pytorch_model_only": round(rows[ONNX_MODEL_ONLY] / ref_model, 3),
            "onnx_api_vs_onnx_end_to_end": round(rows[ONNX_API] / rows[ONNX_END_TO_END], 3),
        }
    print(json.dumps(result))
    return result


def bench_detector_path(
    model: str | os.PathLike,
    images: str | os.PathLike,
    detector: str | os.PathLike,
    *,
    min_score: float | None = None,
    max_hands: int | None = None,
    batch_size: int | None = None,
    limit: int = 512,
    workers: int | None = None,
    device: str | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    """Detector + keypoints end to end against the two models' forward passes alone (same run)."""
    console = make_console()
    keep_freed_memory()  # as predict runs: every row under the same allocator
    dev = pick_device(device)
    net, spec = load_model(model, dev)
    if isinstance(net, OnnxModel):
        raise HandposeError(f"{model}: give the PyTorch model (the detector path is timed on PyTorch)")
    dnet, dspec = load_detector(detector, dev)
    files = _images(Path(images), limit)
    n = len(files)
    for f in files:  # every row reads from the page cache, none from the disk
        f.read_bytes()
    batch_size = batch_size or default_batch_size(dev)
    crops = _ready_batch(files, spec, batch_size)
    photos = _detector_batch(files, dspec, batch_size)
    batches = max(3, math.ceil(n / batch_size))
    threads = torch.get_num_threads()
    hands = [0.0]  # hands per photo kept by the last end-to-end run
    passes = [0.0]  # keypoint passes per photo it ran: every box the detector gave, 1 + refine each

    def e2e(*, torch_threads: int | None = None, **kw: Any) -> float:
        opts = _e2e_options(batch_size, workers, dev)
        with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
            torch.set_num_threads(torch_threads or threads)
            try:
                start = time.perf_counter()
                summary = predict(model, files, tmp, **(opts | kw))
                rate = n / (time.perf_counter() - start)
            finally:
                torch.set_num_threads(threads)
        if "detector" in kw:
            hands[0] = summary["predictions"] / max(1, summary["images"])
            passes[0] = summary["crops"] * (1 + summary["refine"]) / max(1, summary["images"])
        return rate

    found: dict[str, Any] = {"detector": detector, "min_score": min_score, "max_hands": max_hands}

    def alone(m: torch.nn.Module, mspec: Any, batch: torch.Tensor, torch_threads: int) -> float:
        torch.set_num_threads(torch_threads)
        try:
            return model_only(m, mspec, batch, batches, True)
        finally:
            torch.set_num_threads(threads)

    counts = sorted({threads, 1}, reverse=True)
    measures: dict[str, Any] = {}
    for t in counts:
        measures[f"detector forward alone, {t} thread(s) (photos/s)"] = functools.partial(
            alone, dnet, dspec, photos, t
        )
        measures[f"keypoint forward alone, {t} thread(s) (crops/s)"] = functools.partial(
            alone, net, spec, crops, t
        )
        measures[f"{DETECTOR_E2E}, {t} thread(s)"] = functools.partial(e2e, torch_threads=t, **found)
    measures[IMAGE_WORK] = functools.partial(image_work_alone, files, spec, dspec)
    if dev.type == "cpu" and threads > 1:  # the CPU's other way to use its cores: one process each
        for procs in (1, threads):
            measures[f"{RUN_RATE}, {procs} process(es) x {threads // procs} thread(s)"] = functools.partial(
                launched_run, model, files, procs, threads // procs, batch_size, found
            )
    measures[f"{DETECTOR_E2E}, {threads} thread(s), 1 decode thread"] = functools.partial(
        e2e, workers=1, **found
    )
    measures[f"{END_TO_END}, whole image (default refine), {threads} thread(s)"] = e2e
    rows: dict[str, float] = {}
    for _ in range(repeats):  # interleaved rounds, each row keeps its best (see bench_predict)
        for name, measure in measures.items():
            if name == IMAGE_WORK:  # two rates, timed together (the crops reuse the decodes)
                for sub, rate in zip(IMAGE_ROWS, measure(), strict=True):
                    rows[sub] = max(rows.get(sub, 0.0), rate)
            else:
                rows[name] = max(rows.get(name, 0.0), measure())
    h, k = hands[0], passes[0]
    image_only = 1.0 / (1.0 / rows[IMAGE_ROWS[0]] + k / rows[IMAGE_ROWS[1]])
    rows[f"{IMAGE_WORK}: {IMAGE_ROWS[0]} + the keypoint crops (photos/s)"] = image_only
    ratio = {}
    for t in counts:
        det_rate = rows[f"detector forward alone, {t} thread(s) (photos/s)"]
        kp_rate = rows[f"keypoint forward alone, {t} thread(s) (crops/s)"]
        forward_only = 1.0 / (1.0 / det_rate + k / kp_rate)
        rows[f"{FORWARD_ONLY}, {t} thread(s)"] = forward_only
        ratio[t] = rows[f"{DETECTOR_E2E}, {t} thread(s)"] / forward_only
    forward_only = rows[f"{FORWARD_ONLY}, {threads} thread(s)"]
    serial = 1.0 / (1.0 / forward_only + 1.0 / image_only)
    rows[f"serial bound: the image work, then the forward passes, {threads} thread(s)"] = serial
    # Per core: a rank at 1 thread against its own forward passes at 1 thread. Its serial bound is
    # the most one rank per core can reach however little else it does (the image work shares
    # its core); the ranks' forward passes alone are taken as `threads` x the 1-thread rate.
    forward_1 = rows[f"{FORWARD_ONLY}, 1 thread(s)"]
    serial_1 = 1.0 / (1.0 / forward_1 + 1.0 / image_only)
    if threads > 1:
        rows["serial bound: the image work, then the forward passes, 1 thread(s)"] = serial_1
    table = Table(
        title=f"predict with a detector: {n} photos from {images}, {h:.2f} hands per photo kept, "
        f"{k:.2f} keypoint passes per photo, "
        f"batch {batch_size}, {dev}"
    )
    table.add_column("")
    table.add_column("per s", justify="right")
    for name, rate in rows.items():
        table.add_row(name, f"{rate:.1f}")
    console.print(table)
    best = max(counts, key=lambda t: rows[f"{DETECTOR_E2E}, {t} thread(s)"])
    for t in counts:
        console.print(
            f"{t} thread(s): detector + keypoints end to end = {ratio[t]:.2f} x the forward passes alone"
        )
    console.print(
        f"serial bound (the image work alone, then the forward passes alone) = "
        f"{serial / forward_only:.2f} x the forward passes alone, {threads} thread(s)"
    )
    ranks_row = f"{RUN_RATE}, {threads} process(es) x 1 thread(s)"
    ranks = per_core = None
    if ranks_row in rows:
        ranks = rows[ranks_row] / forward_only
        per_core = rows[ranks_row] / (threads * forward_1)
        console.print(
            f"{threads} torchrun ranks x 1 thread: `handpose predict` = {ranks:.2f} x the forward passes "
            f"alone, {threads} thread(s); per core = {per_core:.2f} x {threads} x the forward passes "
            f"alone, 1 thread (serial bound at 1 thread: {serial_1 / forward_1:.2f} x)"
        )
    result = {
        "bench": "predict",
        "images": n,
        "batch_size": batch_size,
        "device": str(dev),
        "threads": threads,
        "hands_per_photo": round(h, 3),
        "keypoint_passes_per_photo": round(k, 3),
        "detector_images_per_s": round(rows[f"{DETECTOR_E2E}, {threads} thread(s)"], 2),
        "forward_only_images_per_s": round(rows[f"{FORWARD_ONLY}, {threads} thread(s)"], 2),
        "detector_vs_forward_only": round(ratio[threads], 3),
        "image_work_images_per_s": round(image_only, 2),
        "serial_bound_vs_forward_only": round(serial / forward_only, 3),
        "best_threads": best,
        "best_detector_vs_forward_only": round(ratio[best], 3),
        "ranks_vs_forward_only": None if ranks is None else round(ranks, 3),
        "ranks_vs_forward_per_core": None if per_core is None else round(per_core, 3),
        "serial_bound_1_thread_vs_forward_only": round(serial_1 / forward_1, 3),
        "whole_image_images_per_s": round(
            rows[f"{END_TO_END}, whole image (default refine), {threads} thread(s)"], 2
        ),
        "rows": {k: round(v, 2) for k, v in rows.items()},
    }
    print(json.dumps(result))
    return result


def launched_run(
    model: str | os.PathLike,
    files: list[Path],
    procs: int,
    threads: int,
    batch_size: int,
    found: dict[str, Any],
) -> float:
    """`handpose predict` as a user launches it, in a child process: `procs` > 1 ranks under
    torchrun (`--standalone`), each with `threads` torch threads. Returns the run's own images/s
    (run.json: from the models loaded to the files committed; interpreter start-up excluded, the
    same clock for 1 process and for several)."""
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        inputs = Path(tmp, "in")
        inputs.mkdir()
        for i, f in enumerate(files):  # exactly these files, in this order
            (inputs / f"{i:06d}{f.suffix}").symlink_to(f.resolve())
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        cmd = [sys.executable, *(launcher if procs > 1 else []), "-m", "handpose", "predict", str(model)]
        cmd += [str(inputs), "--out", str(Path(tmp, "out")), "--device", "cpu"]
        cmd += ["--batch-size", str(batch_size), "--detector", str(found["detector"])]
        for flag, value in (("--min-score", found["min_score"]), ("--max-hands", found["max_hands"])):
            cmd += [flag, str(value)] if value is not None else []
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise HandposeError(f"bench predict: the launched predict failed: {last}")
        return float(json.loads(Path(tmp, "out", "run.json").read_text())["images_per_s"])


def image_work_alone(files: list[Path], spec: ModelSpec, dspec: DetectorSpec) -> tuple[float, float]:
    """The detector path's image work without the models, as predict does it (bytes already in
    memory): (photos/s of each photo decoded and letterboxed for the detector, `photo_input` with
    a fresh `DecodeCache` as a run starts with; crops/s of keypoint crops cut from those decoded
    photos, one per photo, a found box's crop (`crops_of(found=True)`) of a centred square half
    the photo's shorter side; a refinement pass's crop is cut the same way)."""
    datas = [f.read_bytes() for f in files]
    sizes = [image_size_of(d) for d in datas]
    cache = DecodeCache()
    start = time.perf_counter()
    for data, (w, h) in zip(datas, sizes, strict=True):
        photo_input(data, w, h, dspec, cache)
    photos = len(datas) / (time.perf_counter() - start)
    boxes = [
        np.array([w / 2, h / 2, w / 2, h / 2]) + min(w, h) / 4 * np.array([-1, -1, 1, 1]) for w, h in sizes
    ]
    # Untimed: a decode at the crops' DCT scale where it differs from the detector input's (none
    # for 224 px photos). Left out of both rates, so the image work is if anything underestimated
    # and the serial bound overestimated.
    for data, (w, h), box in zip(datas, sizes, boxes, strict=True):
        crops_of(data, w, h, [box], spec, cache, found=True)
    start = time.perf_counter()
    for data, (w, h), box in zip(datas, sizes, boxes, strict=True):
        crops_of(data, w, h, [box], spec, cache, found=True)
    return photos, len(datas) / (time.perf_counter() - start)


def _detector_batch(files: list[Path], spec: DetectorSpec, batch_size: int) -> torch.Tensor:
    """The first `batch_size` photos letterboxed for the detector as predict does (repeated if fewer)."""
    inputs = []
    for i in range(batch_size):
        data = files[i % len(files)].read_bytes()
        inputs.append(photo_input(data, *image_size_of(data), spec)[0])
    return torch.from_numpy(np.stack(inputs))


def _images(folder: Path, limit: int) -> list[Path]:
    if not folder.is_dir():
        raise HandposeError(f"{folder}: not a folder of images")
    files = [Path(p) for p in itertools.islice(walk(folder, is_image), limit)]
    if not files:
        raise HandposeError(f"{folder}: no images ({suffix_list()})")
    return files


def _ready_batch(files: list[Path], spec: ModelSpec, batch_size: int) -> torch.Tensor:
    """The first `batch_size` images' model inputs as predict crops them (repeated if fewer)."""
    images: list[np.ndarray] = []
    for i in range(batch_size):
        data = files[i % len(files)].read_bytes()
        (crop,) = crops_of(data, *image_size_of(data), [None], spec)
        images.append(np.asarray(crop.input))
    return torch.from_numpy(np.stack(images))


def model_only(
    net: torch.nn.Module,
    spec: ModelSpec | DetectorSpec,
    batch: torch.Tensor,
    batches: int,
    channels_last: bool,
) -> float:
    """Forward passes alone on one ready batch, normalised as predict does it: images/s."""
    device = next(net.parameters()).device
    x = normalized_input(batch, spec.mean, spec.std, device)  # channels_last memory
    x = x if channels_last else x.contiguous()
    m = net if channels_last else copy.deepcopy(net).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        m(x)  # warm-up: kernel selection, allocator
        _sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            m(x)
        _sync(device)
    return batches * len(batch) / (time.perf_counter() - start)


def onnx_model_only(runtime: OnnxModel, batch: torch.Tensor, batches: int) -> float:
    """The exported graph alone (normalisation and decoding inside) on the same ready batch."""
    crops = batch.numpy()
    runtime(crops)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        runtime(crops)
    return batches * len(crops) / (time.perf_counter() - start)


def tutorial_loop(net: torch.nn.Module, spec: ModelSpec, files: list[Path]) -> float:
    """The tutorial's inference: per image PIL open + resize, numpy normalise, NCHW batch-1 forward,
    numpy heatmaps -> coordinates. Images/s."""
    device = next(net.parameters()).device
    m = copy.deepcopy(net).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)

    def one(path: Path) -> np.ndarray:
        image = Image.open(path).convert("RGB").resize((spec.size, spec.size), Image.Resampling.BILINEAR)
        x = (np.asarray(image, np.float32) / 255 - mean) / std
        with torch.no_grad():
            h = m(torch.from_numpy(x.transpose(2, 0, 1).copy())[None].to(device)).cpu().numpy()
        grid = np.arange(h.shape[-1], dtype=np.float32)  # the maps' own side (strided: size / 4)
        h = h / h.sum(axis=(2, 3), keepdims=True)
        return np.stack([(h.sum(axis=2) * grid).sum(-1), (h.sum(axis=3) * grid).sum(-1)], -1) / h.shape[-1]

    one(files[0])  # warm-up
    start = time.perf_counter()
    for f in files:
        one(f)
    return len(files) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

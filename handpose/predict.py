"""`handpose predict`: keypoints for every image of files, folders, FreiHAND roots, YOLO-pose
datasets or shards: one prediction per hand box (--boxes) or per image, mapped back to original
pixels; an error report when labels exist. Resumable, and split across ranks under torchrun.

Per chunk of images (`predict_inputs` streams them; chunk c belongs to rank c mod world size):
  read the bytes -> labelled hands (`labels_of`) and boxes (--boxes) -> per box the source square
  `geometry.box_region(box, pad)` (`image_region` for the whole image) and its matrix
  `geometry.crop_matrix` -> the model input (`preprocess`: `imageio.warp_to_input` for handpose
  checkpoints, what the loaders feed the model; the tutorial's own Pillow resize for its
  weights) -> batched forward and the model's `decode` -> `geometry.invert` back to original
  pixels -> (--refine N) N more passes in the box of the predicted keypoints -> predictions
  matched to labelled hands -> lines appended to this rank's part with a checkpoint
  (`predict_staging`). Rank 0 then merges the parts, writes the report (`report.py`) and the
  overlays, and commits them into --out.

OUT/
  predictions.jsonl  one line per prediction, input order: {"path", "width", "height", "hand",
                     "box" ([x0, y0, x1, y1] original px, null: the whole image), "keypoints":
                     [[x, y, score] x 21]} (+ "box_score" from a detector; + "error_px",
                     "error_pct_box" when matched to a labelled hand)
  errors.jsonl       one line per input or label line that could not be used: {"path", "reason"}
  --coco FILE        COCO keypoint results (a new file inside OUT)
  overlays/          --overlays N: drawings (labelled: the worst and the best hands)
  report.json, report.md, error_hist.png, pck.png, gallery.png   with labels (see report.py)
  run.json           written last: status, the files this run wrote, counts, timing, model
"Original pixels" follow geometry.py's convention in the image as displayed (EXIF applied).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from handpose import checkpoint, report
from handpose import model as models
from handpose.atomic import check_output_dir, inside
from handpose.console import make_console
from handpose.distributed import World, barrier, broadcast_object, setup_world, teardown
from handpose.errors import HandposeError
from handpose.geometry import (
    Region,
    apply_affine,
    box_region,
    crop_matrix,
    image_region,
    invert,
    keypoints_box,
)
from handpose.heatmaps import TUTORIAL_INDEX_OFFSET
from handpose.imageio import decode_image, image_size, warp_to_input
from handpose.predict_inputs import (
    IMAGE_SUFFIXES,
    BoxSource,
    BoxTask,
    CocoLabels,
    Hand,
    Input,
    LabelledBoxes,
    Problem,
    Scan,
    Source,
    Unit,
    WholeImage,
    check_split,
    iter_units,
    labelled_kinds,
    labels_of,
    load_coco_labels,
    open_boxes,
    plan_inputs,
    read_bytes,
    scan,
    stamp_of,
    verify_shard_inputs,
)
from handpose.predict_staging import (
    RUN_JSON,
    STAGING,
    Part,
    Staging,
    check_not_foreign,
    merge_parts,
    write_coco_array,
)
from handpose.remote import Cache
from handpose.shards import sha256_file
from handpose.skeleton import NUM_JOINTS

__all__ = ["IMAGE_SUFFIXES", "ModelSpec", "load_model", "predict", "prepare"]

DEFAULT_REFINE = 1  # --refine for box-crop models: 1 beat 0 and 2 on real photos (BENCHMARKS.md)
BOX_TO_KEYPOINTS = 1.2  # box side / keypoint-extent side when a checkpoint does not record it
BOX_PAD = 1.25  # box_pad of checkpoints that do not record one
MIN_SIDE_PX = 8  # smaller images cannot show a hand; they go to errors.jsonl
MIN_CHUNK = 32  # images per chunk at least: the unit of checkpoints and of the ranks' split
TUTORIAL_SIZE = 128
TUTORIAL_MEAN = (0.3950, 0.4323, 0.2954)
TUTORIAL_STD = (0.1966, 0.1734, 0.1836)
# Data errors while reading/decoding one input: recorded in errors.jsonl, the run goes on.
DATA_ERRORS = (OSError, ValueError, EOFError, SyntaxError)
OWN_NAMES = ("predictions.jsonl", "errors.jsonl", RUN_JSON, *report.OUTPUTS)


# ---------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class ModelSpec:
    """How to feed a model and where its crops come from."""

    size: int  # model input side, px
    mean: tuple[float, float, float]  # RGB normalisation of [0, 1] pixels
    std: tuple[float, float, float]
    kind: str = "handpose checkpoint"  # | "tutorial state_dict"
    preprocess: str = "warp"  # "warp": imageio.warp_to_input; "tutorial": Pillow antialiased resize
    crop: str = "image"  # what the model was trained on: "image" | "box" (the checkpoint's sets[0])
    pad: float = BOX_PAD  # the square box's side x pad fills the input (the checkpoint's box_pad)
    box_to_keypoints: float = BOX_TO_KEYPOINTS  # --refine: labelled box side / keypoint extent
    digest: str = ""  # identifies the weights (a resumed run must use the same)


def load_model(
    path: str | os.PathLike, device: torch.device, *, channels_last: bool = True
) -> tuple[torch.nn.Module, ModelSpec]:
    """A handpose checkpoint (its config builds the architecture: `model.build_model`) or a bare
    state_dict (the tutorial's `model_final`: ShallowUNet, 128 px, its normalisation, decoder and
    preprocessing), strictly loaded, in eval mode on `device`. Every failure is one line."""
    path = Path(path)
    if not path.exists():
        raise HandposeError(f"{path}: model file not found")
    if not path.is_file():
        raise HandposeError(f"{path}: is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file fails in many ways; the message says which
        raise HandposeError(f"{path}: {_unloadable(path, e)}") from None
    if isinstance(state, dict) and state.get("format") == checkpoint.FORMAT:
        net, spec = _from_checkpoint(path)
    elif isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        net, spec = _tutorial(path, state)
    else:
        raise HandposeError(
            f"{path}: not a handpose checkpoint or tutorial state_dict (a {type(state).__name__})"
        )
    spec = ModelSpec(**{**spec.__dict__, "digest": sha256_file(path)})
    # Module.to accepts memory_format at run time; the stubs do not list it.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return net.eval().to(device).to(memory_format=fmt), spec  # type: ignore[call-overload]


def _from_checkpoint(path: Path) -> tuple[torch.nn.Module, ModelSpec]:
    try:
        state = checkpoint.load(path)  # verifies the digest and the required keys
    except checkpoint.CorruptCheckpoint as e:
        raise HandposeError(str(e)) from None
    cfg, norm = state["config"], state["norm"]
    arch = str(cfg.get("arch", "unet"))  # checkpoints written before there was a choice: unet
    try:
        net = models.model_from_config(cfg)
    except HandposeError as e:
        raise HandposeError(f"{path}: its config cannot build a model: {e}") from None
    _load_weights(net, state["model"], path, f"arch {arch!r} (the checkpoint's config)")
    sets = state.get("sets") or [{}]
    ratio = (state.get("boxes") or {}).get("box_to_keypoints")
    spec = ModelSpec(
        size=int(cfg["image_size"]),
        mean=tuple(float(v) for v in norm["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in norm["std"]),  # type: ignore[arg-type]
        kind="handpose checkpoint",
        preprocess="warp",
        crop=str(sets[0].get("crop", "image")),
        pad=float(cfg.get("box_pad", BOX_PAD)),
        box_to_keypoints=float(ratio) if ratio else BOX_TO_KEYPOINTS,
    )
    return net, spec


def _tutorial(path: Path, weights: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, ModelSpec]:
    width, depth = _unet_shape(weights)
    # The tutorial's decoder reads heatmap cell i as coordinate i (handpose's: i + 0.5).
    net = models.ShallowUNet(width=width, depth=depth, index_offset=TUTORIAL_INDEX_OFFSET)
    _load_weights(net, weights, path, "a ShallowUNet state_dict")
    spec = ModelSpec(TUTORIAL_SIZE, TUTORIAL_MEAN, TUTORIAL_STD, "tutorial state_dict", "tutorial")
    return net, spec


def _load_weights(net: torch.nn.Module, weights: dict[str, Any], path: Path, what: str) -> None:
    """Strict load; another architecture's weights are one line (counts, not 43 key names)."""
    expected, given = set(net.state_dict()), set(weights)
    if expected != given:
        raise HandposeError(
            f"{path}: weights are for another architecture ({len(expected - given)} missing, "
            f"{len(given - expected)} unexpected keys); expected {what}"
        )
    for name, t in net.state_dict().items():
        if tuple(weights[name].shape) != tuple(t.shape):
            raise HandposeError(
                f"{path}: weights are for another architecture ({name} is "
                f"{tuple(weights[name].shape)}, not {tuple(t.shape)}); expected {what}"
            )
    net.load_state_dict(weights, strict=True)


def _unloadable(path: Path, error: Exception) -> str:
    """Why torch.load refused `path`, in words (torch's own message is many lines about
    weights_only): a PyTorch file cut short or damaged, pickled objects we refuse to load, or not
    a PyTorch file at all."""
    import pickle
    import zipfile

    with open(path, "rb") as f:
        head = f.read(4)
    pytorch = head == b"PK\x03\x04" or head[:1] == b"\x80"  # zip format, or the legacy pickle format
    if isinstance(error, pickle.UnpicklingError) and pytorch and zipfile.is_zipfile(path):
        return "not a handpose checkpoint or tutorial state_dict (it holds pickled objects, never loaded)"
    if pytorch:
        return "truncated or damaged (a PyTorch file that cannot be read back; copy or save it again)"
    return "not a handpose checkpoint or tutorial state_dict (not a PyTorch file)"


def _unet_shape(weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(width, depth) of a ShallowUNet state_dict: first block's channels, number of down blocks.
    Unknown layouts get the tutorial's (16, 3) and fail the strict load with key counts."""
    first = weights.get("conv_down1.double_conv.1.weight")
    depth = sum(1 for k in weights if re.fullmatch(r"conv_down\d+\.double_conv\.1\.weight", k))
    return (int(first.shape[0]), depth) if first is not None and first.ndim == 4 else (16, 3)


def _module_digest(net: torch.nn.Module, spec: ModelSpec) -> str:
    """An in-memory model's identity for resuming: its class, weights and spec."""
    h = hashlib.sha256(f"{type(net).__qualname__}|{spec}".encode())
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_batch_size(device: torch.device) -> int:
    """64 on a GPU; 4 on a CPU, where the activations of bigger batches (1 MB per image for each
    16-channel 128 px map) spill out of the L2 cache: per image, batch 4 ran ~1.2x faster than
    batch 8 and ~2x faster than batch 64 (bench predict, 2-core EPYC)."""
    return 64 if device.type == "cuda" else 4


def default_workers(device: torch.device) -> int:
    """Decode threads: cores - 1 beside a GPU; none on a CPU, where the model already uses every
    core and decoding elsewhere only competes with it (see BENCHMARKS.md)."""
    return max(0, _cores() - 1) if device.type == "cuda" else 0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pick_device(device: str | None) -> torch.device:
    """`device` as given, else CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise HandposeError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HandposeError(f"--device {device}: CUDA is not available on this machine")
    return dev


# ---------------------------------------------------------------------------------------------
# Preprocessing: the model input of one crop


def preprocess(data: bytes, M: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Image bytes + source -> input matrix M -> uint8 (size, size, 3).

    Handpose checkpoints: `imageio.warp_to_input`, the WDS loader's own function (augmentation
    off: M is `crop_matrix(region, size)` there too), including its JPEG DCT fast path.
    The tutorial's weights: a full decode and Pillow's antialiased resize, the tutorial's
    preprocessing, never a DCT-scaled decode (which moves its keypoints by pixels).
    """
    if spec.preprocess == "tutorial":
        return letterbox(decode_image(data)[0], M, spec.size)
    return warp_to_input(data, M, spec.size)


def prepare(
    data: bytes, spec: ModelSpec, box: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One crop as predict feeds it: (uint8 input, source -> input matrix, width, height).
    `box` None: the whole image letterboxed (`image_region`), else the box padded by spec.pad."""
    width, height = image_size(data)
    if min(width, height) < MIN_SIDE_PX:
        raise ValueError(f"image is {width}x{height} px, too small (both sides must be >= {MIN_SIDE_PX} px)")
    M = crop_matrix(_region(box, spec, width, height), spec.size)
    return preprocess(data, M, spec), M, width, height


def _region(box: np.ndarray | None, spec: ModelSpec, width: int, height: int) -> Region:
    return image_region(width, height) if box is None else box_region(box, spec.pad)


def letterbox(image: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """Scale-and-translate `image` by M (no rotation) into a black size x size canvas with Pillow's
    antialiased bilinear resize: exactly M under the pixel-centre convention, also when the bars
    are fractional pixels (the source box is M's inverse of whole destination pixels; where that
    box reaches past the image, zero padding stands for the black bar)."""
    h, w = image.shape[:2]
    s, tx, ty = float(M[0, 0]), float(M[0, 2]), float(M[1, 2])
    x0, x1 = _covered(tx, w * s, size)
    y0, y1 = _covered(ty, h * s, size)
    canvas = np.zeros((size, size, 3), np.uint8)
    if x1 <= x0 or y1 <= y0:  # a crop entirely off the image
        return canvas
    box = [(x0 - tx) / s, (y0 - ty) / s, (x1 - tx) / s, (y1 - ty) / s]
    box = [_snap(v, lim) for v, lim in zip(box, (w, h, w, h), strict=True)]
    # Pad an axis only when its box leaves the image; 1/s + 2 px covers the filter's support.
    pad = math.ceil(max(1.0, 1.0 / s)) + 2
    px = math.ceil(max(0.0, -box[0], box[2] - w)) + pad if box[0] < 0 or box[2] > w else 0
    py = math.ceil(max(0.0, -box[1], box[3] - h)) + pad if box[1] < 0 or box[3] > h else 0
    if px or py:
        image = np.pad(image, ((py, py), (px, px), (0, 0)))
        box = [box[0] + px, box[1] + py, box[2] + px, box[3] + py]
    region = Image.fromarray(image).resize(
        (x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=(box[0], box[1], box[2], box[3])
    )
    canvas[y0:y1, x0:x1] = np.asarray(region)
    return canvas


def _covered(start: float, length: float, size: int) -> tuple[int, int]:
    """Whole destination pixels that [start, start + length) touches, clipped to the canvas."""
    eps = 1e-6
    return max(0, math.floor(start + eps)), min(size, math.ceil(start + length - eps))


def _snap(v: float, limit: int) -> float:
    """Round-off (1e-9 px) must not make an in-image box look like it leaves the image."""
    return 0.0 if abs(v) < 1e-6 else float(limit) if abs(v - limit) < 1e-6 else v


def _reason(e: BaseException) -> str:
    """A data error as one deterministic line (Pillow names its BytesIO object's address)."""
    return re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__


# ---------------------------------------------------------------------------------------------
# Forward


def forward(
    net: torch.nn.Module, images: torch.Tensor, spec: ModelSpec, *, channels_last: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (B, size, size, 3) -> keypoints (B, 21, 2) in model-input pixels and scores (B, 21),
    through the model's own `decode`."""
    device = next(net.parameters()).device
    # NHWC uint8 permuted to NCHW *is* channels_last memory: no copy until the float conversion.
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    x = x if channels_last else x.contiguous()
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = net(x)
    uv, score = net.decode(out)  # type: ignore[operator]
    return uv.float().cpu().numpy().astype(np.float64), score.float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# One chunk of images


@dataclass(frozen=True)
class _Context:
    """What every chunk needs: the model, the options, the pool."""

    net: torch.nn.Module
    spec: ModelSpec
    boxes: BoxSource
    refine: int
    batch_size: int
    channels_last: bool
    pool: ThreadPoolExecutor | None
    first: int  # unlabelled overlays: the first N predictions


@dataclass
class _Image:
    """One image on its way through a chunk."""

    src: Source
    width: int
    height: int
    hands: tuple[Hand, ...] | None
    tasks: list[BoxTask]
    regions: list[Region]
    inputs: list[np.ndarray]
    problems: list[Problem]
    uv: list[np.ndarray] = field(default_factory=list)  # per task, original px
    score: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray | None] = field(default_factory=list)  # the final box of each task


def _open_image(unit: Unit, ctx: _Context) -> _Image | Problem:
    """Read one input and prepare its crops; a data error makes it a Problem."""
    if isinstance(unit, Problem):
        return unit
    try:
        data = read_bytes(unit)
        width, height = image_size(data)
        if min(width, height) < MIN_SIDE_PX:
            raise ValueError(
                f"image is {width}x{height} px, too small (both sides must be >= {MIN_SIDE_PX} px)"
            )
        hands, problems = labels_of(unit, width, height)
        tasks = ctx.boxes.boxes(unit, width, height, hands)
        regions = [_region(t.box, ctx.spec, width, height) for t in tasks]
        inputs = [preprocess(data, crop_matrix(r, ctx.spec.size), ctx.spec) for r in regions]
    except DATA_ERRORS as e:
        return Problem(unit.ordinal, unit.path, _reason(e))
    return _Image(unit, width, height, hands, tasks, regions, inputs, problems, boxes=[t.box for t in tasks])


def _opened(chunks: Iterator[tuple[int, list[Unit]]], ctx: _Context) -> Iterator[tuple[int, list[Any]]]:
    """Each chunk with its images opened; with a pool, the next chunk is read and decoded while
    the caller runs the model on this one."""
    if ctx.pool is None:
        for cid, units in chunks:
            yield cid, [_open_image(u, ctx) for u in units]
        return
    pending: tuple[int, list[Future[Any]]] | None = None
    for cid, units in chunks:
        submitted = (cid, [ctx.pool.submit(_open_image, u, ctx) for u in units])
        if pending is not None:
            yield pending[0], [f.result() for f in pending[1]]
        pending = submitted
    if pending is not None:
        yield pending[0], [f.result() for f in pending[1]]


def _run_model(inputs: list[np.ndarray], ctx: _Context) -> tuple[np.ndarray, np.ndarray]:
    """Model-input keypoints (N, 21, 2) and scores (N, 21) of N inputs, in batches."""
    uv, score = [], []
    for k in range(0, len(inputs), ctx.batch_size):
        batch = torch.from_numpy(np.stack(inputs[k : k + ctx.batch_size]))
        u, s = forward(ctx.net, batch, ctx.spec, channels_last=ctx.channels_last)
        uv.append(u)
        score.append(s)
    if not uv:
        return np.empty((0, NUM_JOINTS, 2)), np.empty((0, NUM_JOINTS))
    return np.concatenate(uv), np.concatenate(score)


def _predict_images(images: list[_Image], ctx: _Context) -> None:
    """Every task of every image: one pass, then `ctx.refine` passes for whole-image tasks."""
    flat = [(img, k) for img in images for k in range(len(img.tasks))]
    uv, score = _run_model([img.inputs[k] for img, k in flat], ctx)
    for (img, k), u, s in zip(flat, uv, score, strict=True):
        img.uv.append(_to_source(u, img.regions[k], ctx.spec.size))
        img.score.append(s)
        img.inputs[k] = None  # type: ignore[call-overload]  # free the crop
    for _ in range(ctx.refine):
        todo = [(img, k) for img, k in flat if img.tasks[k].box is None]
        boxes = [refine_box(img.uv[k], ctx.spec.box_to_keypoints) for img, k in todo]
        jobs = [(img, box_region(b, ctx.spec.pad)) for (img, _), b in zip(todo, boxes, strict=True)]
        crops = list(ctx.pool.map(_crop_again, jobs, [ctx] * len(jobs))) if ctx.pool else None
        crops = crops if crops is not None else [_crop_again(j, ctx) for j in jobs]
        # an image that cannot be read again (gone since the first pass) keeps its last pass
        kept = [n for n, c in enumerate(crops) if c is not None]
        uv, score = _run_model([crops[n] for n in kept], ctx)  # type: ignore[misc]
        for n, u, s in zip(kept, uv, score, strict=True):
            (img, k), (_, region) = todo[n], jobs[n]
            img.uv[k], img.score[k] = _to_source(u, region, ctx.spec.size), s
            img.boxes[k], img.regions[k] = boxes[n], region


def _crop_again(job: tuple[_Image, Region], ctx: _Context) -> np.ndarray | None:
    """A refinement crop: the image is read again (a chunk does not hold every image's bytes)."""
    img, region = job
    try:
        return preprocess(read_bytes(img.src), crop_matrix(region, ctx.spec.size), ctx.spec)
    except DATA_ERRORS:
        return None


def _to_source(uv: np.ndarray, region: Region, size: int) -> np.ndarray:
    """Model-input keypoints -> original pixels through the inverse of the crop's matrix."""
    return apply_affine(invert(crop_matrix(region, size)), uv)


def refine_box(uv: np.ndarray, ratio: float) -> np.ndarray:
    """The hand box a refinement pass crops: the predicted keypoints' extent grown about its
    centre by `ratio` (the training data's labelled box side / keypoint extent side), so it
    matches the boxes the model was trained on; at least MIN_SIDE_PX on its longer side."""
    x0, y0, x1, y1 = keypoints_box(uv)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = np.array([x1 - x0, y1 - y0]) * ratio / 2
    half = np.maximum(half, MIN_SIDE_PX / 2) if max(half) * 2 < MIN_SIDE_PX else half
    return np.array([cx - half[0], cy - half[1], cx + half[0], cy + half[1]])


def match_hands(img: _Image) -> list[int | None]:
    """The labelled hand each prediction is scored against (None: none). --boxes gt: the box's own
    hand. Otherwise greedily by the lowest mean error over the hand's labelled joints: each
    labelled hand and each prediction is used once (a whole-image prediction on a photo with
    three hands is scored against the hand it found)."""
    n = len(img.tasks)
    if not img.hands or not n:
        return [None] * n
    if any(t.label is not None for t in img.tasks):
        return [t.label for t in img.tasks]
    pairs = []
    for i in range(n):
        for j, hand in enumerate(img.hands):
            e = report.image_errors(img.uv[i][None], hand.uv[None], hand.labelled[None])[0]
            if np.isfinite(e):
                pairs.append((float(e), i, j))
    match: list[int | None] = [None] * n
    used: set[int] = set()
    for _, i, j in sorted(pairs):
        if match[i] is None and j not in used:
            match[i] = j
            used.add(j)
    return match


# ---------------------------------------------------------------------------------------------
# A rank's running state: counts and the kept hands (checkpointed with every chunk)


@dataclass
class _State:
    counts: Counter[str]
    extremes: report.Extremes
    first: list[dict[str, Any]]

    @classmethod
    def load(cls, data: dict[str, Any], worst: int, best: int) -> _State:
        return cls(
            Counter(data.get("counts", {})),
            report.Extremes(worst, best).load(data.get("extremes", {})),
            list(data.get("first", [])),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "extremes": self.extremes.to_json(),
            "first": self.first,
        }


def _chunk_outputs(cid: int, opened: list[Any], ctx: _Context, state: _State) -> dict[str, bytes]:
    """Predict one chunk and return the bytes it adds to each part file; update `state`."""
    images = [x for x in opened if isinstance(x, _Image)]
    _predict_images(images, ctx)
    preds, errors, coco, spill = [], [], [], []
    position = 0
    for x in opened:
        if isinstance(x, Problem):
            errors.append(_error_line(x))
            state.counts["errors"] += 1
            continue
        errors += [_error_line(p) for p in x.problems]
        state.counts["label_problems"] += len(x.problems)
        matches = match_hands(x)
        state.counts["images"] += 1
        state.counts["images_without_boxes"] += not x.tasks
        if x.hands:
            state.counts["hands_labelled"] += len(x.hands)
            state.counts["hands_missed"] += len(x.hands) - sum(m is not None for m in matches)
            state.counts["images_scored"] += any(m is not None for m in matches)
        for k in range(len(x.tasks)):
            order = [cid, position]
            position += 1
            hand = x.hands[matches[k]] if matches[k] is not None and x.hands else None
            row, entry = _score(x, k, hand, order)
            preds.append(_prediction_line(x, k, entry))
            coco.append(json.dumps(_coco_result(x, k)) + "\n")
            state.counts["predictions"] += 1
            if row is not None:
                spill.append(row)
                state.extremes.add(entry)
            elif len(state.first) < ctx.first:
                state.first.append(entry)
    return {
        "predictions.jsonl": "".join(preds).encode(),
        "errors.jsonl": "".join(errors).encode(),
        "coco.jsonl": "".join(coco).encode(),
        "spill.f32": np.concatenate(spill).astype("<f4").tobytes() if spill else b"",
    }


def _score(
    img: _Image, k: int, hand: Hand | None, order: list[int]
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The report row of prediction k (None without a labelled hand) and its entry: what the
    overlays and the worst/best tables need to find and draw it again."""
    box = img.boxes[k]
    entry: dict[str, Any] = {
        "path": img.src.path,
        "hand": img.tasks[k].hand,
        "order": order,
        "file": img.src.file,
        "sample": img.src.sample,
        "pred": np.round(img.uv[k], 3).tolist(),
        "box": None if box is None else np.round(box, 3).tolist(),
        "region": [round(float(v), 3) for v in img.regions[k]],
    }
    if hand is None:
        return None, entry
    side = float(max(img.width, img.height))
    gt_side = report.box_side(hand.box)
    row = report.spill_rows(
        img.uv[k][None], hand.uv[None], hand.labelled[None], [side], [gt_side], [img.regions[k][2]]
    )
    err = float(report.image_errors(img.uv[k][None], hand.uv[None], hand.labelled[None])[0])
    entry.update(
        error_px=err,
        error_pct=err / side * 100.0,
        error_pct_box=err / gt_side * 100.0,
        gt=np.round(hand.uv, 3).tolist(),
        labelled=hand.labelled.astype(int).tolist(),
    )
    return row, entry


def _error_line(p: Problem) -> str:
    return json.dumps({"path": p.path, "reason": p.reason}) + "\n"


def _prediction_line(img: _Image, k: int, entry: dict[str, Any]) -> str:
    task = img.tasks[k]
    rec: dict[str, Any] = {
        "path": img.src.path,
        "width": img.width,
        "height": img.height,
        "hand": task.hand,
        "box": entry["box"],
        "keypoints": [
            [round(float(x), 3), round(float(y), 3), round(float(s), 4)]
            for (x, y), s in zip(img.uv[k], img.score[k], strict=True)
        ],
    }
    if task.score is not None:
        rec["box_score"] = round(task.score, 4)
    if "error_px" in entry:
        rec["error_px"] = round(entry["error_px"], 4)
        rec["error_pct_box"] = round(entry["error_pct_box"], 4)
    return json.dumps(rec) + "\n"


def _coco_result(img: _Image, k: int) -> dict[str, Any]:
    """A COCO keypoint-results entry; image_id from the labels (or a digits-only file stem), else
    the input's position (1-based)."""
    iid = img.src.image_id if img.src.image_id is not None else img.src.ordinal + 1
    uv, score = img.uv[k], img.score[k]
    kps = [round(float(v), 3) for (x, y), s in zip(uv, score, strict=True) for v in (x, y, s)]
    rec: dict[str, Any] = {
        "image_id": iid,
        "category_id": 1,
        "keypoints": kps,
        "score": round(float(score.mean()), 4),
    }
    box = img.boxes[k]
    if box is not None:
        rec["bbox"] = [round(float(v), 3) for v in (box[0], box[1], box[2] - box[0], box[3] - box[1])]
    return rec


# ---------------------------------------------------------------------------------------------
# Options and the job


def _check_numbers(**values: int | None) -> None:
    least = {"batch_size": 1, "workers": 0, "overlays": 0, "refine": 0}
    for name, value in values.items():
        if value is not None and value < least[name]:
            raise HandposeError(f"--{name.replace('_', '-')} {value}: must be >= {least[name]}")


def coco_name(out: Path, coco: str | os.PathLike | None) -> str | None:
    """--coco as a path relative to --out: a new file inside --out, not one of predict's own
    names, under no file. Its folder is created inside --out when missing."""
    if coco is None:
        return None
    try:
        path = inside(out, coco)
    except ValueError as e:
        raise HandposeError(f"--coco: {e}") from None
    rel = path.relative_to(out.resolve()).as_posix()
    if rel == ".":
        raise HandposeError(f"--coco {coco}: is the output folder; give a file name inside it")
    if path.is_dir():
        raise HandposeError(f"--coco {coco}: is a folder; give a file name")
    top = rel.split("/")[0]
    if rel in OWN_NAMES or top in ("overlays", STAGING) or rel.endswith(".partial"):
        raise HandposeError(f"--coco {coco}: {rel} is one of predict's own outputs; choose another name")
    for p in path.parents:
        if p == out.resolve():
            break
        if p.exists() and not p.is_dir():
            raise HandposeError(f"--coco {coco}: {p} is a file, not a folder")
    return rel


def _resolve_refine(refine: int | None, spec: ModelSpec, boxes: BoxSource) -> int:
    """--refine: N passes in the predicted hand's box. Default DEFAULT_REFINE for models trained
    on box crops, 0 otherwise; never with --boxes (the boxes are given)."""
    if not isinstance(boxes, WholeImage):
        if refine:
            raise HandposeError("--refine applies to whole images; it cannot be used with --boxes")
        return 0
    if refine is None:
        return DEFAULT_REFINE if spec.crop == "box" else 0
    return refine


def _chunk_size(batch_size: int) -> int:
    """Images per chunk: whole batches (one box per image), at least MIN_CHUNK."""
    return batch_size * max(1, math.ceil(MIN_CHUNK / batch_size))


def _chunks(units: Iterator[Unit], size: int) -> Iterator[tuple[int, list[Unit]]]:
    chunk: list[Unit] = []
    cid = 0
    for unit in units:
        chunk.append(unit)
        if len(chunk) == size:
            yield cid, chunk
            cid, chunk = cid + 1, []
    if chunk:
        yield cid, chunk


def _join_world(dev: torch.device) -> World:
    """One process, or this rank of a torchrun job (each rank its own device: cuda:LOCAL_RANK,
    else the CPU, where each rank gets its share of the cores)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return World(device=dev)
    world = setup_world(dev.type)
    if world.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size) or 1)
        # torchrun sets OMP_NUM_THREADS=1 for every rank; give each rank its share of the cores.
        torch.set_num_threads(max(1, _cores() // local))
    return world


# ---------------------------------------------------------------------------------------------
# Entry


def predict(
    model: str | os.PathLike | tuple[torch.nn.Module, ModelSpec],
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    split: str | None = None,
    labels: str | os.PathLike | None = None,
    boxes: str | os.PathLike | None = None,
    refine: int | None = None,
    coco: str | os.PathLike | None = None,
    overlays: int = 0,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    quiet: bool = False,
    channels_last: bool = True,
    verify: bool = True,
    cache: Cache | None = None,
) -> dict[str, Any]:
    """Predict keypoints for every input image into `out`; with labels, write an error report.

    model: a checkpoint / state_dict path, or an already loaded (module with `decode`, ModelSpec)
    pair. boxes: None (whole images), "gt" (the labelled boxes), a COCO detections json or a YOLO
    labels folder. refine: passes in the predicted hand's box (None: DEFAULT_REFINE for
    box-crop models, else 0). verify: check a shards folder's sha256s before reading it (sizes
    are always checked; a URL's are checked as they stream). cache: where the shards of a shards
    URL are kept (remote.Cache; None: streamed). Returns a summary ({"images", "predictions",
    "errors", "seconds", "images_per_s", "report", ...}; under torchrun rank 0's holds the whole
    run). Re-running an
    interrupted run resumes it. Raises HandposeError for a user mistake, or when nothing could be
    predicted (after writing errors.jsonl).
    """
    _check_numbers(batch_size=batch_size, workers=workers, overlays=overlays, refine=refine)
    out = check_output_dir(out, "--out")
    coco_rel = coco_name(out, coco)
    world = _join_world(pick_device(device))
    if isinstance(model, tuple):
        net, spec = model
        spec = ModelSpec(**{**spec.__dict__, "digest": spec.digest or _module_digest(net, spec)})
    else:
        net, spec = load_model(model, world.device, channels_last=channels_last)
    job = _plan_job(
        spec,
        world,
        inputs,
        out,
        split=split,
        labels=labels,
        boxes=boxes,
        refine=refine,
        coco_rel=coco_rel,
        overlays=overlays,
        batch_size=batch_size,
        workers=workers,
        channels_last=channels_last,
        cache=cache,
    )
    staging = Staging(out)
    mode = None
    if world.is_main:
        # Fail before the work on a file that would have to be overwritten at the end.
        check_not_foreign(out, job.names)
        if verify:
            verify_shard_inputs(job.plan, job.split, progress=not quiet)
        out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
        mode = staging.open(job.fingerprint)
    mode = broadcast_object(mode, world)
    console = make_console(stderr=True, quiet=quiet or not world.is_main)
    if mode == "commit":  # an earlier run finished everything but moving its files into place
        return _end(world, _commit_only(staging, world), console)
    if mode == "resume":
        console.print(f"resuming the interrupted run in {staging.root}")
    start = time.perf_counter()
    pool = ThreadPoolExecutor(job.workers, thread_name_prefix="predict-decode") if job.workers else None
    ctx = _Context(net, spec, job.boxes, job.refine, job.batch_size, channels_last, pool, overlays)
    try:
        state = _run_part(job, ctx, world, staging.part(world.rank), console)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    barrier(world)
    if not world.is_main:
        return _end(world, {"rank": world.rank, **state.counts}, console)
    return _end(world, _finish(staging, world, ctx, job, time.perf_counter() - start, console), console)


@dataclass(frozen=True)
class _Job:
    """A run, resolved: the inputs, the options, and the fingerprint a resumed run must match."""

    plan: list[Input]
    out: Path
    split: str | None
    labels: CocoLabels | None
    boxes: BoxSource
    refine: int
    coco: str | None  # relative to out
    overlays: int
    batch_size: int
    workers: int
    chunk: int  # images per chunk
    found: Scan
    names: list[str]  # files the run will (or may) write in OUT
    fingerprint: dict[str, Any]


def _plan_job(
    spec: ModelSpec,
    world: World,
    inputs: Sequence[str | os.PathLike],
    out: Path,
    *,
    split: str | None,
    labels: str | os.PathLike | None,
    boxes: str | os.PathLike | None,
    refine: int | None,
    coco_rel: str | None,
    overlays: int,
    batch_size: int | None,
    workers: int | None,
    channels_last: bool,
    cache: Cache | None = None,
) -> _Job:
    """Check the inputs and options (HandposeError before anything is written) and scan the
    inputs once: their fingerprint and count."""
    label_set = load_coco_labels(labels) if labels is not None else None
    box_source = open_boxes(boxes)
    refine = _resolve_refine(refine, spec, box_source)
    plan = plan_inputs(inputs, out, cache=cache)
    check_split(plan, split)
    labelled = labelled_kinds(plan, label_set)
    if isinstance(box_source, LabelledBoxes) and not labelled:
        raise HandposeError(
            "--boxes gt: no input carries labels (shards, a YOLO dataset, a FreiHAND root, or --labels)"
        )
    found = scan(iter_units(plan, out, split=split, labels=label_set))
    if not found.units:
        raise HandposeError(
            f"no images found in {', '.join(str(p) for p in inputs) or '(no inputs)'} "
            f"(looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    if labels is not None and found.plain and not found.plain_labelled:
        raise HandposeError(
            f"--labels {labels}: matches none of the {found.plain} input images (by file_name under "
            f"{Path(labels).parent}, or by a base name that occurs once)"
        )
    batch_size = batch_size or default_batch_size(world.device)
    chunk = _chunk_size(batch_size)
    fingerprint = {
        "format": "handpose-predict-job",
        "model": spec.digest,
        "inputs": found.digest,
        "world_size": world.world_size,
        "chunk": chunk,
        "options": {
            "split": split,
            "labels": stamp_of(labels),
            "boxes": stamp_of(boxes),
            "refine": refine,
            "coco": coco_rel,
            "overlays": overlays,
            "batch_size": batch_size,
            "channels_last": channels_last,
            "device": world.device.type,
        },
    }
    names = [*OWN_NAMES[:3], *(report.OUTPUTS if labelled else ()), *([coco_rel] if coco_rel else [])]
    return _Job(
        plan,
        out,
        split,
        label_set,
        box_source,
        refine,
        coco_rel,
        overlays,
        batch_size,
        default_workers(world.device) if workers is None else workers,
        chunk,
        found,
        names,
        fingerprint,
    )


def _run_part(job: _Job, ctx: _Context, world: World, folder: Path, console: Console) -> _State:
    """This rank's chunks, each predicted, appended to its part and checkpointed; a part left by
    an interrupted run continues after its last checkpoint."""
    part = Part(folder)
    try:
        state = _State.load(part.state, *_keep_counts(job.overlays))
        state.counts["fresh_images"] = 0
        units = iter_units(job.plan, job.out, split=job.split, labels=job.labels)
        mine = ((c, u) for c, u in _chunks(units, job.chunk) if c % world.world_size == world.rank)
        todo = max(0, _my_units(job.found.units, job.chunk, world) - part.chunks * job.chunk)
        start = time.perf_counter()
        with _progress(console) as progress, torch.inference_mode():
            task = progress.add_task("predict", total=todo, rate=0.0)
            done = 0
            for cid, opened in _opened(_skip(mine, part.chunks), ctx):
                data = _chunk_outputs(cid, opened, ctx, state)
                state.counts["fresh_images"] += len(opened)
                part.write_chunk(cid, data, state.to_json())
                done += len(opened)
                progress.update(task, completed=done, rate=done / (time.perf_counter() - start))
    finally:
        part.close()
    return state


def _skip(chunks: Iterator[tuple[int, list[Unit]]], n: int) -> Iterator[tuple[int, list[Unit]]]:
    """This rank's chunks after the first `n` (done by an interrupted run: resume after them)."""
    for k, item in enumerate(chunks):
        if k >= n:
            yield item


def _my_units(units: int, chunk: int, world: World) -> int:
    """Units of the first `units` that fall in this rank's chunks."""
    full, rest = divmod(units, chunk)
    mine = len(range(world.rank, full, world.world_size)) * chunk
    return mine + (rest if full % world.world_size == world.rank else 0)


def _keep_counts(overlays: int) -> tuple[int, int]:
    """(worst, best) hands to keep: the report's tables and gallery, and --overlays N (labelled:
    the worst ceil(N/2) and the best floor(N/2))."""
    return max(report.EXTREMES, (overlays + 1) // 2), max(report.EXTREMES, overlays // 2)


def _end(world: World, summary: dict[str, Any], console: Console) -> dict[str, Any]:
    teardown(world)
    if world.is_main and summary.get("predictions") == 0:
        where = summary.get("out", "")
        if summary.get("errors"):
            raise HandposeError(
                f"no image could be predicted: all {summary['errors']} inputs failed "
                f"(reasons in {Path(where) / 'errors.jsonl'})"
            )
        raise HandposeError(f"no prediction: no input image had a box (--boxes {summary.get('boxes')})")
    return summary


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>6.1f} img/s"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


# ---------------------------------------------------------------------------------------------
# Rank 0: merge, report, overlays, commit


def _finish(
    staging: Staging, world: World, ctx: _Context, job: _Job, seconds: float, console: Console
) -> dict[str, Any]:
    """Merge the ranks' parts, write the COCO results, the report and the overlays into the
    staging folder's final/, and commit them into OUT."""
    keep, coco_rel = _keep_counts(job.overlays), job.coco
    parts = [staging.part(r) for r in range(world.world_size)]
    states = [_State.load((_read_progress(p) or {}).get("state", {}), *keep) for p in parts]
    counts: Counter[str] = sum((s.counts for s in states), Counter())
    extremes = report.Extremes(*keep)
    for s in states:
        extremes.load(s.extremes.to_json())
    first = sorted((e for s in states for e in s.first), key=lambda e: e["order"])[: ctx.first]
    final = staging.final
    merge_parts(parts, final)
    files = ["predictions.jsonl", "errors.jsonl"]
    if coco_rel is not None:
        (final / coco_rel).parent.mkdir(parents=True, exist_ok=True)
        write_coco_array(final / "coco.jsonl", final / coco_rel)
        files.append(coco_rel)
    rep = None
    if (final / "spill.f32").stat().st_size:
        rep = report.write_report(
            final,
            report.spill_blocks(final / "spill.f32"),
            model_size=ctx.spec.size,
            load_image=_load_entry_image,
            counts={"images": counts["images_scored"], "hands_missed": counts["hands_missed"]},
            worst=extremes.worst(),
            best=extremes.best(),
            console=console,
        )
        if rep is not None:
            files += list(report.OUTPUTS)
    files += _write_overlays(final, ctx.first, extremes, first)
    fresh = counts["fresh_images"]
    record = {
        "images": counts["images"],
        "predictions": counts["predictions"],
        "errors": counts["errors"],
        "label_problems": counts["label_problems"],
        "images_without_boxes": counts["images_without_boxes"],
        "hands_labelled": counts["hands_labelled"],
        "hands_missed": counts["hands_missed"],
        "inputs": job.found.units,
        "seconds": round(seconds, 3),
        "images_per_s": round(fresh / seconds, 3) if seconds > 0 else None,
        "model": ctx.spec.kind,
        "model_size": ctx.spec.size,
        "device": str(world.device),
        "world_size": world.world_size,
        "batch_size": ctx.batch_size,
        "boxes": ctx.boxes.spec,
        "refine": ctx.refine,
    }
    staging.plan_commit(files, record)
    staging.commit()
    console.print(
        f"predicted {record['predictions']} hands in {record['images']} images, {record['errors']} errors "
        f"-> {staging.out}"
    )
    return {**record, "report": rep, "out": str(staging.out)}


def _commit_only(staging: Staging, world: World) -> dict[str, Any]:
    if not world.is_main:
        return {"rank": world.rank}
    record = staging.commit()
    return {**record, "report": _read_report(staging.out), "out": str(staging.out)}


def _read_progress(folder: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / "progress.json").read_text())
    return None


def _read_report(out: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((out / "report.json").read_text())
    return None


def _load_entry_image(entry: dict[str, Any]) -> np.ndarray:
    """The image of a kept hand (report gallery, overlays), read again from where it was."""
    src = Source(0, entry["path"], entry["file"], "", sample=int(entry["sample"]))
    return decode_image(read_bytes(src))[0]


def _write_overlays(final: Path, n: int, extremes: report.Extremes, first: list[dict[str, Any]]) -> list[str]:
    """--overlays N: labelled runs draw the worst ceil(N/2) and the best floor(N/2) hands with
    their ground truth; unlabelled runs the first N predictions. Returns the names written."""
    if n <= 0:
        return []
    worst, best = extremes.worst(), extremes.best()
    picks: list[tuple[str, dict[str, Any]]] = []
    if worst:
        ranked = [e for e in worst if np.isfinite(e["error_px"])]
        n_worst = min(len(ranked), (n + 1) // 2)
        shown = {tuple(e["order"]) for e in ranked[:n_worst]}
        better = [e for e in best if tuple(e["order"]) not in shown][: n // 2]
        picks = [(f"worst-{r:02d}", e) for r, e in enumerate(ranked[:n_worst], 1)]
        picks += [(f"best-{r:02d}", e) for r, e in enumerate(better, 1)]
    else:
        picks = [(f"{r:04d}", e) for r, e in enumerate(first, 1)]
    (final / "overlays").mkdir(parents=True, exist_ok=True)
    names = []
    for tag, e in picks:
        caption = f"{e['error_px']:.1f} px" if "error_px" in e else None
        name = f"overlays/{tag}-{Path(e['path']).stem}.png"
        report.save_png(report.draw_entry(_load_entry_image(e), e, caption=caption), final / name)
        names.append(name)
    return names

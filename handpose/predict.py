"""`handpose predict`: keypoints for every image in files, folders, a FreiHAND root or shards.

Pipeline: inputs -> `Item`s (where the bytes are, a display path, the label if any) -> DataLoader
workers read, decode (JPEG fast path) and letterbox each image to the model input -> batched
forward (channels_last, inference_mode, bf16 autocast on CUDA) -> the shared decoder
(`heatmaps_to_keypoints`) -> keypoints mapped back to original pixels with
`geometry.invert(fit_matrix)`. Results are written as batches arrive; a report follows when
labels exist (report.py).

OUT/
  predictions.jsonl   one line per image: {"path", "width", "height", "keypoints": [[x, y, score] x 21]}
                      (+ "error_px" when the image has a label); streamed to predictions.jsonl.partial
                      and renamed when the run ends
  errors.jsonl        one line per input that could not be predicted: {"path", "reason"}
  overlays/           --overlays N: skeleton drawings (labelled: the worst and the best images)
  run.json            images, errors, seconds, images/s, model kind and size, device, batch size
  report.json, report.md, *.png   with labels (see report.py)

"Original pixels" follow geometry.py's convention in the image as displayed (EXIF rotation
applied). The model input is the letterbox `fit_matrix(width, height, size)`: the image scaled to
fit, centred, black bars. For the tutorial's weights the image op is Pillow's antialiased
bilinear resize (the tutorial's own preprocessing); for handpose checkpoints it is
`imageio.warp_affine`, what the training loader fed the model (images over twice the model size
are box-reduced first, as warp_affine does not antialias).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from handpose import checkpoint, report
from handpose.atomic import check_output_dir, inside, write_json
from handpose.console import make_console
from handpose.errors import HandposeError
from handpose.geometry import apply_affine, compose, fit_matrix, invert, scaling
from handpose.heatmaps import INDEX_OFFSET, TUTORIAL_INDEX_OFFSET, heatmaps_to_keypoints
from handpose.imageio import JPEG_MAGIC, decode_image, jpeg_size, warp_affine
from handpose.model import ShallowUNet
from handpose.shards import (
    MANIFEST,
    decode_keypoints,
    index_name,
    read_index,
    split_shards,
    verify_shards,
)
from handpose.skeleton import NUM_JOINTS
from handpose.sources import load_json
from handpose.sources.freihand import read_freihand

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MIN_SIDE_PX = 8  # smaller images cannot show a hand; they go to errors.jsonl
TUTORIAL_SIZE = 128
TUTORIAL_MEAN = (0.3950, 0.4323, 0.2954)
TUTORIAL_STD = (0.1966, 0.1734, 0.1836)
# Data errors while reading/decoding one input: recorded in errors.jsonl, the run goes on.
DATA_ERRORS = (OSError, ValueError, EOFError, SyntaxError)
OUTPUTS = ("predictions.jsonl", "errors.jsonl", "run.json", *report.OUTPUTS)  # replaced by every run
OVERLAY_NAMES = ("[0-9][0-9][0-9][0-9]-*.png", "worst-*.png", "best-*.png")


# ---------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class ModelSpec:
    """How to feed a model and read its output."""

    size: int  # model input side, px
    mean: tuple[float, float, float]  # RGB normalisation of [0, 1] pixels
    std: tuple[float, float, float]
    index_offset: float  # heatmaps_to_keypoints: 0.5 handpose, 0.0 the tutorial's decoder
    resample: str  # "resize": Pillow antialiased resize (tutorial); "warp": imageio.warp_affine (loaders)
    kind: str  # "tutorial state_dict" | "handpose checkpoint"


def load_model(
    path: str | os.PathLike, device: torch.device, *, channels_last: bool = True
) -> tuple[torch.nn.Module, ModelSpec]:
    """Load a handpose checkpoint (config and normalisation inside) or a bare state_dict (the
    tutorial's `model_final`: 128 px, its normalisation and decoder), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise HandposeError(
            f"{path}: model file not found" if not path.exists() else f"{path}: is not a file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file fails in many ways; the message says which
        raise HandposeError(f"{path}: {_unloadable(path, e)}") from None
    if isinstance(state, dict) and state.get("format") == checkpoint.FORMAT:
        try:
            state = checkpoint.load(path)  # verifies the digest and required keys
        except checkpoint.CorruptCheckpoint as e:
            raise HandposeError(str(e)) from None
        cfg, norm = state["config"], state["norm"]
        weights = state["model"]
        spec = ModelSpec(
            size=int(cfg["image_size"]),
            mean=tuple(float(v) for v in norm["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in norm["std"]),  # type: ignore[arg-type]
            index_offset=float(cfg.get("index_offset", INDEX_OFFSET)),
            resample="warp",
            kind="handpose checkpoint",
        )
        net = ShallowUNet(width=int(cfg["width"]), depth=int(cfg["depth"]))
    elif isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        weights = state
        spec = ModelSpec(
            TUTORIAL_SIZE, TUTORIAL_MEAN, TUTORIAL_STD, TUTORIAL_INDEX_OFFSET, "resize", "tutorial state_dict"
        )
        width, depth = _unet_shape(weights)
        net = ShallowUNet(width=width, depth=depth)
    else:
        raise HandposeError(f"{path}: not a handpose checkpoint or tutorial state_dict")
    expected, given = set(net.state_dict()), set(weights)
    if expected != given:
        raise HandposeError(
            f"{path}: weights are for another architecture "
            f"({len(expected - given)} missing, {len(given - expected)} unexpected keys)"
        )
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError:  # same keys, other shapes: name the first tensor that differs
        raise HandposeError(
            f"{path}: weights are for another architecture ({_shape_mismatch(net, weights)})"
        ) from None
    # Module.to accepts memory_format at run time; the stubs do not list it.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return net.eval().to(device).to(memory_format=fmt), spec  # type: ignore[call-overload]


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


def _shape_mismatch(net: torch.nn.Module, weights: dict[str, torch.Tensor]) -> str:
    for name, t in net.state_dict().items():
        if tuple(weights[name].shape) != tuple(t.shape):
            return f"{name} is {tuple(weights[name].shape)}, expected {tuple(t.shape)}"
    return "tensor shapes differ"


def _unet_shape(weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(width, depth) of a ShallowUNet state_dict: first block's channels, number of down blocks.
    Unknown layouts get the tutorial's (16, 3) and fail in load_state_dict with its message."""
    first = weights.get("conv_down1.double_conv.1.weight")
    depth = sum(1 for k in weights if re.fullmatch(r"conv_down\d+\.double_conv\.1\.weight", k))
    return (int(first.shape[0]), depth) if first is not None else (16, 3)


def default_batch_size(device: torch.device) -> int:
    """64 on a GPU; 4 on a CPU, where the activations of bigger batches (1 MB per image for each
    16-channel 128 px map) spill out of the L2 cache: per image, batch 4 ran ~1.2x faster than
    batch 8 and ~2x faster than batch 64 (bench predict, 2-core EPYC)."""
    return 64 if device.type == "cuda" else 4


def default_workers(device: torch.device) -> int:
    """Decode processes: cores - 1 beside a GPU; none on a CPU, where the model already uses every
    core and a decode process only competes with it (`handpose bench predict`, 2 cores: decode in
    the main process 88.7 images/s vs 63.9 with one decode worker, see BENCHMARKS.md)."""
    return max(0, (os.cpu_count() or 2) - 1) if device.type == "cuda" else 0


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
# Inputs


@dataclass(frozen=True)
class Item:
    """One input image: where its bytes are, the path reported for it, its label if any."""

    path: str  # as written to predictions.jsonl / errors.jsonl
    file: str  # file to read
    offset: int = 0  # byte range in `file` (a shard member); length -1: the whole file
    length: int = -1
    image_id: int | None = None  # COCO image_id (labels, FreiHAND file number, shard sid)
    uv: np.ndarray | None = None  # (21, 2) ground truth, original pixels
    visible: np.ndarray | None = None  # (21,) bool: joints that count in the report


def collect_inputs(
    inputs: Sequence[str | os.PathLike],
    out: Path,
    *,
    split: str,
    labels: str | os.PathLike | None,
    verify: bool = True,
) -> tuple[list[Item], list[dict[str, str]]]:
    """Expand files, folders (recursive), FreiHAND roots and shard folders into Items; inputs
    that cannot be used become {"path", "reason"} problems (the run goes on without them).
    A shards folder's shards are checked against its manifest's sha256s unless `verify` is off."""
    items: list[Item] = []
    problems: list[dict[str, str]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir() and (p / MANIFEST).is_file():
            items += _shard_items(p, split, verify=verify)
        elif p.is_dir() and (p / "training_xyz.json").is_file():
            found, bad = _freihand_items(p, split)
            items += found
            problems += bad
        elif p.is_dir():
            items += [Item(str(f), str(f)) for f in _image_files(p, skip=out)]
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            items.append(Item(str(p), str(p)))
        elif p.is_file():
            problems.append(
                {
                    "path": str(p),
                    "reason": f"unsupported file type {p.suffix or '(none)'!r} "
                    f"(expected {', '.join(IMAGE_SUFFIXES)})",
                }
            )
        else:
            problems.append({"path": str(p), "reason": "no such file or folder"})
    seen: set[tuple[str, int]] = set()
    unique = []
    for it in items:  # the same file named twice (a file and its folder) is predicted once
        key = (os.path.realpath(it.file), it.offset)
        if key not in seen:
            seen.add(key)
            unique.append(it)
    if labels is not None:
        unique = _attach_coco_labels(unique, Path(labels))
    return unique, problems


def _image_files(folder: Path, *, skip: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden names and the output folder skipped
    (so a re-run does not predict its own overlays)."""
    skip_r = skip.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (d / n).resolve() != skip_r)
        found += [
            d / n
            for n in sorted(filenames)
            if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES
        ]
    return found


FREIHAND_SPLITS = ("train", "training", "eval", "evaluation", "test")


def _freihand_items(root: Path, split: str) -> tuple[list[Item], list[dict[str, str]]]:
    """A FreiHAND root: --split train|training or eval|evaluation; 'test' (the default: the
    held-out images) takes the evaluation set when it is labelled, else the training set."""
    if split not in FREIHAND_SPLITS:
        raise HandposeError(f"--split {split!r}: a FreiHAND root ({root}) has {', '.join(FREIHAND_SPLITS)}")
    data = read_freihand(root, versions=None)
    want_eval = split in ("eval", "evaluation") or (
        split not in ("train", "training") and any(r.evaluation for r in data.records)
    )
    items = [
        Item(str(r.path), str(r.path), image_id=r.sid, uv=r.uv, visible=np.ones(NUM_JOINTS, bool))
        for r in data.records
        if r.evaluation == want_eval
    ]
    if not items:
        raise HandposeError(f"{root}: no {'evaluation' if want_eval else 'training'} images with labels")
    problems = [{"path": str(root / p.file), "reason": p.reason} for p in data.problems]
    return items, problems


def _shard_items(root: Path, split: str, *, verify: bool = True) -> list[Item]:
    """Samples of one split of a shards folder; labels from each sample's kp.f32 member, located
    through the DALI index so workers can read the JPEG bytes directly. The shards' sizes are
    always checked against the manifest, their sha256s too when `verify`."""
    manifest, tars = split_shards(root, split)
    if verify:
        verify_shards(manifest, manifest.entries(split))
    items = []
    for tar in tars:
        idx = tar.with_name(index_name(tar.name))
        if not idx.is_file() or not tar.is_file():
            raise HandposeError(
                f"{root}: {tar.name} or its index {idx.name} is missing (re-run handpose pack)"
            )
        with open(tar, "rb") as data:
            for key, members in read_index(idx):
                if "jpg" not in members or "kp.f32" not in members:
                    raise HandposeError(f"{idx}: sample {key} has no jpg or kp.f32 member")
                data.seek(members["kp.f32"][0])
                uv = decode_keypoints(data.read(members["kp.f32"][1])).astype(np.float64)
                off, size = members["jpg"]
                visible = np.asarray(np.isfinite(uv).all(axis=1), dtype=bool)
                items.append(Item(f"{tar}/{key}.jpg", str(tar), off, size, int(key), uv, visible))
    return items


def _attach_coco_labels(items: list[Item], path: Path) -> list[Item]:
    """Label images from a COCO keypoints json, matched by file_name relative to the json's folder,
    else by a base name that occurs once. Joints with visibility 0 do not count."""
    try:
        data = load_json(path)
    except HandposeError as e:  # its message starts with the path
        raise HandposeError(f"--labels {e}") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations")
    ):
        raise HandposeError(
            f"--labels {path}: not a COCO keypoints json (needs 'images' and 'annotations' lists)"
        )
    names = {im["id"]: str(im["file_name"]) for im in data["images"] if "id" in im and "file_name" in im}
    by_file: dict[str, tuple[int, np.ndarray]] = {}
    for a in data["annotations"]:
        kp = np.asarray(a.get("keypoints", ()), dtype=np.float64)
        if a.get("image_id") in names and kp.shape == (NUM_JOINTS * 3,) and np.isfinite(kp).all():
            by_file[names[a["image_id"]]] = (a["image_id"], kp.reshape(NUM_JOINTS, 3))
    base_count = Counter(Path(f).name for f in by_file)
    by_base = {Path(f).name: v for f, v in by_file.items() if base_count[Path(f).name] == 1}
    root = path.parent.resolve()
    out = []
    for it in items:
        p = Path(it.file).resolve()
        hit = by_file.get(p.relative_to(root).as_posix()) if root in p.parents else None
        hit = hit or by_base.get(p.name)
        if hit is None or it.uv is not None:
            out.append(it)
        else:
            iid, kp = hit
            out.append(Item(it.path, it.file, it.offset, it.length, iid, kp[:, :2].copy(), kp[:, 2] > 0))
    if items and not any(a is not b for a, b in zip(items, out, strict=True)):
        # An explicit --labels that labels nothing is a mistake (wrong json, wrong folder), not a run
        # without a report.
        example = f" such as {next(iter(by_file))!r}" if by_file else ""
        raise HandposeError(
            f"--labels {path}: matches none of the {len(items)} input images ({len(by_file)} annotated "
            f"file_names{example}, matched relative to {root} or by a unique base name)"
        )
    return out


def read_bytes(item: Item) -> bytes:
    """The image bytes of one item (a file, or a member's byte range inside a shard)."""
    with open(item.file, "rb") as f:
        if item.offset:
            f.seek(item.offset)
        return f.read(item.length)


# ---------------------------------------------------------------------------------------------
# Preprocessing (runs in DataLoader workers)


def prepare(data: bytes, spec: ModelSpec, *, draft: bool = True) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Decode and letterbox one image: (uint8 (size, size, 3), fit matrix original -> model, W, H).

    draft: big JPEGs decode at 1/2, 1/4 or 1/8 in the DCT domain (the longer side stays >= the
    model size); the scale enters the image matrix, the fit matrix stays in original pixels.
    """
    min_side = _draft_min_side(*jpeg_size(data), spec.size) if draft and data[:2] == JPEG_MAGIC else 0
    image, scale = decode_image(data, min_side=min_side)
    width, height = (image.shape[1], image.shape[0]) if scale == 1.0 else jpeg_size(data)
    if min(width, height) < MIN_SIDE_PX:
        raise ValueError(f"image is {width}x{height} px, too small (both sides must be >= {MIN_SIDE_PX} px)")
    fit = fit_matrix(width, height, spec.size)
    if spec.resample == "resize":
        return letterbox(image, compose(fit, scaling(1.0 / scale)), spec.size), fit, width, height
    r = max(image.shape[:2]) // spec.size
    if r >= 2:  # warp_affine does not antialias: box-reduce big images first, as the DCT path does
        image, scale = np.asarray(Image.fromarray(image).reduce(r)), scale / r
    return warp_affine(image, compose(fit, scaling(1.0 / scale)), spec.size), fit, width, height


def _draft_min_side(width: int, height: int, size: int) -> int:
    """simplejpeg's min_side that picks the smallest 1/r (r = 2, 4, 8) keeping the longer side
    >= size; 0 (full decode) when even 1/2 is too small. Powers of two only: a 224 px FreiHAND
    image must decode in full, as in the tutorial (5/8 would change its pixels)."""
    for r in (8, 4, 2):
        if max(width, height) / r >= size and min(width, height) / r >= 1:
            return math.ceil(min(width, height) / r)
    return 0


def letterbox(image: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """Scale-and-translate `image` by M (no rotation) into a black size x size canvas with Pillow's
    antialiased bilinear resize: exactly M under the pixel-centre convention, also when the bars
    are fractional pixels (the source box is M's inverse of whole destination pixels; where that
    box reaches past the image, zero padding stands for the black bar)."""
    h, w = image.shape[:2]
    s, tx, ty = float(M[0, 0]), float(M[0, 2]), float(M[1, 2])
    x0, x1 = _covered(tx, w * s, size)
    y0, y1 = _covered(ty, h * s, size)
    box = [(x0 - tx) / s, (y0 - ty) / s, (x1 - tx) / s, (y1 - ty) / s]
    box = [_snap(v, lim) for v, lim in zip(box, (w, h, w, h), strict=True)]
    # Pad an axis only when its box leaves the image; 1/s + 2 px covers the filter's support.
    pad = math.ceil(max(1.0, 1.0 / s)) + 2
    px = pad if box[0] < 0 or box[2] > w else 0
    py = pad if box[1] < 0 or box[3] > h else 0
    if px or py:
        image = np.pad(image, ((py, py), (px, px), (0, 0)))
        box = [box[0] + px, box[1] + py, box[2] + px, box[3] + py]
    region = Image.fromarray(image).resize(
        (x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=(box[0], box[1], box[2], box[3])
    )
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[y0:y1, x0:x1] = np.asarray(region)
    return canvas


def _covered(start: float, length: float, size: int) -> tuple[int, int]:
    """Whole destination pixels that [start, start + length) touches, clipped to the canvas."""
    eps = 1e-6
    return max(0, math.floor(start + eps)), min(size, math.ceil(start + length - eps))


def _snap(v: float, limit: int) -> float:
    """Round-off (1e-9 px) must not make an in-image box look like it leaves the image."""
    return 0.0 if abs(v) < 1e-6 else float(limit) if abs(v - limit) < 1e-6 else v


class _Images(torch.utils.data.Dataset):
    """Item i -> {"index", "image", "fit", "size"} or {"index", "error"}: data errors never raise."""

    def __init__(self, items: list[Item], spec: ModelSpec, draft: bool):
        self.items, self.spec, self.draft = items, spec, draft

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image, fit, w, h = prepare(read_bytes(self.items[i]), self.spec, draft=self.draft)
        except DATA_ERRORS as e:
            return {"index": i, "error": _reason(e)}
        return {"index": i, "image": image, "fit": fit, "size": (w, h)}


def _reason(e: BaseException) -> str:
    """A data error as one deterministic line (Pillow names its BytesIO object's address)."""
    return re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decodable samples; pass the failures through as (index, reason)."""
    ok = [s for s in samples if "error" not in s]
    return {
        "index": [s["index"] for s in ok],
        "image": torch.from_numpy(np.stack([s["image"] for s in ok])) if ok else torch.empty(0),
        "fit": np.stack([s["fit"] for s in ok]) if ok else np.empty((0, 2, 3)),
        "size": [s["size"] for s in ok],
        "errors": [(s["index"], s["error"]) for s in samples if "error" in s],
    }


def make_loader(
    items: list[Item], spec: ModelSpec, *, batch_size: int, workers: int, draft: bool, pin: bool
) -> torch.utils.data.DataLoader:
    """In-order batches of prepared images; decoding overlaps the forward pass when workers > 0."""
    workers = min(workers, math.ceil(len(items) / batch_size))  # tiny inputs: no idle workers
    return torch.utils.data.DataLoader(
        _Images(items, spec, draft),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        worker_init_fn=_worker_init if workers else None,
    )


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only decode; the main process owns the cores for the model


# ---------------------------------------------------------------------------------------------
# Forward


def forward(
    net: torch.nn.Module, images: torch.Tensor, spec: ModelSpec, *, channels_last: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (B, size, size, 3) -> keypoints (B, 21, 2) in model-input pixels and scores (B, 21)."""
    device = next(net.parameters()).device
    # NHWC uint8 permuted to NCHW *is* channels_last memory: no copy until the float conversion.
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    x = x if channels_last else x.contiguous()
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        heatmaps = net(x)
    uv, score = heatmaps_to_keypoints(heatmaps, spec.index_offset)
    return uv.cpu().numpy().astype(np.float64), score.cpu().numpy()


def _results(
    net: torch.nn.Module, spec: ModelSpec, loader: torch.utils.data.DataLoader, channels_last: bool
) -> Iterator[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
    """Per batch: (batch, keypoints (B, 21, 2) in original pixels, scores (B, 21))."""
    with torch.inference_mode():
        for batch in loader:
            if not batch["index"]:
                yield batch, np.empty((0, NUM_JOINTS, 2)), np.empty((0, NUM_JOINTS))
                continue
            uv_model, score = forward(net, batch["image"], spec, channels_last=channels_last)
            back = np.stack([invert(f) for f in batch["fit"]])  # model -> original pixels
            yield batch, apply_affine(back, uv_model), score


# ---------------------------------------------------------------------------------------------
# Outputs


class _Stream:
    """A text file written line by line to NAME.partial and renamed to NAME on close(): readers
    never mistake an interrupted run's file for a complete one."""

    def __init__(self, path: Path):
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        self.f = open(self.partial, "w", encoding="utf-8")

    def write(self, text: str) -> None:
        self.f.write(text)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        self.f.close()
        self.partial.unlink(missing_ok=True)


class _Outputs:
    """predictions.jsonl, errors.jsonl and the optional COCO results, written as batches arrive."""

    def __init__(self, out: Path, coco: Path | None):
        self.preds, self.errors = _Stream(out / "predictions.jsonl"), _Stream(out / "errors.jsonl")
        self.coco = _Stream(coco) if coco else None
        self.ok = self.failed = 0

    def error(self, path: str, reason: str) -> None:
        self.errors.write(json.dumps({"path": path, "reason": reason}) + "\n")
        self.failed += 1

    def prediction(
        self,
        item: Item,
        index: int,
        size: tuple[int, int],
        uv: np.ndarray,
        score: np.ndarray,
        error_px: float | None,
    ) -> None:
        self.preds.write(_prediction_line(item, size, uv, score, error_px))
        if self.coco:  # a json array streamed entry by entry
            self.coco.write(
                ("[" if self.ok == 0 else ",\n") + json.dumps(_coco_result(item, index, uv, score))
            )
        self.ok += 1

    def flush(self) -> None:
        self.preds.flush()
        self.errors.flush()

    def close(self) -> None:
        """Rename everything into place; errors.jsonl only when nothing was predicted."""
        self.errors.close()
        if self.ok == 0:
            self.discard()
            return
        self.preds.close()
        if self.coco:
            self.coco.write("]\n")
            self.coco.close()

    def discard(self) -> None:
        for stream in (self.preds, self.errors, self.coco):
            if stream and not stream.f.closed:
                stream.discard()


def _prediction_line(
    item: Item, size: tuple[int, int], uv: np.ndarray, score: np.ndarray, error_px: float | None
) -> str:
    rec: dict[str, Any] = {
        "path": item.path,
        "width": size[0],
        "height": size[1],
        "keypoints": [
            [round(float(x), 3), round(float(y), 3), round(float(s), 4)]
            for (x, y), s in zip(uv, score, strict=True)
        ],
    }
    if error_px is not None:
        rec["error_px"] = round(error_px, 4)
    return json.dumps(rec) + "\n"


def _coco_result(item: Item, index: int, uv: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    """COCO keypoint-results entry; image_id from the labels, else the FreiHAND-style file number,
    else the input's position (1-based)."""
    stem = Path(item.path).stem
    iid = item.image_id if item.image_id is not None else int(stem) if stem.isdigit() else index + 1
    kps = [round(float(v), 3) for (x, y), s in zip(uv, score, strict=True) for v in (x, y, s)]
    return {"image_id": iid, "category_id": 1, "keypoints": kps, "score": round(float(score.mean()), 4)}


def _output_path(out: Path, path: str | os.PathLike | None, option: str) -> Path | None:
    if path is None:
        return None
    try:
        return inside(out, path)
    except ValueError as e:
        raise HandposeError(f"{option}: {e}") from None


def _clear_previous(out: Path) -> None:
    """Remove the outputs of an earlier run here, so no stale report sits beside new predictions."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for pattern in OVERLAY_NAMES:
        for f in (out / "overlays").glob(pattern):
            f.unlink()


# ---------------------------------------------------------------------------------------------
# Entry


def predict(
    model: str | os.PathLike | tuple[torch.nn.Module, ModelSpec],
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    split: str = "test",
    labels: str | os.PathLike | None = None,
    coco: str | os.PathLike | None = None,
    overlays: int = 0,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    quiet: bool = False,
    channels_last: bool = True,
    draft: bool = True,
    verify: bool = True,
) -> dict[str, Any]:
    """Predict keypoints for every input image into `out`; with labels, write an error report.
    `verify`: check a shards folder's sha256s before reading it (sizes are always checked).

    model: a checkpoint / state_dict path, or an already loaded (module, ModelSpec) pair.
    Returns a summary ({"images", "errors", "seconds", "images_per_s", "report"}). Raises
    HandposeError when nothing could be predicted. `quiet`, `channels_last` and `draft` (the
    JPEG DCT fast path) exist for the benchmark and tests.
    """
    out = check_output_dir(out, "--out")
    for flag, value, least in (
        ("--batch-size", batch_size, 1),
        ("--workers", workers, 0),
        ("--overlays", overlays, 0),
    ):
        if value is not None and value < least:
            raise HandposeError(f"{flag} {value}: must be >= {least}")
    coco_path = _output_path(out, coco, "--coco")
    dev = pick_device(device)
    batch_size = default_batch_size(dev) if batch_size is None else batch_size
    net, spec = model if isinstance(model, tuple) else load_model(model, dev, channels_last=channels_last)
    items, problems = collect_inputs(inputs, out, split=split, labels=labels, verify=verify)
    if not items and not problems:
        raise HandposeError(
            f"no images found in {', '.join(str(p) for p in inputs) or '(no inputs)'} "
            f"(looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
    _clear_previous(out)
    console = make_console(stderr=True, quiet=quiet)

    workers = default_workers(dev) if workers is None else workers
    loader = make_loader(
        items, spec, batch_size=batch_size, workers=workers, draft=draft, pin=dev.type == "cuda"
    )
    outputs, kept = _Outputs(out, coco_path), _Kept(overlays)
    for p in problems:
        outputs.error(p["path"], p["reason"])
    start = time.perf_counter()
    try:
        with _progress(console) as progress:
            task = progress.add_task("predict", total=len(items), rate=0.0)
            for batch, uv, score in _results(net, spec, loader, channels_last):
                for i, reason in batch["errors"]:
                    outputs.error(items[i].path, reason)
                for k, i in enumerate(batch["index"]):
                    error_px = kept.add(i, items[i], uv[k], batch["size"][k])
                    outputs.prediction(items[i], i, batch["size"][k], uv[k], score[k], error_px)
                outputs.flush()
                done = outputs.ok + outputs.failed - len(problems)
                progress.update(task, completed=done, rate=done / (time.perf_counter() - start))
    except BaseException:
        outputs.discard()
        raise
    seconds = time.perf_counter() - start
    outputs.close()
    n_ok, n_err = outputs.ok, outputs.failed
    if n_ok == 0:
        raise HandposeError(
            f"no image could be predicted: all {n_err} inputs failed (reasons in {out / 'errors.jsonl'})"
        )

    def load(i: int) -> np.ndarray:
        return decode_image(read_bytes(items[i]))[0]

    kept.write_overlays(out, items, load)
    result: dict[str, Any] = {
        "images": n_ok,
        "errors": n_err,
        "seconds": seconds,
        "images_per_s": n_ok / seconds,
        "report": None,
    }
    console.print(f"predicted {n_ok} images, {n_err} errors, {n_ok / seconds:.1f} img/s -> {out}")
    if kept.labelled:
        result["report"] = report.write_report(
            out, kept.labelled_set(items), model_size=spec.size, load_image=load, console=console
        )
    write_json(
        out / "run.json",
        {k: v for k, v in result.items() if k != "report"}
        | {"model": spec.kind, "model_size": spec.size, "device": str(dev), "batch_size": batch_size},
    )
    return result


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


class _Kept:
    """What outlives a batch: labelled predictions (for the report and worst/best overlays) and,
    unlabelled, the first N predictions to draw. Everything else is already on disk."""

    def __init__(self, overlays: int):
        self.overlays = overlays
        self.labelled: list[tuple[int, np.ndarray, tuple[int, int], float]] = []
        self.first: list[tuple[int, np.ndarray]] = []

    def add(self, i: int, item: Item, uv: np.ndarray, size: tuple[int, int]) -> float | None:
        """Keep what is needed; return the image's mean error (px) when it has a label."""
        if item.uv is None or item.visible is None:
            if len(self.first) < self.overlays:
                self.first.append((i, uv))
            return None
        err = float(report.image_errors(uv[None], item.uv[None], item.visible[None])[0])
        self.labelled.append((i, uv, size, err))
        return err

    def labelled_set(self, items: list[Item]) -> report.Labelled:
        idx = [k[0] for k in self.labelled]
        return report.Labelled(
            index=np.array(idx),
            paths=[items[i].path for i in idx],
            pred=np.stack([k[1] for k in self.labelled]),
            gt=np.stack([items[i].uv for i in idx]),  # type: ignore[misc]
            visible=np.stack([items[i].visible for i in idx]),  # type: ignore[misc]
            side=np.array([max(k[2]) for k in self.labelled], dtype=np.float64),
        )

    def write_overlays(self, out: Path, items: list[Item], load: Callable[[int], np.ndarray]) -> None:
        """--overlays N: labelled runs draw the worst ceil(N/2) and the best floor(N/2) images with
        their ground truth; unlabelled runs the first N."""
        if self.overlays <= 0:
            return
        folder = out / "overlays"
        folder.mkdir(exist_ok=True)
        if not self.labelled:
            for rank, (i, uv) in enumerate(self.first, 1):
                name = f"{rank:04d}-{Path(items[i].path).stem}.png"
                report.save_png(report.draw_hand(load(i), uv), folder / name)
            return
        ranked = sorted((k for k in self.labelled if np.isfinite(k[3])), key=lambda k: (-k[3], k[0]))
        n_worst = min(len(ranked), (self.overlays + 1) // 2)
        n_best = min(len(ranked) - n_worst, self.overlays // 2)
        picks = [("worst", r, k) for r, k in enumerate(ranked[:n_worst], 1)]
        picks += [("best", r, k) for r, k in enumerate(ranked[::-1][:n_best], 1)]
        for tag, rank, (i, uv, _, err) in picks:
            image = report.draw_hand(load(i), uv, items[i].uv, caption=f"{err:.1f} px")
            report.save_png(image, folder / f"{tag}-{rank:02d}-{Path(items[i].path).stem}.png")

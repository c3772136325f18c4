"""`handpose predict`'s inputs, streamed: each image, where its bytes are, its labelled hands and
the boxes to predict in.

INPUT kinds, detected in this order:
  shards URL (http(s)://, s3://)      as a shards folder (remote.py: streamed, or kept in --cache)
  shards folder (has manifest.json)   the --split split [default test], read through
                                      `shards.read_samples` / `decode_annotation`; the samples of
                                      one photo (one per hand, consecutive) are one image
  FreiHAND root (has training_xyz.json)  --split train | eval | test (test, the default: the
                                      evaluation set when it is labelled, else the training set)
  YOLO-pose dataset (a dataset yaml, or a folder with SRC/{split}/images, SRC/images/{split} or
                                      SRC/images + SRC/labels)  the --split split folder(s)
                                      [default test]; labels by `sources.yolo`'s rules
  any other folder                    every image and video below it, recursively, in path order
  an image file                       that file
  a video file                        its frames (`video.VIDEO_SUFFIXES`; predict_video.py)
(Images: the files `sources.files` calls images, in every kind of input alike.)

A video is one `VideoInput` unit here; predict_video.py turns it into one Source per kept frame
(its pixels, number and time) as the chunks are cut, decoding it once.

Everything is a generator: folders are listed one directory at a time, shards read one shard at
a time, label files read when their image is, so memory does not grow with the number of images.
(Labels that come as one json, a FreiHAND root or `--labels` COCO file, and a `--boxes` COCO
file, are held as the json is.)

A unit of the stream is a `Source` (one image) or a `BadInput` (an input that cannot be used,
reported in errors.jsonl at its place). Every rank of a torchrun job enumerates the same stream;
`ordinal` numbers its units.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handpose import remote
from handpose.errors import HandposeError
from handpose.shards import (
    MANIFEST,
    READ_LABELS,
    decode_annotation,
    read_samples,
    same_photo,
    split_shards,
    verify_shards,
)
from handpose.sources import load_json, numeric_array
from handpose.sources import yolo as yolo_source
from handpose.sources.files import IMAGE_SUFFIXES, is_image, walk
from handpose.video import VIDEO_SUFFIXES, is_video

DEFAULT_SPLIT = "test"
FREIHAND_SPLITS = ("train", "training", "eval", "evaluation", "test")
KINDS = ("shards", "freihand", "yolo", "folder", "image", "video")
SPLIT_KINDS = ("shards", "freihand", "yolo")  # kinds that --split applies to


@dataclass(frozen=True)
class LabelledHand:
    """One labelled hand in pixels of the image as displayed."""

    hand: int  # index within its image (the label line / annotation order)
    uv: np.ndarray  # (21, 2) float64
    visibility: np.ndarray  # (21,) uint8, 0 = not labelled
    box: np.ndarray  # (4,) float64 x0, y0, x1, y1: the labelled box, else the keypoints' extent

    @property
    def labelled(self) -> np.ndarray:
        """(21,) bool: joints with a label that count in the report."""
        return (self.visibility > 0) & np.isfinite(self.uv).all(axis=1)


Hands = tuple[LabelledHand, ...]  # an image's labelled hands, in label order


@dataclass(frozen=True)
class Source:
    """One input image: where its bytes are, how it is named, and its labels if any."""

    ordinal: int  # position in the input stream (images and problems), 0-based
    path: str  # as written to predictions.jsonl
    file: str  # the file to read (a shard's tar for shard samples)
    name: str  # relative name (to its input folder or dataset root): what --boxes file_name matches
    sample: int = -1  # shards: position of the image's first sample in `file`; -1: a plain file
    image_id: int | None = None  # from the labels (COCO, FreiHAND, shards), else a digits-only stem
    hands: Hands | None = None  # labels in pixels; None: unlabelled (or see yolo_label)
    yolo_label: str | None = None  # YOLO: the label file (normalised), read with the image
    yolo_name: str = ""  # the label file as errors.jsonl names it
    yolo_dims: int | None = None  # the dataset's kpt_shape[1], if given
    stamp: str = ""  # size and mtime of what the outputs depend on (the resume fingerprint)
    plain: bool = False  # a file or a folder's image: what --labels labels
    frame: int | None = None  # a video's frame: its number (display order, from 0); `file` is the video
    time: float | None = None  # and its time in seconds from the stream's start
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)  # the frame, RGB


@dataclass(frozen=True)
class VideoInput:
    """A video file in the input stream: its kept frames become Sources as chunks are cut."""

    ordinal: int
    path: str
    name: str  # relative name (to its input folder)
    stamp: str


@dataclass(frozen=True)
class BadInput:
    """An input that cannot be used: one errors.jsonl line at its place in the stream."""

    ordinal: int
    path: str
    reason: str


Unit = Source | BadInput | VideoInput


def read_image(src: Source) -> bytes | np.ndarray:
    """What the inference path reads of one input: a video frame's pixels, else the image bytes."""
    if src.pixels is not None:
        return src.pixels
    assert src.frame is None, "a frame of a chunk this rank does not predict was read"
    return read_bytes(src)


def read_bytes(src: Source) -> bytes:
    """The image bytes of one input (a file, or a shard sample's jpg through `read_samples`)."""
    if src.sample < 0:
        with open(src.file, "rb") as f:
            return f.read()
    store = remote.store_of(src.file) if remote.is_url(src.file) else None
    for sample in read_samples(src.file, ("jpg",), src.sample, src.sample + 1, store=store):
        if "jpg" in sample:
            return sample["jpg"]
    raise ValueError("missing member jpg")


def labels_of(src: Source, width: int, height: int) -> tuple[Hands | None, list[BadInput]]:
    """The image's labelled hands in pixels (None: unlabelled) and any problems of its label file
    (a bad line is reported by file and line; the image's other hands still count)."""
    if src.yolo_label is None:
        return src.hands, []
    if not os.path.isfile(src.yolo_label):
        return (), []  # YOLO's background image: labelled, no hands
    found, problems = yolo_source.read_label(src.yolo_label, src.yolo_name, src.yolo_dims)
    hands = []
    for k, (_, h) in sorted(found.items()):
        uv, box = h.in_pixels(width, height)
        hands.append(LabelledHand(k, uv, h.visibility, box))
    return tuple(hands), [BadInput(src.ordinal, p.file, p.reason) for p in problems]


# ---------------------------------------------------------------------------------------------
# Which inputs, and which split


@dataclass(frozen=True)
class Input:
    """One command-line INPUT, classified."""

    path: Path
    kind: str  # one of KINDS, or "missing" / "unsupported"
    url: remote.Url | None = None  # a shards URL (then `path` is only its text)
    cache: remote.Cache | None = None  # where a shards URL's shards are kept (--cache)

    @property
    def location(self) -> Path | remote.Url:
        return self.path if self.url is None else self.url


def classify(path: Path) -> Input:
    """What an INPUT is (see the module docstring)."""
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return Input(path, "shards")
        if (path / "training_xyz.json").is_file():
            return Input(path, "freihand")
        if yolo_source.is_dataset_folder(path):
            return Input(path, "yolo")
        return Input(path, "folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            return Input(path, "yolo")
        if is_video(path):
            return Input(path, "video")
        return Input(path, "image" if is_image(path.name) else "unsupported")
    return Input(path, "missing")


def plan_inputs(
    inputs: Sequence[str | os.PathLike], out: Path, *, cache: remote.Cache | None = None
) -> list[Input]:
    """The INPUTs, classified, each real path (or URL) once; a file or folder inside a folder input
    is dropped (the folder's walk predicts it), and so is --out itself. A URL is a shards folder."""
    locations = [remote.parse_location(p) for p in inputs]
    classified = [
        Input(Path(str(loc)), "shards", loc, cache) if isinstance(loc, remote.Url) else classify(loc)
        for loc in locations
    ]
    real = [str(i.url) if i.url else os.path.realpath(i.path) for i in classified]
    walked = [r for r, i in zip(real, classified, strict=True) if i.kind == "folder"]
    out_real = os.path.realpath(out)
    plan, seen = [], set()
    for r, i in zip(real, classified, strict=True):
        inside_walk = i.kind in ("folder", "image", "video") and any(
            r != w and r.startswith(w.rstrip(os.sep) + os.sep) for w in walked
        )
        if r in seen or inside_walk or (i.kind == "folder" and r == out_real):
            continue
        seen.add(r)
        plan.append(i)
    return plan


def check_split(plan: Sequence[Input], split: str | None) -> None:
    """Refuse a --split that no input can honour: never predict another split silently."""
    if split is not None and plan and not any(i.kind in SPLIT_KINDS for i in plan):
        raise HandposeError(
            f"--split {split}: applies to shards folders, FreiHAND roots and YOLO datasets; "
            "none is among the inputs"
        )
    for i in plan:
        if i.kind == "freihand" and split is not None and split not in FREIHAND_SPLITS:
            raise HandposeError(
                f"--split {split!r}: a FreiHAND root ({i.path}) has the splits {', '.join(FREIHAND_SPLITS)}"
            )
        if i.kind == "shards":
            _shard_set(i.location, split or DEFAULT_SPLIT, i.cache)  # names the splits there are
        if i.kind == "yolo":
            _yolo_folders(i.path, split)


# ---------------------------------------------------------------------------------------------
# The stream


@dataclass
class CocoLabels:
    """`--labels`: a COCO keypoints json read by `sources.coco` (its rules: visibility 0 = not
    labelled, `bbox` else the labelled keypoints' extent). Plain images match an entry whose
    file_name, under the json's folder, is the image, else by a base name that occurs once."""

    path: Path
    by_file: dict[str, tuple[int, Hands]]  # real path -> (image_id, hands)
    by_base: dict[str, tuple[int, Hands]] = field(default_factory=dict)

    def find(self, file: str) -> tuple[int, Hands] | None:
        return self.by_file.get(os.path.realpath(file)) or self.by_base.get(os.path.basename(file))


def load_coco_labels(path: str | os.PathLike) -> CocoLabels:
    """Read --labels (HandposeError names the flag, the file and the annotation at fault)."""
    from handpose.sources.coco import read_coco

    path = Path(path)
    try:
        data = read_coco(path, need_images=False)
    except HandposeError as e:
        raise HandposeError(f"--labels {e}") from None
    if data.problems:
        raise HandposeError(f"--labels {path}: {data.problems[0].message()}")
    grouped: dict[str, list[Any]] = {}
    for r in data.records:
        grouped.setdefault(str(r.path), []).append(r)
    by_file: dict[str, tuple[int, Hands]] = {}
    for file, records in grouped.items():
        hands = tuple(
            LabelledHand(r.hand, r.uv, r.visibility, r.box) for r in sorted(records, key=lambda r: r.hand)
        )
        by_file[os.path.realpath(file)] = (int(records[0].image_id), hands)
    bases = Counter(os.path.basename(f) for f in by_file)
    by_base = {os.path.basename(f): v for f, v in by_file.items() if bases[os.path.basename(f)] == 1}
    return CocoLabels(path, by_file, by_base)


def iter_units(
    plan: Sequence[Input], out: Path, *, split: str | None, labels: CocoLabels | None
) -> Iterator[Unit]:
    """Every input unit in order, numbered (see the module docstring)."""
    ordinal = 0
    for i in plan:
        for unit in _units(i, out, split, labels):
            yield dataclasses.replace(unit, ordinal=ordinal)
            ordinal += 1


def _units(i: Input, out: Path, split: str | None, labels: CocoLabels | None) -> Iterator[Unit]:
    if i.kind == "missing":
        yield BadInput(0, str(i.path), "no such file or folder")
    elif i.kind == "unsupported":
        reason = f"unsupported file type {i.path.suffix or '(none)'!r} (expected {suffix_list()})"
        yield BadInput(0, str(i.path), reason)
    elif i.kind == "image":
        yield _plain(i.path, i.path.name, labels)
    elif i.kind == "video":
        yield _video(i.path, i.path.name)
    elif i.kind == "folder":
        for p in map(Path, walk(i.path, _is_media, skip=out)):
            name = p.relative_to(i.path).as_posix()
            yield _video(p, name) if is_video(p) else _plain(p, name, labels)
    elif i.kind == "shards":
        yield from _shard_units(i.location, split or DEFAULT_SPLIT, i.cache)
    elif i.kind == "freihand":
        yield from _freihand_units(i.path, split)
    else:
        yield from _yolo_units(i.path, split, out)


def _plain(path: Path, name: str, labels: CocoLabels | None) -> Source:
    st = path.stat()
    stem = path.stem
    hit = labels.find(str(path)) if labels else None
    return Source(
        ordinal=0,
        path=str(path),
        file=str(path),
        name=name,
        image_id=hit[0] if hit else int(stem) if stem.isdigit() else None,
        hands=hit[1] if hit else None,
        stamp=f"{st.st_size}:{st.st_mtime_ns}",
        plain=True,
    )


def _is_media(name: str) -> bool:
    return is_image(name) or is_video(name)


def _video(path: Path, name: str) -> VideoInput:
    st = path.stat()
    return VideoInput(0, str(path), name, f"{st.st_size}:{st.st_mtime_ns}")


def _shard_set(root: Path | remote.Url, split: str, cache: remote.Cache | None = None) -> list[Path]:
    """The tars of a shards folder's split, each one's size checked against the manifest
    (`shards.split_shards`; HandposeError names the splits there are, or the damaged shard)."""
    _, tars = split_shards(root, split, cache=cache)
    return tars


def verify_shard_inputs(plan: Sequence[Input], split: str | None, *, progress: bool) -> None:
    """Check the shards predict will read against their manifest's sha256s (`shards.verify_shards`):
    a changed label is an error, never a silently wrong score."""
    for i in plan:
        if i.kind == "shards":
            manifest, _ = split_shards(i.location, split or DEFAULT_SPLIT, cache=i.cache)
            verify_shards(manifest, manifest.entries(split or DEFAULT_SPLIT), progress=progress)


def _shard_units(root: Path | remote.Url, split: str, cache: remote.Cache | None = None) -> Iterator[Unit]:
    """One Source per photo: the consecutive samples `shards.same_photo` joins (their KEY.json
    "source"; the image bytes are not read here, so a sample without a source is a photo of its
    own) are the hands of one photo (pack stores each hand as a sample and cuts shards only
    between photos)."""
    manifest, tars = split_shards(root, split, cache=cache)
    for tar, entry in zip(tars, manifest.entries(split), strict=True):
        if manifest.store is None:
            st = tar.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        else:  # a URL's shard is known by its content
            stamp = f"{entry['bytes']}:{entry['sha256']}"
        group: list[tuple[int, dict[str, Any], Any]] = []
        last: dict[str, Any] = {}  # the group's last sample
        for k, sample in enumerate(read_samples(tar, ("json", *READ_LABELS), store=manifest.store)):
            path = f"{tar}/{sample['__key__']}.jpg"
            try:
                ann = decode_annotation(sample)
            except ValueError as e:
                yield from _shard_group(tar, group, stamp)
                group = []
                yield BadInput(0, path, str(e))
                continue
            if group and not same_photo(last, sample):
                yield from _shard_group(tar, group, stamp)
                group = []
            group.append((k, _sample_meta(sample), (sample["__key__"], ann)))
            last = sample
        yield from _shard_group(tar, group, stamp)


def _sample_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """KEY.json as a dict ({} when absent or unreadable: only the label members are needed)."""
    try:
        meta = json.loads(sample.get("json", b"{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _shard_group(tar: Path, group: list[tuple[int, dict[str, Any], Any]], stamp: str) -> Iterator[Source]:
    if not group:
        return
    first, meta, (key, _) = group[0]
    hands = tuple(
        LabelledHand(
            int(m["hand"]) if isinstance(m.get("hand"), int) else n,
            ann.uv.astype(np.float64),
            ann.visibility,
            ann.box.astype(np.float64),
        )
        for n, (_, m, (_, ann)) in enumerate(group)
    )
    image_id = meta.get("image_id")
    yield Source(
        ordinal=0,
        path=f"{tar}/{key}.jpg",
        file=str(tar),
        name=str(meta.get("source") or f"{key}.jpg"),
        sample=first,
        image_id=image_id if isinstance(image_id, int) else int(key),
        hands=hands,
        stamp=stamp,
    )


def _freihand_units(root: Path, split: str | None) -> Iterator[Unit]:
    """A FreiHAND root's training or evaluation set (see FREIHAND_SPLITS)."""
    from handpose.sources.freihand import read_freihand

    data = read_freihand(root, versions=None)
    split = split or DEFAULT_SPLIT
    want_eval = split in ("eval", "evaluation") or (
        split == "test" and any(r.evaluation for r in data.records)
    )
    name = "evaluation" if want_eval else "training"
    records = [r for r in data.records if r.evaluation == want_eval]
    if not records:
        raise HandposeError(f"{root}: no {name} images with labels")
    stamp = _stamp(root / f"{name}_xyz.json", root / f"{name}_K.json")
    for p in data.problems:
        if p.file.startswith(f"{name}/"):
            yield BadInput(0, str(root / p.file), p.reason)
    for r in records:
        yield Source(
            ordinal=0,
            path=str(r.path),
            file=str(r.path),
            name=r.file,
            image_id=r.sid,
            hands=(LabelledHand(0, r.uv, r.visibility, r.box),),
            stamp=f"{stamp}:{_stamp(r.path)}",
        )


def _stamp(*paths: Path) -> str:
    stats = [p.stat() for p in paths]
    return ",".join(f"{s.st_size}:{s.st_mtime_ns}" for s in stats)


def _yolo_folders(src: Path, split: str | None) -> tuple[Path, list[Any], int | None]:
    """(root, the image folders of `split`, kpt dims) of a YOLO dataset: the dataset's own split
    folders; a dataset without split folders has all its images and takes no --split."""
    src = Path(os.path.abspath(src))
    if src.is_file():
        root, folders, dims = yolo_source.read_dataset_yaml(src, resplit=False)
    else:
        (folders, _), root, dims = yolo_source.find_folders(src, resplit=False), src, None
    have = sorted({f.split for f in folders if f.split}, key=list(yolo_source.SPLIT_FOLDERS).index)
    if not have:
        if split is not None:
            raise HandposeError(f"--split {split}: {src} has no split folders (predict it without --split)")
        return root, folders, dims
    split = split or DEFAULT_SPLIT
    chosen = [f for f in folders if f.split == split]
    if not chosen:
        raise HandposeError(f"{src}: no split {split!r} (has: {', '.join(have)}); choose one with --split")
    return root, chosen, dims


def _yolo_units(src: Path, split: str | None, out: Path) -> Iterator[Unit]:
    root, folders, dims = _yolo_folders(src, split)
    for folder in folders:
        for image in map(Path, walk(folder.images, is_image, skip=out)):
            label = yolo_source.label_path(image)
            stamp = _stamp(image) + (f",{_stamp(label)}" if label.is_file() else ",-")
            yield Source(
                ordinal=0,
                path=str(image),
                file=str(image),
                name=_relative(image, root),
                image_id=int(image.stem) if image.stem.isdigit() else None,
                yolo_label=str(label),
                yolo_name=str(label),
                yolo_dims=dims,
                stamp=stamp,
            )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def suffix_list() -> str:
    """The image and video suffixes, as a message lists them (".jpg, .png, ..., videos .mp4, ...")."""
    return ", ".join(f".{s}" for s in IMAGE_SUFFIXES) + "; videos " + ", ".join(VIDEO_SUFFIXES)


def labelled_kinds(plan: Sequence[Input], labels: CocoLabels | None) -> bool:
    """Whether any input can carry labels (shards, FreiHAND, YOLO, or --labels for images)."""
    return labels is not None or any(i.kind in SPLIT_KINDS for i in plan)


def unit_descriptor(unit: Unit) -> str:
    """What identifies a unit for the resume fingerprint: where it is and its files' stamps."""
    if isinstance(unit, BadInput):
        return f"P|{unit.path}|{unit.reason}"
    if isinstance(unit, VideoInput):
        return f"V|{unit.path}|{unit.stamp}"
    return f"S|{unit.path}|{unit.file}|{unit.sample}|{unit.stamp}"


@dataclass
class Scan:
    """A pass over the input stream before the run: its fingerprint and a few counts."""

    digest: str
    units: int
    images: int
    plain: int  # images from files and folders (what --labels labels)
    plain_labelled: int
    videos: list[str] = field(default_factory=list)  # the video files, in stream order


def scan(units: Iterator[Unit]) -> Scan:
    """Fingerprint and count a unit stream (memory independent of its length)."""
    h = hashlib.sha256()
    n = images = plain = plain_labelled = 0
    videos = []
    for unit in units:
        h.update(unit_descriptor(unit).encode("utf-8", "surrogateescape") + b"\n")
        n += 1
        if isinstance(unit, VideoInput):
            videos.append(unit.path)
        if isinstance(unit, Source):
            images += 1
            if unit.plain:
                plain += 1
                plain_labelled += unit.hands is not None
    return Scan(h.hexdigest(), n, images, plain, plain_labelled, videos)


# ---------------------------------------------------------------------------------------------
# --boxes


@dataclass(frozen=True)
class BoxTask:
    """One model input of an image: the hand box to crop (None: the whole image)."""

    hand: int  # index within the image
    box: np.ndarray | None  # (4,) x0, y0, x1, y1 original px
    score: float | None = None  # the detector's score, when given
    label: int | None = None  # index into the image's labelled hands, for --boxes gt


class WholeImage:
    """No --boxes: one prediction on the whole image."""

    spec = "whole image"

    def boxes(self, src: Source, width: int, height: int, hands: Hands | None) -> list[BoxTask]:
        return [BoxTask(0, None)]


class LabelledBoxes:
    """--boxes gt: one prediction per labelled hand, in its labelled box (top-down evaluation)."""

    spec = "gt"

    def boxes(self, src: Source, width: int, height: int, hands: Hands | None) -> list[BoxTask]:
        if hands is None:
            raise ValueError("--boxes gt: this image has no labels")
        return [BoxTask(h.hand, h.box, None, k) for k, h in enumerate(hands)]


class CocoDetections:
    """--boxes FILE.json: COCO detection results, [{"image_id" or "file_name", "bbox": [x, y, w, h],
    "score"}], matched to an image by image_id (from its labels, else a digits-only file stem),
    else by file_name (the image's path relative to its input folder or dataset root, or a base
    name that occurs once in FILE). Boxes of one image keep the file's order."""

    def __init__(self, path: Path):
        self.path, self.spec = path, str(path)
        data = load_json(path)
        if not isinstance(data, list):
            raise HandposeError(
                f"--boxes {path}: expected a json list of detections, got {type(data).__name__}"
            )
        self.by_id: dict[int, list[tuple[np.ndarray, float | None]]] = {}
        self.by_name: dict[str, list[tuple[np.ndarray, float | None]]] = {}
        for k, entry in enumerate(data):
            key, box, score = _detection(entry, k, path)
            table: dict[Any, Any] = self.by_id if isinstance(key, int) else self.by_name
            table.setdefault(key, []).append((box, score))
        self.entries = len(data)
        bases = Counter(os.path.basename(n) for n in self.by_name)
        self.by_base = {
            os.path.basename(n): v for n, v in self.by_name.items() if bases[os.path.basename(n)] == 1
        }

    def boxes(self, src: Source, width: int, height: int, hands: Hands | None) -> list[BoxTask]:
        found = self.by_id.get(src.image_id, []) if src.image_id is not None else []
        if not found:
            found = self.by_name.get(src.name) or self.by_name.get(src.path) or []
        if not found:
            found = self.by_base.get(os.path.basename(src.name), [])
        return [BoxTask(k, box, score) for k, (box, score) in enumerate(found)]


def _detection(entry: Any, k: int, path: Path) -> tuple[int | str, np.ndarray, float | None]:
    """One detection entry -> (image_id or file_name, box x0 y0 x1 y1, score)."""
    where = f"--boxes {path}: entry {k}"
    if not isinstance(entry, dict):
        raise HandposeError(f"{where}: not an object")
    iid, name = entry.get("image_id"), entry.get("file_name")
    if isinstance(iid, bool) or (iid is not None and not isinstance(iid, int)):
        raise HandposeError(f"{where}: image_id {iid!r} is not an integer")
    if iid is None and not isinstance(name, str):
        raise HandposeError(f"{where}: needs an integer image_id or a file_name")
    try:
        x, y, w, h = numeric_array(entry.get("bbox"), (4,), "bbox")
    except ValueError as e:
        raise HandposeError(f"{where}: {e}") from None
    if not (w > 0 and h > 0):
        raise HandposeError(f"{where}: bbox [{x:g}, {y:g}, {w:g}, {h:g}] has a width or height <= 0")
    score = entry.get("score")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, (int, float)) or score != score
    ):
        raise HandposeError(f"{where}: score {score!r} is not a number")
    key: int | str = iid if iid is not None else str(name)
    return key, np.array([x, y, x + w, y + h]), (float(score) if score is not None else None)


class YoloBoxes:
    """--boxes FOLDER: YOLO label files, one box per line (`class cx cy w h [conf]`, or a pose line
    with keypoints, whose box is used; normalised to the image). An image's file is
    FOLDER/NAME.txt (NAME: its relative path without the suffix), else FOLDER/STEM.txt (what
    Ultralytics' save_txt writes). No file: no box (no hand found)."""

    def __init__(self, folder: Path):
        self.folder, self.spec = folder, str(folder)

    def boxes(self, src: Source, width: int, height: int, hands: Hands | None) -> list[BoxTask]:
        stem = os.path.splitext(src.name)[0]
        label = self.folder / f"{stem}.txt"
        if not label.is_file():
            label = self.folder / f"{os.path.basename(stem)}.txt"
        if not label.is_file():
            return []
        try:
            text = label.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--boxes {label}: unreadable ({e})") from None
        scale = np.array([width, height, width, height], np.float64)
        tasks = []
        for hand, (n, fields) in enumerate(yolo_source.label_lines(text)):
            try:
                box, score = yolo_source.parse_box_line(fields)
            except ValueError as e:
                raise ValueError(f"--boxes {label}:{n}: {e}") from None
            tasks.append(BoxTask(hand, box * scale, score))
        return tasks


BoxSource = WholeImage | LabelledBoxes | CocoDetections | YoloBoxes


def open_boxes(boxes: str | os.PathLike | None) -> BoxSource:
    """--boxes: None (whole images), "gt", a COCO detections json, or a YOLO labels folder."""
    if boxes is None:
        return WholeImage()
    if str(boxes) == "gt":
        return LabelledBoxes()
    path = Path(boxes)
    if path.is_dir():
        return YoloBoxes(path)
    if not path.exists():
        raise HandposeError(f"--boxes {path}: not found (give gt, a COCO detections json or a labels folder)")
    return CocoDetections(path)


def stamp_of(path: str | os.PathLike | None) -> str:
    """A file's size and mtime, or a folder's listing digest: options' part of the fingerprint."""
    if path is None or str(path) == "gt":
        return str(path)
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in walk(p, lambda n: n.endswith(".txt")):
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return f"{p.resolve()}|{h.hexdigest()}"
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"

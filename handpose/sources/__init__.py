"""Input formats -> validated hands: one reader per format, each with one set of rules.

  freihand.py  a FreiHAND root (training set, optional evaluation set): one hand per image
  coco.py      a COCO keypoints json + image folder: any number of hands per image
  yolo.py      an Ultralytics YOLO-pose dataset (split folders or a dataset yaml): any number

A reader returns a `Dataset`: one `Record` per HAND (one shard sample), the `Problem`s it found
in the labels (the packer fails or skips them, `--on-error`), the split units that `--split`
distributes, and a summary for the manifest. Readers check labels only; the packer's workers
read each image, decode it strictly, and turn normalised (YOLO) labels into pixels of the
image as displayed (`imageio.image_size`), because only they read the image.

Visibility follows COCO: 0 = not labelled (the joint's coordinates mean nothing), 1 = labelled
but occluded, 2 = labelled and visible; FreiHAND's joints are all 1. A hand needs at least one
labelled joint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handpose.errors import HandposeError
from handpose.shards import sample_key

FORMATS = ("freihand", "coco", "yolo")


@dataclass(frozen=True, eq=False)
class Record:
    """One labelled hand: everything the packer needs to write its sample.

    `uv` and `box` are source-image pixels, or fractions of the displayed image's width and
    height when `normalised` (YOLO: the image size is only known once the image is read; see
    `in_pixels`).
    """

    sid: int  # sample id; the shard key is shards.sample_key(sid)
    id: int  # the split unit: FreiHAND id (shared by its versions), COCO image_id, YOLO image ordinal
    hand: int  # index of this hand within its image (0 for one-hand formats)
    file: str  # image path relative to the source root, as reported and stored in KEY.json
    path: Path  # image path to read
    uv: np.ndarray  # (21, 2) float64 keypoints
    visibility: np.ndarray  # (21,) uint8, 0 = not labelled
    box: np.ndarray  # (4,) float64 hand box x0, y0, x1, y1
    normalised: bool = False  # uv and box are fractions of the displayed image size
    split: str | None = None  # fixed by the source (YOLO split folder, FreiHAND evaluation = "eval")
    version: int = 0  # FreiHAND version (index into freihand.VERSION_NAMES); 0 elsewhere
    image_id: int | None = None  # COCO image_id
    label: str | None = None  # YOLO: where the label is ("train/labels/a.txt:3"); messages name files
    cls: int | None = None  # YOLO class index
    xyz: np.ndarray | None = None  # (21, 3) metres (FreiHAND only)
    K: np.ndarray | None = None  # (3, 3) (FreiHAND only)
    size: tuple[int, int] | None = None  # (width, height) the label file claims (COCO), checked on decode

    @property
    def evaluation(self) -> bool:
        """From FreiHAND's evaluation set (packed as split "eval")."""
        return self.split == "eval"

    def in_pixels(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(uv (21, 2), box (4,)) in pixels of an image displayed at width x height."""
        if not self.normalised:
            return self.uv, self.box
        scale = np.array([width, height], np.float64)
        return self.uv * scale, self.box * np.tile(scale, 2)

    def problem(self, reason: str) -> Problem:
        """A problem of this hand found after reading (its image), named like the reader's."""
        return Problem(None if self.label else self.id, self.file, reason, sample_key(self.sid))


@dataclass(frozen=True)
class Problem:
    """A sample that cannot be packed, and why (a manifest 'skipped' entry, or the error)."""

    id: int | None  # the split unit shown in the message; None where the file says it all (YOLO)
    file: str  # the file at fault, relative to the source ("labels/a.txt:3" names the line)
    reason: str
    key: str | None = None  # the sample key, when the problem hit a hand that had one

    def message(self) -> str:
        where = self.file if self.id is None else f"id {self.id} ({self.file})"
        return f"{where}: {self.reason}"

    def entry(self) -> dict[str, Any]:
        """The manifest 'skipped' entry: file and reason, plus id and key where known."""
        e: dict[str, Any] = {"file": self.file, "reason": self.reason}
        if self.id is not None:
            e["id"] = self.id
        if self.key is not None:
            e["key"] = self.key
        return e


@dataclass
class Dataset:
    """What a reader found: valid records, problems, split units and a source summary."""

    records: list[Record]
    problems: list[Problem]
    ids: list[int]  # split units that --split distributes (records with split None), problems included
    source: dict[str, Any]  # goes to manifest["source"]
    notes: list[str] = field(default_factory=list)  # things worth telling the user (not errors)
    background: int = 0  # images that hold no hand (no label file, an empty one, no annotation)
    own_splits: bool = False  # the source fixes every record's split: --split does not apply


def read_source(
    src: str | Path, fmt: str, *, images: str | Path | None = None, versions: str | None = None
) -> Dataset:
    """Read `src` with the reader of `fmt` ('freihand' | 'coco' | 'yolo').

    `images` is COCO's image folder, `versions` FreiHAND's version list (default 'gs'); either
    given for another format is an option error.
    """
    src = Path(src)
    if fmt not in FORMATS:
        raise HandposeError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not src.exists():
        raise HandposeError(f"{src}: not found")
    if images is not None and fmt != "coco":
        raise HandposeError(f"--images is only for --format coco (not {fmt})")
    if versions is not None and fmt != "freihand":
        raise HandposeError(f"--versions is only for --format freihand ({fmt} images have no versions)")
    if fmt == "freihand":
        from handpose.sources.freihand import parse_versions, read_freihand

        return read_freihand(src, parse_versions(versions or "gs"))
    if fmt == "coco":
        from handpose.sources.coco import read_coco

        return read_coco(src, images)
    from handpose.sources.yolo import read_yolo

    return read_yolo(src)


def load_json(path: Path) -> Any:
    """Parse a json file; HandposeError names the file when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise HandposeError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HandposeError(f"{path}: unreadable json: {e}") from None


def check_visibility(values: np.ndarray) -> np.ndarray:
    """Per-joint visibilities (21,) -> uint8; each must be 0, 1 or 2 and one must be > 0."""
    v = np.asarray(values, np.float64)
    bad = (v != 0) & (v != 1) & (v != 2)
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(f"keypoint {j} has visibility {v[j]:g}; expected 0 (not labelled), 1 or 2")
    if not v.any():
        raise ValueError("no labelled keypoint (every visibility is 0)")
    return v.astype(np.uint8)


def check_box(box: np.ndarray, what: str) -> np.ndarray:
    """(x0, y0, x1, y1) -> float64; finite with x1 > x0 and y1 > y0, or ValueError naming `what`."""
    b = np.asarray(box, np.float64)
    if not (np.isfinite(b).all() and b[2] > b[0] and b[3] > b[1]):
        raise ValueError(f"{what} {[round(float(v), 6) for v in b]} is empty (needs x0 < x1 and y0 < y1)")
    return b


def numeric_array(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A json value -> finite float64 array of `shape`; ValueError names `what`."""
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a numeric array of shape {shape}") from None
    if a.shape != shape:
        raise ValueError(f"{what} has shape {a.shape}, expected {shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} has non-finite values (NaN or inf)")
    return a

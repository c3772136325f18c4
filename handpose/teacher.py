"""What the MediaPipe teacher's answers become: the pure decisions of tools/teacher_label.py.

The teacher (MediaPipe Hands, run by tools/teacher_label.py in its own environment) answers each
photo and its horizontal mirror with up to N hands: 21 keypoints as fractions of the image's
width and height (FreiHAND's joint order, which is MediaPipe's), a handedness label and score,
and the score of the palm detection the hand grew from. This module decides which hands become
labels and writes their YOLO-pose lines; it never imports MediaPipe, so handpose's own
environment tests it on made-up answers.

A hand is kept when, in this order (the first failing rule is the reason it is dropped):
  1. its palm detection score >= min_detection,
  2. its handedness score >= min_handedness,
  3. the mirror's answer, mirrored back, holds a hand at the same place (keypoint boxes overlap
     by IoU >= MATCH_IOU; hands are paired greedily by IoU) whose palm detection score is
     >= min_detection too,
  4. and that hand agrees: mean keypoint distance <= mirror_tolerance x the hand box's longer side,
  5. at least min_inside joints lie inside the image,
  6. with VOC boxes given: it overlaps one by IoU >= min_iou (each VOC box labels one hand),
  7. with keep_hands given: it is among the keep_hands hands of the photo with the highest palm
     detection scores that passed 1-6 (photo sets of one hand each: a second "hand" is a
     false one, such as a sliver at the photo's edge).
The hand's presence score is not in this list: MediaPipe applies it inside its graph (hands
under the threshold never come out), so it is a setting of the run, not a rule here.

The label keeps the photo's own answer (not an average with the mirror): what MediaPipe says
about the photo, as in the hand-keypoints set. Joints outside the image are written `0 0 0`
(not labelled), as the hand-keypoints set writes them. The box is the extent of all 21
keypoints grown on every side by (BOX_RATIO - 1) / 2 of its longer side, then clipped to the
image: the hand-keypoints boxes are the keypoint extent plus 10 px on each side of a 224 px
photo, whose median box / keypoint-extent ratio (longer sides) is BOX_RATIO; a margin in units of
the hand keeps that ratio for hands of any size in photos of any size.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handpose.skeleton import NUM_JOINTS

BOX_RATIO = 1.174  # median box / keypoint-extent longer side of hand-keypoints' 18,776 train labels
MATCH_IOU = 0.3  # keypoint boxes of the photo's and the mirror's answer that overlap this much are one hand
REASONS = (
    "low detection score",
    "low handedness score",
    "no hand in the mirror",
    "mirror disagrees",
    "cut by the frame",
    "no VOC box",
    "beyond --keep-hands",
)


@dataclass(frozen=True)
class Answer:
    """One hand as the teacher answered it, in fractions of the image it was shown."""

    uv: np.ndarray  # (21, 2) x / width, y / height
    handedness: str  # "Left" or "Right" (MediaPipe's, which assumes a mirrored selfie photo)
    handedness_score: float
    detection_score: float  # the palm detection's score (0 when no palm detection matched it)

    def to_json(self) -> dict[str, Any]:
        return {
            "uv": [[round(float(x), 7), round(float(y), 7)] for x, y in self.uv],
            "handedness": self.handedness,
            "handedness_score": round(float(self.handedness_score), 6),
            "detection_score": round(float(self.detection_score), 6),
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Answer:
        uv = np.asarray(d["uv"], np.float64)
        if uv.shape != (NUM_JOINTS, 2) or not np.isfinite(uv).all():
            raise ValueError(f"an answer's uv has shape {uv.shape} or non-finite values")
        return Answer(uv, str(d["handedness"]), float(d["handedness_score"]), float(d["detection_score"]))


@dataclass(frozen=True)
class Rules:
    """The thresholds of the filter (see the module doc)."""

    min_detection: float = 0.2
    min_handedness: float = 0.8
    mirror_tolerance: float = 0.1
    min_inside: int = 17
    min_iou: float = 0.3
    keep_hands: int | None = None


@dataclass
class Verdict:
    """One teacher hand of a photo and what became of it."""

    answer: Answer
    reason: str | None  # None: kept
    mirror_error: float | None  # mean keypoint distance / box side against the mirror's answer
    box: np.ndarray  # (4,) x0, y0, x1, y1 in pixels, clipped to the image
    voc: int | None = None  # index of the VOC box it labels
    voc_iou: float | None = None


@dataclass
class PhotoResult:
    """Every decision about one photo."""

    verdicts: list[Verdict]
    voc_boxes: list[np.ndarray] = field(default_factory=list)  # pixels
    voc_labelled: list[bool] = field(default_factory=list)  # per VOC box: a kept hand labels it

    @property
    def kept(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.reason is None]


def mirror_answer(a: Answer) -> Answer:
    """An answer about the mirrored photo, moved back onto the photo: x -> 1 - x. Joint names are
    kept (a mirrored hand keeps its thumb) and the handedness label swaps."""
    uv = a.uv.copy()
    uv[:, 0] = 1.0 - uv[:, 0]
    other = {"Left": "Right", "Right": "Left"}.get(a.handedness, a.handedness)
    return Answer(uv, other, a.handedness_score, a.detection_score)


def to_pixels(uv: np.ndarray, width: int, height: int) -> np.ndarray:
    """Fractions of the image -> pixels (the pixel convention of handpose.geometry)."""
    return np.asarray(uv, np.float64) * (width, height)


def hand_box(uv_px: np.ndarray, width: int, height: int, ratio: float = BOX_RATIO) -> np.ndarray:
    """The label box of a hand (pixels): the keypoint extent grown on every side by
    (ratio - 1) / 2 of its longer side, clipped to the image (see the module doc)."""
    x0, y0 = uv_px.min(axis=0)
    x1, y1 = uv_px.max(axis=0)
    margin = (ratio - 1.0) / 2.0 * max(x1 - x0, y1 - y0)
    box = np.array([x0 - margin, y0 - margin, x1 + margin, y1 + margin])
    return np.clip(box, 0.0, [width, height, width, height])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1); 0 when either is empty."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def pair_by_iou(a: Sequence[np.ndarray], b: Sequence[np.ndarray], min_iou: float) -> list[int | None]:
    """For each box of `a`, the box of `b` it is paired with (None: none): greedily by highest
    IoU, each box used once, pairs under `min_iou` left out. Ties go to the lower indices, so the
    pairing is deterministic."""
    pairs = sorted(
        ((iou(x, y), i, j) for i, x in enumerate(a) for j, y in enumerate(b)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    out: list[int | None] = [None] * len(a)
    used: set[int] = set()
    for v, i, j in pairs:
        if v < min_iou or v <= 0:
            break
        if out[i] is None and j not in used:
            out[i] = j
            used.add(j)
    return out


def mirror_error(a_px: np.ndarray, b_px: np.ndarray, box: np.ndarray) -> float:
    """Mean distance between two answers' keypoints as a fraction of `box`'s longer side."""
    side = max(box[2] - box[0], box[3] - box[1], 1e-9)
    return float(np.linalg.norm(a_px - b_px, axis=1).mean() / side)


def inside_count(uv_px: np.ndarray, width: int, height: int) -> int:
    """Joints inside the image (edges included)."""
    ok = (uv_px[:, 0] >= 0) & (uv_px[:, 0] <= width) & (uv_px[:, 1] >= 0) & (uv_px[:, 1] <= height)
    return int(ok.sum())


def judge(
    photo: Sequence[Answer],
    mirror: Sequence[Answer],
    width: int,
    height: int,
    rules: Rules,
    voc_boxes: Sequence[np.ndarray] | None = None,
) -> PhotoResult:
    """Decide each hand the teacher found in a photo (`photo`) given its answer about the mirrored
    photo (`mirror`, in the mirrored frame); `voc_boxes` (pixels) are the photo's own hand boxes,
    or None where it has none. See the module doc for the rules."""
    back = [mirror_answer(m) for m in mirror if m.detection_score >= rules.min_detection]
    px = [to_pixels(a.uv, width, height) for a in photo]
    back_px = [to_pixels(m.uv, width, height) for m in back]
    boxes = [hand_box(p, width, height) for p in px]
    extent = [hand_box(p, width, height, ratio=1.0) for p in px]
    back_extent = [hand_box(p, width, height, ratio=1.0) for p in back_px]
    partner = pair_by_iou(extent, back_extent, MATCH_IOU)
    verdicts = []
    for a, p, box, j in zip(photo, px, boxes, partner, strict=True):
        error = mirror_error(p, back_px[j], box) if j is not None else None
        reason = None
        if a.detection_score < rules.min_detection:
            reason = REASONS[0]
        elif a.handedness_score < rules.min_handedness:
            reason = REASONS[1]
        elif error is None:
            reason = REASONS[2]
        elif error > rules.mirror_tolerance:
            reason = REASONS[3]
        elif inside_count(p, width, height) < rules.min_inside:
            reason = REASONS[4]
        verdicts.append(Verdict(a, reason, error, box))
    result = PhotoResult(verdicts)
    if voc_boxes is not None:
        result.voc_boxes = [np.asarray(b, np.float64) for b in voc_boxes]
        candidates = [k for k, v in enumerate(verdicts) if v.reason is None]
        match = pair_by_iou([verdicts[k].box for k in candidates], result.voc_boxes, rules.min_iou)
        for k, j in zip(candidates, match, strict=True):
            v = verdicts[k]
            if j is None:
                v.reason = REASONS[5]
            else:
                v.voc, v.voc_iou = j, iou(v.box, result.voc_boxes[j])
    if rules.keep_hands is not None:
        ranked = sorted(
            (k for k, v in enumerate(verdicts) if v.reason is None), key=lambda k: -photo[k].detection_score
        )
        for k in ranked[rules.keep_hands :]:
            verdicts[k].reason = REASONS[6]
    if voc_boxes is not None:
        labelled = {v.voc for v in verdicts if v.reason is None}
        result.voc_labelled = [j in labelled for j in range(len(result.voc_boxes))]
    return result


# ---- YOLO-pose lines --------------------------------------------------------------------------------


def yolo_line(uv_px: np.ndarray, box: np.ndarray, width: int, height: int) -> str:
    """`0 cx cy w h x1 y1 v1 ... x21 y21 v21`, fractions of the image; joints outside the image
    are `0 0 0` (not labelled), the others v = 1 (labelled; MediaPipe does not tell occlusion)."""
    fields = _box_fields(box, width, height)
    for x, y in uv_px:
        if 0 <= x <= width and 0 <= y <= height:
            fields += [f"{x / width:.6f}", f"{y / height:.6f}", "1"]
        else:
            fields += ["0", "0", "0"]
    return " ".join(fields)


def box_only_line(box: np.ndarray, width: int, height: int) -> str:
    """A YOLO-pose line that holds a box and no keypoint (all 21 joints `0 0 0`): a hand the
    detector must learn to box although the teacher gave it no keypoints."""
    return " ".join(_box_fields(box, width, height) + ["0", "0", "0"] * NUM_JOINTS)


def _box_fields(box: np.ndarray, width: int, height: int) -> list[str]:
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    return ["0", f"{cx:.6f}", f"{cy:.6f}", f"{(x1 - x0) / width:.6f}", f"{(y1 - y0) / height:.6f}"]


# ---- VOC boxes ----------------------------------------------------------------------------------------


def read_voc(path: str | Path) -> tuple[tuple[int, int] | None, list[np.ndarray]]:
    """A Pascal VOC annotation -> ((width, height) it claims or None, hand boxes in pixels).
    VOC corners are whole pixels, 1-based and inclusive: (xmin - 1, ymin - 1, xmax, ymax) in the
    pixel-corner convention. ValueError names what is wrong."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"not a VOC xml ({e})") from None
    size = None
    w, h = root.findtext("size/width"), root.findtext("size/height")
    if w and h:
        size = (int(float(w)), int(float(h)))
    boxes = []
    for k, obj in enumerate(root.findall("object")):
        try:
            x0, y0, x1, y1 = (
                float(obj.findtext(f"bndbox/{t}") or "") for t in ("xmin", "ymin", "xmax", "ymax")
            )
        except ValueError:
            raise ValueError(f"object {k}: bndbox is missing or not numeric") from None
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"object {k}: empty bndbox {[x0, y0, x1, y1]}")
        boxes.append(np.array([x0 - 1, y0 - 1, x1, y1]))
    return size, boxes


def scale_boxes(
    boxes: list[np.ndarray], claimed: tuple[int, int] | None, width: int, height: int
) -> list[np.ndarray]:
    """VOC boxes drawn on an image of the `claimed` size, moved onto the image as it is."""
    if claimed is None or claimed == (width, height):
        return boxes
    s = np.array([width / claimed[0], height / claimed[1]] * 2)
    return [b * s for b in boxes]

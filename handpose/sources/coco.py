"""The COCO keypoints reader: a json + image folder -> one validated Record per annotation (hand).

Rules (the same wherever handpose reads COCO labels):
- `images`: each an object with an integer `id` in [0, 10^9) and a `file_name` (a path under the
  image folder); ids and file names unique.
- `annotations`: each an object with a unique integer `id` in [0, 10^10) (the sample id: the
  shard key), an `image_id` of a listed image, and `keypoints`: 21 x (x, y, v) in FreiHAND joint
  order, pixels of the image as displayed. v = 0 marks a joint as not labelled (kept, masked
  downstream), 1 or 2 labelled; an annotation with no labelled joint is a problem.
- The hand box is `bbox` [x, y, w, h] (four finite numbers, w, h > 0) when present, else the
  extent of the labelled keypoints.
- Several annotations of one image are several hands (`hand` = rank by annotation id), split
  together: the split unit is the image. Images without an annotation hold no hand (background).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from handpose.errors import HandposeError
from handpose.geometry import keypoints_box
from handpose.shards import EVAL_SID_OFFSET, sample_key
from handpose.skeleton import NUM_JOINTS
from handpose.sources import Dataset, Problem, Record, check_box, check_visibility, load_json, numeric_array

MAX_SID = 10**10  # keys are sample_key(sid): ten digits


def check_coco_keypoints(value: Any) -> tuple[np.ndarray, np.ndarray]:
    """A COCO `keypoints` list (21 x (x, y, v)) -> (uv (21, 2) float64 px, visibility (21,) uint8)."""
    a = numeric_array(value, (NUM_JOINTS * 3,), "keypoints").reshape(NUM_JOINTS, 3)
    return a[:, :2].copy(), check_visibility(a[:, 2])


def coco_box(bbox: Any, uv: np.ndarray, visibility: np.ndarray) -> np.ndarray:
    """The hand box (x0, y0, x1, y1): from `bbox` [x, y, w, h], or the labelled keypoints' extent."""
    if bbox is None:
        return check_box(keypoints_box(uv, visibility > 0), "no bbox, and the labelled keypoints' extent")
    x, y, w, h = numeric_array(bbox, (4,), "bbox")
    if not (w > 0 and h > 0):
        raise ValueError(f"bbox [{x:g}, {y:g}, {w:g}, {h:g}] has a width or height <= 0")
    return np.array([x, y, x + w, y + h])


def read_coco(
    json_path: str | Path, images: str | Path | None = None, *, need_images: bool = True
) -> Dataset:
    """Read a COCO keypoints json (21 keypoints per annotation, FreiHAND joint order).

    Images are `file_name` under `images` (default: the json's folder). Problems with the file
    as a whole (not COCO, duplicate or missing ids) are HandposeErrors; a bad annotation or a
    missing image is a per-hand Problem. `need_images=False` (predict's --labels, which label
    whatever images are given) keeps the hands of images that are not in the folder.
    """
    json_path = Path(json_path)
    if json_path.is_dir():
        raise HandposeError(f"{json_path}: --format coco expects the keypoints json file, not a folder")
    folder = Path(images) if images is not None else json_path.parent
    if need_images and not folder.is_dir():
        raise HandposeError(f"{folder}: image folder not found")
    data = load_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise HandposeError(f"{json_path}: not a COCO json (no 'images' list)")
    if not isinstance(data.get("annotations"), list):
        raise HandposeError(f"{json_path}: not a COCO keypoints json (no 'annotations' list)")
    by_id = _images(json_path, data["images"])
    hands, orphans = _annotations(json_path, data["annotations"], by_id)

    names = _listing(folder) if need_images else set()
    records: list[Record] = []
    problems: list[Problem] = []
    for iid in sorted(hands):
        im = by_id[iid]
        file = im["file_name"]
        w, h = im.get("width"), im.get("height")
        size = (w, h) if isinstance(w, int) and isinstance(h, int) else None
        exists = _exists(folder, file, names) if need_images else True
        for hand, ann in enumerate(hands[iid]):
            aid = ann["id"]
            try:
                uv, vis = check_coco_keypoints(ann.get("keypoints"))
                box = coco_box(ann.get("bbox"), uv, vis)
            except ValueError as e:
                reason = f"{json_path.name} annotation {aid}: {e}"
                problems.append(Problem(iid, file, reason, sample_key(aid)))
                continue
            record = Record(
                sid=aid,
                id=iid,
                hand=hand,
                file=file,
                path=folder / file,
                uv=uv,
                visibility=vis,
                box=box,
                image_id=iid,
                size=size,
            )
            if exists:
                records.append(record)
            else:
                problems.append(record.problem("missing image"))

    background = len(by_id) - len(hands)
    notes = []
    if background:
        notes.append(f"{background} images have no annotation: no hands, not packed")
    if orphans:
        notes.append(f"{orphans} annotations refer to no listed image: ignored")
    source = {
        "format": "coco",
        "path": str(json_path.resolve()),
        "images": str(folder.resolve()),
        "ids": len(hands),
        "annotations": sum(len(v) for v in hands.values()),
    }
    return Dataset(records, problems, sorted(hands), source, notes, background=background)


def _images(json_path: Path, images: list[Any]) -> dict[int, dict[str, Any]]:
    by_id: dict[int, dict[str, Any]] = {}
    files: dict[str, int] = {}
    for k, im in enumerate(images):
        iid = im.get("id") if isinstance(im, dict) else None
        if not _is_id(iid, EVAL_SID_OFFSET):
            raise HandposeError(f"{json_path}: images[{k}] has no integer id in [0, {EVAL_SID_OFFSET})")
        file = im.get("file_name")
        if not isinstance(file, str):
            raise HandposeError(f"{json_path}: image id {iid} has no file_name")
        if iid in by_id:
            raise HandposeError(f"{json_path}: image id {iid} appears twice in 'images'")
        if file in files:
            raise HandposeError(
                f"{json_path}: file_name {file!r} is listed twice (image ids {files[file]}, {iid})"
            )
        by_id[iid], files[file] = im, iid
    return by_id


def _annotations(
    json_path: Path, annotations: list[Any], by_id: dict[int, dict[str, Any]]
) -> tuple[dict[int, list[dict[str, Any]]], int]:
    """Annotations grouped by image (each group in annotation-id order), and the orphan count."""
    hands: dict[int, list[dict[str, Any]]] = {}
    seen: set[int] = set()
    orphans = 0
    for k, a in enumerate(annotations):
        aid = a.get("id") if isinstance(a, dict) else None
        if not _is_id(aid, MAX_SID):
            raise HandposeError(
                f"{json_path}: annotations[{k}] has no integer id in [0, 10^10) (it is the sample id)"
            )
        if aid in seen:
            raise HandposeError(f"{json_path}: annotation id {aid} appears twice")
        seen.add(aid)
        iid = a.get("image_id")
        if iid in by_id:
            hands.setdefault(iid, []).append(a)
        else:
            orphans += 1
    for group in hands.values():
        group.sort(key=lambda a: a["id"])
    return hands, orphans


def _is_id(value: Any, limit: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


def _listing(folder: Path) -> set[str]:
    with os.scandir(folder) as it:
        return {e.name for e in it}


def _exists(folder: Path, file: str, names: set[str]) -> bool:
    # One listing answers the common flat layout; nested file_names fall back to a stat.
    return file in names if "/" not in file else (folder / file).is_file()

"""Readers: a FreiHAND root, or a COCO keypoints json + image folder -> validated records.

FreiHAND layout (the same names for `evaluation`, which is optional):
  training/rgb/%08d.jpg   file number = id + N * v, N = len(training_xyz.json), v = version
  training_xyz.json       N x 21 x 3 joints in metres, camera space
  training_K.json         N x 3 x 3 intrinsics
All versions of an id share its label; 2D keypoints are `project_points(xyz, K)` in the pixel
convention of geometry.py. Versions: 0 gs (green screen), 1 hom, 2 sample, 3 auto.

Labels are checked here (shape, finite, z > 0, list lengths, image listed in the folder); images
are decoded (the strict check that catches truncation) by the packer's workers. Every problem
becomes a `Problem` naming the sample's id and file, so the caller can fail or skip.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handpose.errors import HandposeError
from handpose.geometry import project_points
from handpose.shards import EVAL_SID_OFFSET
from handpose.skeleton import NUM_JOINTS

VERSION_NAMES = ("gs", "hom", "sample", "auto")
_IMAGE_NAME = re.compile(r"^(\d{8})\.jpg$")


@dataclass(frozen=True)
class Record:
    """One labelled image: everything the packer needs to write its sample."""

    sid: int  # sample id; the shard key is shards.sample_key(sid)
    id: int  # the unit of splitting: FreiHAND id (shared by its versions), COCO image_id
    version: int  # index into VERSION_NAMES (COCO: 0)
    evaluation: bool  # from FreiHAND's evaluation set: packed as split "eval"
    file: str  # image path relative to the source root, as reported and stored in KEY.json
    path: Path  # image path to read
    uv: np.ndarray  # (21, 2) float64 pixels in the source image
    xyz: np.ndarray | None = None  # (21, 3) metres (FreiHAND only)
    K: np.ndarray | None = None  # (3, 3) (FreiHAND only)
    size: tuple[int, int] | None = None  # (width, height) the label file claims (COCO), checked on decode


@dataclass(frozen=True)
class Problem:
    """A sample that cannot be packed, and why (becomes a manifest 'skipped' entry or the error)."""

    id: int
    file: str
    reason: str

    def message(self) -> str:
        return f"id {self.id} ({self.file}): {self.reason}"


@dataclass
class Dataset:
    """What a reader found: valid records, problems, all ids (for splitting) and a source summary."""

    records: list[Record]
    problems: list[Problem]
    ids: list[int]  # every id of the splittable (non-evaluation) part, sorted, problems included
    source: dict[str, Any]  # goes to manifest["source"]
    notes: list[str] = field(default_factory=list)  # things worth telling the user (not errors)


def parse_versions(spec: str) -> tuple[int, ...] | None:
    """'gs' -> (0,), 'gs,hom' -> (0, 1), 'all' -> None (every version present)."""
    spec = spec.strip().lower()
    if spec == "all":
        return None
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in names if s not in VERSION_NAMES]
    if not names or bad:
        raise HandposeError(
            f"--versions {spec!r}: expected 'all' or a comma list of {', '.join(VERSION_NAMES)}"
        )
    return tuple(sorted({VERSION_NAMES.index(s) for s in names}))


def check_xyz(value: Any) -> np.ndarray:
    """One joints entry -> (21, 3) float64 metres; ValueError names what is wrong."""
    a = _array(value, (NUM_JOINTS, 3), "joints")
    z = a[:, 2]
    if np.any(z <= 0):
        j = int(np.argmax(z <= 0))
        raise ValueError(f"joint {j} has z = {z[j]:g} <= 0 (behind the camera)")
    return a


def check_K(value: Any) -> np.ndarray:
    """One intrinsics entry -> (3, 3) float64; ValueError names what is wrong."""
    a = _array(value, (3, 3), "K")
    if a[0, 0] == 0 or a[1, 1] == 0:
        raise ValueError("K has a zero focal length")
    return a


def check_coco_keypoints(value: Any) -> np.ndarray:
    """A COCO `keypoints` list (21 x (u, v, visibility)) -> uv (21, 2) float64 pixels."""
    a = _array(value, (NUM_JOINTS * 3,), "keypoints")
    a = a.reshape(NUM_JOINTS, 3)
    if np.any(a[:, 2] == 0):
        j = int(np.argmax(a[:, 2] == 0))
        raise ValueError(f"keypoint {j} is not labelled (visibility 0); every joint needs a label")
    return a[:, :2].copy()


def _array(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a numeric array of shape {shape}") from None
    if a.shape != shape:
        raise ValueError(f"{what} has shape {a.shape}, expected {shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} has non-finite values (NaN or inf)")
    return a


def load_json(path: Path) -> Any:
    """Parse a json file; HandposeError names the file when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise HandposeError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HandposeError(f"{path}: unreadable json: {e}") from None


def _load_list(path: Path) -> list[Any]:
    data = load_json(path)
    if not isinstance(data, list):
        raise HandposeError(f"{path}: expected a json list (one entry per id), got {type(data).__name__}")
    return data


def _file_numbers(rgb: Path) -> set[int]:
    """File numbers of rgb/%08d.jpg, from one directory listing (no stat per file)."""
    try:
        with os.scandir(rgb) as it:
            return {int(m.group(1)) for e in it if (m := _IMAGE_NAME.match(e.name))}
    except FileNotFoundError:
        raise HandposeError(f"{rgb}: image folder not found") from None


def read_freihand(root: str | Path, versions: tuple[int, ...] | None = (0,)) -> Dataset:
    """Read and validate a FreiHAND root (training set, plus the evaluation set when labelled).

    `versions` None means every version with images in training/rgb. Asking for a version with
    no images at all is an option error (HandposeError), not a per-sample problem.
    """
    root = Path(root)
    if not (root / "training_xyz.json").is_file():
        raise HandposeError(f"{root}: not a FreiHAND root (no training_xyz.json)")
    train = _read_set(root, "training", versions, strict=True)
    sets = [train]
    notes: list[str] = []
    if (root / "evaluation_xyz.json").exists() or (root / "evaluation_K.json").exists():
        sets.append(_read_set(root, "evaluation", versions, strict=False))
    elif (root / "evaluation" / "rgb").is_dir():
        notes.append(
            "evaluation/rgb has no evaluation_xyz.json / evaluation_K.json: evaluation set not packed"
        )
    source = {
        "format": "freihand",
        "path": str(root.resolve()),
        "ids": train.n_ids,
        "versions": [VERSION_NAMES[v] for v in train.versions],
        "evaluation_ids": sets[1].n_ids if len(sets) > 1 else 0,
    }
    return Dataset(
        records=[r for s in sets for r in s.records],
        problems=[p for s in sets for p in s.problems],
        ids=list(range(train.n_ids)),
        source=source,
        notes=notes,
    )


@dataclass
class _Set:
    records: list[Record]
    problems: list[Problem]
    n_ids: int
    versions: tuple[int, ...]


def _read_set(root: Path, name: str, versions: tuple[int, ...] | None, *, strict: bool) -> _Set:
    """One of FreiHAND's two sets ('training' or 'evaluation')."""
    xyz_name, k_name = f"{name}_xyz.json", f"{name}_K.json"
    xyz_list, k_list = _load_list(root / xyz_name), _load_list(root / k_name)
    # A shorter list is most likely truncated, so the longer one gives N (the file-number stride).
    n = max(len(xyz_list), len(k_list))
    numbers = _file_numbers(root / name / "rgb")
    present = tuple(sorted({num // n for num in numbers if num < n * len(VERSION_NAMES)})) if n else ()
    if versions is None:
        use = present or (0,)
    elif strict:
        for v in versions:
            if v not in present:
                raise HandposeError(
                    f"{root / name / 'rgb'}: no images of version {VERSION_NAMES[v]!r} "
                    f"(file numbers {v * n:08d}..{(v + 1) * n - 1:08d}; N = {n} from {xyz_name})"
                )
        use = versions
    else:  # the evaluation set usually has one version only: take what is asked and present
        use = tuple(v for v in versions if v in present)

    xyzs = _check_all(xyz_list, check_xyz, xyz_name, (NUM_JOINTS, 3))
    Ks = _check_all(k_list, check_K, k_name, (3, 3))
    labels: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    label_errors: dict[int, str] = {}
    for i in range(n):
        xyz = xyzs[i] if i < len(xyzs) else None
        K = Ks[i] if i < len(Ks) else None
        if xyz is None or K is None:
            short = xyz_name if xyz is None else k_name
            counts = f"{xyz_name} has {len(xyz_list)} entries, {k_name} has {len(k_list)}"
            label_errors[i] = f"{short} has no entry {i} ({counts})"
        elif isinstance(xyz, str) or isinstance(K, str):
            label_errors[i] = xyz if isinstance(xyz, str) else K  # type: ignore[assignment]
        else:
            labels[i] = (xyz, K, project_points(xyz, K))

    offset = EVAL_SID_OFFSET if name == "evaluation" else 0
    records: list[Record] = []
    problems: list[Problem] = []
    for v in use:
        for i in range(n):
            num = i + n * v
            file = f"{name}/rgb/{num:08d}.jpg"
            if i in label_errors:
                problems.append(Problem(i, file, label_errors[i]))
            elif num not in numbers:
                problems.append(Problem(i, file, "missing image"))
            else:
                xyz, K, uv = labels[i]
                records.append(
                    Record(
                        sid=offset + num,
                        id=i,
                        version=v,
                        evaluation=bool(offset),
                        file=file,
                        path=root / file,
                        uv=uv,
                        xyz=xyz,
                        K=K,
                    )
                )
    return _Set(records, problems, n, use)


def _check_all(values: list[Any], check: Any, file: str, shape: tuple[int, ...]) -> list[Any]:
    """Each entry checked by `check`: an array, or the error text naming the file and entry.

    One vectorised pass first (the real FreiHAND has 32,560 entries per list); only if anything
    is off does the slow per-entry pass run, to name each bad entry.
    """
    try:
        a = np.asarray(values, dtype=np.float64)
        if a.shape == (len(values), *shape) and np.all(np.isfinite(a)):
            if check is check_xyz and np.all(a[..., 2] > 0):
                return list(a)
            if check is check_K and np.all(a[:, 0, 0] != 0) and np.all(a[:, 1, 1] != 0):
                return list(a)
    except (TypeError, ValueError):
        pass
    out: list[Any] = []
    for i, value in enumerate(values):
        try:
            out.append(check(value))
        except ValueError as e:
            out.append(f"{file} entry {i}: {e}")
    return out


def read_coco(json_path: str | Path, images: str | Path | None = None) -> Dataset:
    """Read a COCO keypoints json (21 keypoints in FreiHAND order, one hand per image).

    sid = id = image_id (the split unit: every image is its own id); version 0; no xyz/K.
    Images are `file_name` under `images` (default: the json's folder). Images without an
    annotation are ignored (noted); an image with several annotations is a problem.
    """
    json_path = Path(json_path)
    if json_path.is_dir():
        raise HandposeError(f"{json_path}: --format coco expects the keypoints json file, not a folder")
    folder = Path(images) if images is not None else json_path.parent
    if not folder.is_dir():
        raise HandposeError(f"{folder}: image folder not found")
    data = load_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise HandposeError(f"{json_path}: not a COCO json (no 'images' list)")
    if not isinstance(data.get("annotations"), list):
        raise HandposeError(f"{json_path}: not a COCO keypoints json (no 'annotations' list)")

    by_id: dict[int, dict[str, Any]] = {}
    for k, im in enumerate(data["images"]):
        iid = im.get("id") if isinstance(im, dict) else None
        if not isinstance(iid, int) or isinstance(iid, bool) or not 0 <= iid < EVAL_SID_OFFSET:
            raise HandposeError(f"{json_path}: images[{k}] has no integer id in [0, {EVAL_SID_OFFSET})")
        if not isinstance(im.get("file_name"), str):
            raise HandposeError(f"{json_path}: image id {iid} has no file_name")
        if iid in by_id:
            raise HandposeError(f"{json_path}: image id {iid} appears twice in 'images'")
        by_id[iid] = im
    anns: dict[int, list[dict[str, Any]]] = {}
    orphans = 0
    for a in data["annotations"]:
        iid = a.get("image_id") if isinstance(a, dict) else None
        if iid in by_id:
            anns.setdefault(iid, []).append(a)  # type: ignore[arg-type]
        else:
            orphans += 1

    names = _listing(folder)
    records: list[Record] = []
    problems: list[Problem] = []
    unlabelled = 0
    for iid in sorted(by_id):
        im, found = by_id[iid], anns.get(iid, [])
        file = im["file_name"]
        if not found:
            unlabelled += 1
            continue
        try:
            if len(found) > 1:
                raise ValueError(f"{len(found)} annotations; one hand per image expected")
            uv = check_coco_keypoints(found[0].get("keypoints"))
        except ValueError as e:
            problems.append(Problem(iid, file, f"{json_path.name}: {e}"))
            continue
        if not _exists(folder, file, names):
            problems.append(Problem(iid, file, "missing image"))
            continue
        w, h = im.get("width"), im.get("height")
        size = (w, h) if isinstance(w, int) and isinstance(h, int) else None
        records.append(Record(iid, iid, 0, False, file, folder / file, uv, size=size))

    notes = []
    if unlabelled:
        notes.append(f"{unlabelled} images have no annotation: not packed")
    if orphans:
        notes.append(f"{orphans} annotations refer to no listed image: ignored")
    source = {
        "format": "coco",
        "path": str(json_path.resolve()),
        "images": str(folder.resolve()),
        "ids": len(by_id) - unlabelled,
    }
    ids = sorted(iid for iid in by_id if anns.get(iid))
    return Dataset(records=records, problems=problems, ids=ids, source=source, notes=notes)


def _listing(folder: Path) -> set[str]:
    with os.scandir(folder) as it:
        return {e.name for e in it}


def _exists(folder: Path, file: str, names: set[str]) -> bool:
    # One listing answers the common flat layout; nested file_names fall back to a stat.
    return file in names if "/" not in file else (folder / file).is_file()

"""The FreiHAND reader: a FreiHAND root -> one validated Record per image (one hand each).

Layout (the same names for `evaluation`, which is optional):
  training/rgb/%08d.jpg   file number = id + N * v, N = len(training_xyz.json), v = version
  training_xyz.json       N x 21 x 3 joints in metres, camera space
  training_K.json         N x 3 x 3 intrinsics
All versions of an id share its label; 2D keypoints are `project_points(xyz, K)` in the pixel
convention of geometry.py. Versions: 0 gs (green screen), 1 hom, 2 sample, 3 auto.

Labels are checked here (shape, finite, z > 0, list lengths, image listed in the folder); images
are decoded (the strict check that catches truncation) by the packer's workers. Every problem
becomes a `Problem` naming the sample's id and file, so the caller can fail or skip. Every joint
is labelled (visibility 1); the hand box is the keypoints' extent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handpose.errors import HandposeError
from handpose.geometry import project_points
from handpose.shards import EVAL_SID_OFFSET
from handpose.skeleton import NUM_JOINTS
from handpose.sources import Dataset, Problem, Record, load_json, numeric_array

VERSION_NAMES = ("gs", "hom", "sample", "auto")
_IMAGE_NAME = re.compile(r"^(\d{8})\.jpg$")


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
    a = numeric_array(value, (NUM_JOINTS, 3), "joints")
    z = a[:, 2]
    if np.any(z <= 0):
        j = int(np.argmax(z <= 0))
        raise ValueError(f"joint {j} has z = {z[j]:g} <= 0 (behind the camera)")
    return a


def check_K(value: Any) -> np.ndarray:
    """One intrinsics entry -> (3, 3) float64; ValueError names what is wrong."""
    a = numeric_array(value, (3, 3), "K")
    if a[0, 0] == 0 or a[1, 1] == 0:
        raise ValueError("K has a zero focal length")
    return a


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
    # Every hand's box is its keypoints' extent, found for all ids at once (one keypoints_box
    # call per id cost more than reading the labels).
    uvs = np.stack([labels[i][2] for i in labels]) if labels else np.empty((0, NUM_JOINTS, 2))
    extents = np.concatenate([uvs.min(axis=1), uvs.max(axis=1)], axis=1)
    boxes = dict(zip(labels, extents, strict=True))

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
                        hand=0,
                        file=file,
                        path=root / file,
                        uv=uv,
                        visibility=np.ones(NUM_JOINTS, np.uint8),
                        box=boxes[i],
                        split="eval" if offset else None,
                        version=v,
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

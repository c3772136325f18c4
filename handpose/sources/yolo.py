"""The YOLO-pose reader: an Ultralytics dataset -> one validated Record per label line (hand).

Where the data is (SRC):
- folders: SRC/{split}/images + SRC/{split}/labels, or SRC/images/{split} + SRC/labels/{split},
  split = train, val (or Roboflow's valid), test; or SRC/images + SRC/labels (one folder);
- a dataset yaml (SRC ends in .yaml or .yml): `path` (the root: absolute, or relative to the
  yaml's folder, else to the working directory; default the yaml's folder), `train`, `val`,
  `test` (an image folder or a list of them, relative to the root; a `../x` that does not
  exist is read as `x`, as Ultralytics does for Roboflow exports) and `kpt_shape` ([21, 3] or
  [21, 2]; without it, each line's field count says which).
Images are the files with a suffix Ultralytics reads (`sources.files`), found recursively. The label of
`.../images/.../NAME.EXT` is `.../labels/.../NAME.txt` (Ultralytics' rule: the last `images`
folder in the path becomes `labels`; a path without one has its labels beside the images).

A label line is `class cx cy w h x1 y1 v1 ... x21 y21 v21` (or without the v's when kpt_shape
is [21, 2]; then a negative coordinate marks a joint as not labelled, as in Ultralytics), all
coordinates fractions of the image's displayed width and height. Each non-blank line is one
hand: sid = image ordinal * 1000 + hand, the ordinal counting every image of the dataset in
(split, relative path) order and `hand` counting the file's non-blank lines (a bad line keeps
its number, so fixing it moves no key). Coordinates may stray TOLERANCE past [0, 1] (labelling
tools round, fingertips leave the frame); they are kept as given, not clamped, because moving a
label is worse than a joint slightly outside the image. Box corners are not checked (a box may
reach past the image: the manifest counts those), the box's centre and size are. Joints that
are not labelled are not range-checked.

An image without a label file, or with an empty one, holds no hand (a background image): no
sample, counted in the manifest. Every other problem (a bad line, a label without an image, a
label shared by two images, more than MAX_HANDS lines) is a per-sample Problem naming the label
file and line. With split folders the dataset's own splits are used; one folder (or one split)
is re-split by `--split`, by image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from handpose.errors import HandposeError
from handpose.shards import SPLITS
from handpose.skeleton import NUM_JOINTS
from handpose.sources import Dataset, Problem, Record, check_visibility
from handpose.sources.files import is_image, walk

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}
TOLERANCE = 0.02  # how far past [0, 1] a normalised coordinate may be (kept as given)
MAX_HANDS = 1000  # hands per image: sid = ordinal * MAX_HANDS + hand
_VALUES = {2: "(x, y)", 3: "(x, y, v)"}


@dataclass(frozen=True)
class Folder:
    """One image folder of the dataset and the split it fixes (None: re-split by --split)."""

    split: str | None
    images: Path


@dataclass(frozen=True)
class LabelLine:
    """One parsed label line (one hand), coordinates normalised to the image's displayed size."""

    cls: int
    box: np.ndarray  # (4,) x0, y0, x1, y1
    uv: np.ndarray  # (21, 2)
    visibility: np.ndarray  # (21,) uint8

    def in_pixels(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(uv (21, 2), box (4,)) in pixels of the image displayed at width x height."""
        scale = np.array([width, height], np.float64)
        return self.uv * scale, self.box * np.tile(scale, 2)


def read_yolo(src: str | Path) -> Dataset:
    """Read a YOLO-pose dataset given as a root folder or a dataset yaml (see the module doc)."""
    src = Path(os.path.abspath(src))
    if src.is_file():
        if src.suffix.lower() not in (".yaml", ".yml"):
            raise HandposeError(f"{src}: --format yolo expects a dataset folder or a dataset yaml")
        root, folders, dims = read_dataset_yaml(src)
        layout = "yaml"
    else:
        root, (folders, layout), dims = src, find_folders(src), None
    _check_disjoint(folders)
    data = _read(root, folders, dims, layout, yaml=src if layout == "yaml" else None)
    if layout == "images/{split}":
        with os.scandir(src / "images") as it:
            loose = sum(1 for e in it if e.is_file() and is_image(e.name))
        if loose:
            data.notes.append(f"images/: {loose} images outside the split folders: not packed")
    return data


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last `/images/` of the path becomes `/labels/`, the suffix `.txt`."""
    return Path(_label_str(str(image)))


def _label_str(image: str) -> str:
    head, sep, tail = image.rpartition(f"{os.sep}images{os.sep}")
    path = f"{head}{os.sep}labels{os.sep}{tail}" if sep else image
    return path[: -len(os.path.splitext(path)[1]) or None] + ".txt"


def _label_dir(images: Path) -> Path:
    """Where the labels of the images directly in `images` are."""
    return label_path(images / "x.jpg").parent


def _split_layouts(src: Path) -> dict[str, list[tuple[str, Path]]]:
    """The image folders each split-folder layout would have under `src`: {layout: [(split, folder)]}."""
    return {
        "{split}/images": [(s, src / n / "images") for s, names in SPLIT_FOLDERS.items() for n in names],
        "images/{split}": [(s, src / "images" / n) for s, names in SPLIT_FOLDERS.items() for n in names],
    }


def is_dataset_folder(src: Path) -> bool:
    """Whether a folder is laid out as a YOLO dataset: a split folder of either layout, or images/
    beside labels/ (a folder with only images/ is a plain folder of photos to predict on)."""
    if any(p.is_dir() for cands in _split_layouts(src).values() for _, p in cands):
        return True
    return (src / "images").is_dir() and (src / "labels").is_dir()


def find_folders(src: Path, *, resplit: bool = True) -> tuple[list[Folder], str]:
    """The image folders of a dataset root and its layout name; HandposeError if none is found.

    `resplit`: a dataset in one split folder is re-split by pack's --split, so its folder fixes
    no split; False keeps the folder's own split name (predict's --split picks folders by it).
    """
    found = {
        name: [Folder(s, p) for s, p in cands if p.is_dir()] for name, cands in _split_layouts(src).items()
    }
    if found["{split}/images"] and found["images/{split}"]:
        raise HandposeError(
            f"{src}: both SRC/{{split}}/images and SRC/images/{{split}} folders; give a dataset yaml"
        )
    layout = "{split}/images" if found["{split}/images"] else "images/{split}"
    folders = found[layout]
    if not folders:
        if (src / "images").is_dir():
            return [Folder(None, src / "images")], "images"
        raise HandposeError(
            f"{src}: no YOLO dataset here (expected SRC/{{train,val,test}}/images, "
            f"SRC/images/{{train,val,test}}, SRC/images, or a dataset yaml as SRC)"
        )
    for split in SPLIT_FOLDERS:
        both = [f.images.relative_to(src).as_posix() for f in folders if f.split == split]
        if len(both) > 1:
            raise HandposeError(f"{src}: {' and '.join(both)} are both split {split!r}; keep one")
    return (_one_split_resplits(folders) if resplit else folders), layout


def _one_split_resplits(folders: list[Folder]) -> list[Folder]:
    """A dataset in one split is divided by --split (by image): its folders fix no split."""
    if len({f.split for f in folders}) == 1:
        return [Folder(None, f.images) for f in folders]
    return folders


def _check_disjoint(folders: list[Folder]) -> None:
    real = [(f, Path(os.path.realpath(f.images))) for f in folders]
    for i, (a, ra) in enumerate(real):
        for b, rb in real[i + 1 :]:
            if ra == rb or ra in rb.parents or rb in ra.parents:
                raise HandposeError(
                    f"{a.images} ({a.split or 'one folder'}) and {b.images} ({b.split or 'one folder'}) "
                    f"overlap: an image would be packed twice"
                )


# ---- reading images and labels -------------------------------------------------------------------


def _read(root: Path, folders: list[Folder], dims: int | None, layout: str, yaml: Path | None) -> Dataset:
    # Paths are handled as strings here: pathlib costs more than parsing the labels at 20k images.
    images: list[tuple[Folder, str]] = []
    labels: set[str] = set()
    notes: list[str] = []
    for folder in folders:
        found = list_images(folder.images)
        images += [(folder, p) for p in found]
        label_dir = _label_dir(folder.images)
        if label_dir.is_dir():
            labels |= set(walk(label_dir, lambda n: n.endswith(".txt")))
        elif found:
            notes.append(f"{_rel(label_dir, root)}: no labels folder; its {len(found)} images hold no hands")
    order = {s: k for k, s in enumerate(SPLITS)}
    top = str(root)
    images.sort(key=lambda fp: (order[fp[0].split] if fp[0].split else 0, _rel_str(fp[1], top)))

    by_label: dict[str, list[int]] = {}
    for ordinal, (_, image) in enumerate(images):
        by_label.setdefault(_label_str(image), []).append(ordinal)
    records: list[Record] = []
    problems: list[Problem] = []
    ids: list[int] = []
    background = 0
    for lp, ordinals in by_label.items():
        if lp not in labels and not os.path.isfile(lp):
            background += len(ordinals)
            continue
        labels.discard(lp)
        lrel = _rel_str(lp, top)
        if len(ordinals) > 1:
            names = ", ".join(os.path.basename(images[k][1]) for k in ordinals)
            reason = f"is the label of {len(ordinals)} images ({names}); rename one"
            problems.append(Problem(None, lrel, reason))
            continue
        folder, image = images[ordinals[0]]
        hands, line_problems = read_label(lp, lrel, dims)
        problems += line_problems
        if not hands and not line_problems:
            background += 1  # an empty label file: YOLO's background image
            continue
        ordinal = ordinals[0]
        if folder.split is None:
            ids.append(ordinal)
        file, path = _rel_str(image, top), Path(image)
        for hand, (line, h) in hands.items():
            records.append(
                Record(
                    sid=ordinal * MAX_HANDS + hand,
                    id=ordinal,
                    hand=hand,
                    file=file,
                    path=path,
                    uv=h.uv,
                    visibility=h.visibility,
                    box=h.box,
                    normalised=True,
                    split=folder.split,
                    label=f"{lrel}:{line}",
                    cls=h.cls,
                )
            )
    for lp in sorted(labels):  # label files that no image claimed
        if os.path.basename(lp) == "classes.txt":  # LabelImg's class list, not a label
            notes.append(f"{_rel_str(lp, top)}: a class list, not a label: ignored")
        else:
            stem = os.path.basename(lp)[: -len(".txt")]
            problems.append(Problem(None, _rel_str(lp, top), f"no image {stem}.* for this label"))

    source = {
        "format": "yolo",
        "path": top,
        "yaml": str(yaml) if yaml else None,
        "layout": layout,
        "folders": [
            {"split": f.split, "images": _rel(f.images, root), "labels": _rel(_label_dir(f.images), root)}
            for f in folders
        ],
        "kpt_shape": [NUM_JOINTS, dims] if dims else None,
        "images": len(images),
    }
    own = all(f.split is not None for f in folders)
    records.sort(key=lambda r: r.sid)
    return Dataset(records, problems, sorted(ids), source, notes, background=background, own_splits=own)


def list_images(folder: Path) -> list[str]:
    """Image files under `folder` (`sources.files.walk`: recursive, by relative path)."""
    return list(walk(folder, is_image))


def read_label(
    path: str | Path, rel: str, dims: int | None
) -> tuple[dict[int, tuple[int, LabelLine]], list[Problem]]:
    """A label file -> ({hand: (line number, LabelLine)}, problems naming `rel`:line)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        return {}, [Problem(None, rel, f"unreadable label file ({e.strerror})")]
    except UnicodeDecodeError:
        return {}, [Problem(None, rel, "not a text file (not UTF-8)")]
    lines = label_lines(text)
    if len(lines) > MAX_HANDS:
        return {}, [Problem(None, rel, f"{len(lines)} hands; at most {MAX_HANDS} per image")]
    hands: dict[int, tuple[int, LabelLine]] = {}
    problems: list[Problem] = []
    for hand, (n, fields) in enumerate(lines):
        try:
            hands[hand] = (n, parse_line(fields, dims))
        except ValueError as e:
            problems.append(Problem(None, f"{rel}:{n}", str(e)))
    return hands, problems


def label_lines(text: str) -> list[tuple[int, list[str]]]:
    """The non-blank lines of a label file as (line number, fields): hand k is the k-th."""
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def parse_line(fields: list[str], dims: int | None) -> LabelLine:
    """One label line's fields -> LabelLine; ValueError says what is wrong (see the module doc)."""
    n = len(fields)
    allowed = (dims,) if dims else (3, 2)
    d = next((k for k in allowed if n == 5 + NUM_JOINTS * k), None)
    if d is None:
        raise ValueError(_count_message(n, allowed))
    a = _numbers(fields)
    cls, box = _class_and_box(a, fields)
    kp = a[5:].reshape(NUM_JOINTS, d)
    uv = kp[:, :2].copy()
    if d == 3:
        vis = check_visibility(kp[:, 2])
    else:  # Ultralytics' rule for 2-value keypoints: a negative coordinate means not labelled
        vis = check_visibility(np.where((uv < 0).any(axis=1), 0.0, 1.0))
    outside = (vis > 0)[:, None] & ((uv < -TOLERANCE) | (uv > 1 + TOLERANCE))
    if outside.any():
        j, c = (int(v) for v in np.argwhere(outside)[0])
        raise ValueError(f"keypoint {j} {'xy'[c]} = {uv[j, c]:g} is outside [0, 1] (tolerance {TOLERANCE})")
    return LabelLine(cls, box, uv, vis)


def parse_box_line(fields: list[str]) -> tuple[np.ndarray, float | None]:
    """A detection's label line (predict's --boxes FOLDER) -> (normalised box x0, y0, x1, y1,
    confidence or None): `class cx cy w h` with or without a confidence after it (what
    Ultralytics' save_txt writes), or a pose line (`parse_line`'s rules: its box is used), with or
    without one. The class and box obey the same rules as in a pose label."""
    n = len(fields)
    pose = {5 + NUM_JOINTS * d for d in (2, 3)}
    score = None
    if n == 6 or n - 1 in pose:  # a trailing confidence
        fields, score = fields[:-1], _confidence(fields[-1], n)
    if len(fields) in pose:
        return parse_line(fields, None).box, score
    if len(fields) != 5:
        raise ValueError(f"{n} fields, expected class cx cy w h [conf] or a pose line")
    return _class_and_box(_numbers(fields), fields)[1], score


def _numbers(fields: list[str]) -> np.ndarray:
    """The fields as float64, all finite; ValueError names the first that is not."""
    try:
        a = np.array(fields, dtype=np.float64)
    except ValueError:  # name the first field that is no number
        k, f = next((k, f) for k, f in enumerate(fields, 1) if not _is_number(f))
        raise ValueError(f"field {k} {f!r} is not a number") from None
    if not np.isfinite(a).all():
        k = int(np.argmax(~np.isfinite(a)))
        raise ValueError(f"field {k + 1} is {fields[k]} (not a finite number)")
    return a


def _class_and_box(a: np.ndarray, fields: list[str]) -> tuple[int, np.ndarray]:
    """(class, box x0, y0, x1, y1) from a line's first five numbers `class cx cy w h`."""
    if a[0] < 0 or a[0] != int(a[0]):
        raise ValueError(f"class {fields[0]!r} is not a whole number >= 0")
    cx, cy, w, h = a[1:5]
    for name, v in (("cx", cx), ("cy", cy), ("w", w), ("h", h)):
        if not -TOLERANCE <= v <= 1 + TOLERANCE:
            raise ValueError(f"box {name} = {v:g} is outside [0, 1] (tolerance {TOLERANCE})")
    if not (w > 0 and h > 0):
        raise ValueError(f"box w = {w:g}, h = {h:g}: an empty box")
    return int(a[0]), np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _confidence(text: str, k: int) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"field {k} {text!r} (the confidence) is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"field {k} = {v:g}: a confidence must be in [0, 1]")
    return v


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _count_message(n: int, allowed: tuple[int, ...]) -> str:
    """'62 fields, expected 68 (class, box, 21 x (x, y, v)); 62 fields would be 19 keypoints ...'."""
    want = " or ".join(f"{5 + NUM_JOINTS * d} (class, box, {NUM_JOINTS} x {_VALUES[d]})" for d in allowed)
    message = f"{n} fields, expected {want}"
    k = n - 5
    if k == 0:
        return message + "; a box without keypoints (a detection label?)"
    for d in allowed:
        if k > 0 and k % d == 0:
            return message + f"; {n} fields would be {k // d} keypoints of {_VALUES[d]}"
    return message


def _rel(path: Path, root: Path) -> str:
    """`path` relative to the dataset root (posix), or absolute when it lies outside."""
    return _rel_str(str(path), str(root))


def _rel_str(path: str, root: str) -> str:
    if path.startswith(root + os.sep):
        path = path[len(root) + 1 :]
    return path.replace(os.sep, "/")


# ---- the dataset yaml -------------------------------------------------------------------------------


def read_dataset_yaml(path: Path, *, resplit: bool = True) -> tuple[Path, list[Folder], int | None]:
    """A dataset yaml -> (root, image folders with their splits, keypoint dims or None);
    `resplit` as in `find_folders`. Read with `yaml.safe_load` (plain data, never objects)."""
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise HandposeError(f"{path}: unreadable yaml: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise HandposeError(f"{path}: invalid YAML: {problem}{where}") from None
    if not isinstance(entries, dict):
        raise HandposeError(f"{path}: expected 'key: value' entries (path, train, val, test, kpt_shape)")
    root = _yaml_root(path, entries.get("path"))
    folders: list[Folder] = []
    for split in ("train", "val", "test"):
        for value in _folder_values(entries.get(split), path, split):
            folders.append(Folder(split, _yaml_folder(path, root, split, value)))
    if not folders:
        raise HandposeError(f"{path}: no train, val or test folder")
    dims = _kpt_dims(entries["kpt_shape"], path) if entries.get("kpt_shape") is not None else None
    return root, (_one_split_resplits(folders) if resplit else folders), dims


def _folder_values(value: Any, path: Path, key: str) -> list[str]:
    """A split's entry: a folder or a list of folders (Ultralytics' forms); none when empty."""
    items = value if isinstance(value, list) else [] if value is None else [value]
    if any(isinstance(v, (dict, list)) for v in items):
        raise HandposeError(f"{path}: {key}: expected a folder or a list of folders")
    return [str(v) for v in items if v is not None]


def _yaml_root(path: Path, value: Any) -> Path:
    if value is None or value == "":
        return path.parent
    p = Path(str(value)).expanduser()
    if p.is_absolute():
        root = p
    else:  # the yaml's folder first; Ultralytics takes it from the working directory
        root = path.parent / p
        if not root.is_dir() and (Path.cwd() / p).is_dir():
            root = Path.cwd() / p
    if not root.is_dir():
        raise HandposeError(
            f"{path}: path {str(value)!r}: folder not found (a relative path is taken from the "
            f"yaml's folder, then from the working directory)"
        )
    return Path(os.path.abspath(root))


def _yaml_folder(path: Path, root: Path, key: str, value: str) -> Path:
    folder = Path(value).expanduser()
    folder = folder if folder.is_absolute() else root / folder
    if not folder.exists() and value.startswith("../"):  # Ultralytics' rule for Roboflow's yamls
        folder = root / value[3:]
    if folder.suffix == ".txt":
        raise HandposeError(f"{path}: {key}: {value} is an image list file; handpose reads image folders")
    if not folder.is_dir():
        raise HandposeError(f"{path}: {key}: folder {value!r} not found under {root}")
    return Path(os.path.abspath(folder))


def _kpt_dims(value: Any, path: Path) -> int:
    shape = value if isinstance(value, list) and all(type(v) is int for v in value) else None
    if shape is None or len(shape) != 2:
        raise HandposeError(f"{path}: kpt_shape {value!r}: expected [21, 3] or [21, 2]")
    if shape[0] != NUM_JOINTS or shape[1] not in (2, 3):
        raise HandposeError(
            f"{path}: kpt_shape {shape}: handpose reads {NUM_JOINTS} keypoints of 2 or 3 values"
        )
    return shape[1]

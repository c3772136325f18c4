"""The YOLO-pose reader: an Ultralytics dataset -> one validated Record per label line (hand).

Where the data is (SRC):
- folders: SRC/{split}/images + SRC/{split}/labels, or SRC/images/{split} + SRC/labels/{split},
  split = train, val (or Roboflow's valid), test; or SRC/images + SRC/labels (one folder);
- a dataset yaml (SRC ends in .yaml or .yml): `path` (the root: absolute, or relative to the
  yaml's folder, else to the working directory; default the yaml's folder), `train`, `val`,
  `test` (an image folder or a list of them, relative to the root; a `../x` that does not
  exist is read as `x`, as Ultralytics does for Roboflow exports) and `kpt_shape` ([21, 3] or
  [21, 2]; without it, each line's field count says which).
Images are the files with a suffix Ultralytics reads, found recursively. The label of
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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handpose.errors import HandposeError
from handpose.shards import SPLITS
from handpose.skeleton import NUM_JOINTS
from handpose.sources import Dataset, Problem, Record, check_visibility

# The suffixes Ultralytics reads as images (ultralytics.data.utils.IMG_FORMATS).
IMAGE_SUFFIXES = frozenset({"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm", "heic"})
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
class Hand:
    """One parsed label line, normalised coordinates."""

    cls: int
    box: np.ndarray  # (4,) x0, y0, x1, y1
    uv: np.ndarray  # (21, 2)
    visibility: np.ndarray  # (21,) uint8


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
            loose = sum(1 for e in it if e.is_file() and e.name.rpartition(".")[2].lower() in IMAGE_SUFFIXES)
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


def find_folders(src: Path, *, resplit: bool = True) -> tuple[list[Folder], str]:
    """The image folders of a dataset root and its layout name; HandposeError if none is found.

    `resplit`: a dataset in one split folder is re-split by pack's --split, so its folder fixes
    no split; False keeps the folder's own split name (predict's --split picks folders by it).
    """
    layouts = {
        "{split}/images": [(s, src / n / "images") for s, names in SPLIT_FOLDERS.items() for n in names],
        "images/{split}": [(s, src / "images" / n) for s, names in SPLIT_FOLDERS.items() for n in names],
    }
    found = {name: [Folder(s, p) for s, p in cands if p.is_dir()] for name, cands in layouts.items()}
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
            labels |= set(_walk(label_dir, lambda n: n.endswith(".txt")))
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
    """Image files under `folder` (recursive, hidden names skipped), by relative path."""
    return _walk(folder, lambda n: "." in n and n.rpartition(".")[2].lower() in IMAGE_SUFFIXES)


def _walk(folder: Path, keep: Any) -> list[str]:
    """Paths (str) of the files under `folder` whose name passes `keep`, by relative path."""
    out: list[tuple[str, str]] = []
    start = len(str(folder)) + 1
    for d, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        prefix = d[start:].replace(os.sep, "/")
        prefix = prefix + "/" if prefix else ""
        out += [(prefix + n, os.path.join(d, n)) for n in filenames if not n.startswith(".") and keep(n)]
    return [path for _, path in sorted(out)]


def read_label(
    path: str | Path, rel: str, dims: int | None
) -> tuple[dict[int, tuple[int, Hand]], list[Problem]]:
    """A label file -> ({hand: (line number, Hand)}, problems naming `rel`:line)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        return {}, [Problem(None, rel, f"unreadable label file ({e.strerror})")]
    except UnicodeDecodeError:
        return {}, [Problem(None, rel, "not a text file (not UTF-8)")]
    lines = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) > MAX_HANDS:
        return {}, [Problem(None, rel, f"{len(lines)} hands; at most {MAX_HANDS} per image")]
    hands: dict[int, tuple[int, Hand]] = {}
    problems: list[Problem] = []
    for hand, (n, fields) in enumerate(lines):
        try:
            hands[hand] = (n, parse_line(fields, dims))
        except ValueError as e:
            problems.append(Problem(None, f"{rel}:{n}", str(e)))
    return hands, problems


def parse_line(fields: list[str], dims: int | None) -> Hand:
    """One label line's fields -> Hand; ValueError says what is wrong (see the module doc)."""
    n = len(fields)
    allowed = (dims,) if dims else (3, 2)
    d = next((k for k in allowed if n == 5 + NUM_JOINTS * k), None)
    if d is None:
        raise ValueError(_count_message(n, allowed))
    try:
        a = np.array(fields, dtype=np.float64)
    except ValueError:  # name the first field that is no number
        k, f = next((k, f) for k, f in enumerate(fields, 1) if not _is_number(f))
        raise ValueError(f"field {k} {f!r} is not a number") from None
    if not np.isfinite(a).all():
        k = int(np.argmax(~np.isfinite(a)))
        raise ValueError(f"field {k + 1} is {fields[k]} (not a finite number)")
    if a[0] < 0 or a[0] != int(a[0]):
        raise ValueError(f"class {fields[0]!r} is not a whole number >= 0")
    cx, cy, w, h = a[1:5]
    for name, v in (("cx", cx), ("cy", cy), ("w", w), ("h", h)):
        if not -TOLERANCE <= v <= 1 + TOLERANCE:
            raise ValueError(f"box {name} = {v:g} is outside [0, 1] (tolerance {TOLERANCE})")
    if not (w > 0 and h > 0):
        raise ValueError(f"box w = {w:g}, h = {h:g}: an empty box")
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
    box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return Hand(int(a[0]), box, uv, vis)


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


Entry = tuple[int, str, list[tuple[int, str]]]  # line number, inline value, the block lines below


def read_dataset_yaml(path: Path, *, resplit: bool = True) -> tuple[Path, list[Folder], int | None]:
    """A dataset yaml -> (root, image folders with their splits, keypoint dims or None);
    `resplit` as in `find_folders`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HandposeError(f"{path}: unreadable yaml: {e}") from None
    entries = yaml_entries(text, path)
    root = _yaml_root(path, entries.get("path"))
    folders: list[Folder] = []
    for split in ("train", "val", "test"):
        if split in entries:
            for value in _strings(entries[split], path, split):
                folders.append(Folder(split, _yaml_folder(path, root, split, value, entries[split][0])))
    if not folders:
        raise HandposeError(f"{path}: no train, val or test folder")
    dims = _kpt_dims(entries["kpt_shape"], path) if "kpt_shape" in entries else None
    return root, (_one_split_resplits(folders) if resplit else folders), dims


def yaml_entries(text: str, path: Path) -> dict[str, Entry]:
    """The top-level `key: value` entries of a yaml file, with the indented block under each.

    Enough YAML for a dataset yaml: Ultralytics writes flat `key: value` pairs, flow lists
    (`[21, 3]`), block lists (`- a`) and nested blocks (`names:`, `download: |`) that handpose
    never reads; those are kept as raw lines and only interpreted if a needed key holds one.
    """
    entries: dict[str, Entry] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = _uncomment(lines[i])
        if not line.strip() or line.strip() in ("---", "..."):
            i += 1
            continue
        if line[0] in " \t-":
            raise HandposeError(f"{path}:{i + 1}: unexpected indented line {line.strip()!r}")
        key, colon, value = line.partition(":")
        if not colon or not key or key != key.strip() or (value and value[0] not in " \t"):
            raise HandposeError(f"{path}:{i + 1}: cannot read {line.strip()!r} (expected 'key: value')")
        block = []
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or lines[j][0] in " \t#" or lines[j].startswith("- ")):
            if _uncomment(lines[j]).strip():
                block.append((j + 1, _uncomment(lines[j])))
            j += 1
        entries[key.strip("'\"")] = (i + 1, value.strip(), block)
        i = j
    return entries


def _uncomment(line: str) -> str:
    """The line without its comment: a `#` at the start or after a space, outside quotes."""
    quote = None
    k = 0
    while k < len(line):
        c = line[k]
        if quote:
            if c == "\\" and quote == '"':
                k += 1
            elif c == quote:
                quote = None
        elif c in "'\"" and (k == 0 or line[k - 1] in " \t[,:-"):
            quote = c
        elif c == "#" and (k == 0 or line[k - 1] in " \t"):
            return line[:k].rstrip()
        k += 1
    return line.rstrip()


def _scalar(text: str, where: str) -> str | None:
    t = text.strip()
    if t in ("", "~", "null", "Null", "NULL"):
        return None
    if t[0] == "'" and t.endswith("'") and len(t) > 1:
        return t[1:-1].replace("''", "'")
    if t[0] == '"':
        try:
            value = json.loads(t)  # JSON strings are YAML's double-quoted scalars (common escapes)
        except ValueError:
            value = None
        if not isinstance(value, str):
            raise HandposeError(f"{where}: cannot read the quoted value {t}")
        return value
    if t[0] in "[]{}&*!|>%@`'\"":
        raise HandposeError(f"{where}: {t!r} is a YAML form handpose does not read here")
    return t


def _items(entry: Entry, path: Path, key: str) -> list[str | None] | None:
    """A list value (flow `[a, b]` or a block of `- a` lines), or None for a scalar."""
    n, value, block = entry
    if value.startswith("["):
        if not value.endswith("]"):
            raise HandposeError(f"{path}:{n}: {key}: a flow list must close on its line")
        return [_scalar(item, f"{path}:{n}: {key}") for item in _split_flow(value[1:-1])]
    if not value and block:
        items = []
        for m, line in block:
            s = line.strip()
            if not s.startswith("- ") and s != "-":
                raise HandposeError(f"{path}:{m}: {key}: expected a list item '- value', got {s!r}")
            items.append(_scalar(s[1:], f"{path}:{m}: {key}"))
        return items
    return None


def _split_flow(inner: str) -> list[str]:
    """'a, "b, c", d' -> ['a', '"b, c"', 'd'] (commas inside quotes kept)."""
    items, quote, start = [], None, 0
    for k, c in enumerate(inner):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == ",":
            items.append(inner[start:k])
            start = k + 1
    items.append(inner[start:])
    return [s for s in items if s.strip()] if len(items) > 1 or inner.strip() else []


def _strings(entry: Entry, path: Path, key: str) -> list[str]:
    items = _items(entry, path, key)
    if items is None:
        if entry[2] and not entry[1]:
            raise HandposeError(f"{path}:{entry[0]}: {key}: expected a folder or a list of folders")
        value = _scalar(entry[1], f"{path}:{entry[0]}: {key}")
        items = [value] if value is not None else []
    return [s for s in items if s is not None]


def _yaml_root(path: Path, entry: Entry | None) -> Path:
    if entry is None or (value := _scalar(entry[1], f"{path}:{entry[0]}: path")) is None:
        return path.parent
    p = Path(value).expanduser()
    if p.is_absolute():
        root = p
    else:  # the yaml's folder first; Ultralytics takes it from the working directory
        root = path.parent / p
        if not root.is_dir() and (Path.cwd() / p).is_dir():
            root = Path.cwd() / p
    if not root.is_dir():
        raise HandposeError(
            f"{path}:{entry[0]}: path {value!r}: folder not found (a relative path is taken from "
            f"the yaml's folder, then from the working directory)"
        )
    return Path(os.path.abspath(root))


def _yaml_folder(path: Path, root: Path, key: str, value: str, n: int) -> Path:
    folder = Path(value).expanduser()
    folder = folder if folder.is_absolute() else root / folder
    if not folder.exists() and value.startswith("../"):  # Ultralytics' rule for Roboflow's yamls
        folder = root / value[3:]
    if folder.suffix == ".txt":
        raise HandposeError(f"{path}:{n}: {key}: {value} is an image list file; handpose reads image folders")
    if not folder.is_dir():
        raise HandposeError(f"{path}:{n}: {key}: folder {value!r} not found under {root}")
    return Path(os.path.abspath(folder))


def _kpt_dims(entry: Entry, path: Path) -> int:
    items = _items(entry, path, "kpt_shape")
    try:
        shape = [int(s) for s in items] if items is not None else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        shape = None
    if shape is None or len(shape) != 2:
        raise HandposeError(f"{path}:{entry[0]}: kpt_shape {entry[1]!r}: expected [21, 3] or [21, 2]")
    if shape[0] != NUM_JOINTS or shape[1] not in (2, 3):
        raise HandposeError(
            f"{path}:{entry[0]}: kpt_shape {shape}: handpose reads {NUM_JOINTS} keypoints of 2 or 3 values"
        )
    return shape[1]

"""Label a photo folder with the MediaPipe Hands teacher and write a YOLO-pose dataset.

    make teacher-env
    .venv-teacher/bin/python tools/teacher_label.py SRC DEST [options]

Walks SRC recursively (the image suffixes handpose reads), runs MediaPipe Hands 0.10.21 (static
images, model complexity 1, up to --max-hands) on each photo and on its mirror, keeps the
confident answers (handpose/teacher.py says which and why) and writes into DEST:

  {split}/images/REL        the photo (hard-linked, else copied), REL = its path under SRC
  {split}/labels/REL.txt    one line per kept hand: 0 cx cy w h x1 y1 v1 ... x21 y21 v21
  dataset.yaml              for `handpose pack DEST/dataset.yaml SHARDS --format yolo` (or DEST)
  report.json, report.md    photos in, kept, hands dropped per reason, per folder and group
  voc.json, boxes/          with --voc: every VOC hand box, which ones the teacher labelled, and
                            a second variant whose unlabelled VOC hands are box-only lines
  .teacher-cache/REL.json   the teacher's raw answers about each photo (a re-run reuses them)

Photos without a kept hand get no file in DEST: they hold hands without labels, so they are no
background photos. Splits: everything in --split (default train; pack re-splits a dataset in
one split by its --split), or photos chosen by --val-folders, --val-match or --val-list in val
and the rest in train. Deterministic; never writes outside DEST. Needs mediapipe==0.10.21 and
numpy<2 (its own environment: `make teacher-env`); handpose itself never imports mediapipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handpose.atomic import check_output_dir, inside, write_json, write_text  # noqa: E402
from handpose.errors import HandposeError  # noqa: E402
from handpose.sources.files import walk  # noqa: E402  (not sources.yolo: it needs pyyaml)
from handpose.teacher import (  # noqa: E402
    REASONS,
    Answer,
    PhotoResult,
    Rules,
    box_only_line,
    judge,
    read_voc,
    scale_boxes,
    to_pixels,
    yolo_line,
)

GRAPH = "mediapipe/modules/hand_landmark/hand_landmark_tracking_cpu.binarypb"
RAW_DETECTION = 0.1  # the graph's palm threshold: low, so the cache holds the weak answers too
PALM_JOINTS = (0, 5, 9, 13, 17)  # wrist and knuckles: where the palm detection box sits
CACHE = ".teacher-cache"
WRITTEN = ".teacher-files.json"  # what the last run wrote, so a re-run can retract stale files
JOURNAL = ".teacher-files.journal"  # what this run is writing (what a crashed run wrote)
SPLITS = ("train", "val", "test")
Answerer = Callable[[np.ndarray], list[Answer]]  # RGB uint8 image -> the hands found in it
TeacherFactory = Callable[[argparse.Namespace], tuple[dict[str, Any], Answerer]]


# ---- the teacher ---------------------------------------------------------------------------------


class Teacher:
    """MediaPipe Hands' CPU graph, as `mp.solutions.hands.Hands(static_image_mode=True)` builds it,
    observing the palm detections as well: the legacy solution is the one whose models ship in
    the 0.10.21 wheel (the Tasks HandLandmarker needs a hand_landmarker.task it would download),
    and its graph gives the palm detection score beside the handedness score. The hand-presence
    score is thresholded inside the graph (`min_presence`) and never comes out."""

    def __init__(self, max_hands: int, complexity: int, min_presence: float) -> None:
        from mediapipe.python.solution_base import SolutionBase

        self.graph = SolutionBase(
            binary_graph_path=GRAPH,
            side_inputs={"model_complexity": complexity, "num_hands": max_hands, "use_prev_landmarks": False},
            calculator_params={
                "palmdetectioncpu__TensorsToDetectionsCalculator.min_score_thresh": RAW_DETECTION,
                "handlandmarkcpu__ThresholdingCalculator.threshold": min_presence,
            },
            outputs=["multi_hand_landmarks", "multi_handedness", "palm_detections"],
        )

    def answer(self, rgb: np.ndarray) -> list[Answer]:
        """The hands MediaPipe finds in an RGB uint8 image, each with its palm detection's score."""
        r = self.graph.process({"image": rgb})
        palms = []
        for d in r.palm_detections or []:
            b = d.location_data.relative_bounding_box
            palms.append((float(d.score[0]), np.array([b.xmin + b.width / 2, b.ymin + b.height / 2])))
        answers = []
        for lm, hd in zip(r.multi_hand_landmarks or [], r.multi_handedness or [], strict=True):
            uv = np.array([[p.x, p.y] for p in lm.landmark], np.float64)
            c = hd.classification[0]
            answers.append([uv, str(c.label), float(c.score)])
        scores = palm_scores([a[0][list(PALM_JOINTS)].mean(axis=0) for a in answers], palms)
        return [
            Answer(uv, label, score, det) for (uv, label, score), det in zip(answers, scores, strict=True)
        ]


def palm_scores(centres: list[np.ndarray], palms: list[tuple[float, np.ndarray]]) -> list[float]:
    """Each hand's palm detection score: the palm whose box centre is nearest the hand's palm
    joints, greedily, each palm used once (0 where none is left)."""
    pairs = sorted(
        (float(np.linalg.norm(c - p)), i, j) for i, c in enumerate(centres) for j, (_, p) in enumerate(palms)
    )
    out = [0.0] * len(centres)
    done: set[int] = set()
    used: set[int] = set()
    for _, i, j in pairs:
        if i not in done and j not in used:
            out[i] = palms[j][0]
            done.add(i)
            used.add(j)
    return out


# ---- options and photos ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    path: Path  # in SRC
    rel: str  # posix path under SRC
    folder: str  # first component of rel ("." for photos directly in SRC)
    group: str | None  # --group's match
    split: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="photo folder (searched recursively)")
    p.add_argument("dest", type=Path, help="output folder: the YOLO-pose dataset, its report and cache")
    p.add_argument("--max-hands", type=int, default=2, help="hands per photo the teacher looks for [2]")
    p.add_argument(
        "--model-complexity", type=int, default=1, choices=(0, 1), help="MediaPipe's landmark model [1]"
    )
    p.add_argument(
        "--min-presence", type=float, default=0.5, help="hand-presence threshold inside MediaPipe [0.5]"
    )
    d = Rules()
    p.add_argument(
        "--min-detection",
        type=float,
        default=d.min_detection,
        help=f"palm detection score [{d.min_detection}]",
    )
    p.add_argument(
        "--min-handedness",
        type=float,
        default=d.min_handedness,
        help=f"handedness score [{d.min_handedness}]",
    )
    p.add_argument(
        "--mirror-tolerance",
        type=float,
        default=d.mirror_tolerance,
        help=f"mean keypoint distance photo vs mirror, fraction of the box side [{d.mirror_tolerance}]",
    )
    p.add_argument(
        "--min-inside", type=int, default=d.min_inside, help=f"joints inside the image [{d.min_inside}]"
    )
    p.add_argument(
        "--keep-hands",
        type=int,
        default=None,
        help="keep at most this many hands per photo, best palm scores first",
    )
    p.add_argument("--voc", action="store_true", help="read NAME.xml beside each photo: its VOC hand boxes")
    p.add_argument("--min-iou", type=float, default=d.min_iou, help=f"teacher box vs VOC box [{d.min_iou}]")
    p.add_argument(
        "--split", default="train", choices=SPLITS, help="the split of every photo not sent to val [train]"
    )
    p.add_argument(
        "--val-folders", default="", help="comma-separated first-level subfolders of SRC that go to val"
    )
    p.add_argument(
        "--val-match", default=None, help="photos whose path under SRC matches this regex go to val"
    )
    p.add_argument(
        "--val-list", type=Path, default=None, help="file of photo names or paths under SRC that go to val"
    )
    p.add_argument(
        "--group", default=None, help="regex on the path under SRC; its first group is a report group"
    )
    p.add_argument("--copy", action="store_true", help="copy photos into DEST instead of hard-linking them")
    return p.parse_args(argv)


def find_photos(args: argparse.Namespace) -> list[Photo]:
    src = Path(os.path.abspath(args.src))
    if not src.is_dir():
        raise HandposeError(f"{args.src}: not a folder")
    val_folders = {f for f in args.val_folders.split(",") if f}
    val_match = _regex(args.val_match, "--val-match")
    group = _regex(args.group, "--group")
    val_names = _read_list(args.val_list) if args.val_list else set()
    photos = []
    start = len(str(src)) + 1
    for path in walk(src):
        rel = path[start:].replace(os.sep, "/")
        folder = rel.split("/")[0] if "/" in rel else "."
        to_val = (
            folder in val_folders
            or (val_match is not None and val_match.search(rel) is not None)
            or rel in val_names
            or rel.rsplit("/", 1)[-1] in val_names
        )
        m = group.search(rel) if group else None
        g = (m.group(1) if m.groups() else m.group(0)) if m else None
        photos.append(Photo(Path(path), rel, folder, g, "val" if to_val else args.split))
    if not photos:
        raise HandposeError(f"{args.src}: no photos (searched recursively)")
    missing = val_folders - {p.folder for p in photos}
    if missing:
        raise HandposeError(f"--val-folders: no photos in {', '.join(sorted(missing))} under {args.src}")
    return photos


def _regex(text: str | None, flag: str) -> re.Pattern[str] | None:
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as e:
        raise HandposeError(f"{flag} {text!r}: not a regular expression ({e})") from None


def _read_list(path: Path) -> set[str]:
    try:
        return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as e:
        raise HandposeError(f"--val-list {path}: unreadable ({e})") from None


def check_folders(src: Path, dest: Path) -> Path:
    """DEST must be a writable folder that neither holds SRC nor lies inside it."""
    check_output_dir(dest, "DEST")
    s, d = Path(os.path.realpath(src)), Path(os.path.realpath(dest))
    if s == d or s in d.parents or d in s.parents:
        raise HandposeError(f"DEST {dest} and SRC {src} overlap: write the dataset elsewhere")
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---- one photo: answers (cached) ------------------------------------------------------------------


def load_rgb(path: Path) -> np.ndarray:
    """The photo as displayed (EXIF orientation applied, as handpose reads it), RGB uint8."""
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError) as e:
        raise HandposeError(f"{path}: unreadable image ({e})") from None


def answers(photo: Photo, dest: Path, settings: dict[str, Any], answer: Answerer) -> dict[str, Any]:
    """The teacher's answers about a photo and its mirror, from DEST's cache when it holds them
    for these bytes and settings; else the teacher runs and the cache is written."""
    data = photo.path.read_bytes()
    key = dict(settings, sha256=hashlib.sha256(data).hexdigest())
    cache = inside(dest, dest / CACHE / (photo.rel + ".json"))
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    rgb = load_rgb(photo.path)
    t0 = time.perf_counter()
    found = answer(rgb)
    mirrored = answer(np.ascontiguousarray(rgb[:, ::-1]))
    entry = {
        "key": key,
        "size": [int(rgb.shape[1]), int(rgb.shape[0])],
        "photo": [a.to_json() for a in found],
        "mirror": [a.to_json() for a in mirrored],
        "seconds": round(time.perf_counter() - t0, 4),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache, entry)
    return entry


def voc_boxes(photo: Photo, width: int, height: int) -> list[np.ndarray] | None:
    xml = photo.path.with_suffix(".xml")
    if not xml.is_file():
        return None
    try:
        claimed, boxes = read_voc(xml)
    except (OSError, ValueError) as e:
        raise HandposeError(f"{xml}: {e}") from None
    return scale_boxes(boxes, claimed, width, height)


# ---- writing -----------------------------------------------------------------------------------------


def place_photo(src: Path, dst: Path, copy: bool) -> None:
    """Hard-link (else copy) `src` to `dst` through a temp name; nothing to do when it is there."""
    if dst.exists():
        if dst.samefile(src) or (
            dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes()
        ):
            return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        if copy:
            raise OSError("copy asked for")
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class Writer:
    """Every file of DEST goes through here: checked to lie inside DEST and journaled before it is
    written, so a re-run (after a crash too) retracts the files an earlier run wrote that this one
    does not (and nothing else)."""

    def __init__(self, dest: Path, copy: bool) -> None:
        self.dest, self.copy = dest, copy
        self.files: set[str] = set()
        self.journal = open(dest / JOURNAL, "a", encoding="utf-8")  # noqa: SIM115 (closed by retract_stale)

    def _claim(self, rel: str) -> Path:
        path = inside(self.dest, self.dest / rel)
        if rel not in self.files:
            self.journal.write(rel + "\n")
            self.journal.flush()
            self.files.add(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def photo(self, src: Path, rel: str) -> None:
        place_photo(src, self._claim(rel), self.copy)

    def text(self, rel: str, text: str) -> None:
        path = self._claim(rel)
        if not (path.is_file() and path.read_text() == text):
            write_text(path, text)

    def retract_stale(self) -> int:
        """Delete what earlier runs wrote and this one did not; record what this one wrote."""
        self.journal.close()
        record, journal = self.dest / WRITTEN, self.dest / JOURNAL
        before = set(json.loads(record.read_text())) if record.is_file() else set()
        before |= set(journal.read_text(encoding="utf-8").split("\n")) - {""}
        stale = sorted(before - self.files)
        for rel in stale:
            path = inside(self.dest, self.dest / rel)
            if path.is_file():
                path.unlink()
            _remove_empty_parents(path.parent, self.dest)
        write_json(record, sorted(self.files))
        journal.unlink()
        return len(stale)


def _remove_empty_parents(folder: Path, dest: Path) -> None:
    """Remove `folder` and its parents below DEST while they are empty (left by retracted files,
    so that an emptied split folder does not look like a split)."""
    while folder != dest and dest in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): stop
            return
        folder = folder.parent


def label_rel(split: str, rel: str, root: str = "") -> tuple[str, str]:
    stem = rel.rsplit(".", 1)[0]
    return f"{root}{split}/images/{rel}", f"{root}{split}/labels/{stem}.txt"


def dataset_yaml(splits: list[str]) -> str:
    lines = [
        "# Written by tools/teacher_label.py: MediaPipe Hands answers kept by handpose/teacher.py",
        "path: .",
    ]
    lines += [f"{s}: {s}/images" for s in splits]
    lines += ["kpt_shape: [21, 3]", "names:", "  0: hand", ""]
    return "\n".join(lines)


# ---- the run -----------------------------------------------------------------------------------------


def mediapipe_teacher(args: argparse.Namespace) -> tuple[dict[str, Any], Answerer]:
    """The settings that key the cache, and MediaPipe's answer function (its graph is built on
    the first photo that is not in the cache)."""
    from importlib.metadata import version

    settings = {
        "mediapipe": version("mediapipe"),
        "graph": GRAPH.rsplit("/", 1)[1],
        "model_complexity": args.model_complexity,
        "max_hands": args.max_hands,
        "raw_detection": RAW_DETECTION,
        "min_presence": args.min_presence,
    }
    built: list[Teacher] = []

    def answer(rgb: np.ndarray) -> list[Answer]:
        if not built:
            built.append(Teacher(args.max_hands, args.model_complexity, args.min_presence))
        return built[0].answer(rgb)

    return settings, answer


def run(argv: list[str] | None = None, teacher: TeacherFactory = mediapipe_teacher) -> dict[str, Any]:
    """The whole tool: options -> DEST (see the module doc); returns the report. `teacher` gives
    the cache settings and the answer function (tests give a fake one)."""
    args = parse_args(argv)
    photos = find_photos(args)
    dest = check_folders(args.src, args.dest)
    rules = Rules(
        min_detection=args.min_detection,
        min_handedness=args.min_handedness,
        mirror_tolerance=args.mirror_tolerance,
        min_inside=args.min_inside,
        min_iou=args.min_iou,
        keep_hands=args.keep_hands,
    )
    settings, answer = teacher(args)
    writer = Writer(dest, args.copy)
    stats = Stats(bool(args.voc))
    voc_rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for k, photo in enumerate(photos, 1):
        entry = answers(photo, dest, settings, answer)
        width, height = entry["size"]
        photo_hands = [Answer.from_json(a) for a in entry["photo"]]
        mirror_hands = [Answer.from_json(a) for a in entry["mirror"]]
        boxes = voc_boxes(photo, width, height) if args.voc else None
        result = judge(photo_hands, mirror_hands, width, height, rules, boxes)
        stats.add(photo, result, float(entry["seconds"]))
        lines = [yolo_line(to_pixels(v.answer.uv, width, height), v.box, width, height) for v in result.kept]
        if lines:
            image_rel, label = label_rel(photo.split, photo.rel)
            writer.photo(photo.path, image_rel)
            writer.text(label, "\n".join(lines) + "\n")
        if boxes is not None:
            voc_rows.append(voc_row(photo, result))
            extra = [
                box_only_line(b, width, height)
                for b, done in zip(boxes, result.voc_labelled, strict=True)
                if not done
            ]
            if lines or extra:  # the variant a detector reads: every VOC hand boxed
                image_rel, label = label_rel(photo.split, photo.rel, "boxes/")
                writer.photo(photo.path, image_rel)
                writer.text(label, "\n".join(lines + extra) + "\n")
        if k % 500 == 0 or k == len(photos):
            print(
                f"{k}/{len(photos)} photos, {stats.hands_kept} hands kept, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    splits = [s for s in SPLITS if any(f.startswith(f"{s}/") for f in writer.files)]
    writer.text("dataset.yaml", dataset_yaml(splits))
    if args.voc:
        writer.text("voc.json", json.dumps(voc_rows, indent=1, sort_keys=True) + "\n")
        box_splits = [s for s in SPLITS if any(f.startswith(f"boxes/{s}/") for f in writer.files)]
        writer.text("boxes/dataset.yaml", dataset_yaml(box_splits))
    report = stats.report(args, settings, rules, splits, time.perf_counter() - t0)
    writer.text("report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    writer.text("report.md", render_markdown(report))
    report["stale_files_removed"] = writer.retract_stale()
    print(render_markdown(report).split("\n## ")[0])
    return report


def voc_row(photo: Photo, result: PhotoResult) -> dict[str, Any]:
    """voc.json: a photo's VOC boxes (pixels), which a kept teacher hand labels, and the IoU."""
    hands = {v.voc: v for v in result.kept if v.voc is not None}
    return {
        "photo": photo.rel,
        "split": photo.split,
        "boxes": [[round(float(x), 2) for x in b] for b in result.voc_boxes],
        "labelled": result.voc_labelled,
        "iou": [
            round(hands[j].voc_iou or 0.0, 4) if j in hands else None for j in range(len(result.voc_boxes))
        ],
        "all_labelled": all(result.voc_labelled),
    }


# ---- the report --------------------------------------------------------------------------------------


class Stats:
    """Counts per photo set, per first-level folder and per --group."""

    def __init__(self, voc: bool) -> None:
        self.voc = voc
        self.rows: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self.hands_per_photo: Counter[int] = Counter()
        self.seconds = 0.0
        self.hands_kept = 0
        self.errors: list[float] = []
        self.scores: dict[str, list[float]] = {"detection": [], "handedness": []}

    def add(self, photo: Photo, result: PhotoResult, seconds: float) -> None:
        c: Counter[str] = Counter()
        c["photos"] += 1
        c["photos answered"] += bool(result.verdicts)
        c["photos kept"] += bool(result.kept)
        c[f"photos in {photo.split}"] += bool(result.kept)
        c["hands answered"] += len(result.verdicts)
        c["hands kept"] += len(result.kept)
        for v in result.verdicts:
            if v.reason:
                c[v.reason] += 1
        c["photos with a dropped hand"] += any(v.reason for v in result.verdicts)
        if self.voc:
            c["VOC hands"] += len(result.voc_boxes)
            c["VOC hands labelled"] += sum(result.voc_labelled)
            c["photos with an unlabelled VOC hand"] += not all(result.voc_labelled)
        keys = [("all", "all"), ("folder", photo.folder)] + ([("group", photo.group)] if photo.group else [])
        for key in keys:
            self.rows[key].update(c)
        self.hands_per_photo[len(result.kept)] += 1
        self.seconds += seconds
        self.hands_kept += len(result.kept)
        for v in result.kept:
            self.errors.append(v.mirror_error or 0.0)
        for v in result.verdicts:
            self.scores["detection"].append(v.answer.detection_score)
            self.scores["handedness"].append(v.answer.handedness_score)

    def report(
        self, args: Any, settings: dict, rules: Rules, splits: list[str], wall: float
    ) -> dict[str, Any]:
        def table(kind: str) -> dict[str, dict[str, int]]:
            return {name: dict(sorted(c.items())) for (k, name), c in sorted(self.rows.items()) if k == kind}

        def pct(values: list[float]) -> dict[str, float] | None:
            if not values:
                return None
            q = np.percentile(values, [10, 50, 90])
            return {"p10": round(float(q[0]), 4), "p50": round(float(q[1]), 4), "p90": round(float(q[2]), 4)}

        return {
            "src": os.path.abspath(args.src),
            "settings": settings,
            "rules": vars(rules) | {"box_ratio": BOX_RATIO_NOTE},
            "splits": splits,
            "reasons": list(REASONS),
            "all": table("all").get("all", {}),
            "folders": table("folder"),
            "groups": table("group"),
            "hands_per_photo": {str(k): v for k, v in sorted(self.hands_per_photo.items())},
            "kept_mirror_error": pct(self.errors),
            "answered_scores": {k: pct(v) for k, v in self.scores.items()},
            "teacher_seconds": round(self.seconds, 1),
        }


BOX_RATIO_NOTE = "keypoint extent + (1.174 - 1) / 2 of its longer side on every side, clipped"


def render_markdown(rep: dict[str, Any]) -> str:
    a = rep["all"]
    photos = a.get("photos", 0)
    out = [
        f"# Teacher labels of {rep['src']}",
        "",
        f"{photos} photos in; {a.get('photos answered', 0)} with a hand answered; "
        f"**{a.get('photos kept', 0)} kept** with {a.get('hands kept', 0)} hands "
        f"(of {a.get('hands answered', 0)} answered); splits: {', '.join(rep['splits']) or 'none'}.",
        f"Teacher time: {rep['teacher_seconds']} s (MediaPipe on each photo and its mirror, summed).",
        f"Hands per photo (kept): {rep['hands_per_photo']}.",
        f"Mirror error of kept hands (fraction of the box side): {rep['kept_mirror_error']}.",
        f"Scores of answered hands: {rep['answered_scores']}.",
        f"Settings: {rep['settings']}. Rules: {rep['rules']}.",
        "",
    ]
    cols = ["photos", "photos kept", "hands answered", "hands kept", *rep["reasons"]]
    if "VOC hands" in a:
        cols = [c for c in cols] + ["VOC hands", "VOC hands labelled", "photos with an unlabelled VOC hand"]
    for title, rows in (("All", {"all": a}), ("By folder", rep["folders"]), ("By group", rep["groups"])):
        if not rows:
            continue
        out += [f"## {title}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, c in rows.items():
            out.append(f"| {name} | " + " | ".join(str(c.get(k, 0)) for k in cols) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    try:
        run()
    except HandposeError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""What `handpose predict` writes: each chunk's lines, and rank 0's merged result at the end.

Per chunk (`chunk_outputs`), from its images as the inference path left them (`InputImage`):
  predictions.jsonl  one line per prediction (`prediction_line`), errors.jsonl one per input or
  label line that could not be used, coco.jsonl one COCO keypoint result each, spill.f32 one
  report row (`report.spill_rows`) per prediction matched to a labelled hand (`match_hands`);
  the rank's `RankState` (counts, the worst and best hands, the first hands) goes into its
  checkpoint with them (predict_staging).
At the end, rank 0 (`finish`): merge the parts, the COCO array, the report (report.py), the
overlays, run.json's record, and the commit (predict_staging).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from handpose import report
from handpose.imageio import decode_image
from handpose.inference import Crop
from handpose.predict_inputs import BadInput, BoxTask, Hands, LabelledHand, Source, read_bytes
from handpose.predict_staging import (
    COCO_LINES,
    ERRORS,
    PREDICTIONS,
    SPILL,
    Staging,
    merge_parts,
    part_state,
    write_coco_array,
)
from handpose.predict_video import frame_image, write_overlay_videos


@dataclass
class InputImage:
    """One input image on its way through a chunk: where it came from, its labelled hands, the
    boxes it is predicted in (one task each) and the inference path's crop of each task."""

    src: Source
    width: int
    height: int
    hands: Hands | None
    tasks: list[BoxTask]
    crops: list[Crop]  # one per task, keypoints filled in by `inference.Runner.run`
    problems: list[BadInput]  # of its label file (the image's other hands still count)


def keep_counts(overlays: int) -> tuple[int, int]:
    """(worst, best) hands to keep: the report's tables and gallery, and --overlays N (labelled:
    the worst ceil(N/2) and the best floor(N/2))."""
    return max(report.EXTREMES, (overlays + 1) // 2), max(report.EXTREMES, overlays // 2)


@dataclass
class RankState:
    """A rank's running state, checkpointed with every chunk: counts and the kept hands."""

    counts: Counter[str]
    extremes: report.Extremes  # the worst and best scored hands
    first_hands: list[dict[str, Any]]  # unlabelled runs: the first predictions, for --overlays

    @classmethod
    def load(cls, data: dict[str, Any], worst: int, best: int) -> RankState:
        return cls(
            Counter(data.get("counts", {})),
            report.Extremes(worst, best).load(data.get("extremes", {})),
            list(data.get("first", [])),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "extremes": self.extremes.to_json(),
            "first": self.first_hands,
        }


# ---------------------------------------------------------------------------------------------
# One chunk


def chunk_outputs(cid: int, opened: list[Any], state: RankState, overlays: int) -> dict[str, bytes]:
    """The bytes one predicted chunk adds to each part file (InputImages and BadInputs in input
    order); updates `state` (`overlays`: how many first hands an unlabelled run keeps)."""
    preds, errors, coco, spill = [], [], [], []
    position = 0
    for x in opened:
        if isinstance(x, BadInput):
            errors.append(error_line(x))
            state.counts["errors"] += 1
            continue
        errors += [error_line(p) for p in x.problems]
        state.counts["label_problems"] += len(x.problems)
        matches = match_hands(x)
        state.counts["images"] += 1
        state.counts["images_without_boxes"] += not x.tasks
        if x.hands:
            state.counts["hands_labelled"] += len(x.hands)
            state.counts["hands_missed"] += len(x.hands) - sum(m is not None for m in matches)
            state.counts["images_scored"] += any(m is not None for m in matches)
        for k in range(len(x.tasks)):
            order = [cid, position]
            position += 1
            hand = x.hands[matches[k]] if matches[k] is not None and x.hands else None
            row, entry = _score(x, k, hand, order)
            preds.append(prediction_line(x, k, entry))
            coco.append(json.dumps(coco_result(x, k)) + "\n")
            state.counts["predictions"] += 1
            if row is not None:
                spill.append(row)
                state.extremes.add(entry)
            elif len(state.first_hands) < overlays:
                state.first_hands.append(entry)
    return {
        PREDICTIONS: "".join(preds).encode(),
        ERRORS: "".join(errors).encode(),
        COCO_LINES: "".join(coco).encode(),
        SPILL: np.concatenate(spill).astype("<f4").tobytes() if spill else b"",
    }


def match_hands(img: InputImage) -> list[int | None]:
    """The labelled hand each prediction is scored against (None: none). --boxes gt: the box's own
    hand. Otherwise greedily by the lowest mean error over the hand's labelled joints: each
    labelled hand and each prediction is used once (a whole-image prediction on a photo with
    three hands is scored against the hand it found)."""
    n = len(img.tasks)
    if not img.hands or not n:
        return [None] * n
    if any(t.label is not None for t in img.tasks):
        return [t.label for t in img.tasks]
    pairs = []
    for i in range(n):
        for j, hand in enumerate(img.hands):
            e = report.image_errors(img.crops[i].uv[None], hand.uv[None], hand.labelled[None])[0]  # type: ignore[index]
            if np.isfinite(e):
                pairs.append((float(e), i, j))
    match: list[int | None] = [None] * n
    used: set[int] = set()
    for _, i, j in sorted(pairs):
        if match[i] is None and j not in used:
            match[i] = j
            used.add(j)
    return match


def _score(
    img: InputImage, k: int, hand: LabelledHand | None, order: list[int]
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The report row of prediction k (None without a labelled hand) and its entry: what the
    overlays and the worst/best tables need to find and draw it again."""
    crop = img.crops[k]
    uv, box = np.asarray(crop.uv), crop.final_box
    entry: dict[str, Any] = {
        "path": img.src.path,
        "hand": img.tasks[k].hand,
        "order": order,
        "file": img.src.file,
        "sample": img.src.sample,
        "frame": img.src.frame,
        "pred": np.round(uv, 3).tolist(),
        "box": None if box is None else np.round(box, 3).tolist(),
        "region": [round(float(v), 3) for v in crop.region],
    }
    if hand is None:
        return None, entry
    side = float(max(img.width, img.height))
    gt_side = report.box_side(hand.box)
    row = report.spill_rows(uv[None], hand.uv[None], hand.labelled[None], [side], [gt_side], [crop.region[2]])
    err = float(report.image_errors(uv[None], hand.uv[None], hand.labelled[None])[0])
    entry.update(
        error_px=err,
        error_pct=err / side * 100.0,
        error_pct_box=err / gt_side * 100.0,
        gt=np.round(hand.uv, 3).tolist(),
        labelled=hand.labelled.astype(int).tolist(),
    )
    return row, entry


def error_line(p: BadInput) -> str:
    """An errors.jsonl line: {"path", "reason"}."""
    return json.dumps({"path": p.path, "reason": p.reason}) + "\n"


def prediction_line(img: InputImage, k: int, entry: dict[str, Any]) -> str:
    """A predictions.jsonl line (see predict.py's docstring)."""
    task, crop = img.tasks[k], img.crops[k]
    src = img.src
    frame = {"frame": src.frame, "time": round(src.time or 0.0, 6)} if src.frame is not None else {}
    rec: dict[str, Any] = {
        "path": src.path,
        **frame,
        "width": img.width,
        "height": img.height,
        "hand": task.hand,
        "box": entry["box"],
        "keypoints": [
            [round(float(x), 3), round(float(y), 3), round(float(s), 4)]
            for (x, y), s in zip(crop.uv, crop.score, strict=True)  # type: ignore[arg-type]
        ],
    }
    if task.score is not None:
        rec["box_score"] = round(task.score, 4)
    if "error_px" in entry:
        rec["error_px"] = round(entry["error_px"], 4)
        rec["error_pct_box"] = round(entry["error_pct_box"], 4)
    return json.dumps(rec) + "\n"


def coco_result(img: InputImage, k: int) -> dict[str, Any]:
    """A COCO keypoint-results entry; image_id from the labels (or a digits-only file stem), else
    the input's position (1-based)."""
    iid = img.src.image_id if img.src.image_id is not None else img.src.ordinal + 1
    crop = img.crops[k]
    uv, score = np.asarray(crop.uv), np.asarray(crop.score)
    kps = [round(float(v), 3) for (x, y), s in zip(uv, score, strict=True) for v in (x, y, s)]
    rec: dict[str, Any] = {
        "image_id": iid,
        "category_id": 1,
        "keypoints": kps,
        "score": round(float(score.mean()), 4),
    }
    box = crop.final_box
    if box is not None:
        rec["bbox"] = [round(float(v), 3) for v in (box[0], box[1], box[2] - box[0], box[3] - box[1])]
    return rec


# ---------------------------------------------------------------------------------------------
# Rank 0: merge, report, overlays, commit


def finish(
    staging: Staging,
    world_size: int,
    *,
    overlays: int,
    coco: str | None,
    model_size: int,
    run: dict[str, Any],
    seconds: float,
    console: Console,
    videos: list[str] | None = None,
    every: int = 1,
) -> dict[str, Any]:
    """Merge the ranks' parts, write the COCO results, the report and the overlays into the
    staging folder's final/, and commit them into OUT with run.json's record (`run`: what the job
    was, added to the counts); `videos`: write their overlay videos (--overlay-video, every
    `every`-th frame). Returns the record with the report."""
    keep = keep_counts(overlays)
    parts = [staging.part(r) for r in range(world_size)]
    states = [RankState.load(part_state(p), *keep) for p in parts]
    counts: Counter[str] = sum((s.counts for s in states), Counter())
    extremes = report.Extremes(*keep)
    for s in states:
        extremes.load(s.extremes.to_json())
    first = sorted((e for s in states for e in s.first_hands), key=lambda e: e["order"])[:overlays]
    final = staging.final
    merge_parts(parts, final)
    files = [PREDICTIONS, ERRORS]
    if coco is not None:
        (final / coco).parent.mkdir(parents=True, exist_ok=True)
        write_coco_array(final / COCO_LINES, final / coco)
        files.append(coco)
    rep = None
    if (final / SPILL).stat().st_size:
        rep = report.write_report(
            final,
            report.spill_blocks(final / SPILL),
            model_size=model_size,
            load_image=load_entry_image,
            counts={"images": counts["images_scored"], "hands_missed": counts["hands_missed"]},
            worst=extremes.worst(),
            best=extremes.best(),
            console=console,
        )
        if rep is not None:
            files += list(report.OUTPUTS)
    files += write_overlays(final, overlays, extremes, first)
    if videos:
        files += write_overlay_videos(final, final / PREDICTIONS, videos, every)
    fresh = counts["fresh_images"]
    record = {
        "images": counts["images"],
        "predictions": counts["predictions"],
        "errors": counts["errors"],
        "label_problems": counts["label_problems"],
        "images_without_boxes": counts["images_without_boxes"],
        "hands_labelled": counts["hands_labelled"],
        "hands_missed": counts["hands_missed"],
        "seconds": round(seconds, 3),
        "images_per_s": round(fresh / seconds, 3) if seconds > 0 else None,
        **run,
    }
    staging.plan_commit(files, record)
    staging.commit()
    console.print(
        f"predicted {record['predictions']} hands in {record['images']} images, {record['errors']} errors "
        f"-> {staging.out}"
    )
    return {**record, "report": rep, "out": str(staging.out)}


def commit_only(staging: Staging) -> dict[str, Any]:
    """Finish the commit an earlier run planned (everything else was done); its record."""
    record = staging.commit()
    return {**record, "report": _read_report(staging.out), "out": str(staging.out)}


def _read_report(out: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((out / "report.json").read_text())
    return None


def load_entry_image(entry: dict[str, Any]) -> np.ndarray:
    """The image of a kept hand (report gallery, overlays), read again from where it was (a
    video's frame: decoded again)."""
    if entry.get("frame") is not None:
        return frame_image(entry["file"], int(entry["frame"]))
    src = Source(0, entry["path"], entry["file"], "", sample=int(entry["sample"]))
    return decode_image(read_bytes(src))[0]


def write_overlays(final: Path, n: int, extremes: report.Extremes, first: list[dict[str, Any]]) -> list[str]:
    """--overlays N: labelled runs draw the worst ceil(N/2) and the best floor(N/2) hands with
    their ground truth; unlabelled runs the first N predictions. Returns the names written."""
    if n <= 0:
        return []
    worst, best = extremes.worst(), extremes.best()
    picks: list[tuple[str, dict[str, Any]]] = []
    if worst:
        ranked = [e for e in worst if np.isfinite(e["error_px"])]
        n_worst = min(len(ranked), (n + 1) // 2)
        shown = {tuple(e["order"]) for e in ranked[:n_worst]}
        better = [e for e in best if tuple(e["order"]) not in shown][: n // 2]
        picks = [(f"worst-{r:02d}", e) for r, e in enumerate(ranked[:n_worst], 1)]
        picks += [(f"best-{r:02d}", e) for r, e in enumerate(better, 1)]
    else:
        picks = [(f"{r:04d}", e) for r, e in enumerate(first, 1)]
    (final / "overlays").mkdir(parents=True, exist_ok=True)
    names = []
    for tag, e in picks:
        caption = f"{e['error_px']:.1f} px" if "error_px" in e else None
        frame = f"-frame{e['frame']}" if e.get("frame") is not None else ""
        name = f"overlays/{tag}-{Path(e['path']).stem}{frame}.png"
        report.save_png(report.draw_entry(load_entry_image(e), e, caption=caption), final / name)
        names.append(name)
    return names

"""What `handpose predict` writes: each chunk's lines, and rank 0's merged result at the end.

Per chunk (`chunk_outputs`), from its images as the inference path left them (`InputImage`):
  predictions.jsonl  one line per hand found (`prediction_line`), errors.jsonl one per input or
  label line that could not be used, coco.jsonl one COCO keypoint result each, spill.f32 one
  report row (`report.spill_rows`) per prediction paired with a labelled hand (`match_hands`),
  matches.u8 one record per prediction of a labelled photo (`detection_records`: its score and
  whether COCO's matching made it a true positive at each IoU and OKS threshold, for recall,
  precision and AP); the rank's `RankState` (counts, the worst and best hands, the first hands)
  goes into its checkpoint with them (predict_staging).
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

from handpose import metrics, report
from handpose.imageio import decode_image
from handpose.inference import Crop, Photo, refine_box
from handpose.predict_inputs import BadInput, Hands, LabelledHand, Source, read_bytes
from handpose.predict_staging import (
    COCO_LINES,
    ERRORS,
    MATCHES,
    PREDICTIONS,
    SPILL,
    Staging,
    merge_parts,
    part_state,
    write_coco_array,
)
from handpose.predict_video import frame_image, write_overlay_videos

# matches.u8: per prediction of a labelled photo, its ranking score and two bit sets (bit t: a
# true positive at metrics.THRESHOLDS[t]) by box IoU and by OKS.
MATCH_RECORD = np.dtype([("score", "<f4"), ("box", "<u2"), ("pose", "<u2")])


@dataclass
class InputImage:
    """One input image on its way through a chunk: where it came from, its labelled hands and
    the inference path's photo (its hands, once `inference.Runner.run` has found them)."""

    src: Source
    width: int
    height: int
    hands: Hands | None
    photo: Photo
    problems: list[BadInput]  # of its label file (the image's other hands still count)

    @property
    def crops(self) -> list[Crop]:
        """The hands predicted (one predictions.jsonl line each)."""
        return self.photo.crops


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


def chunk_outputs(
    cid: int, opened: list[Any], state: RankState, overlays: int, box_to_keypoints: float
) -> dict[str, bytes]:
    """The bytes one predicted chunk adds to each part file (InputImages and BadInputs in input
    order); updates `state` (`overlays`: how many first hands an unlabelled run keeps;
    `box_to_keypoints`: the model's, for the box of a whole-image prediction)."""
    preds, errors, coco, spill, found = [], [], [], [], []
    position = 0
    for x in opened:
        if isinstance(x, BadInput):
            errors.append(error_line(x))
            state.counts["errors"] += 1
            continue
        errors += [error_line(p) for p in x.problems]
        state.counts["label_problems"] += len(x.problems)
        matches, similarity = match_hands(x)
        state.counts["images"] += 1
        state.counts["images_without_boxes"] += not x.photo.boxes
        state.counts["crops"] += x.photo.boxes
        state.counts["images_without_hands"] += not x.crops
        state.counts["hands_dropped"] += x.photo.dropped
        if x.hands is not None:
            state.counts["images_labelled"] += 1
            state.counts["images_without_prediction"] += not x.crops
            records, n_box, n_pose = detection_records(x, box_to_keypoints)
            found.append(records)
            state.counts["labels_box"] += n_box
            state.counts["labels_pose"] += n_pose
        if x.hands:
            state.counts["hands_labelled"] += len(x.hands)
            state.counts["hands_missed"] += len(x.hands) - sum(m is not None for m in matches)
            state.counts["images_scored"] += any(m is not None for m in matches)
        for k in range(len(x.crops)):
            order = [cid, position]
            position += 1
            hand = x.hands[matches[k]] if matches[k] is not None and x.hands else None
            row, entry = _score(x, k, hand, order)
            if hand is not None:
                entry["oks"] = float(np.exp(similarity[k, matches[k]]))  # type: ignore[index]
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
        MATCHES: np.concatenate(found).tobytes() if found else b"",
    }


def match_hands(img: InputImage) -> tuple[list[int | None], np.ndarray]:
    """The labelled hand each prediction is scored against (None: none) and log(OKS) (P, G) of
    every prediction and labelled hand. --boxes gt: the box's own hand. Otherwise paired by OKS
    (`metrics.pair_greedily` on `metrics.log_oks`: the highest similarity first, each labelled
    hand and each prediction used once). No threshold for the whole-image path: its one
    prediction is its answer for the photo's hand, so a whole-image prediction on a face is
    scored against the hand, however far off it is. A hand the detector found pairs only with a
    labelled hand its box overlaps (`separate_hands`): it may be a hand no label marks (some
    photos label one of two hands), which is a right answer, not a far-off one; the labelled
    hand it does not overlap counts as missed."""
    n = len(img.crops)
    if not img.hands or not n:
        return [None] * n, np.zeros((n, len(img.hands or ())))
    hands = img.hands
    boxes = np.stack([h.box for h in hands])
    sim = metrics.log_oks(
        np.stack([np.asarray(c.uv) for c in img.crops]),
        np.stack([h.uv for h in hands]),
        np.stack([h.labelled for h in hands]),
        boxes,
    )
    if any(c.label is not None for c in img.crops):
        return [c.label for c in img.crops], sim
    pairable = np.where(separate_hands(img.crops, boxes), -np.inf, sim)
    return [int(g) if g >= 0 else None for g in metrics.pair_greedily(pairable)], sim


def separate_hands(crops: list[Crop], label_boxes: np.ndarray) -> np.ndarray:
    """(P, G) bool: prediction p is a found hand (detector) whose box does not overlap labelled
    box g at all (box IoU 0), so it is another hand, never g's prediction."""
    out = np.zeros((len(crops), len(label_boxes)), bool)
    for p, crop in enumerate(crops):
        if crop.found and crop.box is not None:
            out[p] = metrics.box_iou(np.asarray(crop.box, np.float64)[None], label_boxes)[0] <= 0
    return out


def hand_box(crop: Crop, box_to_keypoints: float) -> np.ndarray:
    """A prediction's box for the box figures: the detector's box, the given box, the box of its
    refinement pass, else (the whole image, no refinement) its keypoints' box grown as refinement
    grows it (`inference.refine_box`)."""
    box = crop.box if crop.found else crop.final_box
    return (
        np.asarray(box, np.float64) if box is not None else refine_box(np.asarray(crop.uv), box_to_keypoints)
    )


def detection_records(img: InputImage, box_to_keypoints: float) -> tuple[np.ndarray, int, int]:
    """A labelled photo's MATCH_RECORDs, one per prediction (`metrics.true_positives`: COCO's
    matching by box IoU and by OKS at every threshold, predictions ranked by `Crop.rank_score`),
    and the labels counted by box and by pose."""
    crops, hands = img.crops, img.hands or ()
    scores = np.array([c.rank_score for c in crops], np.float64)
    pred = metrics.Hands(
        np.array([hand_box(c, box_to_keypoints) for c in crops]).reshape(-1, 4),
        scores,
        np.array([np.asarray(c.uv) for c in crops]).reshape(-1, 21, 2),
    )
    label = metrics.Hands(
        np.array([h.box for h in hands]).reshape(-1, 4),
        None,
        np.array([h.uv for h in hands]).reshape(-1, 21, 2),
        np.array([h.labelled for h in hands]).reshape(-1, 21),
    )
    box_tp, n_box = metrics.true_positives("box", pred, label)
    pose_tp, n_pose = metrics.true_positives("pose", pred, label)
    bits = 1 << np.arange(len(metrics.THRESHOLDS))
    records = np.zeros(len(crops), MATCH_RECORD)
    records["score"] = scores
    records["box"] = (box_tp * bits).sum(axis=1)
    records["pose"] = (pose_tp * bits).sum(axis=1)
    return records, n_box, n_pose


def read_detection_records(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """matches.u8 -> (scores (N,), box true positives (N, T), pose true positives (N, T))."""
    records = np.fromfile(path, dtype=MATCH_RECORD)
    bits = 1 << np.arange(len(metrics.THRESHOLDS))
    return (
        records["score"].astype(np.float64),
        (records["box"][:, None] & bits) > 0,
        (records["pose"][:, None] & bits) > 0,
    )


def _score(
    img: InputImage, k: int, hand: LabelledHand | None, order: list[int]
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The report row of prediction k (None without a labelled hand) and its entry: what the
    overlays and the worst/best tables need to find and draw it again."""
    crop = img.crops[k]
    uv, box = np.asarray(crop.uv), crop.final_box
    entry: dict[str, Any] = {
        "path": img.src.path,
        "hand": crop.hand,
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
    crop, src = img.crops[k], img.src
    frame = {"frame": src.frame, "time": round(src.time or 0.0, 6)} if src.frame is not None else {}
    rec: dict[str, Any] = {
        "path": src.path,
        **frame,
        "width": img.width,
        "height": img.height,
        "hand": crop.hand,
        "box": entry["box"] if not crop.found else np.round(crop.box, 3).tolist(),  # type: ignore[arg-type]
        "keypoints": [
            [round(float(x), 3), round(float(y), 3), round(float(s), 4)]
            for (x, y), s in zip(crop.uv, crop.score, strict=True)  # type: ignore[arg-type]
        ],
        "score": round(crop.keypoint_score, 4),
    }
    if crop.box_score is not None:
        rec["box_score"] = round(crop.box_score, 4)
    if crop.found:
        rec["hand_score"] = round(crop.rank_score, 4)
    if "error_px" in entry:
        rec["error_px"] = round(entry["error_px"], 4)
        rec["error_pct_box"] = round(entry["error_pct_box"], 4)
        rec["oks"] = round(entry["oks"], 4)
    return json.dumps(rec) + "\n"


def coco_result(img: InputImage, k: int) -> dict[str, Any]:
    """A COCO keypoint-results entry; image_id from the labels (or a digits-only file stem), else
    the input's position (1-based); "score" ranks the hand (`Crop.rank_score`)."""
    iid = img.src.image_id if img.src.image_id is not None else img.src.ordinal + 1
    crop = img.crops[k]
    uv, score = np.asarray(crop.uv), np.asarray(crop.score)
    kps = [round(float(v), 3) for (x, y), s in zip(uv, score, strict=True) for v in (x, y, s)]
    rec: dict[str, Any] = {
        "image_id": iid,
        "category_id": 1,
        "keypoints": kps,
        "score": round(crop.rank_score, 4),
    }
    box = crop.box if crop.found else crop.final_box
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
    if counts["images_labelled"] or (final / SPILL).stat().st_size:
        scores, box_tp, pose_tp = read_detection_records(final / MATCHES)
        detection = {
            "images": counts["images_labelled"],
            "images_without_prediction": counts["images_without_prediction"],
            "labels": counts["labels_box"],
            "predictions": len(scores),
            **metrics.figures("box", scores, box_tp, counts["labels_box"]),
            **metrics.figures("pose", scores, pose_tp, counts["labels_pose"]),
        }
        rep = report.write_report(
            final,
            report.spill_blocks(final / SPILL),
            model_size=model_size,
            load_image=load_entry_image,
            counts={"images": counts["images_scored"], "hands_missed": counts["hands_missed"]},
            worst=extremes.worst(),
            best=extremes.best(),
            detection=detection,
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
        "crops": counts["crops"],
        "images_without_boxes": counts["images_without_boxes"],
        "images_without_hands": counts["images_without_hands"],
        "hands_dropped": counts["hands_dropped"],
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

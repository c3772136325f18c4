#!/usr/bin/env python3
"""Score hand predictions on a labelled YOLO-pose image folder with handpose's own figures, so that
`handpose predict` and the Ultralytics peer (`tools/peer_predict.py`) are judged by one code:

    .venv/bin/python tools/peer_score.py PREDICTIONS IMAGES_DIR [--min-score S] [--name NAME]

PREDICTIONS: a `handpose predict` output folder (its predictions.jsonl: one row per hand, ranked
by `hand_score` where a detector found the hand, else `box_score` where a boxes file gave one,
else `score`, as predict's report ranks them) or a
peer_predict.py file (one line per image). IMAGES_DIR: the labelled images (labels found by
Ultralytics' rule, /images/ -> /labels/); every image counts, with or without a prediction.

--score hand|box|keypoint|joints ranks a predict folder's rows by another rule than predict's
(with --box-floor: only boxes scoring at least it), so one run made with a low --min-score
compares the rules; "joints" is the hand score with the mean of the 21 joint scores as the
keypoint score, which a model with a presence head replaces by its presence probability.

Prints one JSON line (`metrics.hand_figures`): box and pose recall and precision at IoU / OKS
>= 0.5 for predictions scoring >= --min-score, COCO 101-point AP50 and AP50-95 over every
prediction given (Ultralytics' OKS for 21 keypoints), and `pct_of_box`: the mean keypoint error
in % of the labelled box's longer side over the labelled hands matched at OKS >= 0.5, and the
images without a labelled hand that get a prediction scoring >= --min-score.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handpose.imageio import image_size  # noqa: E402
from handpose.inference import hand_score  # noqa: E402
from handpose.metrics import THRESHOLDS, Hands, hand_figures, match, oks  # noqa: E402
from handpose.report import box_side  # noqa: E402
from handpose.skeleton import NUM_JOINTS  # noqa: E402
from handpose.sources.files import is_image, walk  # noqa: E402
from handpose.sources.yolo import label_path, read_label  # noqa: E402

SCORES = ("auto", "hand", "box", "keypoint", "joints")


def row_score(r: dict, kind: str = "auto") -> float:
    """The score a predict row is ranked and thresholded by: "auto" as predict's report ranks
    (`hand_score`, else `box_score`, else `score`); "hand" sqrt(box_score x score), "box" the
    detector's `box_score`, "keypoint" the keypoint model's `score`, "joints" sqrt(box_score x
    the mean of the joints' scores) (to compare the rules on one run made with a low
    --min-score; "joints" equals "hand" for a model without a presence head)."""
    if kind == "auto":
        return float(next(r[k] for k in ("hand_score", "box_score", "score") if r.get(k) is not None))
    if kind == "keypoint":
        return float(r["score"])
    box = r.get("box_score")
    if box is None:
        sys.exit(f"peer_score: --score {kind}: a prediction of {r['path']} has no box_score")
    if kind == "joints":
        return hand_score(box, float(np.mean([kp[2] for kp in r["keypoints"]])))
    return float(box) if kind == "box" else hand_score(box, r["score"])


def read_predictions(src: Path, kind: str = "auto", box_floor: float = 0.0) -> dict[str, Hands]:
    """{resolved image path: its predicted hands} from a predict folder (ranked by `row_score`,
    rows whose box_score is under `box_floor` left out) or a peer_predict file."""
    rows: dict[str, list[tuple[list[float], float, list[list[float]]]]] = defaultdict(list)
    if src.is_dir():
        for line in (src / "predictions.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("box_score") is not None and r["box_score"] < box_floor:
                continue
            rows[str(Path(r["path"]).resolve())].append((r["box"], row_score(r, kind), r["keypoints"]))
    else:
        for line in src.read_text().splitlines():
            r = json.loads(line)
            rows[str(Path(r["path"]).resolve())] += [
                (h["box"], h["score"], h["keypoints"]) for h in r["hands"]
            ]
    return {path: _hands(hands) for path, hands in rows.items()}


def _hands(hands: list[tuple[list[float], float, list[list[float]]]]) -> Hands:
    boxes = np.array([h[0] for h in hands], np.float64).reshape(-1, 4)
    scores = np.array([h[1] for h in hands], np.float64)
    uv = np.array([[kp[:2] for kp in h[2]] for h in hands], np.float64).reshape(-1, NUM_JOINTS, 2)
    return Hands(boxes, scores, uv)


def read_labels(image: Path) -> Hands:
    """An image's labelled hands in pixels (none: a background image, or no label file)."""
    w, h = image_size(image.read_bytes())
    label = label_path(image)
    found, problems = read_label(label, image.name, None) if label.exists() else ({}, [])
    if problems:
        sys.exit(f"peer_score: {problems[0].file}: {problems[0].reason}")
    lines = [line for _, (_, line) in sorted(found.items())]  # hand k is the k-th line
    pixels = [line.in_pixels(w, h) for line in lines]
    return Hands(
        np.array([box for _, box in pixels]).reshape(-1, 4),
        None,
        np.array([uv for uv, _ in pixels]).reshape(-1, NUM_JOINTS, 2),
        np.array([line.visibility > 0 for line in lines]).reshape(-1, NUM_JOINTS),
    )


def pct_of_box(pred: Hands, label: Hands, min_score: float) -> list[float]:
    """Per labelled hand matched at OKS >= 0.5 (predictions >= min_score): mean error, % of box."""
    keep = np.asarray(pred.scores) >= min_score
    if not keep.any() or not len(label):
        return []
    assert pred.uv is not None and label.uv is not None and label.labelled is not None
    sim = oks(pred.uv[keep], label.uv, label.labelled, label.boxes)
    matched = match(sim, np.asarray(pred.scores)[keep], THRESHOLDS[0])
    out = []
    for p, lab in enumerate(matched):
        if lab >= 0 and label.labelled[lab].any():
            d = np.linalg.norm(pred.uv[keep][p] - label.uv[lab], axis=-1)[label.labelled[lab]]
            out.append(100.0 * float(d.mean()) / box_side(label.boxes[lab]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("predictions", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("--min-score", type=float, default=0.25, help="for recall, precision, pct_of_box [0.25]")
    ap.add_argument("--name", default="", help="a name for the JSON line")
    ap.add_argument(
        "--score", choices=SCORES, default="auto", help="predict rows: the score to rank by [auto]"
    )
    ap.add_argument(
        "--box-floor", type=float, default=0.0, help="predict rows: leave out box_score under this"
    )
    args = ap.parse_args()
    preds = read_predictions(args.predictions, args.score, args.box_floor)
    images = [args.images / rel for rel in walk(args.images, is_image)]
    if not images:
        sys.exit(f"peer_score: {args.images}: no images")
    empty = Hands(np.zeros((0, 4)), np.zeros(0), np.zeros((0, NUM_JOINTS, 2)))
    p_list = [preds.get(str(p.resolve()), empty) for p in images]
    l_list = [read_labels(p) for p in images]
    figures = hand_figures(p_list, l_list, min_score=args.min_score, pose=True)
    errors = [e for p, lab in zip(p_list, l_list, strict=True) for e in pct_of_box(p, lab, args.min_score)]
    unknown = len(set(preds) - {str(p.resolve()) for p in images})
    hand_free = [k for k, lab in enumerate(l_list) if not len(lab)]
    found_on_free = sum(bool((np.asarray(p_list[k].scores) >= args.min_score).any()) for k in hand_free)
    out = {
        "name": args.name,
        "images": len(images),
        "min_score": args.min_score,
        **{k: round(v, 4) if np.isfinite(v) else None for k, v in figures.items()},  # None: no labels
        "pct_of_box": round(float(np.mean(errors)), 3) if errors else None,
        "matched_hands": len(errors),
        "hand_free_images": len(hand_free),
        "hand_free_images_with_a_hand": found_on_free,
        "predicted_images_not_in_folder": unknown,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

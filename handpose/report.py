"""The error report of a labelled `predict` run: report.json, report.md, plots and a gallery.

An error is the Euclidean distance in original pixels between a predicted and a labelled
keypoint, over the joints that are labelled (visibility > 0). Statistics pool every such
keypoint, each with the same weight (the tutorial's mean error, the EPE); a hand's error is the
mean over its joints. Three normalisations sit next to the pixels:
- "% of the image side": divided by max(width, height), the side the letterbox fits;
- "% of the box": divided by the longer side of the hand's LABELLED box (whatever box the
  prediction was made in; for labels without a box, the labelled keypoints' extent), and
  PCK@0.05/0.1/0.2 of that side, the standard top-down figures;
- "at the model size": the error in model-input pixels (x size / the side of the square that
  filled the input), the unit the tutorial quotes ("6 px at 128").
PCK(t) = fraction of keypoints with error <= t px, t in 0..30 px; its AUC is the curve's
trapezoid area divided by 30 (1.0 = every keypoint exact).

Beside the errors of the hands paired with a label, the figures YOLO-pose users know, over every
prediction of every labelled photo (`metrics.py`, the one home of OKS, matching and AP; predict
computes them in `predict_outputs.detection_records`): recall and precision at OKS >= 0.5 (and at
box IoU >= 0.5), pose and box AP50 and AP50-95, and the labelled photos without a prediction.

Statistics are streamed, so memory does not grow with the number of images: predict spills one
float32 row per scored hand (`spill_rows`: 21 errors, NaN where not labelled, then the image
side, the labelled box side and the input side) and `summarise` reads the spill in blocks; exact
percentiles come from a radix select over the values' bit patterns (`order_statistics`), the
worst and best hands from bounded heaps (`Extremes`).

OUT/report.json   headline keys mean_error_px, mean_error_pct, mean_error_pct_box, pck_0.2_box,
                  median_error_px, auc, then recall, precision, pose_ap50, pose_ap50_95, box_ap50,
                  box_ap50_95, images_without_prediction (with detection figures); then all tables
OUT/report.md     the same for people
OUT/error_hist.png, OUT/pck.png, OUT/gallery.png (worst row above best row)
"""

from __future__ import annotations

import heapq
import io
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from handpose.atomic import write_bytes, write_json, write_text
from handpose.console import make_console
from handpose.skeleton import FINGERS, JOINT_NAMES, NUM_JOINTS, draw_skeleton, joint_finger

OUTPUTS = ("report.json", "report.md", "error_hist.png", "pck.png", "gallery.png")
PCK_MAX_PX = 30.0
PCK_THRESHOLDS_PX = np.linspace(0.0, PCK_MAX_PX, 61)  # 0.5 px steps
BOX_PCK = (0.05, 0.1, 0.2)  # PCK thresholds as fractions of the labelled box's longer side
STATS = ("mean", "median", "p90", "p95", "max")
QUANTILES = {"median": 50.0, "p90": 90.0, "p95": 95.0}
HIST_TOP_Q = 99.0  # the error histogram spans 0 .. max(PCK_MAX_PX, this percentile)
GT_COLOR = (255, 255, 255)
EXTREMES = 10  # rows of the worst and best tables

# A spill row: NUM_JOINTS errors (px, NaN = not labelled), then these three sides (px).
SIDE, BOX_SIDE, INPUT_SIDE = NUM_JOINTS, NUM_JOINTS + 1, NUM_JOINTS + 2
SPILL_COLUMNS = NUM_JOINTS + 3
BLOCK_ROWS = 1 << 13  # rows read per block of the spill (0.8 MB; the statistics' working set ~10x)
FINGER_GROUPS = {f: [j for j in range(NUM_JOINTS) if joint_finger(j) == f] for f in ("wrist", *FINGERS)}


# ---------------------------------------------------------------------------------------------
# Per-hand errors (pure)


def keypoint_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(N, 21, 2) x 2 -> (N, 21) Euclidean distances."""
    return np.linalg.norm(np.asarray(pred, np.float64) - np.asarray(gt, np.float64), axis=-1)


def image_errors(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(N,) mean error over each hand's labelled joints; NaN for a hand with none."""
    e = np.where(visible, keypoint_errors(pred, gt), 0.0)
    n = visible.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, e.sum(axis=1) / n, np.nan)


def spill_rows(
    pred: np.ndarray,
    gt: np.ndarray,
    labelled: np.ndarray,
    side: Sequence[float] | np.ndarray,
    box_side: Sequence[float] | np.ndarray,
    input_side: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """(N, SPILL_COLUMNS) float32 rows: per-joint errors (NaN where not labelled), the image's
    longer side, the labelled box's longer side and the side of the square that filled the input."""
    err = np.where(np.asarray(labelled, bool), keypoint_errors(pred, gt), np.nan)
    sides = np.stack([np.asarray(v, np.float64).reshape(-1) for v in (side, box_side, input_side)], axis=1)
    return np.concatenate([err, sides], axis=1).astype(np.float32)


def box_side(box: np.ndarray) -> float:
    """The longer side of a box (x0, y0, x1, y1)."""
    return float(max(box[2] - box[0], box[3] - box[1]))


# ---------------------------------------------------------------------------------------------
# The worst and best hands: bounded heaps


class Extremes:
    """The `worst` highest-error and `best` lowest-error hands seen so far, each an entry dict with
    "error_px" and "order" (a list that sorts like the input order: ties go to the earlier hand).

    Bounded, so a run over any number of images keeps at most worst + best entries; entries are
    plain JSON, so a rank can checkpoint them and rank 0 can merge every rank's.
    """

    def __init__(self, worst: int, best: int):
        self.n_worst, self.n_best = worst, best
        self._worst: list[tuple[float, list[int], int, dict[str, Any]]] = []  # min-heap of the worst
        self._best: list[tuple[float, list[int], int, dict[str, Any]]] = []  # min-heap of -error
        self._tick = 0  # unique tie-breaker so dicts are never compared

    def add(self, entry: dict[str, Any]) -> None:
        e, order = float(entry["error_px"]), _neg(entry["order"])
        self._tick += 1
        # worst: keep the largest errors; among equal errors the earliest hand (largest -order)
        _push(self._worst, (e, order, self._tick, entry), self.n_worst)
        _push(self._best, (-e, order, self._tick, entry), self.n_best)

    def worst(self) -> list[dict[str, Any]]:
        """Highest error first; ties: the earlier hand first."""
        return [t[3] for t in sorted(self._worst, key=lambda t: (-t[0], _neg(t[1])))]

    def best(self) -> list[dict[str, Any]]:
        """Lowest error first; ties: the earlier hand first."""
        return [t[3] for t in sorted(self._best, key=lambda t: (t[0] * -1, _neg(t[1])))]

    def to_json(self) -> dict[str, Any]:
        return {"worst": self.worst(), "best": self.best()}

    def load(self, data: dict[str, Any]) -> Extremes:
        """Add the entries of a `to_json()` dict (a checkpoint, or another rank's); returns self."""
        for entry in [*data.get("worst", []), *data.get("best", [])]:
            self.add(entry)
        return self


def _neg(order: list[int]) -> list[int]:
    return [-v for v in order]


def _push(heap: list[Any], item: tuple[Any, ...], limit: int) -> None:
    if limit <= 0:
        return
    if any(t[1] == item[1] for t in heap):  # the same hand added twice (merging checkpoints)
        return
    if len(heap) < limit:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)


# ---------------------------------------------------------------------------------------------
# Streamed statistics


Blocks = Callable[[], Iterable[np.ndarray]]  # a fresh pass over the spill, block by block


def spill_blocks(path: str | os.PathLike, rows: int = BLOCK_ROWS) -> Blocks:
    """Passes over a spill file (float32 rows of SPILL_COLUMNS), `rows` at a time."""

    def blocks() -> Iterator[np.ndarray]:
        with open(path, "rb") as f:
            while True:
                block = np.fromfile(f, dtype="<f4", count=rows * SPILL_COLUMNS)
                if not block.size:
                    return
                yield block.reshape(-1, SPILL_COLUMNS)

    return blocks


def _groups(rows: np.ndarray, model_size: int) -> dict[str, np.ndarray]:
    """The value groups the report describes, from one block of spill rows (float32, >= 0)."""
    err = rows[:, :NUM_JOINTS]
    lab = np.isfinite(err)
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = err / rows[:, SIDE : SIDE + 1] * np.float32(100.0)
        pct_box = err / rows[:, BOX_SIDE : BOX_SIDE + 1] * np.float32(100.0)
        model = err * np.float32(model_size) / rows[:, INPUT_SIDE : INPUT_SIDE + 1]
    out = {"px": err[lab], "pct": pct[lab], "pct_box": pct_box[lab], "model_px": model[lab]}
    for j in range(NUM_JOINTS):
        m = lab[:, j]
        out[f"joint{j}"], out[f"joint{j}_pct"], out[f"joint{j}_pct_box"] = err[m, j], pct[m, j], pct_box[m, j]
    for f, cols in FINGER_GROUPS.items():
        m = lab[:, cols]
        out[f"finger_{f}"] = err[:, cols][m]
        out[f"finger_{f}_pct"] = pct[:, cols][m]
        out[f"finger_{f}_pct_box"] = pct_box[:, cols][m]
    # abs(): a -0.0 would sort as the largest bit pattern
    return {k: np.abs(v.astype(np.float32, copy=False)) for k, v in out.items()}


def order_statistics(
    blocks: Callable[[], Iterable[dict[str, np.ndarray]]], wanted: Mapping[str, Iterable[int]]
) -> dict[str, dict[int, float]]:
    """The k-th smallest value (k 0-based) of named groups of non-negative float32 values that
    arrive in blocks, exactly, in memory independent of their number: a radix select on the bit
    patterns (non-negative IEEE floats sort like their unsigned integers), 8 bits per pass."""
    state = {g: {k: [int(k), 0] for k in ks} for g, ks in wanted.items()}  # k left, bits chosen
    for p in range(4):
        shift = 24 - 8 * p
        hist = {(g, t[1]): np.zeros(256, np.int64) for g, ts in state.items() for t in ts.values()}
        for block in blocks():
            for g, ts in state.items():
                keys = np.ascontiguousarray(block[g]).view(np.uint32)
                for prefix in {t[1] for t in ts.values()}:
                    sel = keys if p == 0 else keys[(keys >> (shift + 8)) == prefix]
                    hist[g, prefix] += np.bincount(((sel >> shift) & 0xFF).astype(np.intp), minlength=256)
        for g, ts in state.items():
            for t in ts.values():
                cum = np.cumsum(hist[g, t[1]])
                digit = int(np.searchsorted(cum, t[0], side="right"))
                t[0] -= int(cum[digit - 1]) if digit else 0
                t[1] = (t[1] << 8) | digit
    return {
        g: {k: float(np.array([t[1]], np.uint32).view(np.float32)[0]) for k, t in ts.items()}
        for g, ts in state.items()
    }


def _percentile_ranks(n: int, q: float) -> tuple[int, int, float]:
    """np.percentile's linear rule: the two order statistics around q and the weight between."""
    index = q / 100 * (n - 1)
    lo = math.floor(index)
    return lo, min(lo + 1, n - 1), index - lo


def _lerp(a: float, b: float, t: float) -> float:
    """np.percentile's interpolation (its formula, so the figures equal numpy's)."""
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)


def summarise(
    blocks: Blocks,
    model_size: int,
    *,
    counts: dict[str, int] | None = None,
    worst: Sequence[dict[str, Any]] = (),
    best: Sequence[dict[str, Any]] = (),
    detection: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Everything report.json holds, from passes over the spill rows. `counts` adds the run's
    counts ("images", "hands_missed"); `worst` and `best` are `Extremes` entries; `detection`
    the multi-hand figures (`metrics.figures` of box and pose, "images",
    "images_without_prediction", "labels", "predictions")."""

    def grouped() -> Iterator[dict[str, np.ndarray]]:
        for rows in blocks():
            yield _groups(rows, model_size)

    n: dict[str, int] = {}
    total: dict[str, float] = {}
    top: dict[str, float] = {}
    pck = np.zeros(len(PCK_THRESHOLDS_PX), np.int64)
    box_pck = np.zeros(len(BOX_PCK), np.int64)
    hands = 0
    for rows in blocks():
        hands += int(np.isfinite(rows[:, :NUM_JOINTS]).any(axis=1).sum())
        groups = _groups(rows, model_size)
        for g, v in groups.items():
            n[g] = n.get(g, 0) + v.size
            total[g] = total.get(g, 0.0) + float(v.sum(dtype=np.float64))
            top[g] = max(top.get(g, -math.inf), float(v.max()) if v.size else -math.inf)
        pck += np.searchsorted(np.sort(groups["px"]), PCK_THRESHOLDS_PX, side="right")
        box_pck += [int((groups["pct_box"] <= t * 100).sum()) for t in BOX_PCK]

    described = ["px", "pct", "pct_box", "model_px"] + [f"joint{j}" for j in range(NUM_JOINTS)]
    described += [f"finger_{f}" for f in FINGER_GROUPS]
    wanted: dict[str, set[int]] = {}
    for g in described:
        if n.get(g, 0):
            qs = [*QUANTILES.values(), *([HIST_TOP_Q] if g == "px" else [])]
            wanted[g] = {r for q in qs for r in _percentile_ranks(n[g], q)[:2]}
    ranked = order_statistics(grouped, wanted)

    def quantile(g: str, q: float) -> float:
        lo, hi, t = _percentile_ranks(n[g], q)
        return _lerp(ranked[g][lo], ranked[g][hi], t)

    def describe(g: str) -> dict[str, float]:
        if not n.get(g, 0):
            return {k: float("nan") for k in STATS}
        return {"mean": total[g] / n[g], **{k: quantile(g, q) for k, q in QUANTILES.items()}, "max": top[g]}

    def mean(g: str) -> float:
        return total[g] / n[g] if n.get(g, 0) else float("nan")

    def group_row(g: str) -> dict[str, Any]:
        return {
            "keypoints": n.get(g, 0),
            "error_px": describe(g),
            "mean_error_pct": mean(f"{g}_pct"),
            "mean_error_pct_box": mean(f"{g}_pct_box"),
        }

    keypoints = n.get("px", 0)
    fraction = (pck / max(keypoints, 1)).tolist()
    px, pct, pct_box = describe("px"), describe("pct"), describe("pct_box")
    box_fraction = {f"{t:g}": float(c / max(keypoints, 1)) for t, c in zip(BOX_PCK, box_pck, strict=True)}
    counts = counts or {}
    headline = {}
    if detection is not None:
        headline = {
            "recall": float(detection["pose_recall"]),
            "precision": float(detection["pose_precision"]),
            "pose_ap50": float(detection["pose_ap50"]),
            "pose_ap50_95": float(detection["pose_ap50_95"]),
            "box_ap50": float(detection["box_ap50"]),
            "box_ap50_95": float(detection["box_ap50_95"]),
            "images_without_prediction": int(detection["images_without_prediction"]),
        }
    return {
        "mean_error_px": px["mean"],
        "mean_error_pct": pct["mean"],
        "mean_error_pct_box": pct_box["mean"],
        "pck_0.2_box": box_fraction["0.2"],
        "median_error_px": px["median"],
        "auc": pck_auc(PCK_THRESHOLDS_PX, np.asarray(fraction)),
        **headline,
        "images": int(counts.get("images", hands)),
        "hands": hands,
        "hands_missed": int(counts.get("hands_missed", 0)),
        "keypoints": keypoints,
        "model_size": int(model_size),
        "error_px": px,
        "error_pct": pct,
        "error_pct_box": pct_box,
        "error_model_px": describe("model_px"),
        "pck": {"thresholds_px": PCK_THRESHOLDS_PX.tolist(), "fraction": fraction},
        "pck_box": box_fraction,
        "hist_top_px": max(PCK_MAX_PX, quantile("px", HIST_TOP_Q)) if keypoints else PCK_MAX_PX,
        "per_joint": [
            {"joint": j, "name": JOINT_NAMES[j], **group_row(f"joint{j}")} for j in range(NUM_JOINTS)
        ],
        "per_finger": [{"finger": f, **group_row(f"finger_{f}")} for f in FINGER_GROUPS],
        "worst": [_table_row(e) for e in worst[:EXTREMES]],
        "best": [_table_row(e) for e in best[:EXTREMES]],
        **({"detection": dict(detection)} if detection is not None else {}),
    }


def _table_row(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("path", "hand", "error_px", "error_pct", "error_pct_box")}


def pck_curve(errors: np.ndarray, thresholds: np.ndarray = PCK_THRESHOLDS_PX) -> np.ndarray:
    """Fraction of `errors` <= each threshold."""
    e = np.sort(np.asarray(errors, np.float64))
    return np.searchsorted(e, thresholds, side="right") / max(len(e), 1)


def pck_auc(thresholds: np.ndarray, pck: np.ndarray) -> float:
    """Trapezoid area under the PCK curve, divided by the threshold range (so in [0, 1])."""
    t, p = np.asarray(thresholds, np.float64), np.asarray(pck, np.float64)
    return float(np.sum((p[1:] + p[:-1]) / 2 * np.diff(t)) / (t[-1] - t[0]))


def error_histogram(blocks: Blocks, top: float, bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the labelled keypoint errors clipped to [0, top], one streamed pass."""
    edges = np.linspace(0.0, top, bins + 1)
    counts = np.zeros(bins, np.int64)
    for rows in blocks():
        err = rows[:, :NUM_JOINTS]
        e = np.clip(err[np.isfinite(err)].astype(np.float64), 0, top)
        counts += np.histogram(e, bins=edges)[0]
    return counts, edges


# ---------------------------------------------------------------------------------------------
# Entry


def write_report(
    out: str | os.PathLike,
    blocks: Blocks,
    *,
    model_size: int,
    load_image: Callable[[dict[str, Any]], np.ndarray],
    counts: dict[str, int] | None = None,
    worst: Sequence[dict[str, Any]] = (),
    best: Sequence[dict[str, Any]] = (),
    detection: Mapping[str, float] | None = None,
    console: Console | None = None,
    gallery: int = 4,
) -> dict[str, Any] | None:
    """Write report.json, report.md, the plots and the gallery into `out`; print the headline
    table. `blocks` are passes over the spill rows; `worst`/`best` are `Extremes` entries, which
    `load_image(entry)` turns back into their (RGB uint8) image for the gallery; `detection` the
    multi-hand figures (see `summarise`). Returns the report dict, or None when no keypoint has
    a label and there are no detection figures."""
    out = Path(out)
    console = console or make_console(stderr=True)
    rep = summarise(blocks, model_size, counts=counts, worst=worst, best=best, detection=detection)
    if not rep["keypoints"] and detection is None:
        console.print("no labelled keypoints: no report")
        return None
    write_json(out / "report.json", rep)
    write_text(out / "report.md", render_markdown(rep))
    _plots(out, error_histogram(blocks, rep["hist_top_px"]), rep)
    save_png(_gallery(worst[:gallery], best[:gallery], load_image), out / "gallery.png")
    console.print(_headline_table(rep))
    if detection is not None:
        console.print(_detection_line(rep))
    return rep


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt(v: float, digits: int = 2) -> str:
    return "-" if not np.isfinite(v) else f"{v:.{digits}f}"


def render_markdown(rep: dict[str, Any]) -> str:
    """report.md from the report dict."""
    size = rep["model_size"]
    missed = f" {rep['hands_missed']} labelled hands got no prediction." if rep["hands_missed"] else ""
    lines = [
        "# Keypoint error report",
        "",
        f"{rep['images']} images, {rep['hands']} hands, {rep['keypoints']} labelled keypoints.{missed} "
        "Errors are distances in original pixels; % of the image side (max of width and height); "
        "% of the labelled box's longer side; and at the model's "
        f"{size} px input, as the tutorial reports them.",
        "",
        "| error | " + " | ".join(STATS) + " |",
        "|---|" + "---|" * len(STATS),
    ]
    rows = (
        ("px", "error_px"),
        ("% of side", "error_pct"),
        ("% of box", "error_pct_box"),
        (f"px at {size}", "error_model_px"),
    )
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(rep[key][s]) for s in STATS) + " |")
    box = rep["pck_box"]
    lines += [
        "",
        "Box-normalised (top-down) figures:",
        "",
        "| EPE px | mean % of box | " + " | ".join(f"PCK@{t:g} of box" for t in BOX_PCK) + " |",
        "|---|---|" + "---|" * len(BOX_PCK),
        f"| {_fmt(rep['mean_error_px'])} | {_fmt(rep['mean_error_pct_box'])} | "
        + " | ".join(f"{box[f'{t:g}']:.3f}" for t in BOX_PCK)
        + " |",
    ]
    if "detection" in rep:
        d = rep["detection"]
        lines += [
            "",
            f"Every hand of the {d['images']} labelled photos ({d['labels']} labelled hands, "
            f"{d['predictions']} predictions; {d['images_without_prediction']} photos without a "
            "prediction): each labelled hand matched to at most one prediction, by descending "
            "score (Ultralytics' OKS for 21 keypoints; box IoU), COCO's 101-point AP:",
            "",
            "| by | recall | precision | AP50 | AP50-95 |",
            "|---|---|---|---|---|",
            f"| OKS (pose) | {_fmt(d['pose_recall'], 3)} | {_fmt(d['pose_precision'], 3)} | "
            f"{_fmt(d['pose_ap50'], 3)} | {_fmt(d['pose_ap50_95'], 3)} |",
            f"| box IoU | {_fmt(d['box_recall'], 3)} | {_fmt(d['box_precision'], 3)} | "
            f"{_fmt(d['box_ap50'], 3)} | {_fmt(d['box_ap50_95'], 3)} |",
        ]
    pck = dict(zip(rep["pck"]["thresholds_px"], rep["pck"]["fraction"], strict=True))
    marks = [5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    lines += [
        "",
        f"PCK AUC over 0..{PCK_MAX_PX:g} px: **{rep['auc']:.4f}**",
        "",
        "| PCK@ | " + " | ".join(f"{t:g} px" for t in marks) + " |",
        "|---|" + "---|" * len(marks),
        "| fraction | " + " | ".join(f"{pck[t]:.3f}" for t in marks) + " |",
    ]
    head = "| keypoints | mean px | median px | p90 px | mean % | mean % of box |"
    for title, key, first in (("Per finger", "per_finger", "finger"), ("Per joint", "per_joint", "joint")):
        lines += ["", f"## {title}", "", f"| {first} {head}", "|---|---|---|---|---|---|---|"]
        for r in rep[key]:
            e = r["error_px"]
            name = r["finger"] if key == "per_finger" else f"{r['joint']} {r['name']}"
            lines.append(
                f"| {name} | {r['keypoints']} | {_fmt(e['mean'])} | {_fmt(e['median'])} | "
                f"{_fmt(e['p90'])} | {_fmt(r['mean_error_pct'])} | {_fmt(r['mean_error_pct_box'])} |"
            )
    for title, key in (("Worst hands", "worst"), ("Best hands", "best")):
        lines += [
            "",
            f"## {title}",
            "",
            "| # | image | hand | mean px | % of side | % of box |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | `{r['path']}` | {r['hand']} | {_fmt(r['error_px'])} | {_fmt(r['error_pct'])} | "
            f"{_fmt(r['error_pct_box'])} |"
            for k, r in enumerate(rep[key], 1)
        ]
    lines += [
        "",
        "## Plots",
        "",
        "![error histogram](error_hist.png)",
        "",
        "![PCK curve](pck.png)",
        "",
        "![worst (top row) and best (bottom row) hands](gallery.png)",
        "",
    ]
    return "\n".join(lines)


def _headline_table(rep: dict[str, Any]) -> Table:
    size = rep["model_size"]
    t = Table(
        title=f"keypoint error: {rep['hands']} hands, {rep['keypoints']} keypoints, "
        f"PCK AUC 0-{PCK_MAX_PX:g} px {rep['auc']:.3f}, PCK@0.2 of box {rep['pck_0.2_box']:.3f}"
    )
    t.add_column("")
    for col in ("px", "% of side", "% of box", f"px at {size}"):
        t.add_column(col, justify="right")
    for s in STATS:
        t.add_row(
            s,
            _fmt(rep["error_px"][s]),
            _fmt(rep["error_pct"][s]),
            _fmt(rep["error_pct_box"][s]),
            _fmt(rep["error_model_px"][s]),
        )
    return t


def _detection_line(rep: dict[str, Any]) -> str:
    d = rep["detection"]
    return (
        f"hands: recall {_fmt(d['pose_recall'], 3)}, precision {_fmt(d['pose_precision'], 3)} at OKS >= 0.5; "
        f"pose AP50 {_fmt(d['pose_ap50'], 3)}, AP50-95 {_fmt(d['pose_ap50_95'], 3)}; "
        f"box AP50 {_fmt(d['box_ap50'], 3)}, AP50-95 {_fmt(d['box_ap50_95'], 3)}; "
        f"{d['images_without_prediction']} of {d['images']} labelled photos without a prediction"
    )


def _plots(out: Path, hist: tuple[np.ndarray, np.ndarray], rep: dict[str, Any]) -> None:
    """error_hist.png and pck.png with matplotlib's object API (no pyplot: no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def save(fig: Figure, name: str) -> None:
        buf = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})
        write_bytes(out / name, buf.getvalue())

    counts, edges = hist
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.hist(edges[:-1], bins=edges.tolist(), weights=counts, color="tab:blue")
    if rep["keypoints"]:  # no hand paired with a label (a detection run on photos without hands)
        ax.axvline(rep["error_px"]["mean"], color="tab:red", label=f"mean {rep['error_px']['mean']:.2f} px")
        ax.axvline(
            rep["error_px"]["median"], color="tab:orange", label=f"median {rep['error_px']['median']:.2f} px"
        )
        ax.legend()
    ax.set(xlabel="keypoint error, px (last bin: at least)", ylabel="keypoints", title="Keypoint error")
    fig.tight_layout()
    save(fig, "error_hist.png")

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(
        rep["pck"]["thresholds_px"], rep["pck"]["fraction"], color="tab:green", label=f"AUC {rep['auc']:.3f}"
    )
    ax.set(
        xlabel="threshold, px",
        ylabel="fraction of keypoints within",
        title="PCK",
        xlim=(0, PCK_MAX_PX),
        ylim=(0, 1.01),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save(fig, "pck.png")


def draw_hand(
    image: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray | None = None,
    labelled: np.ndarray | None = None,
    *,
    caption: str | None = None,
) -> Image.Image:
    """The image (longer side scaled into 256..512 px) with the predicted skeleton in finger
    colours and, when given, the ground truth's `labelled` joints in white beneath it
    (`skeleton.draw_skeleton`, in geometry.py's pixel convention)."""
    h, w = image.shape[:2]
    side = max(w, h)
    f = min(max(side, 256), 512) / side
    canvas = Image.fromarray(image).resize(
        (max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BILINEAR
    )
    scale = np.array([canvas.width / w, canvas.height / h])  # resize maps corner to corner
    draw = ImageDraw.Draw(canvas)
    lw = max(1, round(min(canvas.size) / 160))
    if gt is not None:
        draw_skeleton(
            draw, np.asarray(gt, np.float64) * scale, labelled, radius=lw + 1, width=lw, colour=GT_COLOR
        )
    draw_skeleton(draw, np.asarray(pred, np.float64) * scale, radius=lw + 1, width=lw)
    return _caption(canvas, caption) if caption else canvas


def draw_entry(image: np.ndarray, entry: dict[str, Any], *, caption: str | None = None) -> Image.Image:
    """One predicted hand drawn over its image: the whole image, or for a box prediction the
    square around the box (`entry["region"]` = cx, cy, side, clipped to the image)."""
    pred = np.asarray(entry["pred"], np.float64)
    gt = np.asarray(entry["gt"], np.float64) if entry.get("gt") is not None else None
    labelled = np.asarray(entry["labelled"], bool) if entry.get("labelled") is not None else None
    region = entry.get("region")
    if entry.get("box") is not None and region is not None:
        cx, cy, side = region
        h, w = image.shape[:2]
        x0, y0 = max(0, math.floor(cx - side / 2)), max(0, math.floor(cy - side / 2))
        x1, y1 = min(w, math.ceil(cx + side / 2)), min(h, math.ceil(cy + side / 2))
        if x1 > x0 and y1 > y0:
            image = image[y0:y1, x0:x1]
            pred = pred - [x0, y0]
            gt = gt - [x0, y0] if gt is not None else None
    return draw_hand(image, pred, gt, labelled, caption=caption)


def _caption(image: Image.Image, text: str) -> Image.Image:
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((4, 4), text)
    draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=(0, 0, 0))
    draw.text((4, 4), text, fill=(255, 255, 255))
    return image


def _gallery(
    worst: Sequence[dict[str, Any]],
    best: Sequence[dict[str, Any]],
    load_image: Callable[[dict[str, Any]], np.ndarray],
) -> Image.Image:
    """Worst hands in the top row, best below, each with ground truth and prediction."""
    tile = 224
    rows = [worst, best]
    cols = max(1, max(len(r) for r in rows))
    sheet = Image.new("RGB", (cols * tile, 2 * tile), (40, 40, 40))
    for r, row in enumerate(rows):
        for c, entry in enumerate(row):
            label = f"{'worst' if r == 0 else 'best'} {entry['error_px']:.1f}px {Path(entry['path']).name}"
            img = draw_entry(load_image(entry), entry)
            img.thumbnail((tile, tile), Image.Resampling.BILINEAR)
            img = _caption(img, label)
            sheet.paste(img, (c * tile + (tile - img.width) // 2, r * tile + (tile - img.height) // 2))
    return sheet


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())

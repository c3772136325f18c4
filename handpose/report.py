"""The error report of a labelled `predict` run: report.json, report.md, plots and a gallery.

An error is the Euclidean distance in original pixels between a predicted and a labelled
keypoint, over the joints that count (`visible`). Statistics pool every such keypoint, each with
the same weight (the tutorial's mean error); an image's error is the mean over its joints.
"% of the image side" divides by max(width, height), the side the letterbox fits to the model
input; "at the model size" is the same error in model-input pixels (x size / side), the unit the
tutorial quotes ("6 px at 128"). PCK(t) = fraction of keypoints with error <= t px, t in 0..30 px;
its AUC is the curve's trapezoid area divided by 30 (1.0 = every keypoint exact).

OUT/report.json   headline keys mean_error_px, mean_error_pct, median_error_px, auc; then all tables
OUT/report.md     the same for people
OUT/error_hist.png, OUT/pck.png, OUT/gallery.png (worst row above best row)
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from handpose.atomic import write_bytes, write_json, write_text
from handpose.console import make_console
from handpose.skeleton import BONES, FINGER_COLORS, FINGERS, JOINT_NAMES, NUM_JOINTS, joint_finger

OUTPUTS = ("report.json", "report.md", "error_hist.png", "pck.png", "gallery.png")
PCK_MAX_PX = 30.0
PCK_THRESHOLDS_PX = np.linspace(0.0, PCK_MAX_PX, 61)  # 0.5 px steps
STATS = ("mean", "median", "p90", "p95", "max")
GT_COLOR = (255, 255, 255)


@dataclass(frozen=True)
class Labelled:
    """Predictions with their labels, all in original pixels."""

    index: np.ndarray  # (N,) input index (to reload the image)
    paths: list[str]
    pred: np.ndarray  # (N, 21, 2)
    gt: np.ndarray  # (N, 21, 2)
    visible: np.ndarray  # (N, 21) bool: joints that count
    side: np.ndarray  # (N,) max(width, height), px


# ---------------------------------------------------------------------------------------------
# Metrics (pure)


def keypoint_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(N, 21, 2) x 2 -> (N, 21) Euclidean distances."""
    return np.linalg.norm(np.asarray(pred, np.float64) - np.asarray(gt, np.float64), axis=-1)


def image_errors(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(N,) mean error over each image's visible joints; NaN for an image with none."""
    e = np.where(visible, keypoint_errors(pred, gt), 0.0)
    n = visible.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, e.sum(axis=1) / n, np.nan)


def describe(values: np.ndarray) -> dict[str, float]:
    """mean, median, p90, p95, max of a 1-D array (linear-interpolated percentiles)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {k: float("nan") for k in STATS}
    p50, p90, p95 = np.percentile(v, [50, 90, 95])
    return {
        "mean": float(v.mean()),
        "median": float(p50),
        "p90": float(p90),
        "p95": float(p95),
        "max": float(v.max()),
    }


def pck_curve(errors: np.ndarray, thresholds: np.ndarray = PCK_THRESHOLDS_PX) -> np.ndarray:
    """Fraction of `errors` <= each threshold."""
    e = np.sort(np.asarray(errors, np.float64))
    return np.searchsorted(e, thresholds, side="right") / max(len(e), 1)


def pck_auc(thresholds: np.ndarray, pck: np.ndarray) -> float:
    """Trapezoid area under the PCK curve, divided by the threshold range (so in [0, 1])."""
    t, p = np.asarray(thresholds, np.float64), np.asarray(pck, np.float64)
    return float(np.sum((p[1:] + p[:-1]) / 2 * np.diff(t)) / (t[-1] - t[0]))


def summarise(lab: Labelled, model_size: int, *, extremes: int = 10) -> dict[str, Any]:
    """Everything report.json holds."""
    err = keypoint_errors(lab.pred, lab.gt)
    vis = lab.visible.astype(bool)
    pct = err / lab.side[:, None] * 100.0
    flat, flat_pct = err[vis], pct[vis]
    pck = pck_curve(flat)
    per_image = image_errors(lab.pred, lab.gt, vis)
    order = [int(i) for i in np.argsort(np.nan_to_num(per_image, nan=-1.0), kind="stable")]
    order = [i for i in order if np.isfinite(per_image[i])]

    def image_row(i: int) -> dict[str, Any]:
        return {
            "path": lab.paths[i],
            "error_px": float(per_image[i]),
            "error_pct": float(per_image[i] / lab.side[i] * 100.0),
        }

    def group_row(cols: np.ndarray) -> dict[str, Any]:
        m = vis[:, cols]
        e, p = err[:, cols][m], pct[:, cols][m]
        return {
            "keypoints": int(m.sum()),
            "error_px": describe(e),
            "mean_error_pct": float(p.mean()) if p.size else float("nan"),
        }

    px, pc = describe(flat), describe(flat_pct)
    return {
        "mean_error_px": px["mean"],
        "mean_error_pct": pc["mean"],
        "median_error_px": px["median"],
        "auc": pck_auc(PCK_THRESHOLDS_PX, pck),
        "images": int(len(lab.paths)),
        "keypoints": int(vis.sum()),
        "model_size": int(model_size),
        "error_px": px,
        "error_pct": pc,
        "error_model_px": describe(flat_pct / 100.0 * model_size),
        "pck": {"thresholds_px": PCK_THRESHOLDS_PX.tolist(), "fraction": pck.tolist()},
        "per_joint": [
            {"joint": j, "name": JOINT_NAMES[j], **group_row(np.array([j]))} for j in range(NUM_JOINTS)
        ],
        "per_finger": [
            {"finger": f, **group_row(np.array([j for j in range(NUM_JOINTS) if joint_finger(j) == f]))}
            for f in ("wrist", *FINGERS)
        ],
        "worst": [image_row(i) for i in order[::-1][:extremes]],
        "best": [image_row(i) for i in order[:extremes]],
    }


# ---------------------------------------------------------------------------------------------
# Entry


def write_report(
    out: str | os.PathLike,
    lab: Labelled,
    *,
    model_size: int,
    load_image: Callable[[int], np.ndarray],
    console: Console | None = None,
    gallery: int = 4,
) -> dict[str, Any] | None:
    """Write report.json, report.md, the plots and the gallery into `out`; print the headline
    table. `load_image(index)` returns an input image (RGB uint8) for the gallery. Returns the
    report dict, or None when no keypoint has a label."""
    out = Path(out)
    console = console or make_console(stderr=True)
    if not lab.visible.any():
        console.print("no labelled keypoints: no report")
        return None
    rep = summarise(lab, model_size)
    write_json(out / "report.json", rep)
    write_text(out / "report.md", render_markdown(rep))
    _plots(out, keypoint_errors(lab.pred, lab.gt)[lab.visible.astype(bool)], rep)
    save_png(_gallery(lab, rep, load_image, gallery), out / "gallery.png")
    console.print(_headline_table(rep))
    return rep


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt(v: float, digits: int = 2) -> str:
    return "-" if not np.isfinite(v) else f"{v:.{digits}f}"


def render_markdown(rep: dict[str, Any]) -> str:
    """report.md from the report dict."""
    size = rep["model_size"]
    lines = [
        "# Keypoint error report",
        "",
        f"{rep['images']} images, {rep['keypoints']} labelled keypoints. Errors are distances in original "
        f"pixels; % of the image side (max of width and height); and at the model's {size} px input, "
        "as the tutorial reports them.",
        "",
        "| error | " + " | ".join(STATS) + " |",
        "|---|" + "---|" * len(STATS),
    ]
    for label, key in (("px", "error_px"), ("% of side", "error_pct"), (f"px at {size}", "error_model_px")):
        lines.append(f"| {label} | " + " | ".join(_fmt(rep[key][s]) for s in STATS) + " |")
    pck = dict(zip(rep["pck"]["thresholds_px"], rep["pck"]["fraction"], strict=True))
    marks = [5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    lines += [
        "",
        f"PCK AUC over 0..{PCK_MAX_PX:g} px: **{rep['auc']:.4f}**",
        "",
        "| PCK@ | " + " | ".join(f"{t:g} px" for t in marks) + " |",
        "|---|" + "---|" * len(marks),
        "| fraction | " + " | ".join(f"{pck[t]:.3f}" for t in marks) + " |",
        "",
        "## Per finger",
        "",
        "| finger | keypoints | mean px | median px | p90 px | mean % |",
        "|---|---|---|---|---|---|",
    ]
    for r in rep["per_finger"]:
        e = r["error_px"]
        lines.append(
            f"| {r['finger']} | {r['keypoints']} | {_fmt(e['mean'])} | {_fmt(e['median'])} | "
            f"{_fmt(e['p90'])} | {_fmt(r['mean_error_pct'])} |"
        )
    lines += [
        "",
        "## Per joint",
        "",
        "| # | joint | mean px | median px | p90 px | mean % |",
        "|---|---|---|---|---|---|",
    ]
    for r in rep["per_joint"]:
        e = r["error_px"]
        lines.append(
            f"| {r['joint']} | {r['name']} | {_fmt(e['mean'])} | {_fmt(e['median'])} | "
            f"{_fmt(e['p90'])} | {_fmt(r['mean_error_pct'])} |"
        )
    for title, key in (("Worst images", "worst"), ("Best images", "best")):
        lines += ["", f"## {title}", "", "| # | image | mean px | % of side |", "|---|---|---|---|"]
        lines += [
            f"| {k} | `{r['path']}` | {_fmt(r['error_px'])} | {_fmt(r['error_pct'])} |"
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
        "![worst (top row) and best (bottom row) images](gallery.png)",
        "",
    ]
    return "\n".join(lines)


def _headline_table(rep: dict[str, Any]) -> Table:
    size = rep["model_size"]
    t = Table(
        title=f"keypoint error: {rep['images']} images, {rep['keypoints']} keypoints, "
        f"PCK AUC 0-{PCK_MAX_PX:g} px {rep['auc']:.3f}"
    )
    t.add_column("")
    for col in ("px", "% of side", f"px at {size}"):
        t.add_column(col, justify="right")
    for s in STATS:
        t.add_row(s, _fmt(rep["error_px"][s]), _fmt(rep["error_pct"][s]), _fmt(rep["error_model_px"][s]))
    return t


def _plots(out: Path, errors: np.ndarray, rep: dict[str, Any]) -> None:
    """error_hist.png and pck.png with matplotlib's object API (no pyplot: no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def save(fig: Figure, name: str) -> None:
        buf = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})
        write_bytes(out / name, buf.getvalue())

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    top = max(PCK_MAX_PX, float(np.percentile(errors, 99)))
    ax.hist(np.clip(errors, 0, top), bins=60, range=(0, top), color="tab:blue")
    ax.axvline(rep["error_px"]["mean"], color="tab:red", label=f"mean {rep['error_px']['mean']:.2f} px")
    ax.axvline(
        rep["error_px"]["median"], color="tab:orange", label=f"median {rep['error_px']['median']:.2f} px"
    )
    ax.set(xlabel="keypoint error, px (last bin: at least)", ylabel="keypoints", title="Keypoint error")
    ax.legend()
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
    image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None = None, *, caption: str | None = None
) -> Image.Image:
    """The image (longer side scaled into 256..512 px) with the predicted skeleton in finger
    colours and, when given, the ground truth in white beneath it."""
    h, w = image.shape[:2]
    side = max(w, h)
    f = min(max(side, 256), 512) / side
    canvas = Image.fromarray(image).resize(
        (max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BILINEAR
    )
    draw = ImageDraw.Draw(canvas)
    lw = max(1, round(min(canvas.size) / 160))
    for uv, colours in ((gt, None), (pred, FINGER_COLORS)):
        if uv is None:
            continue
        p = np.asarray(uv, np.float64) * f
        for a, b in BONES:
            colour = GT_COLOR if colours is None else colours[joint_finger(b)]
            draw.line([tuple(p[a]), tuple(p[b])], fill=colour, width=lw)
        r = lw + 1
        for j, (x, y) in enumerate(p):
            if colours is None:  # ground truth: white rings
                draw.ellipse([x - r, y - r, x + r, y + r], outline=GT_COLOR)
            else:  # prediction: filled, black-edged dots (the wrist grey)
                fill = (160, 160, 160) if j == 0 else colours[joint_finger(j)]
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(0, 0, 0))
    return _caption(canvas, caption) if caption else canvas


def _caption(image: Image.Image, text: str) -> Image.Image:
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((4, 4), text)
    draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=(0, 0, 0))
    draw.text((4, 4), text, fill=(255, 255, 255))
    return image


def _gallery(
    lab: Labelled, rep: dict[str, Any], load_image: Callable[[int], np.ndarray], k: int
) -> Image.Image:
    """Worst k images in the top row, best k below, each with ground truth and prediction."""
    tile = 224
    where = {p: i for i, p in enumerate(lab.paths)}
    rows = [rep["worst"][:k], rep["best"][:k]]
    cols = max(1, max(len(r) for r in rows))
    sheet = Image.new("RGB", (cols * tile, 2 * tile), (40, 40, 40))
    for r, row in enumerate(rows):
        for c, entry in enumerate(row):
            i = where[entry["path"]]
            label = f"{'worst' if r == 0 else 'best'} {entry['error_px']:.1f}px {Path(entry['path']).name}"
            img = draw_hand(load_image(int(lab.index[i])), lab.pred[i], lab.gt[i])
            img.thumbnail((tile, tile), Image.Resampling.BILINEAR)
            img = _caption(img, label)
            sheet.paste(img, (c * tile + (tile - img.width) // 2, r * tile + (tile - img.height) // 2))
    return sheet


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())

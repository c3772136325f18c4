"""Detection and multi-hand pose figures, in the units YOLO-pose and COCO users know. One home.

Similarities between a prediction and a labelled hand:
- box IoU of (x0, y0, x1, y1) boxes (`box_iou`);
- OKS, Object Keypoint Similarity, exactly as Ultralytics computes it for a pose that is not
  COCO's 17 keypoints (`oks`; ultralytics/utils/metrics.py `kpt_iou`, its pose validator's
  `sigma = np.ones(nkpt) / nkpt` and `area = box w * box h * 0.53`):

      OKS = sum_j labelled_j * exp(-d_j^2 / ((2 sigma_j)^2 * (area + 1e-7) * 2)) / (sum_j labelled_j + 1e-7)

  with d_j the distance (px) of joint j, sigma_j = 1/21, and the LABEL's box for the area.

Matching (`match`), as pycocotools does per image: predictions in descending score order, each
takes the not yet matched label with the highest similarity >= the threshold; a label is matched
at most once. Average precision (`average_precision`): COCO's 101-point interpolation as
pycocotools' `accumulate` computes it: over all photos, predictions by descending score (stable
sort), cumulative true/false positives -> recall and precision, precision made non-increasing
from the right, sampled at recall 0, 0.01, ..., 1 (0 where that recall is never reached), the
mean of the 101 samples. (Ultralytics integrates the same envelope with the trapezoid rule over
the same 101 points, which differs in the third decimal.) AP50 is at threshold 0.5, AP50-95 the
mean over 0.50, 0.55, ..., 0.95. Every prediction given counts (no maxDets cut: the detector's
decode keeps at most its top K).

Recall and precision at a score threshold: the predictions scoring at least `min_score`, matched
at threshold 0.5; recall = matched labels / labels, precision = matched predictions / predictions
(1 when there is no prediction, as a detector that finds nothing makes no false claim).

Pose figures leave out labelled hands without a single labelled joint (OKS is undefined for them;
pycocotools likewise ignores labels with num_keypoints 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from handpose.skeleton import NUM_JOINTS

OKS_AREA = 0.53  # OKS area = label box w x h x this (Ultralytics, after xtcocotools)
EPS = 1e-7  # Ultralytics' eps in kpt_iou
THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())  # AP50-95 thresholds
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's recall thresholds


def oks_sigmas(joints: int = NUM_JOINTS) -> np.ndarray:
    """Per-joint OKS sigmas for a pose that is not COCO's: 1 / joints each (Ultralytics)."""
    return np.full(joints, 1.0 / joints)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (N, M) of boxes a (N, 4) and b (M, 4), x0, y0, x1, y1 (0 for empty boxes)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def oks(
    pred_uv: np.ndarray,
    label_uv: np.ndarray,
    labelled: np.ndarray,
    label_boxes: np.ndarray,
    sigmas: np.ndarray | None = None,
) -> np.ndarray:
    """OKS (P, G) of predicted keypoints (P, J, 2) against labelled hands: keypoints (G, J, 2),
    `labelled` (G, J) bool, boxes (G, 4) x0, y0, x1, y1 (px). See the module docstring."""
    e, mask = _oks_terms(pred_uv, label_uv, labelled, label_boxes, sigmas)
    return (np.exp(-e) * mask[None]).sum(-1) / (mask.sum(-1)[None] + EPS)


def log_oks(
    pred_uv: np.ndarray,
    label_uv: np.ndarray,
    labelled: np.ndarray,
    label_boxes: np.ndarray,
    sigmas: np.ndarray | None = None,
) -> np.ndarray:
    """log(OKS) (P, G), computed in the log domain so that predictions far from every hand (whose
    OKS underflows to 0) still rank by distance; -inf for a label without a labelled joint."""
    e, mask = _oks_terms(pred_uv, label_uv, labelled, label_boxes, sigmas)
    terms = np.where(mask[None], -e, -np.inf)  # (P, G, J)
    top = terms.max(axis=-1, initial=-np.inf)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        lse = safe + np.log(np.exp(terms - safe[..., None]).sum(-1))
        return np.where(np.isfinite(top), lse - np.log(mask.sum(-1)[None] + EPS), -np.inf)


def _oks_terms(
    pred_uv: np.ndarray,
    label_uv: np.ndarray,
    labelled: np.ndarray,
    label_boxes: np.ndarray,
    sigmas: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """OKS's exponents d^2 / ((2 sigma)^2 (area + eps) 2) (P, G, J) and the labelled mask (G, J)."""
    pred = np.asarray(pred_uv, np.float64).reshape(-1, NUM_JOINTS, 2)
    label = np.asarray(label_uv, np.float64).reshape(-1, NUM_JOINTS, 2)
    mask = np.asarray(labelled, bool).reshape(-1, NUM_JOINTS)
    boxes = np.asarray(label_boxes, np.float64).reshape(-1, 4)
    sigma = oks_sigmas(NUM_JOINTS) if sigmas is None else np.asarray(sigmas, np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * OKS_AREA  # (G,)
    label = np.where(mask[..., None], label, 0.0)  # unlabelled joints may hold NaN
    d = ((pred[:, None] - label[None]) ** 2).sum(-1)  # (P, G, J)
    return d / ((2 * sigma) ** 2 * (area[None, :, None] + EPS) * 2), mask


def match(similarity: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy matching of one photo: (P,) index of the label each prediction matched, -1 for none.
    Predictions by descending score (stable) each take the unmatched label of highest similarity
    (P, G) >= threshold (the first such label on a tie)."""
    sim = np.asarray(similarity, np.float64)
    if sim.ndim != 2 or len(sim) != len(scores):
        raise ValueError(
            f"similarity must be (predictions, labels), got {sim.shape} for {len(scores)} scores"
        )
    out = np.full(len(scores), -1, np.int64)
    free = np.ones(sim.shape[1], bool)
    for p in np.argsort(-np.asarray(scores, np.float64), kind="mergesort"):
        candidates = np.where(free & (sim[p] >= threshold), sim[p], -np.inf)
        if candidates.size and np.isfinite(candidates.max()):
            g = int(np.argmax(candidates))
            out[p], free[g] = g, False
    return out


def pair_greedily(similarity: np.ndarray) -> np.ndarray:
    """The pairing of the error figures (no threshold, no score order): (P,) index of the label
    each prediction is paired with, -1 for none. Pairs in descending similarity (P, G) (ties: the
    earlier prediction, then the earlier label), each prediction and each label used once; a
    similarity of -inf or NaN never pairs."""
    sim = np.asarray(similarity, np.float64)
    out = np.full(sim.shape[0], -1, np.int64)
    if not sim.size:
        return out
    flat = np.where(np.isnan(sim), -np.inf, sim).ravel()
    free = np.ones(sim.shape[1], bool)
    for k in np.argsort(-flat, kind="mergesort"):
        if flat[k] == -np.inf:
            break
        p, g = divmod(int(k), sim.shape[1])
        if out[p] < 0 and free[g]:
            out[p], free[g] = g, False
    return out


def average_precision(scores: np.ndarray, true_positive: np.ndarray, n_labels: int) -> float:
    """COCO's 101-point AP of predictions over all photos: `scores` (N,), `true_positive` (N,)
    bool, `n_labels` labelled hands. NaN when there is no label (undefined, as pycocotools' -1)."""
    if n_labels == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    tp = np.asarray(true_positive, bool)[order]
    tp_sum, fp_sum = np.cumsum(tp), np.cumsum(~tp)
    recall = tp_sum / n_labels
    precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # non-increasing from the right
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.zeros(len(RECALL_POINTS))
    reached = at < len(precision)
    q[reached] = precision[at[reached]]
    return float(np.mean(q))


@dataclass(frozen=True)
class Hands:
    """The hands of one photo, predicted or labelled, in the photo's pixels.

    Predictions carry `scores` (and `uv` for pose figures); labels carry `uv` and `labelled`
    for pose figures. Boxes are x0, y0, x1, y1.
    """

    boxes: np.ndarray  # (n, 4)
    scores: np.ndarray | None = None  # (n,) predictions only
    uv: np.ndarray | None = None  # (n, 21, 2)
    labelled: np.ndarray | None = None  # (n, 21) bool, labels only

    def __len__(self) -> int:
        return len(self.boxes)


def _similarity(kind: str, pred: Hands, label: Hands) -> np.ndarray:
    if kind == "box":
        return box_iou(pred.boxes, label.boxes)
    assert pred.uv is not None and label.uv is not None and label.labelled is not None
    return oks(pred.uv, label.uv, label.labelled, label.boxes)


def _pose_labels(label: Hands) -> Hands:
    """The labelled hands OKS is defined for (at least one labelled joint)."""
    assert label.labelled is not None and label.uv is not None
    keep = np.asarray(label.labelled, bool).reshape(-1, NUM_JOINTS).any(axis=1)
    return Hands(label.boxes[keep], None, label.uv[keep], label.labelled[keep])


def hand_figures(
    preds: Sequence[Hands], labels: Sequence[Hands], *, min_score: float, pose: bool | None = None
) -> dict[str, float]:
    """Figures over photos (preds[i] and labels[i] are photo i's):

    box_recall, box_precision     at IoU >= 0.5 for predictions scoring >= min_score
    box_ap50, box_ap50_95         COCO 101-point AP over every prediction given
    pose_recall, pose_precision, pose_ap50, pose_ap50_95   the same by OKS (when `pose`; by
                                  default when every prediction and label has keypoints)
    labels, predictions           labelled hands, predictions scoring >= min_score
    """
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} photos of predictions for {len(labels)} photos of labels")
    if pose is None:
        pose = all(p.uv is not None for p in preds) and all(
            lab.uv is not None and lab.labelled is not None for lab in labels
        )
    out: dict[str, float] = {
        "labels": float(sum(len(lab) for lab in labels)),
        "predictions": float(sum(int((np.asarray(p.scores) >= min_score).sum()) for p in preds)),
    }
    for kind in ("box", "pose") if pose else ("box",):
        out.update(_figures(kind, preds, labels, min_score))
    return out


def true_positives(kind: str, pred: Hands, label: Hands) -> tuple[np.ndarray, int]:
    """One photo's COCO matching at every threshold: (P, len(THRESHOLDS)) bool, whether each
    prediction matched a label by `kind` ("box": IoU, "pose": OKS), and the labels that count
    (pose: those with a labelled joint). Streams: `figures` adds photos up."""
    label = _pose_labels(label) if kind == "pose" else label
    s = np.asarray(pred.scores, np.float64).reshape(-1)
    sim = _similarity(kind, pred, label) if len(pred) and len(label) else np.zeros((len(s), len(label)))
    tp = np.stack([match(sim, s, t) >= 0 for t in THRESHOLDS], axis=1).reshape(len(s), len(THRESHOLDS))
    return tp, len(label)


def figures(
    kind: str, scores: np.ndarray, true_positive: np.ndarray, n_labels: int, min_score: float = 0.0
) -> dict[str, float]:
    """{kind}_recall, _precision (threshold 0.5, the predictions scoring >= min_score), _ap50 and
    _ap50_95 of predictions over all photos: `scores` (N,) and `true_positive` (N, THRESHOLDS)
    from `true_positives`, `n_labels` their labels. (The predictions above min_score are matched
    first, by descending score, so their matches are those of the whole set.)"""
    scores = np.asarray(scores, np.float64).reshape(-1)
    tp = np.asarray(true_positive, bool).reshape(len(scores), len(THRESHOLDS))
    above = scores >= min_score
    shown, matched = int(above.sum()), int(tp[above, 0].sum())
    aps = [average_precision(scores, tp[:, t], n_labels) for t in range(len(THRESHOLDS))]
    return {
        f"{kind}_recall": matched / n_labels if n_labels else float("nan"),
        f"{kind}_precision": matched / shown if shown else 1.0,
        f"{kind}_ap50": aps[0],
        f"{kind}_ap50_95": float(np.mean(aps)),
    }


def _figures(
    kind: str, preds: Sequence[Hands], labels: Sequence[Hands], min_score: float
) -> dict[str, float]:
    scores, tps = [], []
    n_labels = 0
    for pred, label in zip(preds, labels, strict=True):
        tp, n = true_positives(kind, pred, label)
        scores.append(np.asarray(pred.scores, np.float64).reshape(-1))
        tps.append(tp)
        n_labels += n
    all_scores = np.concatenate(scores) if scores else np.zeros(0)
    all_tp = np.concatenate(tps) if tps else np.zeros((0, len(THRESHOLDS)), bool)
    return figures(kind, all_scores, all_tp, n_labels, min_score)

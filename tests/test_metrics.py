"""metrics.py against values computed by hand (OKS, IoU, greedy matching, COCO 101-point AP)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from handpose.inference import Crop, Photo
from handpose.metrics import (
    THRESHOLDS,
    Hands,
    average_precision,
    box_iou,
    hand_figures,
    match,
    oks,
    oks_sigmas,
)
from handpose.predict_inputs import LabelledHand
from handpose.predict_outputs import InputImage, match_hands, separate_hands

BOX = np.array([[0.0, 0.0, 10.0, 10.0]])  # area 100 -> OKS area 53


def _uv(offset: float = 0.0) -> np.ndarray:
    return np.arange(42, dtype=np.float64).reshape(1, 21, 2) + offset


def test_oks_by_hand() -> None:
    """sigma 1/21, area 0.53 x 100 = 53: a (1, 1) px shift on every joint gives d^2 = 2 and
    OKS = exp(-2 / ((2/21)^2 x 53 x 2)) = exp(-2 x 441 / 424) = 0.12490664..."""
    labelled = np.ones((1, 21), bool)
    assert oks(_uv(), _uv(), labelled, BOX)[0, 0] == pytest.approx(1.0, abs=1e-6)
    want = math.exp(-2 * 441 / 424)
    assert want == pytest.approx(0.1249066427, abs=1e-9)
    assert oks(_uv(1.0), _uv(), labelled, BOX)[0, 0] == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(oks_sigmas(), np.full(21, 1 / 21))


def test_oks_counts_labelled_joints_only() -> None:
    """Joints 0-9 exact, 10-20 far away but not labelled (and NaN): OKS 1; with them labelled:
    (10 x 1 + 11 x exp(-big)) / 21 = 10/21."""
    pred, label = _uv(), _uv()
    pred[0, 10:] += 1000.0
    labelled = np.zeros((1, 21), bool)
    labelled[0, :10] = True
    label_nan = label.copy()
    label_nan[0, 10:] = np.nan
    assert oks(pred, label_nan, labelled, BOX)[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert oks(pred, label, np.ones((1, 21), bool), BOX)[0, 0] == pytest.approx(10 / 21, abs=1e-6)


def test_oks_scales_with_the_label_box_and_has_shape_p_by_g() -> None:
    """The same 1 px shift on a 20 x 20 box (area 4 x larger): exp(-2 x 441 / 1696)."""
    labelled = np.ones((2, 21), bool)
    labels = np.concatenate([_uv(), _uv()])
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0]])
    got = oks(np.concatenate([_uv(1.0), _uv(), _uv(1.0)]), labels, labelled, boxes)
    assert got.shape == (3, 2)
    assert got[0, 1] == pytest.approx(math.exp(-2 * 441 / 1696), rel=1e-6)
    assert got[1, 0] == pytest.approx(1.0, abs=1e-6)


def test_box_iou_by_hand() -> None:
    a = np.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 5.0]])
    b = np.array([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    np.testing.assert_allclose(box_iou(a, b), [[50 / 150, 0.0], [0.0, 0.0]])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 2)


def test_matching_takes_predictions_by_score_and_labels_once() -> None:
    """Prediction 1 scores highest and takes label 0 (its best); prediction 0 then gets label 1;
    prediction 2 finds nothing left above the threshold."""
    sim = np.array([[0.9, 0.6], [0.95, 0.2], [0.8, 0.4]])
    np.testing.assert_array_equal(match(sim, np.array([0.5, 0.9, 0.1]), 0.5), [1, 0, -1])
    np.testing.assert_array_equal(match(sim, np.array([0.5, 0.9, 0.1]), 0.7), [-1, 0, -1])
    assert match(np.zeros((0, 3)), np.zeros(0), 0.5).shape == (0,)
    with pytest.raises(ValueError):
        match(np.zeros((2, 3)), np.zeros(3), 0.5)


def test_average_precision_by_hand() -> None:
    """3 labels; predictions by score TP, FP, TP: recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3
    -> envelope 1, 2/3, 2/3. Recall points 0.00-0.33 (34) read 1, 0.34-0.66 (33) read 2/3, the
    34 above 2/3 read 0: AP = (34 + 33 x 2/3) / 101 = 56/101."""
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1], bool), 3) == pytest.approx(
        56 / 101
    )
    # order comes from the scores, not the input order
    assert average_precision(np.array([0.7, 0.9, 0.8]), np.array([1, 1, 0], bool), 3) == pytest.approx(
        56 / 101
    )
    assert average_precision(np.array([0.5]), np.array([True]), 1) == pytest.approx(1.0)
    assert average_precision(np.zeros(0), np.zeros(0, bool), 2) == 0.0
    assert math.isnan(average_precision(np.array([0.5]), np.array([False]), 0))


def test_hand_figures_by_hand() -> None:
    """Photo A: two labels; predictions 0.9 (IoU 1 with label 0), 0.6 (IoU 1/3 with label 1: a
    miss at 0.5), 0.2 (IoU 1 with label 1, below min_score 0.5). Photo B: no label, one
    prediction 0.8. Above 0.5: 3 predictions, 1 match -> recall 1/2, precision 1/3.
    AP50 over all: by score 0.9 TP, 0.8 FP, 0.6 FP, 0.2 TP: recall 1/2, 1/2, 1/2, 1; precision
    1, 1/2, 1/3, 1/2 -> envelope 1, 1/2, 1/2, 1/2: points 0-0.5 (51) read 1, 0.51-1 (50) read
    1/2: AP50 = (51 + 25) / 101. At IoU >= 0.55 the 1/3 overlap stays a miss: same AP up to 0.95."""
    labels = [Hands(np.array([[0.0, 0, 10, 10], [20, 0, 30, 10]])), Hands(np.zeros((0, 4)))]
    preds = [
        Hands(np.array([[0.0, 0, 10, 10], [25, 0, 35, 10], [20, 0, 30, 10]]), np.array([0.9, 0.6, 0.2])),
        Hands(np.array([[50.0, 50, 60, 60]]), np.array([0.8])),
    ]
    f = hand_figures(preds, labels, min_score=0.5)
    assert f["box_recall"] == pytest.approx(0.5)
    assert f["box_precision"] == pytest.approx(1 / 3)
    assert f["box_ap50"] == pytest.approx(76 / 101)
    assert f["box_ap50_95"] == pytest.approx(76 / 101)
    assert f["labels"] == 2 and f["predictions"] == 3
    assert "pose_ap50" not in f
    assert len(THRESHOLDS) == 10 and THRESHOLDS[0] == 0.5 and THRESHOLDS[-1] == 0.95


def test_pose_figures_use_oks_and_skip_labels_without_joints() -> None:
    """One photo, two labelled hands (the second with no labelled joint: left out), two
    predictions: one exact (OKS 1), one 1 px off on a 10 px box (OKS 0.1249 < 0.5: a miss).
    Pose: 1 label, precision 1/2, AP50 = 1 (the exact one scores highest). At OKS >= 0.5 the
    exact one matches at every threshold: AP50-95 = 1."""
    boxes = np.array([[0.0, 0, 10, 10], [40.0, 0, 50, 10]])
    uv = np.concatenate([_uv(), _uv(40.0)])
    labelled = np.array([[True] * 21, [False] * 21])
    labels = [Hands(boxes, uv=uv, labelled=labelled)]
    preds = [
        Hands(
            boxes + [[0, 0, 0, 0], [1, 0, 1, 0]], np.array([0.9, 0.7]), uv=np.concatenate([_uv(), _uv(1.0)])
        )
    ]
    f = hand_figures(preds, labels, min_score=0.5)
    assert f["pose_recall"] == pytest.approx(1.0)
    assert f["pose_precision"] == pytest.approx(0.5)
    assert f["pose_ap50"] == pytest.approx(1.0) and f["pose_ap50_95"] == pytest.approx(1.0)
    # boxes: label 1 counts (IoU 0.818 with the second prediction): recall 1, precision 1
    assert f["box_recall"] == pytest.approx(1.0) and f["box_precision"] == pytest.approx(1.0)


def test_a_detector_that_finds_nothing() -> None:
    f = hand_figures([Hands(np.zeros((0, 4)), np.zeros(0))], [Hands(BOX)], min_score=0.3)
    assert f["box_recall"] == 0.0 and f["box_precision"] == 1.0 and f["box_ap50"] == 0.0
    with pytest.raises(ValueError):
        hand_figures([], [Hands(BOX)], min_score=0.3)


def _labelled(x0: float, y0: float) -> LabelledHand:
    """A labelled hand: 21 joints on a 20 px grid starting at (x0, y0), its box around them."""
    uv = np.stack(np.meshgrid(np.linspace(0, 20, 7), np.linspace(0, 20, 3)), -1).reshape(21, 2) + (x0, y0)
    return LabelledHand(0, uv, np.full(21, 2, np.uint8), np.array([x0, y0, x0 + 20, y0 + 20]))


def _image(crops: list[Crop], hands: list[LabelledHand]) -> InputImage:
    return InputImage(None, 200, 200, hands, Photo(lambda: None, 200, 200, crops), [])  # type: ignore[arg-type]


def _crop(hand: LabelledHand, shift: float, *, found: bool) -> Crop:
    uv = hand.uv + shift
    box = np.array([uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(), uv[:, 1].max()]) if found else None
    return Crop(box, (100.0, 100.0, 200.0), uv=uv, found=found, box_score=0.9 if found else None)


def test_a_found_hand_pairs_only_with_a_labelled_hand_it_overlaps() -> None:
    """The error figures' pairing: a hand the detector found far from the one labelled hand is
    another hand (some photos label one of two), so it is scored against nothing and the label
    is missed; the same prediction from the whole-image path is that path's answer for the
    labelled hand and is scored against it; a found hand on the label pairs with it."""
    label, other = _labelled(20, 20), _labelled(150, 150)
    far = _crop(other, 0.0, found=True)
    assert match_hands(_image([far], [label]))[0] == [None]
    assert match_hands(_image([_crop(other, 0.0, found=False)], [label]))[0] == [0]
    near = _crop(label, 3.0, found=True)  # 3 px off: boxes overlap
    assert match_hands(_image([far, near], [label]))[0] == [None, 0]
    # two labelled hands, each found: each pairs with its own, whatever the order
    assert match_hands(_image([far, near], [label, other]))[0] == [1, 0]
    np.testing.assert_array_equal(
        separate_hands([far, near, _crop(label, 0.0, found=False)], np.stack([label.box, other.box])),
        [[True, False], [False, True], [False, False]],
    )

"""tools/peer_score.py: a predict folder scored against a YOLO-pose folder by the rule asked for
(--score, --box-floor), with the hand-free images that get a hand counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _dataset(tmp_path: Path) -> tuple[Path, Path]:
    """hand.jpg (one labelled hand) and empty.jpg (no hand), 100 x 100, and a predict folder: an
    exact hand (box 0.9, keypoint score 0.4) and a box on the empty photo (box 0.8, keypoint 0.1)."""
    images, labels, pred = tmp_path / "set" / "images", tmp_path / "set" / "labels", tmp_path / "pred"
    for d in (images, labels, pred):
        d.mkdir(parents=True)
    for name in ("hand", "empty"):
        Image.new("RGB", (100, 100), (90, 90, 90)).save(images / f"{name}.jpg")
    uv = np.stack([np.linspace(30, 70, 21), np.linspace(20, 80, 21)], axis=1)
    kps = " ".join(f"{x / 100:.4f} {y / 100:.4f} 2" for x, y in uv)
    (labels / "hand.txt").write_text(f"0 0.5 0.5 0.5 0.7 {kps}\n")
    (labels / "empty.txt").write_text("")
    rows = [
        {"path": str(images / "hand.jpg"), "box": [25, 15, 75, 85], "box_score": 0.9, "score": 0.4,
         "keypoints": [[x, y, 0.4] for x, y in uv.tolist()]},
        {"path": str(images / "empty.jpg"), "box": [10, 10, 40, 40], "box_score": 0.8, "score": 0.1,
         "keypoints": [[20.0, 20.0, 0.1]] * 21},
    ]  # fmt: skip
    (pred / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pred, images.parent


def _score(pred: Path, data: Path, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "peer_score.py"), str(pred), str(data), *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    ("args", "recall", "precision", "free"),
    [
        (("--score", "box"), 1.0, 0.5, 1),  # the empty photo's box (0.8) counts
        (("--score", "hand"), 1.0, 1.0, 0),  # sqrt(0.8 x 0.1) = 0.28: dropped; the hand sqrt(0.36) = 0.6
        (("--score", "keypoint"), 0.0, 1.0, 0),  # the hand's keypoint score 0.4 is under 0.5: no prediction
        (("--box-floor", "0.85"), 1.0, 1.0, 0),  # auto = box_score here; the 0.8 box is left out
    ],
)
def test_rules(tmp_path: Path, args: tuple[str, ...], recall: float, precision: float, free: int) -> None:
    pred, data = _dataset(tmp_path)
    got = _score(pred, data, "--min-score", "0.5", *args)
    assert got["images"] == 2 and got["hand_free_images"] == 1
    assert got["pose_recall"] == recall and got["pose_precision"] == precision
    assert got["hand_free_images_with_a_hand"] == free
    assert got["pct_of_box"] == (pytest.approx(0.0, abs=1e-3) if recall else None)


def test_joint_scores_against_the_presence_score(tmp_path: Path) -> None:
    """--score joints takes the mean of the joints' scores where `score` is a presence head's:
    the empty photo's presence 0.9 (joints 0.1) keeps its box by "hand", drops it by "joints"."""
    pred, data = _dataset(tmp_path)
    rows = [json.loads(line) for line in (pred / "predictions.jsonl").read_text().splitlines()]
    rows[1]["score"] = 0.9
    (pred / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hand = _score(pred, data, "--min-score", "0.5", "--score", "hand")
    joints = _score(pred, data, "--min-score", "0.5", "--score", "joints")
    assert (hand["pose_precision"], hand["hand_free_images_with_a_hand"]) == (0.5, 1)
    assert (joints["pose_precision"], joints["hand_free_images_with_a_hand"]) == (1.0, 0)
    assert hand["pose_recall"] == joints["pose_recall"] == 1.0  # sqrt(0.9 x 0.4) = 0.6 either way

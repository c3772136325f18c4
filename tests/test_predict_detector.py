"""`handpose predict --detector`: every hand of a photo, the thresholds, the presence head, the
multi-hand report (recall, precision, AP by OKS), flip test and upright refinement through the
one inference path, detector files, and resume.

The detectors here are exact: `predictkit.lookup_detector` answers each known photo with the ideal
CenterNet maps of its labelled boxes (the training targets' own formula, at chosen scores) and
the keypoint model (`predictkit.lookup_model`) answers each known crop with its labelled
keypoints, so every number below is known in advance; a crop or letterbox predict should not
have taken fails the lookup. A real CenterNet checkpoint goes through predict in
`test_a_detector_checkpoint_round_trips_through_predict`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from predictkit import (
    DETECT,
    WARP,
    FixedPoseModel,
    IntensityModel,
    encode,
    hand_photos,
    lookup_detector,
    lookup_model,
    smooth_image,
)

from handpose import checkpoint
from handpose.detector import CenterNet, detect_photos, load_detector
from handpose.errors import HandposeError
from handpose.geometry import ANGLE_STEP_DEG, apply_affine, box_region, crop_matrix, invert, steady_region
from handpose.inference import DEFAULT_MIN_HAND_SCORE, Predictor, refine_region
from handpose.metrics import THRESHOLDS
from handpose.model import ModelSpec, build_model
from handpose.predict import predict
from handpose.predict_staging import STAGING
from handpose.skeleton import NUM_JOINTS

SCORES = {"p0": [], "p1": [0.8], "p3": [0.9, 0.6, 0.35]}  # the detector's score of each labelled hand


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _multihand(tmp_path: Path, presence: list[float] | None = None, extra: dict | None = None):
    """Generated photos with 0, 1 and 3 generated hands as a YOLO-pose data set, an exact detector
    (SCORES; `extra`: more boxes per photo, {name: [(box, score)]}, which no label holds) and an
    exact keypoint model for the labelled boxes, with a presence head that says `presence` on
    them (default 1.0 each: a hand's score, sqrt(box score x presence), is then sqrt(box
    score)). Returns (root, truth, detector, model)."""
    presence = [1.0] * 4 if presence is None else presence
    root = tmp_path / "yolo"
    truth = hand_photos(root, {name: len(s) for name, s in SCORES.items()})
    photos, crops = [], []
    for name, hands in truth.items():
        data = (root / "images" / f"{name}.jpg").read_bytes()
        boxes = [b for b, _ in hands] + [b for b, _ in (extra or {}).get(name, [])]
        scores = SCORES[name] + [s for _, s in (extra or {}).get(name, [])]
        photos.append((data, np.array(boxes).reshape(-1, 4), np.array(scores)))
        crops += [(data, b, uv) for b, uv in hands]
    return root, truth, lookup_detector(photos), lookup_model(crops, WARP, presence)


def _by_photo(out: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in read_jsonl(out / "predictions.jsonl"):
        rows.setdefault(Path(r["path"]).stem, []).append(r)
    return rows


def _ap(hits: list[bool], labels: int) -> float:
    """COCO's 101-point AP of predictions already in descending score order, written out."""
    tp = np.cumsum(hits)
    recall, precision = tp / labels, tp / np.arange(1, len(hits) + 1)
    envelope = [precision[k:].max() for k in range(len(hits))]
    return (
        sum(
            next((envelope[k] for k in range(len(hits)) if recall[k] >= r), 0.0)
            for r in np.linspace(0, 1, 101)
        )
        / 101
    )


# ----------------------------------------------------------------------------- every hand of a photo


def test_photos_with_0_1_and_3_hands_give_0_1_and_3_rows(tmp_path: Path) -> None:
    """Each row is a labelled hand: its box and box score from the detector, its hand score
    sqrt(box score x keypoint score) (best first), keypoints in the photo's pixels, paired with
    its label (OKS 1); the photo without a hand gives no row and is counted in run.json and the
    report; Predictor gives the same hands."""
    root, truth, det, model = _multihand(tmp_path)
    summary = predict((model, WARP), [root], tmp_path / "out", detector=(det, DETECT), refine=0, quiet=True)
    rows = _by_photo(tmp_path / "out")
    assert {name: len(rows.get(name, [])) for name in truth} == {"p0": 0, "p1": 1, "p3": 3}
    for name, hands in truth.items():
        for k, ((box, uv), score) in enumerate(zip(hands, SCORES[name], strict=True)):
            r = rows[name][k]
            assert r["hand"] == k and r["box_score"] == score
            assert np.abs(np.array(r["box"]) - box).max() < 2e-3
            assert np.abs(np.array(r["keypoints"])[:, :2] - uv).max() < 2e-3
            assert r["score"] == 1.0 and r["hand_score"] == round(math.sqrt(score), 4)
            assert r["error_px"] < 2e-3 and r["oks"] == 1.0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["images"] == 3 and run["predictions"] == 4 and run["boxes"] == "detector"
    assert run["images_without_hands"] == 1 and run["images_without_boxes"] == 1 and run["crops"] == 4
    assert run["detector"] == {"size": DETECT.size, "min_score": DEFAULT_MIN_HAND_SCORE, "max_hands": 4}
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["recall"] == rep["precision"] == 1.0 and rep["images_without_prediction"] == 1
    assert rep["pose_ap50"] == rep["pose_ap50_95"] == rep["box_ap50"] == rep["box_ap50_95"] == 1.0
    assert rep["detection"]["labels"] == 4 and rep["detection"]["predictions"] == 4
    assert rep["hands"] == 4 and rep["hands_missed"] == 0 and rep["mean_error_px"] < 2e-3
    assert "| OKS (pose) | 1.000 | 1.000 | 1.000 | 1.000 |" in (tmp_path / "out" / "report.md").read_text()
    assert summary["report"]["recall"] == 1.0

    predictor = Predictor(model, WARP, detector=(det, DETECT), refine=0)
    for name in truth:
        hands = predictor((root / "images" / f"{name}.jpg").read_bytes())
        got = [
            [
                [round(float(x), 3), round(float(y), 3), round(float(s), 4)]
                for (x, y), s in zip(h.uv, h.score, strict=True)
            ]
            for h in hands
        ]
        assert got == [r["keypoints"] for r in rows.get(name, [])]
        assert np.allclose([h.box_score for h in hands], SCORES[name], atol=1e-6)
        assert np.allclose([h.rank_score for h in hands], np.sqrt(SCORES[name]), atol=1e-6)


def test_min_score_and_max_hands(tmp_path: Path) -> None:
    """--min-score keeps the hands whose hand score (here sqrt(box score): the keypoint model
    says 1.0) is at least it (default DEFAULT_MIN_HAND_SCORE), --max-hands the best N boxes of
    each photo; the report counts the hands left out as missed and its AP is COCO's over the
    rows written."""
    root, _, det, model = _multihand(tmp_path)
    for kw, p3, hits in [
        ({}, [0.9, 0.6, 0.35], [True] * 4),  # hand scores 0.949, 0.775, 0.592 (p1: 0.894)
        ({"min_score": 0.7}, [0.9, 0.6], [True] * 3),
        ({"min_score": 0.95}, [], []),
        ({"max_hands": 1}, [0.9], [True] * 2),
        ({"max_hands": 2, "min_score": 0.8}, [0.9], [True] * 2),
    ]:
        out = tmp_path / f"out-{len(p3)}-{sorted(kw.items())}"
        predict((model, WARP), [root], out, detector=(det, DETECT), refine=0, quiet=True, **kw)
        rows = _by_photo(out)
        assert [r["box_score"] for r in rows.get("p3", [])] == p3, kw
        assert [r["hand"] for r in rows.get("p3", [])] == list(range(len(p3)))
        rep = json.loads((out / "report.json").read_text())
        assert rep["recall"] == pytest.approx(len(hits) / 4) and rep["hands_missed"] == 4 - len(hits)
        if hits:
            assert rep["pose_ap50"] == pytest.approx(_ap(hits, 4)) and rep["precision"] == 1.0
    assert _ap([True] * 3, 4) == pytest.approx(76 / 101)  # recall 0, 0.01, ..., 0.75 at precision 1


def test_presence_drops_what_is_not_a_hand(tmp_path: Path) -> None:
    """The detector also boxes a patch of background in the photo without a hand (score 0.7); the
    keypoint model's presence head says 0.1 there and 0.97 on the hands: the default threshold
    drops it (run.json counts it); --min-presence 0 with --min-score 0.2 keeps it (hand score
    sqrt(0.7 x 0.1) = 0.26, under the default --min-score) as a false positive, ranked last by
    its hand score although its box scores above two hands', as the report's precision and AP
    say."""
    face = (np.array([120.0, 60.0, 200.0, 150.0]), 0.7)
    weak = (np.array([20.0, 20.0, 60.0, 70.0]), 0.25)  # under the detector's own min_score (0.3)
    root, _, det, model = _multihand(tmp_path, presence=[0.97] * 4, extra={"p0": [face, weak]})
    model.default = np.full((NUM_JOINTS, 2), 64.0)  # the background patch: some answer
    model.default_presence = 0.1
    predict((model, WARP), [root], tmp_path / "a", detector=(det, DETECT), refine=0, quiet=True)
    rows = _by_photo(tmp_path / "a")
    assert "p0" not in rows and all(r["score"] == 0.97 for rs in rows.values() for r in rs)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["hands_dropped"] == 1 and run["images_without_hands"] == 1 and run["images_without_boxes"] == 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["precision"] == 1.0

    opts = {"refine": 0, "quiet": True, "min_presence": 0.0}
    predict((model, WARP), [root], tmp_path / "b", detector=(det, DETECT), min_score=0.2, **opts)
    (fp,) = _by_photo(tmp_path / "b")["p0"]
    assert fp["score"] == 0.1 and fp["box_score"] == 0.7 and "oks" not in fp
    assert fp["hand_score"] == round(math.sqrt(0.07), 4)
    # --min-score 0.2 also crops the weak box (0.25 >= 0.2), whose hand score sqrt(0.025) drops it
    assert json.loads((tmp_path / "b" / "run.json").read_text())["crops"] == 6
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["precision"] == pytest.approx(4 / 5) and rep["recall"] == 1.0
    # by descending hand score: every hand (0.93, 0.88, 0.76, 0.58), then the background (0.26);
    # by box score it would sit third (0.7), an AP of 91/101
    assert rep["pose_ap50"] == rep["box_ap50"] == pytest.approx(1.0)
    assert _ap([True, True, False, True, True], 4) == pytest.approx(91 / 101)
    predict((model, WARP), [root], tmp_path / "c", detector=(det, DETECT), **opts)
    assert "p0" not in _by_photo(tmp_path / "c")  # the default --min-score drops it, after its pass
    run = json.loads((tmp_path / "c" / "run.json").read_text())  # the weak box is never cropped
    assert run["crops"] == 5 and run["hands_dropped"] == 0 and run["predictions"] == 4
    with pytest.raises(HandposeError, match="--min-presence 1.5: must be between 0 and 1"):
        predict(
            (model, WARP),
            [root],
            tmp_path / "x",
            detector=(det, DETECT),
            refine=0,
            min_presence=1.5,
            quiet=True,
        )


def test_presence_on_whole_images_and_given_boxes(tmp_path: Path) -> None:
    """Without a detector the whole image's hand is dropped under the threshold too (an empty
    photo gives no row); a given box (--boxes) keeps its row unless --min-presence is given."""
    root, truth, _, _ = _multihand(tmp_path)
    data = (root / "images" / "p1.jpg").read_bytes()
    ((box, uv),) = truth["p1"]
    model = lookup_model([(data, None, uv), (data, box, uv)], WARP, presence=[0.3, 0.3])
    single = root / "images" / "p1.jpg"
    predict((model, WARP), [single], tmp_path / "whole", quiet=True, refine=0)
    assert read_jsonl(tmp_path / "whole" / "predictions.jsonl") == []
    predict((model, WARP), [single], tmp_path / "kept", quiet=True, refine=0, min_presence=0.25)
    assert len(read_jsonl(tmp_path / "kept" / "predictions.jsonl")) == 1
    (tmp_path / "b.json").write_text(
        json.dumps([{"file_name": "p1.jpg", "bbox": [*box[:2], *(box[2:] - box[:2])]}])
    )
    predict((model, WARP), [single], tmp_path / "given", quiet=True, boxes=tmp_path / "b.json")
    assert read_jsonl(tmp_path / "given" / "predictions.jsonl")[0]["score"] == 0.3
    predict(
        (model, WARP), [single], tmp_path / "asked", quiet=True, boxes=tmp_path / "b.json", min_presence=0.5
    )
    assert read_jsonl(tmp_path / "asked" / "predictions.jsonl") == []


def test_boxes_override_the_detector(tmp_path: Path) -> None:
    """--boxes gt with --detector: the labelled boxes, not the detector's (it is never run)."""
    root, truth, det, model = _multihand(tmp_path)
    predict((model, WARP), [root], tmp_path / "out", detector=(det, DETECT), boxes="gt", quiet=True)
    rows = _by_photo(tmp_path / "out")
    assert {k: len(v) for k, v in rows.items()} == {"p1": 1, "p3": 3} and det.calls == 0
    assert all("box_score" not in r for rs in rows.values() for r in rs)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["boxes"] == "gt"


# ----------------------------------------------------------------------------- the report, by hand


def test_oks_report_against_hand_computed_values(tmp_path: Path) -> None:
    """Two labelled hands; the model answers the first exactly and every joint of the second
    (d, d) px off. OKS = exp(-2 d^2 / ((2/21)^2 x 0.53 x w x h x 2)) for the second's label box
    w x h; it is a true positive at the thresholds up to its OKS, a false positive above: per
    threshold AP 1 or (recall 0.5 at precision 1 ->) 51/101."""
    root = tmp_path / "yolo"
    truth = hand_photos(root, {"p2": 2})
    data = (root / "images" / "p2.jpg").read_bytes()
    (box_a, uv_a), (box_b, uv_b) = truth["p2"]
    w, h = box_b[2:] - box_b[:2]
    d = 2.0
    want_oks = math.exp(-2 * d * d / ((2 / 21) ** 2 * (0.53 * w * h + 1e-7) * 2))
    assert 0.5 < want_oks < 0.95  # a hit at some thresholds, a miss at others
    det = lookup_detector([(data, np.stack([box_a, box_b]), np.array([0.9, 0.8]))])
    model = lookup_model([(data, box_a, uv_a), (data, box_b, uv_b + d)], WARP)
    predict((model, WARP), [root], tmp_path / "out", detector=(det, DETECT), refine=0, quiet=True)
    rows = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert rows[0]["oks"] == 1.0 and rows[1]["oks"] == pytest.approx(want_oks, abs=1e-4)
    assert rows[1]["error_px"] == pytest.approx(d * math.sqrt(2), abs=1e-3)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    hits = sum(t <= want_oks for t in THRESHOLDS)
    assert rep["recall"] == rep["precision"] == 1.0 and rep["pose_ap50"] == 1.0
    assert rep["pose_ap50_95"] == pytest.approx((hits + (10 - hits) * 51 / 101) / 10)
    assert rep["box_ap50_95"] == 1.0 and rep["detection"]["pose_recall"] == 1.0
    assert rep["mean_error_px"] == pytest.approx(d * math.sqrt(2) / 2, abs=1e-3)  # the 42 joints


# ----------------------------------------------------------------------------- a real detector file


def _save_detector(path: Path, net: torch.nn.Module, **config: object) -> None:
    checkpoint.save(
        path,
        {
            "model": net.state_dict(),
            "config": {"arch": "centernet", "width": 4, "depth": 1, "image_size": 64, "sigma": 3.0}
            | {"loss": "focal", "stride": 8, "min_score": 0.25, **config},
            "norm": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
            "epoch": 1,
            "step": 3,
        },
    )


def test_a_detector_checkpoint_round_trips_through_predict(tmp_path: Path) -> None:
    """A CenterNet checkpoint as --detector: the rows' boxes and scores are `detect_photos`' on
    the loaded file, and each row's keypoints are the keypoint model's in that box's crop."""
    torch.manual_seed(0)
    _save_detector(tmp_path / "det.pt", CenterNet(4, 1, stride=8).eval())
    (tmp_path / "in").mkdir()
    for k, (w, h) in enumerate([(200, 150), (120, 160)]):
        (tmp_path / "in" / f"{k}.jpg").write_bytes(encode(smooth_image(w, h, k), "JPEG", quality=90))
    pose = np.random.default_rng(0).uniform(20, 100, (NUM_JOINTS, 2))
    spec = ModelSpec(**{**WARP.__dict__, "pad": 1.3})
    opts = {"detector": tmp_path / "det.pt", "min_score": 0.0, "max_hands": 2, "quiet": True}
    predict((FixedPoseModel(pose, spec.size), spec), [tmp_path / "in"], tmp_path / "out", refine=0, **opts)
    rows = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    net, dspec = load_detector(tmp_path / "det.pt")
    assert dspec.min_score == 0.25 and len(dspec.digest) == 64
    for k in range(2):
        data = (tmp_path / "in" / f"{k}.jpg").read_bytes()
        ((boxes, scores),) = detect_photos(net, dspec, [data], min_score=0.0, max_hands=2)
        mine = [r for r in rows if r["path"].endswith(f"{k}.jpg")]
        assert len(mine) == 2 == len(boxes)
        for r, box, s in zip(mine, boxes, scores, strict=True):
            assert np.abs(np.array(r["box"]) - box).max() < 2e-3 and r["box_score"] == round(float(s), 4)
            region = steady_region(box_region(box, 1.3), spec.size)[0]  # a found box's crop is snapped
            uv = apply_affine(invert(crop_matrix(region, spec.size)), pose)
            assert np.abs(np.array(r["keypoints"])[:, :2] - uv).max() < 2e-3
    # The default with a detector: one refinement pass, in the box of the keypoints the detector's
    # crop gave (the row's box stays the detector's).
    predict((FixedPoseModel(pose, spec.size), spec), [tmp_path / "in"], tmp_path / "r", **opts)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["refine"] == 1
    for r, first in zip(read_jsonl(tmp_path / "r" / "predictions.jsonl"), rows, strict=True):
        region, _, _ = refine_region(np.array(first["keypoints"])[:, :2], spec)
        uv = apply_affine(invert(crop_matrix(region, spec.size)), pose)
        assert r["box"] == first["box"] and np.abs(np.array(r["keypoints"])[:, :2] - uv).max() < 2e-3


def test_detector_and_model_file_mistakes_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the CLI: a damaged detector file, a keypoint checkpoint as --detector, a detector
    as MODEL, and the new options' bad values are one line naming the flag or file, exit 1."""
    from handpose.cli import main

    _save_detector(tmp_path / "det.pt", CenterNet(4, 1, stride=8))
    data = bytearray((tmp_path / "det.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "damaged.pt").write_bytes(bytes(data))
    torch.manual_seed(0)
    config = {"arch": "strided", "width": 4, "depth": 1, "image_size": 64, "sigma": 2.0, "loss": "l1"}
    checkpoint.save(
        tmp_path / "kp.pt",
        {
            "model": build_model("strided", **{k: v for k, v in config.items() if k != "arch"}).state_dict(),
            "config": config | {"box_pad": 1.25},
            "norm": {"mean": [0.5] * 3, "std": [0.2] * 3},
            "sets": [{"crop": "box"}],
            "epoch": 1,
            "step": 1,
        },
    )
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(encode(smooth_image(100, 80, 0), "JPEG"))
    kp, det, photos = str(tmp_path / "kp.pt"), str(tmp_path / "det.pt"), str(tmp_path / "in")
    cases = [
        ([kp, photos, "--detector", str(tmp_path / "damaged.pt")], "--detector", "damaged.pt"),
        ([kp, photos, "--detector", kp], "--detector", "not a detector"),
        ([kp, photos, "--detector", str(tmp_path / "none.pt")], "--detector", "not found"),
        ([det, photos], "det.pt: is a hand detector", "--detector"),
        ([kp, photos, "--min-score", "0.5"], "--min-score 0.5: applies with --detector", ""),
        ([kp, photos, "--detector", det, "--min-score", "2"], "--min-score 2.0: must be between 0 and 1", ""),
        ([kp, photos, "--detector", det, "--max-hands", "0"], "--max-hands 0: must be >= 1", ""),
        (
            [kp, photos, "--refine-mode", "sideways"],
            "--refine-mode 'sideways': must be one of box, upright",
            "",
        ),
        ([kp, photos, "--min-presence", "-0.1"], "--min-presence -0.1: must be between 0 and 1", ""),
    ]
    for args, needle, other in cases:
        old = sys.argv
        sys.argv = ["handpose", "predict", *args, "--out", str(tmp_path / "out")]
        try:
            with pytest.raises(SystemExit) as e:
                main()
        finally:
            sys.argv = old
        err = capsys.readouterr().err
        assert e.value.code == 1 and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        assert needle in err and other in err, (needle, err)
    assert not (tmp_path / "out").exists()
    with pytest.raises(HandposeError, match="--refine-mode upright: refines whole images"):
        predict(tmp_path / "kp.pt", [photos], tmp_path / "out", boxes="gt", refine_mode="upright", quiet=True)


# ----------------------------------------------------------------------------- flip test, upright


def test_flip_test_gives_the_mirrored_prediction_of_a_mirrored_photo(tmp_path: Path) -> None:
    """A real network (random weights) with --flip-test: predict on a photo's mirror image returns
    the mirrored keypoints (x -> width - x, the same joint) to 1e-4 px, on the whole image and in
    a mirrored box; without --flip-test it does not (the test can fail)."""
    torch.manual_seed(3)
    net = build_model("strided", width=8, depth=1, image_size=64, sigma=2.0, loss="l1").eval()
    with torch.no_grad():
        net.head[1].weight.mul_(30.0)  # peaked heatmaps: keypoints that follow the image
    spec = ModelSpec(size=64, mean=(0.5, 0.4, 0.3), std=(0.25, 0.25, 0.25), crop="box", pad=1.0)
    pixels = smooth_image(256, 192, 5)  # letterboxed at exactly 1/4: symmetric pixels both ways
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(pixels))
    (tmp_path / "in" / "b.png").write_bytes(encode(np.ascontiguousarray(pixels[:, ::-1])))
    box = [40, 60, 104, 124]  # a 64 px square: the crop is the photo's own pixels, mirrored at 152..216
    (tmp_path / "boxes.json").write_text(
        json.dumps(
            [
                {"file_name": "a.png", "bbox": [40, 60, 64, 64]},
                {"file_name": "b.png", "bbox": [256 - box[2], 60, 64, 64]},
            ]
        )
    )
    for flip in (True, False):
        for boxes in (None, tmp_path / "boxes.json"):
            out = tmp_path / f"out-{flip}-{boxes is None}"
            predict(
                (net, spec),
                [tmp_path / "in"],
                out,
                flip_test=flip,
                boxes=boxes,
                refine=0 if boxes is None else None,
                quiet=True,
            )
            a, b = (np.array(r["keypoints"]) for r in read_jsonl(out / "predictions.jsonl"))
            mirrored = np.stack([256 - b[:, 0], b[:, 1]], axis=1)
            gap = np.abs(a[:, :2] - mirrored).max()
            if flip:
                assert gap <= 1e-4 + 1e-9 and np.abs(a[:, 2] - b[:, 2]).max() <= 1e-4, gap
            else:
                assert gap > 0.02, gap  # the plain network is no mirror: the flip test made it one


class ChannelModel(IntensityModel):
    """Joint 0 (wrist) at the red centroid, joint 9 (middle MCP) at the green one, every other joint
    at the blue one; keeps the inputs it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs += [np.asarray(v) for v in x.detach().numpy()]
        channel = torch.full((NUM_JOINTS,), 2, dtype=torch.long)
        channel[0], channel[9] = 0, 1
        return x[:, channel]


def _centroid(plane: np.ndarray) -> np.ndarray:
    ys, xs = np.indices(plane.shape) + 0.5
    return np.array([(plane * xs).sum(), (plane * ys).sum()]) / plane.sum()


def test_upright_refinement_maps_back(tmp_path: Path) -> None:
    """Dot test: a red dot (wrist), a green dot (middle MCP) and a blue dot on black. The upright
    pass crops the photo turned so that red -> green points up (green straight above red in the
    model input), and its keypoints, mapped back through the turned crop, land on the dots."""
    w, h = 320, 240
    dots = {0: (150.0, 160.0), 1: (190.0, 110.0), 2: (140.0, 120.0)}  # channel: (x, y)
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    pixels = np.zeros((h, w, 3), np.uint8)
    for c, (cx, cy) in dots.items():
        g = np.exp(-((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) / (2 * 5.0**2))
        pixels[..., c] = np.round(g * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "dots.png").write_bytes(encode(pixels))
    spec = ModelSpec(
        size=128, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop="box", pad=1.25, box_to_keypoints=2.0
    )
    model = ChannelModel()
    predict((model, spec), [tmp_path / "in"], tmp_path / "out", refine_mode="upright", quiet=True)
    (row,) = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["refine"] == 1 and run["refine_mode"] == "upright"  # upright implies one pass
    uv = np.array(row["keypoints"])[:, :2]
    for joint, c in ((0, 0), (9, 1), (5, 2)):
        assert np.abs(uv[joint] - dots[c]).max() < 0.05, (joint, uv[joint], dots[c])
    crop = model.inputs[-1]  # the upright pass's input: green straight above red
    red, green = _centroid(crop[0]), _centroid(crop[1])
    # upright to within the angle grid the crop is snapped to (steady_region: +-ANGLE_STEP_DEG / 2)
    lean = math.tan(math.radians(ANGLE_STEP_DEG / 2 + 0.05)) * (red[1] - green[1])
    assert abs(red[0] - green[0]) < lean + 0.05 and green[1] < red[1] - 20
    (hand,) = Predictor(model, spec, refine_mode="upright")(pixels)
    want = -90.0 - math.degrees(math.atan2(dots[1][1] - dots[0][1], dots[1][0] - dots[0][0]))
    assert hand.angle == pytest.approx((want + 180) % 360 - 180, abs=ANGLE_STEP_DEG / 2 + 0.05)
    assert hand.angle / ANGLE_STEP_DEG == pytest.approx(round(hand.angle / ANGLE_STEP_DEG), abs=1e-9)
    assert np.abs(hand.uv - uv).max() < 2e-3
    predict((model, spec), [tmp_path / "in"], tmp_path / "box", refine=1, quiet=True)
    assert (
        np.abs(np.array(read_jsonl(tmp_path / "box" / "predictions.jsonl")[0]["keypoints"])[:, :2] - uv).max()
        < 0.1
    )


# ----------------------------------------------------------------------------- resume


class _Interrupting(torch.nn.Module):
    """The keypoint model, interrupted (Ctrl-C) at its `interrupt_at`-th forward call."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls, self.interrupt_at = inner, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return self.inner(x)

    def decode(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.decode(out)  # type: ignore[operator]


def _files(out: Path) -> dict[str, bytes]:
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    run = json.loads(files.pop("run.json"))
    for key in ("seconds", "images_per_s"):
        run.pop(key)
    return {**files, "run.json": json.dumps(run).encode()}


def test_an_interrupted_detector_run_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    """40 photos (two chunks of 32 and 8) with 1 or 2 hands each: Ctrl-C in the second chunk, then
    the same command: the outputs equal an uninterrupted run's byte for byte, and the first chunk
    is not predicted again."""
    root = tmp_path / "yolo"
    counts = {f"q{k:02d}": 1 + k % 2 for k in range(40)}
    truth = hand_photos(root, counts, width=320, height=160, seed=1)
    photos, crops = [], []
    for name, hands in truth.items():
        data = (root / "images" / f"{name}.jpg").read_bytes()
        photos.append((data, np.array([b for b, _ in hands]), np.array([0.9, 0.5][: len(hands)])))
        crops += [(data, b, uv) for b, uv in hands]
    det = lookup_detector(photos)
    model = _Interrupting(lookup_model(crops, WARP))
    opts = {"detector": (det, DETECT), "refine": 0, "batch_size": 4, "overlays": 2, "quiet": True}
    predict((model, WARP), [root], tmp_path / "clean", coco=tmp_path / "clean" / "c.json", **opts)
    full = model.calls
    model.calls, model.interrupt_at = 0, full - 2  # in the second chunk
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        predict((model, WARP), [root], out, coco=out / "c.json", **opts)
    assert json.loads((out / STAGING / "rank-0" / "progress.json").read_text())["chunks"] == 1
    model.calls, model.interrupt_at = 0, 0
    predict((model, WARP), [root], out, coco=out / "c.json", **opts)
    assert full == 15 and model.calls == 3  # the first chunk's 48 hands (12 batches) not again
    got, want = _files(out), _files(tmp_path / "clean")
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want), [
        k for k in want if got.get(k) != want[k]
    ]
    assert len(read_jsonl(out / "predictions.jsonl")) == 60 and not (out / STAGING).exists()
    assert json.loads((out / "report.json").read_text())["recall"] == 1.0


def test_bench_predict_times_the_detector_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`handpose bench predict --detector` runs both models' files end to end: the hands per photo
    are what predict kept (2 each: min_score 0, max_hands 2), each through 2 keypoint passes (the
    detector path's one refinement), so the forward-only rate combines the two models' rows as
    1 / (1/D + 4/K); the ratio is end to end over it; the image work alone combines the same way
    into the serial bound; and the JSON line printed is the result returned."""
    from handpose.bench.predict import DETECTOR_E2E, FORWARD_ONLY, IMAGE_ROWS, RUN_RATE, bench_predict
    from handpose.model import model_from_config

    torch.manual_seed(0)
    _save_detector(tmp_path / "det.pt", CenterNet(4, 1, stride=8).eval())
    config = {"arch": "strided", "width": 4, "depth": 1, "image_size": 32, "sigma": 3.0, "loss": "l1"}
    checkpoint.save(
        tmp_path / "kp.pt",
        {
            "model": model_from_config(config).state_dict(),
            "config": config,
            "norm": {"mean": [0.45, 0.4, 0.35], "std": [0.25, 0.2, 0.22]},
            "epoch": 1,
            "step": 1,
            "sets": [{"crop": "box"}],
            "boxes": {"box_to_keypoints": 1.33},
        },
    )
    (tmp_path / "in").mkdir()
    for k, (w, h) in enumerate([(200, 150), (120, 160), (64, 64)]):
        (tmp_path / "in" / f"{k}.jpg").write_bytes(encode(smooth_image(w, h, k), "JPEG", quality=90))
    capsys.readouterr()
    result = bench_predict(
        tmp_path / "kp.pt",
        tmp_path / "in",
        detector=tmp_path / "det.pt",
        min_score=0.0,
        max_hands=2,
        batch_size=2,
        repeats=1,
        device="cpu",
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    t, rows = result["threads"], result["rows"]
    assert result["images"] == 3 and result["hands_per_photo"] == 2.0
    assert result["keypoint_passes_per_photo"] == 4.0
    det = rows[f"detector forward alone, {t} thread(s) (photos/s)"]
    kp = rows[f"keypoint forward alone, {t} thread(s) (crops/s)"]
    # rows are printed to 0.01: on a starved machine a rate of 0.13/s is all rounding
    assert rows[f"{FORWARD_ONLY}, {t} thread(s)"] == pytest.approx(1 / (1 / det + 4 / kp), rel=1e-2, abs=0.01)
    e2e = rows[f"{DETECTOR_E2E}, {t} thread(s)"]
    assert result["detector_images_per_s"] == pytest.approx(e2e, abs=0.01)
    fwd = result["forward_only_images_per_s"]
    slack = 0.006 / e2e + 0.006 / fwd  # the ratio is of the unrounded rates, these are to 0.01
    assert result["detector_vs_forward_only"] == pytest.approx(e2e / fwd, rel=1e-2 + slack, abs=1e-3)
    assert all(v > 0 for v in rows.values()) and result["whole_image_images_per_s"] > 0
    # the serial bound: the image work alone (decode + detector input, 4 crops per photo) and the
    # forward passes alone, one after the other
    image = 1 / (1 / rows[IMAGE_ROWS[0]] + 4 / rows[IMAGE_ROWS[1]])
    assert result["image_work_images_per_s"] == pytest.approx(image, rel=1e-2, abs=0.01)
    serial = 1 / (1 / rows[f"{FORWARD_ONLY}, {t} thread(s)"] + 1 / image)
    assert result["serial_bound_vs_forward_only"] == pytest.approx(serial / fwd, rel=2e-2, abs=1e-3)
    # the same bound at 1 thread, against the 1-thread forward passes: a rank per core's ceiling
    fwd_1 = rows[f"{FORWARD_ONLY}, 1 thread(s)"]
    serial_1 = 1 / (1 / fwd_1 + 1 / image)
    bound_1 = result["serial_bound_1_thread_vs_forward_only"]
    assert bound_1 == pytest.approx(serial_1 / fwd_1, rel=2e-2, abs=1e-3)
    # on a CPU with several cores, predict as launched: one process, and one per core under torchrun
    launched = [name for name in rows if name.startswith(RUN_RATE)]
    assert len(launched) == (2 if t > 1 else 0)
    if t > 1:  # the ranks against each core's forward passes alone at 1 thread
        ranks = rows[f"{RUN_RATE}, {t} process(es) x 1 thread(s)"]
        assert result["ranks_vs_forward_per_core"] == pytest.approx(ranks / (t * fwd_1), rel=2e-2, abs=1e-3)
    else:
        assert result["ranks_vs_forward_per_core"] is None

"""The MediaPipe teacher: its filter (handpose/teacher.py) on made-up answers, the YOLO-pose
dataset tools/teacher_label.py writes (with a fake teacher: no MediaPipe needed), that
`handpose pack` reads it, and the real teacher on a few real photos where .venv-teacher exists."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handpose.pack import pack
from handpose.shards import read_manifest
from handpose.sources.yolo import parse_line, read_yolo
from handpose.teacher import (
    BOX_RATIO,
    Answer,
    Rules,
    box_only_line,
    hand_box,
    judge,
    mirror_answer,
    pair_by_iou,
    read_voc,
    yolo_line,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import teacher_label  # noqa: E402

TEACHER_PY = ROOT / ".venv-teacher" / "bin" / "python"
W, H = 200, 100


def hand_uv(cx: float, cy: float, side: float) -> np.ndarray:
    """21 keypoints (fractions of a W x H image) spread over a side x side square (pixels)."""
    rng = np.random.default_rng(int(cx * 1000 + cy))
    px = np.array([cx, cy]) + rng.uniform(-side / 2, side / 2, (21, 2))
    px[0], px[1] = (cx - side / 2, cy - side / 2), (cx + side / 2, cy + side / 2)  # the extent is exact
    return px / (W, H)


def answer(uv: np.ndarray, det: float = 0.9, hand: float = 0.95, label: str = "Left") -> Answer:
    return Answer(uv, label, hand, det)


def mirrored(a: Answer, shift_px: float = 0.0) -> Answer:
    """What a perfect teacher answers about the mirrored photo, keypoints moved by shift_px."""
    m = mirror_answer(a)
    return Answer(
        m.uv + shift_px / W * np.array([1.0, 0.0]), m.handedness, m.handedness_score, m.detection_score
    )


# ---- the filter ------------------------------------------------------------------------------------


def test_hand_box_grows_the_extent_by_the_ratio_of_its_longer_side_and_clips() -> None:
    uv = np.array([[50.0, 40.0], [90.0, 60.0]] + [[70.0, 50.0]] * 19)
    box = hand_box(uv, W, H)
    m = (BOX_RATIO - 1) / 2 * 40  # the longer side (40 px) sets the margin of both axes
    np.testing.assert_allclose(box, [50 - m, 40 - m, 90 + m, 60 + m])
    assert (box[2] - box[0]) / 40 == pytest.approx(BOX_RATIO)
    np.testing.assert_allclose(hand_box(uv - [48.0, 0.0], W, H)[0], 0.0)  # clipped at the left edge


def test_judge_keeps_a_hand_its_mirror_confirms_and_names_the_first_failing_rule() -> None:
    rules = Rules(min_detection=0.5, min_handedness=0.8, mirror_tolerance=0.1, min_inside=17)
    good = answer(hand_uv(60, 50, 40))
    result = judge([good], [mirrored(good, shift_px=1.0)], W, H, rules)
    (v,) = result.verdicts
    assert v.reason is None and result.kept == [v]
    side = 40 * BOX_RATIO  # the box's longer side: the mean distance is 1 px of it
    assert v.mirror_error == pytest.approx(1.0 / side)

    cases = {
        "low detection score": ([answer(good.uv, det=0.4)], [mirrored(good)]),  # under 0.5 here
        "low handedness score": ([answer(good.uv, hand=0.7)], [mirrored(good)]),
        "no hand in the mirror": ([good], []),
        "mirror disagrees": ([good], [mirrored(good, shift_px=0.11 * side)]),
    }
    for reason, (photo, mirror) in cases.items():
        assert judge(photo, mirror, W, H, rules).verdicts[0].reason == reason, reason
    # the mirror's hand must itself be confident
    weak = Answer(mirrored(good).uv, "Right", 0.95, 0.3)
    assert judge([good], [weak], W, H, rules).verdicts[0].reason == "no hand in the mirror"
    # a hand reaching past the right edge: 5 joints outside
    cut = good.uv.copy()
    cut[16:, 0] = 1.05
    cut_hand = answer(cut)
    assert judge([cut_hand], [mirrored(cut_hand)], W, H, rules).verdicts[0].reason == "cut by the frame"


def test_two_hands_pair_with_their_mirrors_by_position_not_order() -> None:
    left, right = answer(hand_uv(40, 50, 30)), answer(hand_uv(150, 50, 30))
    # the mirror lists them the other way round, and its copy of `right` is off by 3 px
    result = judge([left, right], [mirrored(right, shift_px=3.0), mirrored(left)], W, H, Rules())
    assert [v.reason for v in result.verdicts] == [None, None]
    assert result.verdicts[0].mirror_error == pytest.approx(0.0, abs=1e-12)
    assert result.verdicts[1].mirror_error == pytest.approx(3.0 / (30 * BOX_RATIO))
    assert pair_by_iou([np.array([0, 0, 10, 10])], [np.array([20, 20, 30, 30])], 0.3) == [None]
    # one-hand photo sets: only the best palm score stays
    weaker = Answer(right.uv, "Right", 0.95, 0.6)
    result = judge([left, weaker], [mirrored(weaker), mirrored(left)], W, H, Rules(keep_hands=1))
    assert [v.reason for v in result.verdicts] == [None, "beyond --keep-hands"]


def test_voc_boxes_label_hands_by_iou_and_flag_the_ones_left_without_keypoints() -> None:
    a = answer(hand_uv(40, 50, 30))
    voc = [hand_box(a.uv * (W, H), W, H) + 1.0, np.array([120.0, 10.0, 180.0, 90.0])]
    stray = answer(hand_uv(100, 20, 10))  # confident, confirmed, but no VOC box: not a labelled hand
    result = judge([a, stray], [mirrored(a), mirrored(stray)], W, H, Rules(), voc)
    assert [v.reason for v in result.verdicts] == [None, "no VOC box"]
    assert result.verdicts[0].voc == 0 and result.verdicts[0].voc_iou > 0.8
    assert result.voc_labelled == [True, False]


def test_each_hand_gets_the_score_of_the_palm_nearest_its_palm_joints() -> None:
    hands = [np.array([0.8, 0.5]), np.array([0.2, 0.5]), np.array([0.5, 0.9])]
    palms = [(0.3, np.array([0.25, 0.45])), (0.9, np.array([0.75, 0.55]))]
    assert teacher_label.palm_scores(hands, palms) == [0.9, 0.3, 0.0]  # the third hand: no palm left


def test_read_voc_moves_one_based_inclusive_corners_to_pixel_corners(tmp_path: Path) -> None:
    xml = tmp_path / "a.xml"
    objects = "".join(
        f"<object><name>hand</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
        "</bndbox></object>"
        for a, b, c, d in ((11, 21, 50, 60), (100, 5, 120, 40))
    )
    xml.write_text(f"<annotation><size><width>800</width><height>600</height></size>{objects}</annotation>")
    size, boxes = read_voc(xml)
    assert size == (800, 600)
    np.testing.assert_array_equal(boxes, [[10, 20, 50, 60], [99, 4, 120, 40]])
    xml.write_text("<annotation><object><bndbox><xmin>5</xmin></bndbox></object></annotation>")
    with pytest.raises(ValueError, match="object 0"):
        read_voc(xml)


def test_yolo_line_is_what_the_yolo_reader_reads_back() -> None:
    uv = hand_uv(60, 50, 40) * (W, H)
    uv[3] = (-4.0, 50.0)  # outside the image: not labelled
    box = hand_box(uv, W, H)
    hand = parse_line(yolo_line(uv, box, W, H).split(), 3)
    np.testing.assert_allclose(hand.box * (W, H, W, H), box, atol=1e-3)
    labelled = np.arange(21) != 3
    np.testing.assert_array_equal(hand.visibility, labelled.astype(np.uint8))
    np.testing.assert_allclose(hand.uv[labelled] * (W, H), uv[labelled], atol=1e-3)
    np.testing.assert_array_equal(hand.uv[3], [0, 0])
    only = box_only_line(box, W, H).split()
    assert len(only) == 68 and set(only[5:]) == {"0"}
    with pytest.raises(ValueError, match="no labelled keypoint"):  # what pack says of such a line
        parse_line(only, 3)


# ---- the tool, with a fake teacher ------------------------------------------------------------------


def fake_photos(src: Path) -> dict[str, list[Answer]]:
    """Photos in two folders; each photo's mean red picks what the fake teacher says.
    Returns the answers about each photo by its relative path."""
    plans = {
        "p1/a.jpg": [answer(hand_uv(60, 50, 40))],
        "p1/b.JPG": [answer(hand_uv(40, 50, 30)), answer(hand_uv(150, 50, 30), label="Right")],
        "p1/c.jpg": [answer(hand_uv(60, 50, 40), det=0.15)],  # dropped: low detection score
        "p2/d.jpg": [],  # no hand
        "p2/sub/e.jpeg": [answer(hand_uv(100, 60, 50))],
    }
    for k, rel in enumerate(plans):
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        noise = np.random.default_rng(k).integers(-8, 9, (H, W, 3))  # pack needs pixels that vary
        Image.fromarray((np.array([40 * k + 10, 50, 50]) + noise).astype(np.uint8)).save(path, quality=95)
    (src / "p1" / "notes.txt").write_text("not a photo")
    return plans


def fake_teacher(plans: dict[str, list[Answer]], calls: list[int]) -> teacher_label.TeacherFactory:
    """A teacher that answers from `plans` by the photo's red channel; on the mirrored photo it
    answers the mirror image of the same hands."""
    by_colour = {40 * k + 10: answers for k, answers in enumerate(plans.values())}

    def factory(args: object) -> tuple[dict, teacher_label.Answerer]:
        def answer_fn(rgb: np.ndarray) -> list[Answer]:
            calls.append(1)
            red = float(rgb[..., 0].mean())
            hands = by_colour[min(by_colour, key=lambda c: abs(c - red))]
            return hands if len(calls) % 2 else [mirror_answer(a) for a in hands]

        return {"teacher": "fake"}, answer_fn

    return factory


def run_tool(src: Path, dest: Path, plans: dict, calls: list[int], *extra: str) -> dict:
    return teacher_label.run([str(src), str(dest), *extra], teacher=fake_teacher(plans, calls))


def test_the_tool_writes_a_yolo_dataset_that_pack_reads(tmp_path: Path) -> None:
    src, dest = tmp_path / "photos", tmp_path / "out"
    plans = fake_photos(src)
    calls: list[int] = []
    report = run_tool(src, dest, plans, calls, "--val-folders", "p2")
    assert len(calls) == 10  # every photo and its mirror once

    a = report["all"]
    assert (a["photos"], a["photos kept"], a["hands answered"], a["hands kept"]) == (5, 3, 5, 4)
    assert a["low detection score"] == 1 and a["photos answered"] == 4
    assert report["folders"]["p1"]["hands kept"] == 3 and report["folders"]["p2"]["photos in val"] == 1
    assert report["hands_per_photo"] == {"0": 2, "1": 2, "2": 1}
    assert json.loads((dest / "report.json").read_text())["all"] == a
    assert "| p1 | 3 | 2 | 4 | 3 | 1 |" in (dest / "report.md").read_text()

    # files: kept photos only, labels beside them, one line per kept hand
    images = sorted(p.relative_to(dest).as_posix() for p in dest.glob("*/images/**/*") if p.is_file())
    assert images == ["train/images/p1/a.jpg", "train/images/p1/b.JPG", "val/images/p2/sub/e.jpeg"]
    assert (dest / "train/images/p1/a.jpg").read_bytes() == (src / "p1/a.jpg").read_bytes()
    lines = (dest / "train/labels/p1/b.txt").read_text().splitlines()
    assert len(lines) == 2
    for line, want in zip(lines, plans["p1/b.JPG"], strict=True):
        np.testing.assert_allclose(parse_line(line.split(), 3).uv, want.uv, atol=1e-6)
    assert "kpt_shape: [21, 3]" in (dest / "dataset.yaml").read_text()

    data = read_yolo(dest / "dataset.yaml")
    assert len(data.records) == 4 and not data.problems
    assert sorted({r.split for r in data.records}) == ["train", "val"]
    shards = tmp_path / "shards"
    pack(dest, shards, fmt="yolo", workers=1)
    m = read_manifest(shards)
    assert (m.count("train"), m.count("val")) == (3, 1)

    # a re-run asks the teacher nothing and writes the same bytes
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    run_tool(src, dest, plans, calls, "--val-folders", "p2")
    assert len(calls) == 10
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before


def test_teacher_predictions_give_every_answer_on_the_photo_in_its_pixels(tmp_path: Path) -> None:
    """tools/teacher_predictions.py: one line per photo, every hand the teacher answered on the
    photo itself (the dropped ones too, none from the mirror) in pixels, boxed as teacher_label
    boxes its labels, scored by the palm detection; a photo the cache lacks is one line, exit 1."""
    import teacher_predictions

    src, dest = tmp_path / "photos", tmp_path / "out"
    plans = fake_photos(src)
    run_tool(src, dest, plans, [])
    out = tmp_path / "teacher.jsonl"
    teacher_predictions.main([str(dest), str(src), "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["path"] for line in lines] == [str(src / rel) for rel in plans]
    for line, answers in zip(lines, plans.values(), strict=True):
        assert len(line["hands"]) == len(answers)  # p1/c.jpg's low-score hand included
        for hand, a in zip(line["hands"], answers, strict=True):
            px = a.uv * (W, H)
            np.testing.assert_allclose(np.array(hand["keypoints"])[:, :2], px, atol=1e-3)
            assert [k[2] for k in hand["keypoints"]] == [1.0] * 21
            np.testing.assert_allclose(hand["box"], hand_box(px, W, H), atol=1e-3)
            assert hand["score"] == pytest.approx(a.detection_score)

    (src / "p2" / "new.jpg").write_bytes((src / "p1" / "a.jpg").read_bytes())  # never labelled
    tool = [sys.executable, str(ROOT / "tools" / "teacher_predictions.py"), str(dest), str(src)]
    done = subprocess.run([*tool, "--out", str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {dest / '.teacher-cache' / 'p2' / 'new.jpg.json'}: no teacher answer for "
        f"{src / 'p2' / 'new.jpg'} (run teacher_label.py over {src})"
    ]
    assert len(out.read_text().splitlines()) == len(plans)  # the earlier file is left whole


def test_a_rerun_with_other_rules_retracts_what_it_no_longer_keeps(tmp_path: Path) -> None:
    src, dest = tmp_path / "photos", tmp_path / "out"
    plans = fake_photos(src)
    calls: list[int] = []
    run_tool(src, dest, plans, calls)
    mine = dest / "train" / "labels" / "keep-me.txt"  # not the tool's: never deleted
    mine.write_text("x")
    report = run_tool(src, dest, plans, calls, "--min-detection", "0.95")
    assert report["all"]["hands kept"] == 0 and report["stale_files_removed"] == 6
    assert not (dest / "train" / "images").exists()  # emptied folders go too
    assert mine.read_text() == "x"
    assert len(calls) == 10  # the answers came from the cache


def test_a_run_that_crashed_leaves_nothing_a_rerun_does_not_clean(tmp_path: Path) -> None:
    src, dest = tmp_path / "photos", tmp_path / "out"
    plans = fake_photos(src)
    calls: list[int] = []
    teacher = fake_teacher(plans, calls)

    def crashing(args: object) -> tuple[dict, teacher_label.Answerer]:
        settings, answer_fn = teacher(args)

        def answer_or_crash(rgb: np.ndarray) -> list[Answer]:
            if len(calls) == 6:  # after three photos: a.jpg, b.JPG (written) and c.jpg
                raise RuntimeError("killed")
            return answer_fn(rgb)

        return settings, answer_or_crash

    with pytest.raises(RuntimeError, match="killed"):
        teacher_label.run([str(src), str(dest)], teacher=crashing)
    assert (dest / "train/images/p1/a.jpg").is_file()
    # the re-run sends p1 to val: the crashed run's train files go, nothing else is left
    run_tool(src, dest, plans, calls, "--val-folders", "p1")
    left = sorted(
        p.relative_to(dest).as_posix()
        for p in dest.rglob("*")
        if p.is_file() and ".teacher-cache" not in p.parts
    )
    assert [f for f in left if f.startswith("train/")] == [
        "train/images/p2/sub/e.jpeg",
        "train/labels/p2/sub/e.txt",
    ]
    assert "val/images/p1/a.jpg" in left and ".teacher-files.journal" not in left


def test_groups_val_lists_and_bad_options(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    plans = fake_photos(src)
    calls: list[int] = []
    names = tmp_path / "val.txt"
    names.write_text("a.jpg\n")
    report = run_tool(src, tmp_path / "o1", plans, calls, "--val-list", str(names), "--group", r"/(\w)\.")
    assert report["groups"]["a"]["photos in val"] == 1 and report["groups"]["b"]["photos in train"] == 1
    one = run_tool(src, tmp_path / "o4", plans, calls, "--keep-hands", "1")
    assert one["all"]["beyond --keep-hands"] == 1 and one["hands_per_photo"] == {"0": 2, "1": 3}
    assert one["rules"]["keep_hands"] == 1
    with pytest.raises(teacher_label.HandposeError, match="overlap"):
        run_tool(src, src / "out", plans, calls)
    with pytest.raises(teacher_label.HandposeError, match="--val-folders: no photos in p9"):
        run_tool(src, tmp_path / "o2", plans, calls, "--val-folders", "p9")
    with pytest.raises(teacher_label.HandposeError, match="--group"):
        run_tool(src, tmp_path / "o3", plans, calls, "--group", "(")


def test_voc_photos_get_a_box_variant_and_a_list(tmp_path: Path) -> None:
    src, dest = tmp_path / "photos", tmp_path / "out"
    plans = fake_photos(src)
    a = plans["p1/a.jpg"][0]
    x0, y0, x1, y1 = hand_box(a.uv * (W, H), W, H)
    boxes = [(x0 + 1, y0 + 1, x1, y1), (150, 10, 190, 60)]  # the teacher's hand and one it missed
    objects = "".join(
        f"<object><bndbox><xmin>{p:.0f}</xmin><ymin>{q:.0f}</ymin><xmax>{r:.0f}</xmax><ymax>{s:.0f}</ymax>"
        "</bndbox></object>"
        for p, q, r, s in boxes
    )
    (src / "p1" / "a.xml").write_text(
        f"<annotation><size><width>{W}</width><height>{H}</height></size>{objects}</annotation>"
    )
    report = run_tool(src, dest, plans, [], "--voc")
    assert (report["all"]["VOC hands"], report["all"]["VOC hands labelled"]) == (2, 1)
    assert report["all"]["photos with an unlabelled VOC hand"] == 1
    (row,) = json.loads((dest / "voc.json").read_text())
    assert row["photo"] == "p1/a.jpg" and row["labelled"] == [True, False] and not row["all_labelled"]
    variant = (dest / "boxes/train/labels/p1/a.txt").read_text().splitlines()
    assert variant[0] == (dest / "train/labels/p1/a.txt").read_text().strip()
    assert variant[1].split()[5:] == ["0"] * 63
    # b.JPG holds hands the teacher kept but no xml: its hands stand (no VOC boxes to check against)
    assert (dest / "train/labels/p1/b.txt").is_file() and not (dest / "boxes/train/labels/p1/b.txt").exists()
    # pack refuses box-only lines (a hand needs a labelled joint): --on-error skip lists them
    shards = tmp_path / "shards"
    pack(dest / "boxes", shards, fmt="yolo", workers=1, on_error="skip", split="1,0,0")
    m = read_manifest(shards)
    assert m.count("train") == 1
    assert [s["reason"] for s in m.data["skipped"]] == ["no labelled keypoint (every visibility is 0)"]


# ---- the real teacher ------------------------------------------------------------------------------


def test_the_real_teacher_on_real_photos(tmp_path: Path, shared_data: Path) -> None:
    """MediaPipe on 6 hand-keypoints photos (whose labels MediaPipe made): the kept hands sit
    within a few % of the box of those labels."""
    if not TEACHER_PY.exists():
        pytest.skip(".venv-teacher is absent (make teacher-env creates it)")
    sample = shared_data / "hand-keypoints" / "sample" / "val"
    if not sample.is_dir():
        pytest.skip("../shared/data/hand-keypoints/sample is absent")
    src = tmp_path / "photos"
    src.mkdir()
    names = sorted(os.listdir(sample / "images"))[:6]
    for n in names:
        (src / n).write_bytes((sample / "images" / n).read_bytes())
    dest = tmp_path / "out"
    cmd = [str(TEACHER_PY), str(ROOT / "tools" / "teacher_label.py"), str(src), str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = read_yolo(dest)
    assert len(data.records) >= 3 and not data.problems
    for r in data.records:
        label = (sample / "labels" / Path(r.file).name).with_suffix(".txt").read_text().split()
        want = np.asarray(label[5:], np.float64).reshape(21, 3)[:, :2]
        side = max(r.box[2] - r.box[0], r.box[3] - r.box[1])
        assert np.abs(r.uv - want).mean() < 0.05 * side, r.file
    report = json.loads((dest / "report.json").read_text())
    assert report["all"]["photos"] == 6 and report["settings"]["mediapipe"] == "0.10.21"


# ---- compositing cut-out hands onto backgrounds ---------------------------------------------------

import composite  # noqa: E402


def cutout(seed: int) -> np.ndarray:
    """A 120 x 100 'hand on black': a skin-coloured disc with a 2 px dark crease (hand) and a
    24 px hole (background showing through, as in the O sign), plus JPEG-like noise on black."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 12, (100, 120, 3)).astype(np.uint8)  # black is never exactly 0
    yy, xx = np.mgrid[:100, :120]
    disc = (xx - 60) ** 2 + (yy - 50) ** 2 < 40**2
    img[disc] = (200, 150, 120)
    img[disc & (abs(xx - 45) <= 1)] = (15, 10, 10)  # a crease: dark, but hand
    img[(xx - 70) ** 2 + (yy - 50) ** 2 < 12**2] = (5, 5, 5)  # the hole
    return img


def test_hand_mask_is_the_hand_with_its_creases_and_without_its_holes() -> None:
    alpha = composite.hand_mask(cutout(0))
    assert alpha.shape == (100, 120) and alpha.dtype == np.float32
    assert alpha[50, 30] == 1.0 and alpha[50, 45] == 1.0  # the disc and its crease
    assert alpha[50, 70] == 0.0 and alpha[5, 5] == 0.0  # the hole and the black around
    assert 0.0 < alpha[50, 20] < 1.0  # the soft edge (the disc's edge is at x = 20)


def test_hand_free_crops_keep_clear_of_every_hand() -> None:
    rng = np.random.default_rng(0)
    avoid = [np.array([20.0, 20.0, 80.0, 60.0])]
    grown = np.array([11.0, 14.0, 89.0, 66.0])  # AVOID_PAD 0.15 of the 60 x 40 px box
    for _ in range(200):
        crop = composite.hand_free_crop(400, 300, avoid, rng)
        assert crop is not None
        x0, y0, side = crop
        assert composite.iou(np.array([x0, y0, x0 + side, y0 + side]), grown) == 0.0
        assert 0 <= x0 and x0 + side <= 400 and 0 <= y0 and y0 + side <= 300
    assert composite.hand_free_crop(400, 300, [np.array([0.0, 0.0, 400.0, 300.0])], rng) is None


def background_set(root: Path) -> Path:
    """What teacher_label.py --voc leaves: report.json (src), voc.json, the cache of answers."""
    src, out = root / "bg-photos", root / "bg-labelled"
    src.mkdir(parents=True)
    rows = []
    for k, split in enumerate(("train", "train", "val")):
        rng = np.random.default_rng(100 + k)
        Image.fromarray(rng.integers(0, 256, (200, 300, 3)).astype(np.uint8)).save(src / f"bg{k}.jpg")
        rows.append({"photo": f"bg{k}.jpg", "split": split, "boxes": [[10.0, 10.0, 60.0, 70.0]]})
        entry = {"size": [300, 200], "photo": [answer(hand_uv(250, 150, 40)).to_json()], "mirror": []}
        (out / ".teacher-cache").mkdir(parents=True, exist_ok=True)
        (out / ".teacher-cache" / f"bg{k}.jpg.json").write_text(json.dumps(entry))
    (out / "voc.json").write_text(json.dumps(rows))
    (out / "report.json").write_text(json.dumps({"src": str(src)}))
    return out


def test_composites_keep_the_labels_and_the_hand_and_are_seeded(tmp_path: Path) -> None:
    hands = tmp_path / "hands"
    (hands / "train" / "images" / "s").mkdir(parents=True)
    (hands / "train" / "labels" / "s").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(cutout(k)).save(hands / "train" / "images" / "s" / f"h{k}.jpeg", quality=98)
        (hands / "train" / "labels" / "s" / f"h{k}.txt").write_text(
            f"0 0.5 0.5 0.6 0.8 {'0.5 0.5 1 ' * 21}\n"
        )
    bgs = background_set(tmp_path)

    def make(dest: str, seed: int) -> dict:
        return composite.run(
            [str(hands), str(bgs), str(tmp_path / dest), "--copies", "2", "--seed", str(seed)]
        )

    log = make("c1", 0)
    out = tmp_path / "c1" / "train"
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert names == [f"images/s/h{k}_bg{c}.jpg" for k in range(3) for c in range(2)]
    for k in range(3):
        for c in range(2):
            label = (out / "labels" / "s" / f"h{k}_bg{c}.txt").read_bytes()
            assert label == (hands / "train" / "labels" / "s" / f"h{k}.txt").read_bytes()
    assert {Path(p["photo"]).name for p in log["photos"]} <= {"bg0.jpg", "bg1.jpg"}  # never the val photo

    # the hand stays, the black becomes the background crop the log names
    first = log["photos"][0]
    got = np.asarray(Image.open(tmp_path / "c1" / first["image"]), np.float64)
    np.testing.assert_allclose(got[50, 30], (200, 150, 120), atol=12)
    x0, y0, side = first["crop"]
    with Image.open(first["photo"]) as im:
        bg = np.asarray(
            im.convert("RGB").resize(
                (120, 100), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side)
            )
        )
    far = composite.hand_mask(cutout(0)) == 0
    assert np.abs(got[far] - bg[far]).mean() < 12  # JPEG noise on random pixels
    assert read_yolo(tmp_path / "c1" / "dataset.yaml").records

    make("c2", 0)
    make("c3", 1)
    files = sorted(p.relative_to(tmp_path / "c1") for p in (tmp_path / "c1").rglob("*.jpg"))
    assert all((tmp_path / "c1" / f).read_bytes() == (tmp_path / "c2" / f).read_bytes() for f in files)
    assert any((tmp_path / "c1" / f).read_bytes() != (tmp_path / "c3" / f).read_bytes() for f in files)


def plain_background_set(root: Path) -> Path:
    """What teacher_label.py leaves without --voc: report.json (src), the photos it kept a hand in
    under train/images, and the cache of answers about every photo (kept or not)."""
    src, out = root / "plain-photos", root / "plain-labelled"
    src.mkdir(parents=True)
    for k, kept in enumerate((True, True, False)):
        rng = np.random.default_rng(200 + k)
        Image.fromarray(rng.integers(0, 256, (200, 300, 3)).astype(np.uint8)).save(src / f"pl{k}.jpg")
        hands = [answer(hand_uv(60, 60, 50)).to_json()] if kept else []
        entry = {"size": [300, 200], "photo": hands, "mirror": []}
        (out / ".teacher-cache").mkdir(parents=True, exist_ok=True)
        (out / ".teacher-cache" / f"pl{k}.jpg.json").write_text(json.dumps(entry))
        if kept:
            (out / "train" / "images").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f"pl{k}.jpg", out / "train" / "images" / f"pl{k}.jpg")
    (out / "report.json").write_text(json.dumps({"src": str(src)}))
    return out


def test_backgrounds_from_several_sets_with_and_without_voc(tmp_path: Path) -> None:
    """Two background sets, one with VOC boxes and one without: composites take crops of the
    train photos of both; of the set without VOC, only photos with a kept hand, each crop clear
    of every hand the teacher answered."""
    plain = plain_background_set(tmp_path)
    found = composite.read_backgrounds(plain, "train")
    assert [b.path.name for b in found] == ["pl0.jpg", "pl1.jpg"]  # pl2: no kept hand, maybe a missed one
    assert len(found[0].avoid) == 1 and found[0].path == tmp_path / "plain-photos" / "pl0.jpg"
    with pytest.raises(composite.HandposeError, match="no val photos to take backgrounds from"):
        composite.read_backgrounds(plain, "val")

    hands = tmp_path / "hands"
    (hands / "train" / "images").mkdir(parents=True)
    (hands / "train" / "labels").mkdir(parents=True)
    for k in range(12):
        Image.fromarray(cutout(k)).save(hands / "train" / "images" / f"h{k}.jpeg", quality=98)
        (hands / "train" / "labels" / f"h{k}.txt").write_text(f"0 0.5 0.5 0.6 0.8 {'0.5 0.5 1 ' * 21}\n")
    log = composite.run([str(hands), str(background_set(tmp_path)), str(plain), str(tmp_path / "out")])
    used = {Path(p["photo"]).name for p in log["photos"]}
    assert used <= {"bg0.jpg", "bg1.jpg", "pl0.jpg", "pl1.jpg"} and used & {"pl0.jpg", "pl1.jpg"}
    grown = composite.hand_box(composite.to_pixels(answer(hand_uv(60, 60, 50)).uv, 300, 200), 300, 200)
    pad = composite.AVOID_PAD * (grown[2:] - grown[:2])
    grown = np.concatenate([grown[:2] - pad, grown[2:] + pad])
    for p in log["photos"]:
        if Path(p["photo"]).name.startswith("pl"):
            x0, y0, side = p["crop"]
            assert composite.iou(np.array([x0, y0, x0 + side, y0 + side]), grown) == 0.0


def test_the_tool_imports_only_what_the_teachers_environment_holds(tmp_path: Path) -> None:
    """.venv-teacher has mediapipe, numpy<2 and pillow (and what mediapipe pulls), none of
    handpose's own dependencies: the tool starts with them blocked (so it never imports
    handpose.sources.yolo, which needs pyyaml)."""
    blocked = ["yaml", "torch", "simplejpeg", "webdataset", "typer", "rich", "nvidia"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        f"sys.argv = ['teacher_label.py', {str(tmp_path / 'none')!r}, {str(tmp_path / 'out')!r}]\n"
        f"sys.path.insert(0, {str(ROOT / 'tools')!r})\n"
        "import teacher_label\n"
        "teacher_label.main()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip() == f"error: {tmp_path / 'none'}: not a folder", p.stderr

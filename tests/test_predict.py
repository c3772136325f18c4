"""`handpose predict`: geometry round trips through stub models (whole images, several boxes per
image, refinement), every input kind and its labels, the shared preprocessing, the tutorial's
numbers, model loading, bad inputs and the report's arithmetic.

Output rules, resume and torchrun are in test_predict_runs.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yolokit
from PIL import Image
from predictkit import (
    PLAIN,
    WARP,
    FixedPoseModel,
    IntensityModel,
    dot_image,
    encode,
    formula_unet,
    lookup_model,
    noise_image,
    smooth_image,
)

from handpose.checkpoint import load_model
from handpose.errors import HandposeError
from handpose.geometry import (
    apply_affine,
    box_region,
    crop_matrix,
    fit_matrix,
    invert,
    keypoints_box,
    steady_region,
)
from handpose.inference import DEFAULT_REFINE, Predictor, crops_of, image_size_of, letterbox, refine_box
from handpose.model import BOX_TO_KEYPOINTS, ModelSpec
from handpose.predict import predict
from handpose.report import (
    PCK_THRESHOLDS_PX,
    SPILL_COLUMNS,
    order_statistics,
    pck_auc,
    spill_rows,
    summarise,
    write_report,
)
from handpose.skeleton import NUM_JOINTS
from handpose.sources.yolo import parse_box_line


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "w, h, fmt, preprocess",
    [
        (300, 200, "PNG", "tutorial"),  # fractional bars: 21.33 px top and bottom
        (200, 300, "PNG", "warp"),
        (96, 64, "PNG", "tutorial"),  # upscaled
        (1001, 603, "JPEG", "tutorial"),  # full decode, width not a multiple of 8
        (1001, 603, "JPEG", "warp"),  # JPEG DCT fast path at 1/4
    ],
)
def test_letterbox_dot_round_trip(tmp_path: Path, w: int, h: int, fmt: str, preprocess: str) -> None:
    """A dot drawn at a known place in a non-square image comes back there in original pixels."""
    spec = ModelSpec(**{**PLAIN.__dict__, "preprocess": preprocess})
    cx, cy = 0.87 * w + 0.3, 0.31 * h + 0.2  # far from the centre: scale errors show
    (tmp_path / f"dot.{fmt.lower()}").write_bytes(
        encode(dot_image(w, h, cx, cy, max(w, h) / 40), fmt, quality=95)
    )
    predict((IntensityModel(), spec), [tmp_path], tmp_path / "out", workers=0, quiet=True)
    (rec,) = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert (rec["width"], rec["height"], rec["hand"], rec["box"]) == (w, h, 0, None)
    kp = np.array(rec["keypoints"])
    assert np.abs(kp[:, :2] - [cx, cy]).max() < 0.1 * max(1.0, max(w, h) / 300)  # measured: <= 0.05


def test_exif_rgba_and_grey_dots(tmp_path: Path) -> None:
    """Keypoints are in the image as displayed: EXIF-rotated JPEG, RGBA and greyscale PNGs."""
    w, h, cx, cy = 240, 160, 180.3, 50.6
    disp = dot_image(w, h, cx, cy, 6.0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees; viewers rotate it clockwise back to `disp`
    Image.fromarray(disp).transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "exif.jpg", exif=exif, quality=95
    )
    rgba = np.concatenate([disp, np.full((h, w, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(disp[..., 0], "L").save(tmp_path / "grey.png")
    for spec in (PLAIN, WARP):
        predict((IntensityModel(), spec), [tmp_path], tmp_path / "out", workers=0, quiet=True)
        recs = read_jsonl(tmp_path / "out" / "predictions.jsonl")
        assert [Path(r["path"]).name for r in recs] == ["exif.jpg", "grey.png", "rgba.png"]
        for r in recs:
            assert (r["width"], r["height"]) == (w, h)
            assert np.abs(np.array(r["keypoints"])[:, :2] - [cx, cy]).max() < 0.1, r["path"]


def test_letterbox_equals_the_fit_matrix() -> None:
    """The resize-and-pad image op is the fit matrix: a square image is a plain PIL resize, and a
    non-square one matches the affine warp of the same matrix away from the bar edges."""
    img = noise_image(224, 224, 0)
    plain = np.asarray(Image.fromarray(img).resize((128, 128), Image.Resampling.BILINEAR))
    assert np.array_equal(letterbox(img, fit_matrix(224, 224, 128), 128), plain)
    smooth = np.asarray(Image.fromarray(noise_image(30, 20, 1)).resize((300, 200), Image.Resampling.BICUBIC))
    M = fit_matrix(300, 200, 128)
    out = letterbox(smooth, M, 128).astype(int)
    assert out[:21].max() == 0 and out[108:].max() == 0  # bars: rows 0..20 and 108..127 are black
    from handpose.imageio import warp_affine

    ref = warp_affine(smooth, M, 128).astype(int)
    assert np.abs(out[23:105] - ref[23:105]).mean() < 4  # same geometry, antialiased vs not


def test_known_keypoints_come_back(tmp_path: Path) -> None:
    """Known keypoints on generated images of many shapes come back through predict exactly, in
    input order, whatever the batch size and decode threads."""
    rng = np.random.default_rng(0)
    crops, uv_of = [], {}
    for k, (w, h) in enumerate([(224, 224), (320, 180), (150, 400), (640, 480), (257, 255)]):
        path = tmp_path / "in" / f"img{k}.{'jpg' if k % 2 else 'png'}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(encode(noise_image(w, h, k), "JPEG" if k % 2 else "PNG", quality=90))
        uv_of[str(path)] = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h], (NUM_JOINTS, 2))
        crops.append((path.read_bytes(), None, uv_of[str(path)]))
    for spec in (PLAIN, WARP):
        model = lookup_model(crops, spec)
        predict(
            (model, spec),
            [tmp_path / "in"],
            tmp_path / "out",
            batch_size=2,
            workers=2,
            overlays=1,
            quiet=True,
        )
        assert [p.name for p in (tmp_path / "out" / "overlays").iterdir()] == ["0001-img0.png"]
        recs = read_jsonl(tmp_path / "out" / "predictions.jsonl")
        assert [r["path"] for r in recs] == sorted(uv_of)
        for r in recs:
            assert np.abs(np.array(r["keypoints"])[:, :2] - uv_of[r["path"]]).max() < 2e-3
        first = (tmp_path / "out" / "predictions.jsonl").read_bytes()
        predict((model, spec), [tmp_path / "in"], tmp_path / "out", batch_size=64, workers=0, quiet=True)
        assert (tmp_path / "out" / "predictions.jsonl").read_bytes() == first


@pytest.mark.parametrize("spec", [WARP, PLAIN], ids=["warp", "tutorial"])
def test_crops_equal_independently_computed_crops(spec: ModelSpec) -> None:
    """The model inputs predict feeds, computed here without handpose: a box whose padded square
    is the input size is the image's own pixels (numpy slicing; black past the image's edge),
    the whole image letterboxed at scale 1 is the image between two black bars, and at scale 1/2
    its 2x2 means (handpose checkpoints) or Pillow's resize of it (the tutorial's weights)."""
    pixels = noise_image(300, 200, 4)
    data = encode(pixels)
    side = spec.size / spec.pad  # a square box whose padded square is exactly the input side
    for cx, cy in ((150.0, 70.0), (40.0, 30.0)):  # inside the image; reaching past its top-left corner
        box = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
        (crop,) = crops_of(data, 300, 200, [box], spec)
        x0, y0 = int(cx) - spec.size // 2, int(cy) - spec.size // 2
        expected = np.zeros((spec.size, spec.size, 3), np.uint8)
        ys, xs = slice(max(0, y0), y0 + spec.size), slice(max(0, x0), x0 + spec.size)
        expected[max(0, -y0) :, max(0, -x0) :] = pixels[ys, xs][
            : spec.size - max(0, -y0), : spec.size - max(0, -x0)
        ]
        assert np.array_equal(crop.input, expected), (spec.preprocess, cx, cy)
    small = noise_image(128, 96, 5)
    (crop,) = crops_of(encode(small), 128, 96, [None], spec)
    assert (
        np.array_equal(crop.input[16:112], small) and not crop.input[:16].any() and not crop.input[112:].any()
    )
    big = smooth_image(256, 192, 6)
    (crop,) = crops_of(encode(big), 256, 192, [None], spec)
    if spec.preprocess == "warp":  # box-reduced by 2: 2x2 means
        half = big.reshape(96, 2, 128, 2, 3).astype(np.float64).mean(axis=(1, 3))
    else:  # the tutorial's Pillow resize of the whole image
        half = np.asarray(Image.fromarray(big).resize((128, 96), Image.Resampling.BILINEAR), np.float64)
    assert np.abs(crop.input[16:112].astype(np.float64) - half).max() <= 1.0
    assert not crop.input[:16].any() and not crop.input[112:].any()


def test_one_image_in_memory_gives_predicts_numbers(tmp_path: Path) -> None:
    """`inference.Predictor` on one image in memory (its bytes, or its decoded pixels) runs the
    path predict runs: the same keypoints and scores, in a given box and on the whole image with
    refinement passes alike."""
    spec = ModelSpec(**{**WARP.__dict__, "crop": "box", "box_to_keypoints": 1.3})
    pixels = dot_image(320, 240, 201.3, 77.6, 6.0)  # IntensityModel finds the dot: where crops matter
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(pixels))
    box = np.array([150.0, 30.0, 260.0, 130.0])
    (tmp_path / "box.json").write_text(json.dumps([{"file_name": "a.png", "bbox": [150, 30, 110, 100]}]))
    for boxes, refine in ((None, 2), (tmp_path / "box.json", 0)):
        out = tmp_path / f"out-{refine}"
        predict((IntensityModel(), spec), [tmp_path / "in"], out, boxes=boxes, refine=refine, quiet=True)
        (rec,) = read_jsonl(out / "predictions.jsonl")
        assert np.abs(np.array(rec["keypoints"])[:, :2] - [201.3, 77.6]).max() < 0.5
        for image in (encode(pixels), pixels):
            (hand,) = Predictor(IntensityModel(), spec, refine=refine)(
                image, None if boxes is None else [box]
            )
            kp = [
                [round(float(x), 3), round(float(y), 3), round(float(v), 4)]
                for (x, y), v in zip(hand.uv, hand.score, strict=True)
            ]
            assert kp == rec["keypoints"], (refine, type(image))
            final = None if hand.final_box is None else np.round(hand.final_box, 3).tolist()
            assert final == rec["box"] and (final is None) == (boxes is None and refine == 0)
    with pytest.raises(ValueError, match="too small"):
        image_size_of(np.zeros((4, 40, 3), np.uint8))


def _box_photos(tmp_path: Path) -> tuple[dict[str, list[tuple[np.ndarray, np.ndarray]]], list, Path]:
    """Three photos with 3, 2 and 1 off-centre hand boxes of several sizes, each box with known
    keypoints: {file name: [(box, uv)]}, the crops for a lookup model, and the folder."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "photos"
    folder.mkdir()
    truth, crops = {}, []
    for name, (w, h), n in (("a.jpg", (1280, 960), 3), ("b.png", (400, 300), 2), ("c.jpg", (224, 224), 1)):
        data = encode(smooth_image(w, h, len(truth)), "JPEG" if name.endswith("jpg") else "PNG", quality=92)
        (folder / name).write_bytes(data)
        hands = []
        for _ in range(n):
            side = rng.uniform(0.1, 0.4) * min(w, h)
            x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
            box = np.array([x0, y0, x0 + side, y0 + side * rng.uniform(0.7, 1.0)])
            uv = rng.uniform(box[:2], box[2:], (NUM_JOINTS, 2))
            hands.append((box, uv))
            crops.append((data, box, uv))
        truth[name] = hands
    return truth, crops, folder


@pytest.mark.parametrize("spec", [WARP, PLAIN], ids=["warp", "tutorial"])
def test_boxes_several_per_image_come_back(tmp_path: Path, spec: ModelSpec) -> None:
    """--boxes: a stub model that answers known keypoints for each crop returns them in original
    pixels for several boxes per image, from COCO detections (by file_name or image_id) and from a
    YOLO labels folder; predictions.jsonl carries each box and its hand index."""
    truth, crops, folder = _box_photos(tmp_path)
    model = lookup_model(crops, spec)
    detections = []
    for name, hands in truth.items():
        for box, _ in hands:
            x0, y0, x1, y1 = box.tolist()
            detections.append({"file_name": name, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 0.9})
    (tmp_path / "dets.json").write_text(json.dumps(detections))
    labels = tmp_path / "labels"
    labels.mkdir()
    for name, hands in truth.items():
        w, h = Image.open(folder / name).size
        lines = []
        for box, _ in hands:
            cx, cy, bw, bh = (
                (box[0] + box[2]) / 2 / w,
                (box[1] + box[3]) / 2 / h,
                (box[2] - box[0]) / w,
                (box[3] - box[1]) / h,
            )
            lines.append(f"0 {float(cx)!r} {float(cy)!r} {float(bw)!r} {float(bh)!r} 0.8")
        (labels / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")
    for boxes in (tmp_path / "dets.json", labels):
        out = tmp_path / f"out-{Path(boxes).stem}"
        predict((model, spec), [folder], out, boxes=boxes, workers=0, quiet=True, coco=out / "coco.json")
        recs = read_jsonl(out / "predictions.jsonl")
        assert [(Path(r["path"]).name, r["hand"]) for r in recs] == [
            (n, k) for n, hands in truth.items() for k in range(len(hands))
        ]
        for r in recs:
            box, uv = truth[Path(r["path"]).name][r["hand"]]
            assert np.abs(np.array(r["box"]) - box).max() < 2e-3
            assert np.abs(np.array(r["keypoints"])[:, :2] - uv).max() < 2e-3
            assert r["box_score"] == (0.9 if boxes.suffix == ".json" else 0.8)
        coco = json.loads((out / "coco.json").read_text())
        assert len(coco) == len(recs) and all(len(c["bbox"]) == 4 for c in coco)
    # by image_id: a digits-only stem is the image's id
    (folder / "a.jpg").rename(folder / "7.jpg")
    by_id = [{"image_id": 7, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for b, _ in truth["a.jpg"]]
    (tmp_path / "ids.json").write_text(json.dumps(by_id))
    predict(
        (model, spec),
        [folder / "7.jpg"],
        tmp_path / "out-id",
        boxes=tmp_path / "ids.json",
        workers=0,
        quiet=True,
    )
    recs = read_jsonl(tmp_path / "out-id" / "predictions.jsonl")
    assert len(recs) == 3 and "box_score" not in recs[0]
    for r in recs:
        assert np.abs(np.array(r["keypoints"])[:, :2] - truth["a.jpg"][r["hand"]][1]).max() < 2e-3


def test_boxes_file_errors(tmp_path: Path) -> None:
    """A bad detection entry is one line naming the entry; a bad YOLO box line fails its image."""
    (tmp_path / "a.png").write_bytes(encode(noise_image(64, 48, 0)))
    cases = [
        ({"x": 1}, "entry 1: needs an integer image_id or a file_name"),
        ({"file_name": "a.png", "bbox": [0, 0, 5]}, "entry 1: bbox has shape"),
        ({"file_name": "a.png", "bbox": [0, 0, 0, 5]}, "entry 1: bbox .* width or height <= 0"),
        ({"image_id": "3", "bbox": [0, 0, 5, 5]}, "entry 1: image_id '3' is not an integer"),
        ({"file_name": "a.png", "bbox": [0, 0, 5, 5], "score": "high"}, "entry 1: score 'high'"),
    ]
    for entry, message in cases:
        (tmp_path / "d.json").write_text(json.dumps([{"file_name": "a.png", "bbox": [1, 1, 9, 9]}, entry]))
        with pytest.raises(HandposeError, match=message):
            predict(
                (IntensityModel(), PLAIN),
                [tmp_path / "a.png"],
                tmp_path / "out",
                boxes=tmp_path / "d.json",
                quiet=True,
            )
    assert not (tmp_path / "out").exists()  # refused before anything was written
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 1.5 0.2\n")
    with pytest.raises(HandposeError, match="no image could be predicted"):
        predict((IntensityModel(), PLAIN), [tmp_path / "a.png"], tmp_path / "out", boxes=labels, quiet=True)
    (err,) = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert err["path"].endswith("a.png") and re.search(r"a\.txt:2: box w = 1\.5 is outside", err["reason"])
    assert parse_box_line("0 0.5 0.5 0.2 0.4".split())[1] is None
    assert np.allclose(parse_box_line("0 0.5 0.5 0.2 0.4 0.7".split())[0], [0.4, 0.3, 0.6, 0.7])


def test_refine_crops_the_predicted_hand(tmp_path: Path) -> None:
    """--refine N: each pass crops the box of the last pass's keypoints grown by the checkpoint's
    box-to-keypoints ratio, padded by its box_pad, snapped to `steady_region`'s grid;
    predictions.jsonl records the final box (unsnapped)."""
    w, h = 640, 480
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.jpg").write_bytes(encode(smooth_image(w, h, 3), "JPEG", quality=90))
    rng = np.random.default_rng(2)
    pose = rng.uniform(40, 90, (NUM_JOINTS, 2))  # a hand left of centre in every crop
    spec = ModelSpec(**{**WARP.__dict__, "crop": "box", "pad": 1.3, "box_to_keypoints": 1.5})
    model = FixedPoseModel(pose, spec.size)
    for refine in (0, 1, 2):
        out = tmp_path / f"out{refine}"
        predict((model, spec), [tmp_path / "in"], out, refine=refine, quiet=True)
        (rec,) = read_jsonl(out / "predictions.jsonl")
        uv = apply_affine(invert(fit_matrix(w, h, spec.size)), pose)  # pass 1: the whole image
        box = None
        for _ in range(refine):
            box = refine_box(uv, 1.5)
            assert np.allclose(box[2:] - box[:2], (keypoints_box(uv)[2:] - keypoints_box(uv)[:2]) * 1.5)
            region = box_region(box, 1.3)
            snapped = steady_region(region, spec.size)[0]
            assert snapped != region and abs(snapped[2] / region[2] - 1) < 0.003
            assert (
                max(abs(snapped[0] - region[0]), abs(snapped[1] - region[1]))
                <= snapped[2] / spec.size / 4 + 1e-9
            )
            uv = apply_affine(invert(crop_matrix(snapped, spec.size)), pose)
        assert (rec["box"] is None) == (box is None)
        if box is not None:
            assert np.abs(np.array(rec["box"]) - box).max() < 2e-3
        assert np.abs(np.array(rec["keypoints"])[:, :2] - uv).max() < 2e-3
    # the default: DEFAULT_REFINE passes for a box-crop model, none for a whole-image model
    predict((model, spec), [tmp_path / "in"], tmp_path / "d-box", quiet=True)
    assert (read_jsonl(tmp_path / "d-box" / "predictions.jsonl")[0]["box"] is None) == (DEFAULT_REFINE == 0)
    predict((model, WARP), [tmp_path / "in"], tmp_path / "d-image", quiet=True)
    assert read_jsonl(tmp_path / "d-image" / "predictions.jsonl")[0]["box"] is None
    with pytest.raises(HandposeError, match="--refine applies to whole images"):
        predict((model, spec), [tmp_path / "in"], tmp_path / "x", refine=1, boxes="gt", quiet=True)
    assert BOX_TO_KEYPOINTS == 1.2


# ----------------------------------------------------------------------------- inputs and labels


def test_yolo_dataset_gt_boxes_and_splits(tmp_path: Path) -> None:
    """A YOLO-pose dataset: --split picks its split folder; --boxes gt predicts each labelled hand
    in its box; a perfect model scores 0 in px and in % of the box; unlabelled joints and a
    background image count nowhere."""
    root = yolokit.write_dataset(tmp_path / "yolo", yolokit.default_spec())
    spec = yolokit.default_spec()
    crops, expect = [], []
    for img in spec.splits["train"]:
        data = (root / "train" / "images" / f"{img.name}.jpg").read_bytes()
        w, h = yolokit.displayed_size(img)
        for k, line in enumerate(img.lines or []):
            (cx, cy, bw, bh), uv, vis = yolokit.parse(line)
            box = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]) * [w, h, w, h]
            crops.append((data, box, uv * [w, h]))
            expect.append((img.name, k, box, uv * [w, h], vis))
    model = lookup_model(crops, WARP)
    predict((model, WARP), [root], tmp_path / "out", split="train", boxes="gt", quiet=True, overlays=3)
    recs = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    got = [
        (Path(r["path"]).relative_to(root / "train" / "images").with_suffix("").as_posix(), r["hand"])
        for r in recs
    ]
    assert got == [(n, k) for n, k, *_ in expect]
    for r, (_, _, box, uv, vis) in zip(recs, expect, strict=True):
        assert np.abs(np.array(r["box"]) - box).max() < 1e-3
        assert np.abs(np.array(r["keypoints"])[vis > 0, :2] - uv[vis > 0]).max() < 2e-3
        assert r["error_px"] < 2e-3
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["hands"] == len(expect) and rep["keypoints"] == sum(int((v > 0).sum()) for *_, v in expect)
    assert rep["mean_error_px"] < 2e-3 and rep["mean_error_pct_box"] < 1e-2 and rep["pck_0.2_box"] == 1.0
    assert rep["images"] == 5 and rep["hands_missed"] == 0
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 3
    with pytest.raises(HandposeError, match=r"no split 'bogus' \(has: train, val\)"):
        predict((model, WARP), [root], tmp_path / "x", split="bogus", quiet=True)
    with pytest.raises(HandposeError, match=r"no split 'test' \(has: train, val\); choose one with --split"):
        predict((model, WARP), [root], tmp_path / "x", quiet=True)
    assert not (tmp_path / "x").exists()


def test_whole_image_scored_against_the_hand_it_found(tmp_path: Path) -> None:
    """Whole images with several labelled hands: the one prediction is scored against the
    labelled hand nearest to it; the other hands are counted as missed."""
    root = yolokit.write_dataset(tmp_path / "yolo", yolokit.default_spec())
    spec = yolokit.default_spec()
    img = spec.splits["val"][0]  # h: 224 x 224, two hands
    data = (root / "val" / "images" / "h.jpg").read_bytes()
    uv1 = yolokit.parse(img.lines[1])[1] * [224, 224]  # the model finds the SECOND hand
    model = lookup_model([(data, None, uv1)], WARP)
    predict((model, WARP), [root / "val" / "images" / "h.jpg"], tmp_path / "out", quiet=True, refine=0)
    assert "error_px" not in read_jsonl(tmp_path / "out" / "predictions.jsonl")[0]  # a file: no labels
    model.default = np.full((NUM_JOINTS, 2), 64.0)  # the dataset's other photos: some answer
    predict((model, WARP), [root], tmp_path / "out", split="val", quiet=True, refine=0)
    recs = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert Path(recs[0]["path"]).name == "h.jpg" and recs[0]["error_px"] < 2e-3
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["hands"] == 3 and rep["hands_missed"] == 3  # h: 1 of 2, i: 1 of 1, j: 1 of 3


def test_freihand_root_labels(synth_root: Path, tmp_path: Path) -> None:
    """A FreiHAND root: labels are xyz/K projected; a perfect model scores ~0 px in the report."""
    from handpose.sources.freihand import read_freihand

    evaluation = [r for r in read_freihand(synth_root, versions=None).records if r.evaluation]
    crops = [(r.path.read_bytes(), None, r.uv) for r in evaluation]
    model = lookup_model(crops, PLAIN)
    predict((model, PLAIN), [synth_root], tmp_path / "out", workers=0, overlays=2, quiet=True)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["images"] == len(evaluation) and rep["keypoints"] == len(evaluation) * NUM_JOINTS
    assert rep["mean_error_px"] < 2e-3 and rep["auc"] > 0.98
    assert len(list((tmp_path / "out" / "overlays").glob("worst-01-*.png"))) == 1
    assert len(list((tmp_path / "out" / "overlays").glob("best-01-*.png"))) == 1
    with pytest.raises(HandposeError, match="FreiHAND root .* has the splits train, training, eval"):
        predict((model, PLAIN), [synth_root], tmp_path / "x", split="bogus", quiet=True)


def test_shards_read_through_the_shard_reader(packed: Path, tmp_path: Path) -> None:
    """A shards folder: JPEG bytes and labels (uv, visibility, box) through shards.read_samples;
    with --boxes gt the labelled box of each sample; COCO image ids are the sample ids."""
    from handpose.shards import decode_annotation, read_manifest, read_samples, split_shards

    _, tars = split_shards(packed, "val")
    samples = [s for t in tars for s in read_samples(t, ("jpg", "kp.f32", "vis.u8", "box.f32"))]
    assert len(samples) == read_manifest(packed).count("val")
    anns = [decode_annotation(s) for s in samples]
    for boxes in (None, "gt"):
        crops = [
            (s["jpg"], a.box.astype(np.float64) if boxes else None, a.uv.astype(np.float64))
            for s, a in zip(samples, anns, strict=True)
        ]
        model = lookup_model(crops, WARP)
        out = tmp_path / f"out-{boxes}"
        predict((model, WARP), [packed], out, split="val", boxes=boxes, quiet=True, coco=out / "r.json")
        recs = read_jsonl(out / "predictions.jsonl")
        assert [Path(r["path"]).stem for r in recs] == [s["__key__"] for s in samples]
        for r, a in zip(recs, anns, strict=True):
            assert np.abs(np.array(r["keypoints"])[:, :2] - a.uv).max() < 2e-3
            assert (r["box"] is None) == (boxes is None)
        rep = json.loads((out / "report.json").read_text())
        assert rep["hands"] == len(samples) and rep["mean_error_px"] < 2e-3
        results = json.loads((out / "r.json").read_text())
        assert [r["image_id"] for r in results] == [int(s["__key__"]) for s in samples]
    with pytest.raises(HandposeError, match=r"no shards for split 'bogus' \(have: eval, test, train, val\)"):
        predict((model, WARP), [packed], tmp_path / "x", split="bogus", quiet=True)


def test_yolo_shards_group_the_hands_of_a_photo(tmp_path: Path) -> None:
    """Packed YOLO data holds one sample per hand; predict reads the samples of one photo as one
    image, so whole-image predictions on the shards equal those on the YOLO root."""
    from handpose.pack import pack

    root = yolokit.write_dataset(tmp_path / "yolo", yolokit.default_spec())
    pack(root, tmp_path / "shards", fmt="yolo", workers=1)
    model = IntensityModel()
    predict((model, WARP), [root], tmp_path / "a", split="val", quiet=True, refine=0)
    predict((model, WARP), [tmp_path / "shards"], tmp_path / "b", split="val", quiet=True, refine=0)
    a, b = read_jsonl(tmp_path / "a" / "predictions.jsonl"), read_jsonl(tmp_path / "b" / "predictions.jsonl")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x["keypoints"] == y["keypoints"] and (x["width"], x["height"]) == (y["width"], y["height"])
        assert abs(x["error_px"] - y["error_px"]) < 1e-3  # labels: float64 vs the shards' float32
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in "ab")
    assert (ra["hands"], ra["hands_missed"]) == (rb["hands"], rb["hands_missed"]) == (3, 3)


def test_coco_labels_by_the_coco_reader(tmp_path: Path) -> None:
    """--labels: read by sources.coco; joints with visibility 0 are not labelled and do not count;
    labels that match no input image are an error."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(4)
    images, annotations, crops = [], [], []
    for k in range(3):
        data = encode(noise_image(96, 80, k))
        (folder / f"{k:03d}x.png").write_bytes(data)
        uv = rng.uniform(10, 70, (NUM_JOINTS, 2))
        pred = uv + 3.0  # off by (3, 3) everywhere
        vis = np.full(NUM_JOINTS, 2)
        vis[:5] = 0  # not labelled: their (wild) coordinates must count nowhere
        kps = np.column_stack([np.where(vis[:, None] > 0, uv, 500.0), vis]).ravel().tolist()
        images.append({"id": k + 1, "file_name": f"{k:03d}x.png", "width": 96, "height": 80})
        annotations.append({"id": k + 10, "image_id": k + 1, "keypoints": kps})
        crops.append((data, None, pred))
    (folder / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    model = lookup_model(crops, PLAIN)
    predict(
        (model, PLAIN),
        [folder],
        tmp_path / "out",
        labels=folder / "ann.json",
        quiet=True,
        coco=tmp_path / "out" / "c.json",
    )
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["keypoints"] == 3 * 16 and rep["mean_error_px"] == pytest.approx(np.hypot(3, 3), abs=2e-3)
    assert [c["image_id"] for c in json.loads((tmp_path / "out" / "c.json").read_text())] == [1, 2, 3]
    other = tmp_path / "other"
    other.mkdir()
    (other / "zzz.png").write_bytes(encode(noise_image(96, 80, 9)))
    with pytest.raises(HandposeError, match=r"--labels .*ann.json: matches none of the 1 input images"):
        predict((model, PLAIN), [other], tmp_path / "x", labels=folder / "ann.json", quiet=True)
    annotations[1]["keypoints"] = annotations[1]["keypoints"][:-3]
    (folder / "bad.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    with pytest.raises(HandposeError, match=r"--labels .*bad.json: .*annotation 11: keypoints has shape"):
        predict((model, PLAIN), [folder], tmp_path / "x", labels=folder / "bad.json", quiet=True)


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("w, h", [(1280, 960), (224, 224)])
def test_preprocessing_equals_the_wds_loader(tmp_path: Path, w: int, h: int) -> None:
    """For handpose checkpoints the model input is the WDS loader's (augmentation off) within 1
    grey level, for crop image and crop box, on a large and a small JPEG."""
    from shardkit import MEAN, STD, jpeg, write_pack

    from handpose.loader import make_loader

    rng = np.random.default_rng(5)
    samples = []
    for sid in range(3):
        data = jpeg(smooth_image(w, h, sid), 90)
        side = rng.uniform(0.15, 0.5) * min(w, h)
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        box = np.array([x0, y0, x0 + side * 0.8, y0 + side])
        samples.append(
            (sid, data, rng.uniform(0, [w, h], (NUM_JOINTS, 2)), {"box.f32": box.astype("<f4").tobytes()})
        )
    root = write_pack(tmp_path / "shards", {"val": [samples]})
    spec = ModelSpec(size=128, mean=MEAN, std=STD, pad=1.25)
    for crop in ("image", "box"):
        batch = next(iter(make_loader(root, "val", batch_size=3, workers=0, crop=crop, box_pad=1.25)))
        mean, std = np.array(MEAN)[:, None, None], np.array(STD)[:, None, None]
        loader_u8 = (batch["image"].numpy() * std + mean) * 255
        for k, (_, data, _, extra) in enumerate(samples):
            box = np.frombuffer(extra["box.f32"], "<f4").astype(np.float64) if crop == "box" else None
            (ours,) = crops_of(data, w, h, [box], spec)
            pixels = np.asarray(ours.input).transpose(2, 0, 1).astype(np.float64)
            assert np.abs(pixels - loader_u8[k]).max() <= 1.0, (crop, k)


def _random_unet(path: Path) -> torch.nn.Module:
    """A randomly initialised tutorial-shaped ShallowUNet saved as a bare state_dict, its output
    layer scaled so its heatmaps (and keypoints) depend strongly on the input."""
    from handpose.model import ShallowUNet

    torch.manual_seed(0)
    net = ShallowUNet(16, 3)
    with torch.no_grad():
        net.conv_out[0].weight.mul_(40.0)
    torch.save(net.state_dict(), path)
    return net.eval()


def _tutorial_keypoints(net: torch.nn.Module, path: Path) -> np.ndarray:
    """The tutorial's per-image pipeline, written out: PIL open, resize to 128 bilinear, to a
    tensor, normalise, model, its decoder (cell i at coordinate i), scaled to the image."""
    from handpose.model import TUTORIAL_MEAN, TUTORIAL_STD

    image = Image.open(path).convert("RGB")
    w, h = image.size
    x = torch.from_numpy(np.asarray(image.resize((128, 128), Image.Resampling.BILINEAR)).copy())
    x = x.permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(TUTORIAL_MEAN).view(3, 1, 1)) / torch.tensor(TUTORIAL_STD).view(3, 1, 1)
    with torch.no_grad():
        heat = net(x[None])[0].numpy().astype(np.float64)
    heat = heat / heat.sum(axis=(1, 2), keepdims=True)
    grid = np.arange(128, dtype=np.float64)
    uv = np.stack([(heat.sum(axis=1) * grid).sum(-1), (heat.sum(axis=2) * grid).sum(-1)], axis=-1)
    return uv * [w / 128, h / 128]


def test_tutorial_parity_at_256_and_1024_px(tmp_path: Path) -> None:
    """A bare state_dict is predicted with the tutorial's own preprocessing, never the JPEG DCT
    fast path: its keypoints equal the tutorial pipeline's on 256 and 1024 px photos."""
    net = _random_unet(tmp_path / "weights.pt")
    folder = tmp_path / "photos"
    folder.mkdir()
    for side in (256, 1024):
        (folder / f"p{side}.jpg").write_bytes(encode(smooth_image(side, side, side), "JPEG", quality=90))
    predict(tmp_path / "weights.pt", [folder], tmp_path / "out", quiet=True, device="cpu")
    recs = {
        Path(r["path"]).name: np.array(r["keypoints"])[:, :2]
        for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")
    }
    for side in (256, 1024):
        ref = _tutorial_keypoints(net, folder / f"p{side}.jpg")
        assert np.abs(recs[f"p{side}.jpg"] - ref).max() < 2e-3, side
    # the test can fail: the DCT fast path (warp_to_input) moves the 1024 px photo's keypoints
    loaded, spec = load_model(tmp_path / "weights.pt", torch.device("cpu"))
    assert spec.preprocess == "tutorial"
    from handpose.inference import forward

    data = (folder / "p1024.jpg").read_bytes()
    (fast,) = crops_of(data, 1024, 1024, [None], ModelSpec(**{**spec.__dict__, "preprocess": "warp"}))
    with torch.inference_mode():
        uv = forward(loaded, torch.from_numpy(np.asarray(fast.input)[None].copy()), spec)[0][0] * 8
    assert np.abs(uv - recs["p1024.jpg"]).max() > 0.05


# predict's keypoints (original px, to 0.01) of `predictkit.formula_unet` saved as a bare state_dict,
# on generated photos 0 and 1 (synth seed 0, 224 px): the tutorial's path on every machine.
# fmt: off
FORMULA_KEYPOINTS = {
    "00000000.jpg": [
        (107.67, 97.59), (102.65, 105.62), (103.18, 109.04), (104.94, 107.67), (112.8, 104.7),
        (131.53, 95.48), (129.1, 99.34), (125.92, 105.91), (124.2, 124.2), (121.35, 139.95),
        (119.26, 145.31), (118.56, 143.49), (120.84, 129.01), (121.73, 108.36), (120.09, 103.51),
        (117.73, 98.58), (115.84, 94.19), (119.27, 89.95), (124.7, 89.74), (129.5, 91.28),
        (130.75, 95.07),
    ],
    "00000001.jpg": [
        (102.51, 102.21), (100.15, 112.33), (102.7, 113.56), (103.69, 108.99), (108.77, 100.94),
        (122.62, 88.91), (129.48, 82.49), (129.07, 85.15), (118.55, 101.03), (110.61, 112.02),
        (107.38, 118.75), (107.17, 120.23), (110.33, 110.61), (117.03, 93.14), (114.65, 91.98),
        (110.94, 94.04), (107.38, 89.64), (105.06, 85.76), (106.81, 84.17), (113.59, 80.76),
        (118.15, 85.17),
    ],
}
# fmt: on


def test_tutorial_network_on_generated_photos(tmp_path: Path) -> None:
    """The tutorial's path without external files: its network as a bare 85-key state_dict, its
    preprocessing (Pillow resize, its mean/std) and decoder (cell i at i), on generated photos:
    predict's keypoints equal the values stored above and the tutorial's pipeline written out.
    (model_final itself on real photos: test_parity_with_the_tutorial, which needs ../shared.)"""
    from handpose.synth import encode_jpeg, make_sample

    net = formula_unet()
    torch.save(net.state_dict(), tmp_path / "model_final")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i:08d}.jpg").write_bytes(encode_jpeg(make_sample(0, "training", i, 224, 1)[1][0]))
    predict(tmp_path / "model_final", [folder], tmp_path / "out", quiet=True, device="cpu")
    recs = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [Path(r["path"]).name for r in recs] == list(FORMULA_KEYPOINTS)
    for r in recs:
        uv = np.array(r["keypoints"])[:, :2]
        assert np.abs(uv - FORMULA_KEYPOINTS[Path(r["path"]).name]).max() < 0.02, r["path"]
        assert np.abs(uv - _tutorial_keypoints(net, Path(r["path"]))).max() < 2e-3, r["path"]
        assert np.ptp(uv, axis=0).min() > 10  # keypoints that follow the photo, not the centre
    _, spec = load_model(tmp_path / "model_final", torch.device("cpu"))
    assert (spec.kind, spec.preprocess, spec.size) == ("tutorial state_dict", "tutorial", 128)


def test_parity_with_the_tutorial(shared_data: Path, tmp_path: Path) -> None:
    """model_final on the 8 real FreiHAND images: per-image errors as in the README's table."""
    root = shared_data / "freihand-mmpose"
    expected = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^\| (\d{8}\.jpg) \| ([\d.]+) \|", (root / "README.md").read_text(), re.M)
    }
    assert len(expected) == 8
    predict(
        shared_data / "tutorial-weights" / "model_final",
        [root],
        tmp_path,
        labels=root / "test_freihand.json",
        workers=0,
        quiet=True,
        device="cpu",
    )
    got = {Path(r["path"]).name: r["error_px"] for r in read_jsonl(tmp_path / "predictions.jsonl")}
    assert got.keys() == expected.keys()
    for name, err in expected.items():
        assert abs(got[name] - err) < 0.1, name
    rep = json.loads((tmp_path / "report.json").read_text())
    assert abs(rep["mean_error_px"] - np.mean(list(got.values()))) < 0.01  # 21 joints each: same mean


# ----------------------------------------------------------------------------- models


def test_tutorial_state_dict_loads(shared_data: Path) -> None:
    net, spec = load_model(shared_data / "tutorial-weights" / "model_final", torch.device("cpu"))
    assert (spec.size, spec.preprocess, spec.kind) == (128, "tutorial", "tutorial state_dict")
    assert sum(p.numel() for p in net.parameters()) == 491_206


def _checkpoint(path: Path, net: torch.nn.Module, config: dict, **extra: object) -> None:
    from handpose import checkpoint

    state = {
        "model": net.state_dict(),
        "config": config,
        "norm": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]},
        "epoch": 1,
        "step": 1,
        **extra,
    }
    checkpoint.save(path, state)


def test_checkpoint_loads_and_bad_models_are_one_line(tmp_path: Path) -> None:
    """A handpose checkpoint's config picks the architecture and the crop settings; every way a
    MODEL can be wrong is one line naming the file."""
    from handpose.model import ShallowUNet

    net = ShallowUNet(width=8, depth=2)
    config = {"arch": "unet", "width": 8, "depth": 2, "image_size": 64, "sigma": 3.0, "loss": "iou"}
    config |= {"index_offset": 0.5, "box_pad": 1.4}
    _checkpoint(tmp_path / "best.pt", net, config, sets=[{"crop": "box"}], boxes={"box_to_keypoints": 1.33})
    loaded, spec = load_model(tmp_path / "best.pt", torch.device("cpu"))
    assert (spec.size, spec.mean, spec.std, spec.preprocess) == (64, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "warp")
    assert (spec.crop, spec.pad, spec.box_to_keypoints) == ("box", 1.4, 1.33)
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(loaded(x), net.eval()(x), atol=1e-6)  # the same weights (channels_last)
    old = {k: v for k, v in config.items() if k not in ("arch", "box_pad")}  # before arch and boxes
    _checkpoint(tmp_path / "old.pt", net, old, boxes={"box_to_keypoints": None})
    _, spec = load_model(tmp_path / "old.pt", torch.device("cpu"))
    assert (spec.crop, spec.pad, spec.box_to_keypoints) == ("image", 1.25, 1.2)

    (tmp_path / "junk.pt").write_bytes(b"not a model")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "best.pt").read_bytes()[:3000])
    torch.save(ShallowUNet(16, 3, joints=10).state_dict(), tmp_path / "ten.pt")  # same keys
    other = {f"layer{i}.weight": torch.zeros(2) for i in range(5)}
    torch.save(other, tmp_path / "other.pt")
    _checkpoint(tmp_path / "mismatch.pt", ShallowUNet(8, 3), config)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {
        "junk.pt": "not a PyTorch file",
        "cut.pt": "truncated or damaged",
        "other.pt": r"another architecture \(85 missing, 5 unexpected keys\); expected a ShallowUNet",
        "ten.pt": r"conv_out\.0\.weight is \(10, 16, 3, 3\), not \(21, 16, 3, 3\)",
        "mismatch.pt": r"another architecture \(\d+ missing, \d+ unexpected keys\); expected arch 'unet'",
        "list.pt": r"not a handpose checkpoint or tutorial state_dict \(a list\)",
        "missing.pt": "model file not found",
    }
    for name, message in cases.items():
        with pytest.raises(HandposeError, match=message) as e:
            load_model(tmp_path / name, torch.device("cpu"))
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


def test_bad_inputs(tmp_path: Path) -> None:
    """Inputs that cannot be used go to errors.jsonl at their place, with a reason; the others are
    predicted. No images at all, or none predictable, is one HandposeError."""
    src = tmp_path / "in"
    (src / "empty").mkdir(parents=True)
    good = encode(noise_image(64, 48, 0), "JPEG", quality=90)
    (src / "good.jpg").write_bytes(good)
    (src / "corrupt.jpg").write_bytes(good[: len(good) // 2])
    (src / "text.jpg").write_text("not an image\n")
    (src / "tiny.png").write_bytes(encode(np.zeros((1, 1, 3), np.uint8)))
    deep = (np.arange(40 * 56, dtype=np.uint16).reshape(40, 56) * 29).astype(np.uint16)
    Image.fromarray(deep).save(src / "deep16.png")  # 16-bit greyscale
    Image.fromarray(noise_image(64, 48, 1)).save(src / "good.tif")  # an image in a folder as in YOLO
    (src / "raw.dng").write_bytes(b"raw sensor data")  # an image suffix: reported, not passed over
    (src / "notes.txt").write_text("ignored inside a folder\n")
    summary = predict(
        (IntensityModel(), PLAIN),
        [src, tmp_path / "missing.png", src / "notes.txt"],
        tmp_path / "out",
        workers=0,
        quiet=True,
    )
    assert summary["images"] == 3 and summary["errors"] == 6
    preds = [Path(r["path"]).name for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")]
    assert preds == ["deep16.png", "good.jpg", "good.tif"]
    errors = {Path(e["path"]).name: e["reason"] for e in read_jsonl(tmp_path / "out" / "errors.jsonl")}
    assert list(errors) == ["corrupt.jpg", "raw.dng", "text.jpg", "tiny.png", "missing.png", "notes.txt"]
    assert "cannot decode image" in errors["raw.dng"]
    assert "too small" in errors["tiny.png"] and "1x1" in errors["tiny.png"]
    assert "unsupported" in errors["notes.txt"] and "no such" in errors["missing.png"]
    assert all(errors.values())

    with pytest.raises(HandposeError, match="no images found"):
        predict((IntensityModel(), PLAIN), [src / "empty"], tmp_path / "out2", workers=0, quiet=True)
    assert not (tmp_path / "out2").exists()
    with pytest.raises(HandposeError, match="no image could be predicted: all 2 inputs failed"):
        predict(
            (IntensityModel(), PLAIN), [src / "corrupt.jpg", src / "text.jpg"], tmp_path / "out3", quiet=True
        )
    assert len(read_jsonl(tmp_path / "out3" / "errors.jsonl")) == 2
    assert (tmp_path / "out3" / "predictions.jsonl").read_text() == ""


@pytest.mark.parametrize(
    "arch, presence",
    [("unet", False), ("strided", False), ("simcc", False), ("strided", True), ("simcc", True)],
)
def test_checkpoint_of_each_architecture_round_trips_through_predict(
    tmp_path: Path, arch: str, presence: bool
) -> None:
    """A checkpoint's config builds its architecture (model.model_from_config) and predict returns
    that model's own decoded keypoints for the crop, mapped back to original pixels; a presence
    head comes back with the same weights."""
    from handpose.model import build_model

    torch.manual_seed(1)
    config = {"arch": arch, "width": 4, "depth": 1, "image_size": 64, "sigma": 2.0, "presence": presence}
    config |= {
        "loss": {"unet": "iou", "strided": "l1", "simcc": "kl"}[arch],
        "index_offset": 0.5,
        "box_pad": 1.25,
    }
    net = build_model(arch, **{k: v for k, v in config.items() if k not in ("arch", "box_pad")})
    _checkpoint(tmp_path / "m.pt", net, config, sets=[{"crop": "box"}])
    (tmp_path / "in").mkdir()
    data = encode(smooth_image(200, 150, 7), "JPEG", quality=90)
    (tmp_path / "in" / "a.jpg").write_bytes(data)
    # min_presence 0: a random presence head may say "no hand"; this test is about the keypoints
    opts = {"refine": 0, "quiet": True, "device": "cpu", "min_presence": 0.0}
    predict(tmp_path / "m.pt", [tmp_path / "in"], tmp_path / "out", **opts)
    (rec,) = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    loaded, spec = load_model(tmp_path / "m.pt", torch.device("cpu"))
    (crop,) = crops_of(data, 200, 150, [None], spec)
    M = crop_matrix(crop.region, spec.size)
    x = torch.from_numpy(np.asarray(crop.input).copy()).permute(2, 0, 1).float()[None] / 255 - torch.tensor(
        spec.mean
    ).view(1, 3, 1, 1)
    x = x / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        uv = net.eval().decode(net(x))[0][0].numpy()
        assert (loaded.presence(loaded(x)) is None) == (not presence)  # type: ignore[operator]
        if presence:
            assert torch.allclose(loaded.presence(loaded(x)), net.presence(net(x)), atol=1e-6)  # type: ignore[operator]
    assert np.abs(np.array(rec["keypoints"])[:, :2] - apply_affine(invert(M), uv)).max() < 2e-3


# ----------------------------------------------------------------------------- the report's arithmetic


def test_report_values_by_hand(tmp_path: Path) -> None:
    """Hand A (image side 100, box side 50): 21 joints off by (3, 4) = 5 px. Hand B (side 200,
    box 100): joints 0-9 off by (6, 8) = 10 px, joints 10-20 unlabelled (and far off: they must
    not count)."""
    gt = np.zeros((2, NUM_JOINTS, 2)) + 50
    pred = gt.copy()
    pred[0] += [3, 4]
    pred[1, :10] += [6, 8]
    pred[1, 10:] += 500
    vis = np.ones((2, NUM_JOINTS), bool)
    vis[1, 10:] = False
    rows = spill_rows(pred, gt, vis, [100.0, 200.0], [50.0, 100.0], [100.0, 200.0])
    (tmp_path / "spill.f32").write_bytes(rows.tobytes())
    images = [np.zeros((100, 100, 3), np.uint8), np.zeros((150, 200, 3), np.uint8)]
    entries = [
        {"path": p, "hand": 0, "error_px": e, "error_pct": e / s * 100, "error_pct_box": e / b * 100,
         "order": [0, k], "pred": pred[k].tolist(), "gt": gt[k].tolist(), "box": None, "region": [0, 0, 1]}
        for k, (p, e, s, b) in enumerate([("a.png", 5.0, 100, 50), ("b.png", 10.0, 200, 100)])
    ]  # fmt: skip
    from handpose.report import spill_blocks

    rep = write_report(
        tmp_path,
        spill_blocks(tmp_path / "spill.f32", rows=1),  # one row per block: the streamed path
        model_size=128,
        load_image=lambda e: images[e["order"][1]],
        worst=entries[::-1],
        best=entries,
    )
    n = 31
    assert rep["keypoints"] == n and rep["hands"] == 2
    assert rep["mean_error_px"] == pytest.approx((21 * 5 + 10 * 10) / n)
    assert rep["median_error_px"] == pytest.approx(5.0)  # 16th of 21 fives then 10 tens
    assert rep["mean_error_pct"] == pytest.approx(5.0)  # 5/100 and 10/200
    assert rep["mean_error_pct_box"] == pytest.approx(10.0)  # 5/50 and 10/100
    assert rep["pck_box"] == {"0.05": 0.0, "0.1": 1.0, "0.2": 1.0} and rep["pck_0.2_box"] == 1.0
    assert rep["error_model_px"]["mean"] == pytest.approx(0.05 * 128)
    assert rep["error_px"]["p90"] == pytest.approx(10.0) and rep["error_px"]["max"] == pytest.approx(10.0)
    frac = np.array(rep["pck"]["fraction"])
    t = np.array(rep["pck"]["thresholds_px"])
    assert (
        frac[t < 5].max() == 0 and np.allclose(frac[(t >= 5) & (t < 10)], 21 / n) and frac[t >= 10].min() == 1
    )
    assert rep["auc"] == pytest.approx((21 / n * 5 + 0.25 + 20) / 30)
    wrist = next(r for r in rep["per_finger"] if r["finger"] == "wrist")
    assert wrist["error_px"]["mean"] == pytest.approx(7.5) and wrist["keypoints"] == 2
    assert wrist["mean_error_pct_box"] == pytest.approx(10.0)
    little = next(r for r in rep["per_finger"] if r["finger"] == "little")
    assert little["keypoints"] == 4 and little["error_px"]["mean"] == pytest.approx(5.0)
    assert [r["path"] for r in rep["worst"]] == ["b.png", "a.png"]
    assert json.loads((tmp_path / "report.json").read_text())["auc"] == pytest.approx(rep["auc"])
    for name in ("report.md", "error_hist.png", "pck.png", "gallery.png"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    assert "| px | 6.61 | 5.00 | 10.00 | 10.00 | 10.00 |" in md
    assert "| 6.61 | 10.00 | 0.000 | 1.000 | 1.000 |" in md


def test_streamed_statistics_equal_numpy(tmp_path: Path) -> None:
    """Order statistics by radix select over blocks equal numpy's percentiles exactly (ties,
    zeros and a wide range of magnitudes included), and block size does not change the report."""
    rng = np.random.default_rng(6)
    values = np.concatenate(
        [rng.exponential(5.0, 5000), np.zeros(40), np.full(300, 2.5), rng.uniform(0, 1e-3, 50)]
    )
    values = rng.permutation(values).astype(np.float32)
    blocks = [values[k : k + 777] for k in range(0, len(values), 777)]
    ranks = [0, 1, 17, len(values) // 2, len(values) - 2, len(values) - 1]
    got = order_statistics(lambda: ({"v": b} for b in blocks), {"v": ranks})["v"]
    ordered = np.sort(values)
    assert [got[k] for k in ranks] == [float(ordered[k]) for k in ranks]
    rows = np.full((len(values) // 21, SPILL_COLUMNS), 100.0, np.float32)
    rows[:, :NUM_JOINTS] = values[: len(rows) * NUM_JOINTS].reshape(-1, NUM_JOINTS)
    rows[::3, 4] = np.nan  # unlabelled joints
    whole = summarise(lambda: [rows], 128)
    parts = summarise(lambda: (rows[k : k + 50] for k in range(0, len(rows), 50)), 128)
    flat = rows[:, :NUM_JOINTS][np.isfinite(rows[:, :NUM_JOINTS])].astype(np.float64)
    for q, key in ((50, "median"), (90, "p90"), (95, "p95")):
        assert whole["error_px"][key] == float(np.percentile(flat, q)), key
    assert whole["error_px"]["max"] == float(flat.max())
    assert whole["error_px"]["mean"] == pytest.approx(flat.mean(), rel=1e-12)
    for key in ("error_px", "error_pct", "error_pct_box", "error_model_px"):
        for stat in ("median", "p90", "p95", "max"):  # exact whatever the blocks
            assert parts[key][stat] == whole[key][stat], (key, stat)
        assert parts[key]["mean"] == pytest.approx(whole[key]["mean"], rel=1e-12)
    assert parts["pck"] == whole["pck"] and parts["pck_box"] == whole["pck_box"]


def test_overlays_are_drawn_in_the_pixel_convention() -> None:
    """predict's overlays and gallery draw hands as inspect does (`skeleton.draw_skeleton`): uv
    (100.5, 50.5) is the centre of pixel (100, 50); the wrist is WRIST_COLOR; ground truth rings
    are drawn for labelled joints only."""
    from handpose.report import GT_COLOR, draw_hand
    from handpose.skeleton import FINGER_COLORS, WRIST_COLOR

    uv = np.tile([[100.5, 50.5]], (NUM_JOINTS, 1))
    black = np.zeros((256, 256, 3), np.uint8)  # 256 px: drawn at scale 1
    ys, xs = np.nonzero(np.all(np.asarray(draw_hand(black, uv)) == FINGER_COLORS["little"], axis=2))
    assert abs(xs.mean() - 100) < 0.5 and abs(ys.mean() - 50) < 0.5  # little4, drawn last
    uv[0] = [30.5, 200.5]
    ys, xs = np.nonzero(np.all(np.asarray(draw_hand(black, uv)) == WRIST_COLOR, axis=2))
    assert abs(xs.mean() - 30) < 0.5 and abs(ys.mean() - 200) < 0.5
    gt = np.tile([[180.5, 120.5]], (NUM_JOINTS, 1))
    gt[0] = [180.5, 230.5]
    labelled = np.zeros(NUM_JOINTS, bool)
    labelled[0] = True  # only the wrist's truth is labelled: one ring, no bones
    out = np.asarray(draw_hand(black, uv, gt, labelled))
    ys, xs = np.nonzero(np.all(out == GT_COLOR, axis=2) & (np.arange(256) > 150)[None, :])
    assert abs(ys.mean() - 230) < 0.5 and abs(xs.mean() - 180) < 0.5 and ys.min() > 200
    for y in (50.2, 50.5, 50.9):  # a bone along y lies on the pixel row that holds y: row 50
        uv = np.tile([[200.5, y]], (NUM_JOINTS, 1))
        uv[0] = [30.5, y]
        column = np.asarray(draw_hand(np.zeros((100, 256, 3), np.uint8), uv))[:, 100]  # 1 px lines
        assert np.nonzero(np.all(column == FINGER_COLORS["little"], axis=1))[0].tolist() == [50], y


def test_pck_auc_of_a_perfect_curve() -> None:
    assert pck_auc(PCK_THRESHOLDS_PX, np.ones_like(PCK_THRESHOLDS_PX)) == pytest.approx(1.0)
    rows = spill_rows(
        np.zeros((1, NUM_JOINTS, 2)),
        np.zeros((1, NUM_JOINTS, 2)),
        np.ones((1, NUM_JOINTS), bool),
        [224.0],
        [50.0],
        [224.0],
    )
    assert summarise(lambda: [rows], 128)["auc"] == pytest.approx(1.0)

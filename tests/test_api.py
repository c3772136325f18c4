"""The Python API (`handpose.load`): on a path, a PIL image, a numpy array or a list of them it
gives `handpose predict`'s rows for the same images exactly (the same path: crops, forward,
refinement), with a checkpoint and with its ONNX export; a detector's boxes go where predict
--boxes takes them; every mistake is one HandposeError line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from predictkit import encode, smooth_image

import handpose
from handpose import checkpoint
from handpose.model import model_from_config
from handpose.predict import predict

CONFIG = {"arch": "strided", "width": 4, "depth": 1, "image_size": 32, "sigma": 3.0, "loss": "l1"}
SIZES = [(120, 90), (64, 96), (200, 200), (90, 130), (150, 100)]


def _save(path: Path, config: dict, *, crop: str = "box", **extra: object) -> None:
    """A checkpoint with random weights whose keypoints follow the image (BN statistics and an
    output layer that make the soft-argmax maps peaked)."""
    torch.manual_seed(3)
    net = model_from_config(config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        last = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 6.0)
    state = {
        "model": net.state_dict(),
        "config": config,
        "norm": {"mean": [0.45, 0.4, 0.35], "std": [0.25, 0.2, 0.22]},
        "epoch": 1,
        "step": 1,
        "sets": [{"crop": crop}],
        "boxes": {"box_to_keypoints": 1.3},
        **extra,
    }
    checkpoint.save(path, state)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """PNG photos (decoded exactly alike from a file and from memory) and one JPEG."""
    d = tmp_path_factory.mktemp("photos")
    paths = []
    for k, (w, h) in enumerate(SIZES):
        image = smooth_image(w, h, k)
        path = d / (f"p{k}.jpg" if k == 4 else f"p{k}.png")
        path.write_bytes(encode(image, "JPEG", quality=90) if k == 4 else encode(image))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.pt"
    _save(path, CONFIG)
    return path


def _rows(model: object, photos: list[Path], out: Path, **kw: object) -> list[dict]:
    predict(model, photos, out, quiet=True, device="cpu", **kw)  # type: ignore[arg-type]
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _as_row(hand: handpose.Hand) -> tuple[list, list | None]:
    """A Hand as predict writes it (its rounding)."""
    kp = [
        [round(float(x), 3), round(float(y), 3), round(float(s), 4)]
        for (x, y), s in zip(hand.keypoints, hand.scores, strict=True)
    ]
    return kp, None if hand.box is None else [round(float(v), 3) for v in hand.box]


def test_every_input_kind_gives_predicts_rows(model_file: Path, photos: list[Path], tmp_path: Path) -> None:
    """Paths, PIL images and numpy arrays, one at a time and as one list, give predict's rows to
    the printed digit (a whole image, then the default refinement pass in the hand it found)."""
    rows = _rows(model_file, photos, tmp_path / "out")
    want = [(r["keypoints"], r["box"]) for r in rows]
    assert len({json.dumps(r["keypoints"]) for r in rows}) == len(rows)  # keypoints differ: it can fail
    model = handpose.load(model_file, device="cpu")
    assert model.predictor.runner.refine == 1 and all(r["box"] is not None for r in rows)
    pngs = [p for p in photos if p.suffix == ".png"]
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
    by_path = [_as_row(hands[0]) for hands in model([str(p) for p in photos])]
    assert by_path == want
    assert [_as_row(model(p)[0]) for p in photos] == want
    png_rows = [w for p, w in zip(photos, want, strict=True) if p.suffix == ".png"]
    assert [_as_row(model(Image.open(p))[0]) for p in pngs] == png_rows
    assert [_as_row(model(x)[0]) for x in pixels] == png_rows
    mixed = model([pixels[0], Image.open(pngs[1]), pngs[2]])
    assert [_as_row(h[0]) for h in mixed] == png_rows[:3]
    hand = model(pngs[0])[0]
    assert hand.keypoints.shape == (21, 2) and hand.scores.shape == (21,) and hand.box.shape == (4,)  # type: ignore[union-attr]
    assert hand.score == pytest.approx(float(hand.scores.mean()))


def test_exported_model_gives_predicts_onnx_rows(
    model_file: Path, photos: list[Path], tmp_path: Path
) -> None:
    """An exported .onnx through the API equals `predict model.onnx` exactly; both are within
    the export's tolerance of the checkpoint."""
    from handpose.export import export

    onnx = tmp_path / "m.onnx"
    export(model_file, onnx, quiet=True)
    rows = _rows(onnx, photos, tmp_path / "out")
    model = handpose.load(onnx, device="cpu")
    assert [_as_row(h[0]) for h in model(photos)] == [(r["keypoints"], r["box"]) for r in rows]
    torch_hands = handpose.load(model_file, device="cpu")(photos)
    d = np.array(
        [
            np.abs(np.array(r["keypoints"])[:, :2] - h[0].keypoints)
            for r, h in zip(rows, torch_hands, strict=True)
        ]
    )
    assert d.mean() <= 0.01 and d.max() <= 0.05


def test_a_detector_finds_what_predict_detector_finds(
    model_file: Path, photos: list[Path], tmp_path: Path
) -> None:
    """With a detector every hand kept is one of its boxes (detect_photos, the photo's own
    pixels) whose hand score, sqrt(box score x mean joint score), is at least min_score, best
    first; the API's hands are predict --detector's rows (keypoints and boxes), row for row."""
    from handpose.detector import detect_photos, load_detector

    det_config = {"arch": "centernet", "width": 4, "depth": 1, "image_size": 64, "stride": 8, "loss": "focal"}
    _save(tmp_path / "det.pt", det_config)
    net, spec = load_detector(tmp_path / "det.pt")
    found = detect_photos(net, spec, [p.read_bytes() for p in photos], min_score=0.0, max_hands=20)
    every = handpose.load(model_file, detector=tmp_path / "det.pt", device="cpu", min_score=0.0, max_hands=20)
    all_hands = every(photos)
    box_score = {}
    for (boxes, scores), got in zip(found, all_hands, strict=True):
        assert len(got) == len(boxes)
        for hand in got:
            k = int(np.abs(boxes - hand.box).max(axis=1).argmin())
            assert np.abs(hand.box - boxes[k]).max() < 1e-4  # type: ignore[operator]  # float32, other batches
            assert hand.score == pytest.approx(math.sqrt(scores[k] * float(np.mean(hand.scores))))
            box_score[id(hand)] = scores[k]
        assert [h.score for h in got] == sorted((h.score for h in got), reverse=True)
    threshold = float(np.sort([h.score for hs in all_hands for h in hs])[-8])  # keep about 8 hands
    floor = min(spec.min_score, threshold)  # the boxes cropped: the detector's own, or lower
    opts = {"min_score": threshold, "max_hands": 20}
    model = handpose.load(model_file, detector=tmp_path / "det.pt", device="cpu", **opts)
    hands = model(photos)
    for got, every_hand in zip(hands, all_hands, strict=True):
        kept = [h for h in every_hand if h.score >= threshold and box_score[id(h)] >= floor]
        assert [_as_row(h) for h in got] == [_as_row(h) for h in kept]
    assert sum(len(hs) for hs in hands) >= 4
    rows = _rows(model_file, photos, tmp_path / "out", detector=tmp_path / "det.pt", **opts)
    assert [_as_row(h) for hs in hands for h in hs] == [(r["keypoints"], r["box"]) for r in rows]
    assert handpose.load(model_file, detector=False, device="cpu").detector is None


def test_mistakes_are_one_line(model_file: Path, photos: list[Path], tmp_path: Path) -> None:
    """A missing, foreign or damaged model, and each kind of bad image, is a HandposeError of one
    line naming it; an unreadable image reads as predict's errors.jsonl reason."""
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(model_file.read_bytes()[:500])
    for path, needle in (
        (tmp_path / "none.pt", "model file not found"),
        (tmp_path / "notes.txt", "not a PyTorch file"),
        (tmp_path / "cut.pt", "truncated or damaged"),
        (tmp_path / "none.onnx", "model file not found"),
    ):
        with pytest.raises(handpose.HandposeError, match=needle) as e:
            handpose.load(path, device="cpu")
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    model = handpose.load(model_file, device="cpu")
    cases = [
        (tmp_path / "none.png", f"{tmp_path / 'none.png'}: no such file or folder"),
        (tmp_path, "is a folder"),
        (tmp_path / "notes.txt", "unsupported file type '.txt'"),
        (tmp_path / "clip.mp4", "a video: call the model on its frames"),
        (np.zeros((40, 40), np.uint8), "image: expected RGB uint8 pixels (H, W, 3), got uint8 (40, 40)"),
        ([photos[0], np.zeros((4, 40, 3), np.uint8)], "image 1: image is 40x4 px, too small"),
        (3.5, "expected a path, a PIL image or an (H, W, 3) uint8 numpy array, got float"),
    ]
    for image, needle in cases:
        with pytest.raises(handpose.HandposeError) as e:
            model(image)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(handpose.HandposeError) as e:
        model(tmp_path / "bad.png")
    predict(model_file, [tmp_path / "bad.png", photos[0]], tmp_path / "out", quiet=True, device="cpu")
    (line,) = (tmp_path / "out" / "errors.jsonl").read_text().splitlines()
    assert str(e.value) == f"{tmp_path / 'bad.png'}: {json.loads(line)['reason']}"
    with pytest.raises(handpose.HandposeError, match="refine=-1: must be >= 0"):
        handpose.load(model_file, refine=-1, device="cpu")


def test_help_is_enough() -> None:
    """help(handpose.load) names every input kind, the result's fields and the error class."""
    doc = handpose.load.__doc__ or ""
    for word in ("bundled", ".onnx", "detector", "device", "Hand", "keypoints (21, 2)", "HandposeError"):
        assert word in doc, word
    assert handpose.HandposeError is handpose.errors.HandposeError


def test_bench_predict_times_the_api_and_onnxruntime(
    model_file: Path, photos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`handpose bench predict --onnx` runs every row (API and onnxruntime ones too) on the same
    photos and reports their ratios (no timing is checked)."""
    from handpose.bench.predict import API, ONNX_API, ONNX_END_TO_END, ONNX_MODEL_ONLY, bench_predict

    result = bench_predict(model_file, photos[0].parent, limit=5, repeats=1, onnx=True, device="cpu")
    assert {API, ONNX_API, ONNX_END_TO_END, ONNX_MODEL_ONLY} <= result["rows"].keys()
    assert all(rate > 0 for rate in result["rows"].values()) and result["images"] == 5
    for key in ("api_vs_end_to_end", "onnx_vs_pytorch_end_to_end", "onnx_vs_pytorch_model_only"):
        assert result[key] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "predict"

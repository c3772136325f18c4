"""`handpose predict` and its report: geometry round trips through stub models, the tutorial's
numbers on real FreiHAND images, bad inputs, output rules and the report's arithmetic."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handpose.errors import HandposeError
from handpose.geometry import apply_affine, fit_matrix
from handpose.predict import Item, ModelSpec, collect_inputs, letterbox, predict, prepare, read_bytes
from handpose.report import PCK_THRESHOLDS_PX, Labelled, pck_auc, summarise, write_report
from handpose.skeleton import NUM_JOINTS

PLAIN = ModelSpec(
    size=128, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), index_offset=0.5, resample="resize", kind="stub"
)


# ----------------------------------------------------------------------------- stub models


class IntensityModel(torch.nn.Module):
    """Every heatmap = the input's red channel: the decoder then returns the red centroid, so a
    single bright dot on black comes back where the letterbox put it (mean 0 / std 1 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # predict finds the device from a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].expand(-1, NUM_JOINTS, -1, -1)


class LookupModel(torch.nn.Module):
    """A perfect model for known images: the model input (back to uint8) is hashed and looked up
    to model-space keypoints, each rendered as a bilinear splat on the 4 nearest cells, which the
    heatmap-mean decoder reads back exactly (a Gaussian is cut off near the border)."""

    def __init__(self, table: dict[str, np.ndarray], spec: ModelSpec) -> None:
        super().__init__()
        self.table, self.spec = table, spec
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std).view(1, 3, 1, 1)
        u8 = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        uv = np.stack([self.table[_digest(im.contiguous().numpy())] for im in u8])
        return torch.from_numpy(splat(uv, self.spec.size))


def splat(uv: np.ndarray, size: int) -> np.ndarray:
    """(B, J, 2) model pixels -> (B, J, size, size) maps whose weighted mean of cell centres
    (i + 0.5) is exactly uv (for 0.5 <= uv <= size - 0.5)."""
    b, j, _ = uv.shape
    maps = np.zeros((b, j, size, size), np.float32)
    c = uv - 0.5
    i0 = np.clip(np.floor(c).astype(int), 0, size - 2)
    f = c - i0
    for bi in range(b):
        for ji in range(j):
            (x0, y0), (fx, fy) = i0[bi, ji], f[bi, ji]
            maps[bi, ji, y0 : y0 + 2, x0 : x0 + 2] = np.outer([1 - fy, fy], [1 - fx, fx])
    return maps


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def lookup_model(items: list[Item], spec: ModelSpec, uv_of: dict[str, np.ndarray]) -> LookupModel:
    """Stub for these items: uv_of[item.path] (original pixels) moved into model space by the fit."""
    table = {}
    for it in items:
        image, fit, _, _ = prepare(read_bytes(it), spec)
        table[_digest(image)] = apply_affine(fit, uv_of[it.path])
    return LookupModel(table, spec)


# ----------------------------------------------------------------------------- image helpers


def encode(image: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def dot_image(w: int, h: int, cx: float, cy: float, sigma: float) -> np.ndarray:
    """Black (h, w, 3) with a Gaussian dot centred at (cx, cy) in pixel-centre coordinates."""
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    g = np.exp(-((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) / (2 * sigma**2))
    return np.repeat(np.round(g * 255).astype(np.uint8)[..., None], 3, axis=2)


def noise_image(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "w, h, fmt, resample",
    [
        (300, 200, "PNG", "resize"),  # fractional bars: 21.33 px top and bottom
        (200, 300, "PNG", "warp"),
        (96, 64, "PNG", "resize"),  # upscaled
        (1001, 603, "JPEG", "resize"),  # JPEG fast path: 1/4 in the DCT domain, width not a multiple of 8
        (1001, 603, "JPEG", "warp"),
    ],
)
def test_letterbox_dot_round_trip(tmp_path: Path, w: int, h: int, fmt: str, resample: str) -> None:
    """A dot drawn at a known place in a non-square image comes back there in original pixels."""
    spec = ModelSpec(**{**PLAIN.__dict__, "resample": resample})
    cx, cy = 0.87 * w + 0.3, 0.31 * h + 0.2  # far from the centre: scale errors show
    (tmp_path / f"dot.{fmt.lower()}").write_bytes(
        encode(dot_image(w, h, cx, cy, max(w, h) / 40), fmt, quality=95)
    )
    predict((IntensityModel(), spec), [tmp_path], tmp_path / "out", workers=0, quiet=True)
    (rec,) = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert (rec["width"], rec["height"]) == (w, h)
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
    predict((IntensityModel(), PLAIN), [tmp_path], tmp_path / "out", workers=0, quiet=True)
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
    """Known keypoints on generated images of many shapes come back through predict exactly."""
    rng = np.random.default_rng(0)
    uv_of = {}
    for k, (w, h) in enumerate([(224, 224), (320, 180), (150, 400), (640, 480), (257, 255)]):
        path = tmp_path / "in" / f"img{k}.{'jpg' if k % 2 else 'png'}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(encode(noise_image(w, h, k), "JPEG" if k % 2 else "PNG", quality=90))
        uv_of[str(path)] = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h], (NUM_JOINTS, 2))
    items, _ = collect_inputs([tmp_path / "in"], tmp_path / "out", split="test", labels=None)
    model = lookup_model(items, PLAIN, uv_of)
    predict(
        (model, PLAIN), [tmp_path / "in"], tmp_path / "out", batch_size=2, workers=1, overlays=1, quiet=True
    )
    assert [p.name for p in (tmp_path / "out" / "overlays").iterdir()] == ["0001-img0.png"]
    recs = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [r["path"] for r in recs] == sorted(uv_of)
    for r in recs:
        assert np.abs(np.array(r["keypoints"])[:, :2] - uv_of[r["path"]]).max() < 2e-3
    # Same bytes with another batch size and no workers: order and values do not depend on them.
    first = (tmp_path / "out" / "predictions.jsonl").read_bytes()
    predict((model, PLAIN), [tmp_path / "in"], tmp_path / "out", batch_size=64, workers=0, quiet=True)
    assert (tmp_path / "out" / "predictions.jsonl").read_bytes() == first


def test_freihand_root_labels(synth_root: Path, tmp_path: Path) -> None:
    """A FreiHAND root: labels are xyz/K projected; a perfect model scores ~0 px in the report."""
    from handpose.sources.freihand import read_freihand

    evaluation = [r for r in read_freihand(synth_root, versions=None).records if r.evaluation]
    uv_of = {str(r.path): r.uv for r in evaluation}
    items, _ = collect_inputs([synth_root], tmp_path, split="test", labels=None)
    assert sorted(it.path for it in items) == sorted(uv_of)
    model = lookup_model(items, PLAIN, uv_of)
    predict((model, PLAIN), [synth_root], tmp_path / "out", workers=0, overlays=2, quiet=True)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["images"] == len(evaluation) and rep["keypoints"] == len(evaluation) * NUM_JOINTS
    assert rep["mean_error_px"] < 2e-3 and rep["auc"] > 0.98
    assert len(list((tmp_path / "out" / "overlays").glob("worst-01-*.png"))) == 1
    assert len(list((tmp_path / "out" / "overlays").glob("best-01-*.png"))) == 1


def test_shards_labels(packed: Path, tmp_path: Path) -> None:
    """A shards folder with --split: JPEG bytes read in place, labels from kp.f32."""
    from handpose.shards import decode_keypoints, read_manifest

    items, _ = collect_inputs([packed], tmp_path, split="val", labels=None)
    assert len(items) == read_manifest(packed).count("val")
    uv_of = {it.path: it.uv for it in items}
    assert all(uv is not None for uv in uv_of.values())
    first = items[0]  # the label really is that sample's kp.f32 member
    tar_path, name = first.path.rsplit("/", 1)
    with tarfile.open(tar_path) as tar:
        kp = tar.extractfile(name.replace(".jpg", ".kp.f32")).read()
        assert tar.extractfile(name).read() == read_bytes(first)
    assert np.array_equal(decode_keypoints(kp), first.uv.astype(np.float32))
    model = lookup_model(items, PLAIN, uv_of)
    predict(
        (model, PLAIN),
        [packed],
        tmp_path / "out",
        split="val",
        workers=0,
        quiet=True,
        coco=tmp_path / "out" / "results.json",
    )
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["images"] == len(items) and rep["mean_error_px"] < 2e-3
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["image_id"] for r in results] == [int(Path(it.path).stem) for it in items]


# ----------------------------------------------------------------------------- the tutorial's numbers


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


# ----------------------------------------------------------------------------- bad inputs and output rules


def test_bad_inputs(tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "empty").mkdir(parents=True)
    good = encode(noise_image(64, 48, 0), "JPEG", quality=90)
    (src / "good.jpg").write_bytes(good)
    (src / "corrupt.jpg").write_bytes(good[: len(good) // 2])
    (src / "text.jpg").write_text("not an image\n")
    (src / "tiny.png").write_bytes(encode(np.zeros((1, 1, 3), np.uint8)))
    deep = (np.arange(40 * 56, dtype=np.uint16).reshape(40, 56) * 29).astype(np.uint16)
    Image.fromarray(deep).save(src / "deep16.png")  # 16-bit greyscale
    (src / "notes.txt").write_text("ignored inside a folder\n")
    items, _ = collect_inputs([src], tmp_path / "out", split="test", labels=None)
    decodable = [it for it in items if Path(it.path).name in ("good.jpg", "deep16.png")]
    model = lookup_model(decodable, PLAIN, {it.path: np.full((NUM_JOINTS, 2), 20.0) for it in decodable})

    summary = predict(
        (model, PLAIN),
        [src, tmp_path / "missing.png", src / "notes.txt"],
        tmp_path / "out",
        workers=0,
        quiet=True,
    )
    assert summary["images"] == 2 and summary["errors"] == 5
    preds = {Path(r["path"]).name for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")}
    assert preds == {"good.jpg", "deep16.png"}
    errors = {Path(e["path"]).name: e["reason"] for e in read_jsonl(tmp_path / "out" / "errors.jsonl")}
    assert set(errors) == {"corrupt.jpg", "text.jpg", "tiny.png", "missing.png", "notes.txt"}
    assert "too small" in errors["tiny.png"] and "1x1" in errors["tiny.png"]
    assert "unsupported" in errors["notes.txt"] and "no such" in errors["missing.png"]
    assert all(errors.values())

    with pytest.raises(HandposeError, match="no images found"):
        predict((model, PLAIN), [src / "empty"], tmp_path / "out2", workers=0, quiet=True)
    with pytest.raises(HandposeError, match="no image could be predicted"):
        predict(
            (model, PLAIN), [src / "corrupt.jpg", src / "text.jpg"], tmp_path / "out3", workers=0, quiet=True
        )
    assert len(read_jsonl(tmp_path / "out3" / "errors.jsonl")) == 2
    assert not (tmp_path / "out3" / "predictions.jsonl").exists()


def test_coco_outside_out_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(encode(noise_image(32, 32, 0)))
    with pytest.raises(HandposeError, match="outside the output folder"):
        predict(
            (IntensityModel(), PLAIN),
            [tmp_path / "a.png"],
            tmp_path / "out",
            coco=tmp_path / "results.json",
            workers=0,
            quiet=True,
        )
    with pytest.raises(HandposeError, match="outside the output folder"):
        predict(
            (IntensityModel(), PLAIN),
            [tmp_path / "a.png"],
            tmp_path / "out",
            coco=tmp_path / "out" / ".." / "results.json",
            workers=0,
            quiet=True,
        )
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_tutorial_state_dict_loads(shared_data: Path) -> None:
    from handpose.predict import load_model

    net, spec = load_model(shared_data / "tutorial-weights" / "model_final", torch.device("cpu"))
    assert (spec.size, spec.index_offset, spec.resample) == (128, 0.0, "resize")
    assert sum(p.numel() for p in net.parameters()) == 491_206


def test_checkpoint_loads(tmp_path: Path) -> None:
    """A handpose checkpoint: shape, size, decoder offset and normalisation come from inside."""
    from handpose import checkpoint
    from handpose.model import ShallowUNet
    from handpose.predict import load_model

    net = ShallowUNet(width=8, depth=2)
    state = {
        "model": net.state_dict(),
        "config": {"width": 8, "depth": 2, "image_size": 64, "index_offset": 0.5},
        "norm": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]},
        "epoch": 1,
        "step": 1,
    }
    checkpoint.save(tmp_path / "best.pt", state)
    loaded, spec = load_model(tmp_path / "best.pt", torch.device("cpu"))
    assert (spec.size, spec.mean, spec.std, spec.resample) == (64, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "warp")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(HandposeError, match="junk.pt"):
        load_model(tmp_path / "junk.pt", torch.device("cpu"))


# ----------------------------------------------------------------------------- the report's arithmetic


def test_report_values_by_hand(tmp_path: Path) -> None:
    """Image A (side 100): 21 joints off by (3, 4) = 5 px. Image B (side 200): joints 0-9 off by
    (6, 8) = 10 px, joints 10-20 unlabelled (and far off: they must not count)."""
    gt = np.zeros((2, NUM_JOINTS, 2)) + 50
    pred = gt.copy()
    pred[0] += [3, 4]
    pred[1, :10] += [6, 8]
    pred[1, 10:] += 500
    vis = np.ones((2, NUM_JOINTS), bool)
    vis[1, 10:] = False
    lab = Labelled(np.array([0, 1]), ["a.png", "b.png"], pred, gt, vis, np.array([100.0, 200.0]))
    images = {0: np.zeros((100, 100, 3), np.uint8), 1: np.zeros((150, 200, 3), np.uint8)}
    rep = write_report(tmp_path, lab, model_size=128, load_image=images.__getitem__)

    n = 31
    assert rep["keypoints"] == n and rep["images"] == 2
    assert rep["mean_error_px"] == pytest.approx((21 * 5 + 10 * 10) / n)
    assert rep["median_error_px"] == pytest.approx(5.0)  # 16th of 21 fives then 10 tens
    assert rep["mean_error_pct"] == pytest.approx(5.0)  # 5/100 and 10/200
    assert rep["error_model_px"]["mean"] == pytest.approx(0.05 * 128)
    assert rep["error_px"]["p90"] == pytest.approx(10.0) and rep["error_px"]["max"] == pytest.approx(10.0)
    # PCK: 0 below 5 px, 21/31 from 5 px, 1 from 10 px; trapezoids on the 0.5 px grid.
    frac = np.array(rep["pck"]["fraction"])
    t = np.array(rep["pck"]["thresholds_px"])
    assert (
        frac[t < 5].max() == 0 and np.allclose(frac[(t >= 5) & (t < 10)], 21 / n) and frac[t >= 10].min() == 1
    )
    assert rep["auc"] == pytest.approx((21 / n * 5 + 0.25 + 20) / 30)
    wrist = next(r for r in rep["per_finger"] if r["finger"] == "wrist")
    assert wrist["error_px"]["mean"] == pytest.approx(7.5) and wrist["keypoints"] == 2
    little = next(r for r in rep["per_finger"] if r["finger"] == "little")
    assert little["keypoints"] == 4 and little["error_px"]["mean"] == pytest.approx(5.0)
    assert [r["path"] for r in rep["worst"]] == ["b.png", "a.png"]
    assert json.loads((tmp_path / "report.json").read_text())["auc"] == pytest.approx(rep["auc"])
    for name in ("report.md", "error_hist.png", "pck.png", "gallery.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| px | 6.61 | 5.00 | 10.00 | 10.00 | 10.00 |" in (tmp_path / "report.md").read_text()


def test_pck_auc_of_a_perfect_curve() -> None:
    assert pck_auc(PCK_THRESHOLDS_PX, np.ones_like(PCK_THRESHOLDS_PX)) == pytest.approx(1.0)
    lab = Labelled(
        np.array([0]),
        ["x"],
        np.zeros((1, NUM_JOINTS, 2)),
        np.zeros((1, NUM_JOINTS, 2)),
        np.ones((1, NUM_JOINTS), bool),
        np.array([224.0]),
    )
    assert summarise(lab, 128)["auc"] == pytest.approx(1.0)

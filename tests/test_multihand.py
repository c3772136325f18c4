"""tools/multihand.py on tiny generated YOLO-pose sets: labels on the pixels, every hand counted,
negatives without hands, the same bytes for the same seed, and what pack and predict read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import yolokit
from shardkit import dot_centroid

from handpose.geometry import apply_affine, move_boxes, place_matrix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import multihand  # noqa: E402

COUNTS = {"mosaics": 3, "singles": 4, "backgrounds": 2, "blanked": 2}


def dot_dataset(root: Path, n: int = 5, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """val photos of 200 x 160 px, each one hand: a 13 x 13 white dot on keypoint 0 (a pixel
    centre) on black; returns {image name: (box, uv)} in pixels."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        w, h = 200, 160
        img = np.zeros((h, w, 3), np.uint8)
        x, y = int(rng.integers(40, w - 40)), int(rng.integers(40, h - 40))
        img[y - 6 : y + 7, x - 6 : x + 7] = 255
        uv = rng.uniform([x - 30, y - 30], [x + 30, y + 30], (21, 2))
        uv[0] = (x + 0.5, y + 0.5)
        box = np.array([x - 35.0, y - 35.0, x + 35.0, y + 35.0])
        name = f"p{i}"
        (root / "val" / "images").mkdir(parents=True, exist_ok=True)
        (root / "val" / "labels").mkdir(parents=True, exist_ok=True)
        (root / "val" / "images" / f"{name}.jpg").write_bytes(
            simplejpeg.encode_jpeg(img, quality=100, colorsubsampling="444")
        )
        cx, cy, bw, bh = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h, 70 / w, 70 / h
        kps = " ".join(f"{u / w:.6f} {v / h:.6f} 2" for u, v in uv)
        (root / "val" / "labels" / f"{name}.txt").write_text(f"0 {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f} {kps}\n")
        truth[f"val/images/{name}.jpg"] = (box, uv)
    return truth


def read_labels(out: Path, image: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(box x0, y0, x1, y1; uv (21, 2); visibility) per line, in pixels of the written image."""
    from PIL import Image

    with Image.open(out / image) as im:
        w, h = im.size
    label = str(out / image.replace("/images/", "/labels/")).rsplit(".", 1)[0]
    rows = []
    for line in Path(label + ".txt").read_text().splitlines():
        (cx, cy, bw, bh), uv, vis = yolokit.parse(line)
        box = np.array([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
        rows.append((box, uv * [w, h], vis))
    return rows


def test_labels_follow_the_pixels(tmp_path: Path) -> None:
    """Each hand's label is its photo's label moved by the photo's placement (to 1e-3 px of the
    6-decimal labels), and the dot drawn on keypoint 0 lands within 1 px of the moved keypoint."""
    truth = dot_dataset(tmp_path / "ds")
    out = tmp_path / "mh"
    summary = multihand.build(tmp_path / "ds", out, seed=3, **COUNTS)
    checked = 0
    for entry in summary["images"]:
        if entry["kind"] not in ("mosaic", "single"):
            continue
        rows = read_labels(out, entry["image"])
        assert len(rows) == len(entry["photos"]) == entry["hands"]
        image = np.asarray(simplejpeg.decode_jpeg((out / entry["image"]).read_bytes())).transpose(2, 0, 1)
        for (box, uv, vis), name, square in zip(rows, entry["photos"], entry["squares"], strict=True):
            M = place_matrix(200, 160, tuple(square))
            src_box, src_uv = truth[name]
            np.testing.assert_allclose(box, move_boxes(M, src_box), atol=2e-3)
            np.testing.assert_allclose(uv, apply_affine(M, src_uv), atol=2e-3)
            assert (vis == 2).all()
            x, y = (int(v) for v in uv[0])
            r = max(3, int(np.ceil(13 * square[2] / 200)))
            crop = image[:, y - r : y + r + 1, x - r : x + r + 1]
            np.testing.assert_allclose(dot_centroid(crop) + (x - r, y - r), uv[0], atol=1.0)
            checked += 1
    assert checked == 4 * COUNTS["mosaics"] + COUNTS["singles"]
    sizes = {e["kind"]: e for e in summary["images"]}
    assert summary["counts"] == {"mosaic": 3, "single": 4, "background": 2, "blanked": 2}
    assert sizes["mosaic"]["squares"][0][2] >= 0.6 * 320 - 1e-6


def test_negatives_hold_no_labelled_hand(tmp_path: Path) -> None:
    """Backgrounds and blanked photos have empty label files; a blanked hand box is one flat colour."""
    truth = dot_dataset(tmp_path / "ds")
    out = tmp_path / "mh"
    summary = multihand.build(tmp_path / "ds", out, seed=1, **COUNTS)
    for entry in summary["images"]:
        if entry["kind"] in ("background", "blanked"):
            assert read_labels(out, entry["image"]) == [] and entry["hands"] == 0
        if entry["kind"] == "blanked":
            image = np.asarray(simplejpeg.decode_jpeg((out / entry["image"]).read_bytes()), np.float64)
            x0, y0, x1, y1 = truth[entry["photos"][0]][0].astype(int)
            assert image[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].std(axis=(0, 1)).max() < 3.0  # the dot is gone
        if entry["kind"] == "background":
            image = np.asarray(simplejpeg.decode_jpeg((out / entry["image"]).read_bytes()))
            assert image.shape == (480, 640, 3) and image.std() > 10  # clutter, not a flat field


def test_same_seed_same_bytes_and_a_smaller_rerun_removes_its_own_extra_files(tmp_path: Path) -> None:
    data = yolokit.write_dataset(tmp_path / "ds", yolokit.default_spec())
    a, b = tmp_path / "a", tmp_path / "b"
    multihand.build(data, a, seed=5, **COUNTS)
    multihand.build(data, b, seed=5, **COUNTS)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    (a / "mine.txt").write_text("not the tool's")
    multihand.build(data, a, seed=5, mosaics=1, singles=1, backgrounds=0, blanked=0)
    assert sorted(p.name for p in (a / "val" / "images").iterdir()) == ["mosaic_0000.jpg", "single_0000.jpg"]
    assert sorted(p.name for p in (a / "val" / "labels").iterdir()) == ["mosaic_0000.txt", "single_0000.txt"]
    assert (a / "mine.txt").read_text() == "not the tool's"


def test_pack_and_predict_read_it(tmp_path: Path) -> None:
    """`handpose pack --format yolo` packs every hand (negatives count as background images);
    predict's YOLO input reads every image with its labelled hands."""
    from handpose.pack import pack
    from handpose.predict_inputs import iter_units, labels_of, plan_inputs
    from handpose.shards import read_manifest

    data = yolokit.write_dataset(tmp_path / "ds", yolokit.default_spec())
    out = tmp_path / "mh"
    summary = multihand.build(data, out, seed=2, **COUNTS)
    pack(out, tmp_path / "shards", fmt="yolo", split="0,1,0", workers=1)
    manifest = read_manifest(tmp_path / "shards")
    assert manifest.count("val") == summary["hands"] > 0
    assert manifest.data["images"]["background"] == COUNTS["backgrounds"] + COUNTS["blanked"]
    for source in (out, out / "data.yaml"):
        units = list(
            iter_units(plan_inputs([source], tmp_path / "pred"), tmp_path / "pred", split="val", labels=None)
        )
        assert len(units) == sum(COUNTS.values())
        hands = {}
        for u in units:
            from handpose.imageio import image_size
            from handpose.predict_inputs import read_bytes

            w, h = image_size(read_bytes(u))
            got, problems = labels_of(u, w, h)
            assert not problems
            hands[u.name] = len(got or ())
        assert hands == {e["image"]: e["hands"] for e in summary["images"]}


def test_mistakes_are_one_line(tmp_path: Path) -> None:
    data = yolokit.write_dataset(tmp_path / "ds", yolokit.default_spec())
    cmd = [sys.executable, "tools/multihand.py", "--data", str(data), "--out", str(tmp_path / "o")]
    for extra, needle in (
        (["--split", "test"], "no labelled hand in split 'test'"),
        (["--mosaic-scale", "0.8", "0.5"], "--mosaic-scale"),
    ):
        proc = subprocess.run([*cmd, *extra], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 1 and needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    (tmp_path / "file").write_text("x")
    proc = subprocess.run([*cmd[:-1], str(tmp_path / "file")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "is a file" in proc.stderr


@pytest.mark.parametrize("kind", ["mosaic", "single"])
def test_json_says_what_each_image_is(tmp_path: Path, kind: str) -> None:
    data = yolokit.write_dataset(tmp_path / "ds", yolokit.default_spec())
    multihand.build(data, tmp_path / "mh", seed=0, **COUNTS)
    summary = json.loads((tmp_path / "mh" / "multihand.json").read_text())
    entries = [e for e in summary["images"] if e["kind"] == kind]
    assert len(entries) == COUNTS[f"{kind}s"]
    assert all(len(e["photos"]) == (4 if kind == "mosaic" else 1) for e in entries)
    assert summary["hands"] == sum(e["hands"] for e in summary["images"])


def test_a_dataset_of_symlinked_photos(tmp_path: Path) -> None:
    """Photos and labels that are symlinks to another folder (a subset of a big set, made with
    ln -s): the val photos are found as a folder walk finds them."""
    truth = dot_dataset(tmp_path / "real", n=3)
    for sub in ("images", "labels"):
        (tmp_path / "links" / "val" / sub).mkdir(parents=True)
        for f in (tmp_path / "real" / "val" / sub).iterdir():
            (tmp_path / "links" / "val" / sub / f.name).symlink_to(f)
    summary = multihand.build(tmp_path / "links", tmp_path / "out", **COUNTS, seed=0)
    assert summary["hands"] > 0 and {Path(n).name for n in truth} >= {
        Path(p).name for e in summary["images"] for p in e["photos"]
    }

"""`handpose inspect`: manifest tables, a contact sheet read back from the shards, skeleton placement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from handpose.errors import HandposeError
from handpose.inspector import BOX_COLOR, CELL, Drawable, contact_sheet, inspect_shards
from handpose.shards import Annotation
from handpose.skeleton import FINGER_COLORS


def test_inspect_writes_png_and_prints_tables(
    packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    png = inspect_shards(packed, split="val", n=5, png=tmp_path / "sheet.png")
    assert png == tmp_path / "sheet.png"
    with Image.open(png) as im:
        assert im.size == (3 * CELL, 2 * CELL) and im.mode == "RGB"  # 5 samples: 3 columns, 2 rows
        assert np.asarray(im)[:CELL, :CELL].std() > 10  # an image, not an empty tile
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("splits", "train │ 48", "val │ 16", "eval │ 16", "mean", "std", "drew 5 val samples"):
        assert expected in text
    for expected in ("hands", "box side px", "96 with hands, 0 background", "labelled joints: 100.0%"):
        assert expected in text


def test_default_png_inside_the_pack_and_small_split(packed: Path, tmp_path: Path) -> None:
    root = tmp_path / "pack"
    shutil.copytree(packed, root)  # the session fixture stays untouched
    png = inspect_shards(root, split="eval", n=100)
    assert png == root / "inspect-eval.png"
    with Image.open(png) as im:
        assert im.size == (4 * CELL, 4 * CELL)  # only 16 eval samples exist


def test_skipped_samples_are_listed(packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "pack"
    shutil.copytree(packed, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["skipped"] = [
        {"id": 4, "file": "training/rgb/00000004.jpg", "reason": "corrupt JPEG (x)"},
        {"file": "train/labels/[v2]/a.txt:3", "reason": "62 fields"},  # YOLO: no id; brackets kept
    ]
    (root / "manifest.json").write_text(json.dumps(manifest))
    inspect_shards(root, n=1, png=tmp_path / "x.png")
    out = capsys.readouterr().out
    assert "skipped (2)" in out and "00000004.jpg" in out and "train/labels/[v2]/a.txt:3" in out


def test_bad_split_and_n(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(HandposeError, match="no shards for split 'nope'"):
        inspect_shards(packed, split="nope", png=tmp_path / "x.png")
    with pytest.raises(HandposeError, match="--n"):
        inspect_shards(packed, n=0, png=tmp_path / "x.png")
    with pytest.raises(HandposeError, match="no manifest.json"):
        inspect_shards(tmp_path, png=tmp_path / "x.png")


def drawable(image: np.ndarray, uv: np.ndarray, box=(0, 0, 1, 1), visibility=None) -> Drawable:
    jpg = simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=100, colorsubsampling="444")
    vis = np.ones(21, np.uint8) if visibility is None else np.asarray(visibility, np.uint8)
    ann = Annotation(np.float32(uv), vis, np.float32(box))
    return Drawable("", jpg, image.shape[1], image.shape[0], ann, {})


def test_joint_is_drawn_at_its_pixel() -> None:
    """uv (100.5, 50.5) is the centre of pixel (100, 50): the dot must be centred there."""
    image = np.zeros((CELL, CELL, 3), np.uint8)  # CELL x CELL: the letterbox is the identity
    uv = np.tile([[100.5, 50.5]], (21, 1))
    sheet = np.asarray(contact_sheet([drawable(image, uv)]))
    little = np.all(sheet == FINGER_COLORS["little"], axis=2)  # the last joint drawn is little4
    ys, xs = np.nonzero(little)
    assert little[50, 100] and abs(xs.mean() - 100) < 0.5 and abs(ys.mean() - 50) < 0.5


def test_letterbox_moves_keypoints_and_box_with_the_image() -> None:
    """A 448x224 image is halved into the tile (and centred vertically): uv and box move with it."""
    image = np.zeros((224, 448, 3), np.uint8)
    uv = np.tile([[200.5, 100.5]], (21, 1))  # -> (100.25, 50.25 + 56) in the tile
    sheet = np.asarray(contact_sheet([drawable(image, uv, box=(40, 20, 400, 200))]))
    ys, xs = np.nonzero(np.all(sheet == FINGER_COLORS["little"], axis=2))
    assert abs(xs.mean() + 0.5 - 100.25) < 0.75 and abs(ys.mean() + 0.5 - 106.25) < 0.75
    # the box moves to (20, 66)-(200, 156): each edge is drawn on a pixel it borders
    white = np.all(sheet == BOX_COLOR, axis=2)
    assert white[65:67, 30:190].any(axis=0).all() and white[155:157, 30:190].any(axis=0).all()
    assert white[70:150, 19:21].any(axis=1).all() and white[70:150, 199:201].any(axis=1).all()
    assert not white[70:150, 30:190].any() and not white[:60].any()  # an outline, nothing else


def test_unlabelled_joints_are_not_drawn() -> None:
    image = np.zeros((CELL, CELL, 3), np.uint8)
    uv = np.array([[20.5 + 8 * j, 100.5] for j in range(21)])
    vis = np.ones(21, np.uint8)
    vis[[17, 18, 19, 20]] = 0  # the little finger is not labelled
    sheet = np.asarray(contact_sheet([drawable(image, uv, visibility=vis)]))
    assert not np.all(sheet == FINGER_COLORS["little"], axis=2).any()
    assert np.all(sheet == FINGER_COLORS["ring"], axis=2).any()

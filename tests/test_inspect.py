"""`handpose inspect`: manifest tables, a contact sheet read back from the shards, skeleton placement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handpose.errors import HandposeError
from handpose.inspector import CELL, contact_sheet, inspect_shards
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
    manifest["skipped"] = [{"id": 4, "file": "training/rgb/00000004.jpg", "reason": "corrupt JPEG (x)"}]
    (root / "manifest.json").write_text(json.dumps(manifest))
    inspect_shards(root, n=1, png=tmp_path / "x.png")
    out = capsys.readouterr().out
    assert "skipped (1)" in out and "00000004.jpg" in out


def test_bad_split_and_n(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(HandposeError, match="no shards for split 'nope'"):
        inspect_shards(packed, split="nope", png=tmp_path / "x.png")
    with pytest.raises(HandposeError, match="--n"):
        inspect_shards(packed, n=0, png=tmp_path / "x.png")
    with pytest.raises(HandposeError, match="no manifest.json"):
        inspect_shards(tmp_path, png=tmp_path / "x.png")


def test_joint_is_drawn_at_its_pixel() -> None:
    """uv (100.5, 50.5) is the centre of pixel (100, 50): the dot must be centred there."""
    image = np.zeros((CELL, CELL, 3), np.uint8)  # CELL x CELL: the letterbox is the identity
    uv = np.tile([[100.5, 50.5]], (21, 1))
    sheet = np.asarray(contact_sheet([{"key": "", "image": image, "uv": uv, "meta": {}}]))
    little = np.all(sheet == FINGER_COLORS["little"], axis=2)  # the last joint drawn is little4
    ys, xs = np.nonzero(little)
    assert little[50, 100] and abs(xs.mean() - 100) < 0.5 and abs(ys.mean() - 50) < 0.5


def test_letterbox_moves_keypoints_with_the_image() -> None:
    """A 448x224 image is halved into the tile (and centred vertically): uv moves with it."""
    image = np.zeros((224, 448, 3), np.uint8)
    uv = np.tile([[200.5, 100.5]], (21, 1))  # -> (100.25, 50.25 + 56) in the tile
    sheet = np.asarray(contact_sheet([{"key": "", "image": image, "uv": uv, "meta": {}}]))
    ys, xs = np.nonzero(np.all(sheet == FINGER_COLORS["little"], axis=2))
    assert abs(xs.mean() + 0.5 - 100.25) < 0.75 and abs(ys.mean() + 0.5 - 106.25) < 0.75

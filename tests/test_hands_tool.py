"""`make hands` (tools/hands.py) end to end on a generated YOLO-pose dataset with a tiny recipe:
pack -> train (the photos once per crop of the recipe) -> predict three ways -> one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yolokit

ROOT = Path(__file__).resolve().parents[1]

TINY = """
loader = "wds"
workers = 0
device = "cpu"
crop = ["box", "image"]
weights = [0.75, 0.25]
arch = "strided"
loss = "l1"
width = 4
depth = 1
image_size = 32
epochs = 1
batch_size = 4
val_batches = 0
"""


@pytest.mark.slow
def test_make_hands_prints_one_table_from_the_reports(tmp_path: Path) -> None:
    data = yolokit.write_dataset(tmp_path / "ds", yolokit.default_spec())
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    out = tmp_path / "hands"
    cmd = [sys.executable, "tools/hands.py", "--data", str(data), "--out", str(out), "--recipe", str(recipe)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    # the recipe's two crops got the photo folder twice
    config = (out / "run" / "config.toml").read_text()
    assert f'shards = ["{out / "shards"}", "{out / "shards"}"]' in config

    rows = json.loads((out / "hands.json").read_text())["rows"]
    assert [(r["model"], r["input"]) for r in rows] == [
        ("trained (tiny)", "labelled boxes"),
        ("trained (tiny)", "whole photo, 1 pass"),
        ("trained (tiny)", "whole photo, 2 passes"),
        ("mean training pose", "labelled boxes"),
        ("mean training pose", "whole photo"),
    ]
    # each trained row is its predict run's report, scored on every labelled val hand (6)
    for row, folder in zip(rows, ("trained-boxes", "trained-whole", "trained-refine1"), strict=False):
        rep = json.loads((out / "eval" / folder / "report.json").read_text())
        assert row["pct_box"] == rep["mean_error_pct_box"] and row["mean_px"] == rep["mean_error_px"]
        assert row["pck_0.2_box"] == rep["pck_0.2_box"] and row["pct_image"] == rep["mean_error_pct"]
    assert json.loads((out / "eval" / "trained-boxes" / "report.json").read_text())["hands"] == 6
    table = (out / "hands.md").read_text()
    assert table.count("\n| ") == 1 + len(rows) and "| trained (tiny) | labelled boxes |" in table
    assert table in proc.stdout

    # a re-run reuses every finished step: nothing is packed, trained or predicted again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "hands.md"}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "$ handpose" not in again.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "hands.json")

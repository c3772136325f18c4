"""tools/scaling.py: a recipe trained at several budgets on a make hands folder's packs, the
epochs set from a measured training rate, one table on both validations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yolokit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import scaling  # noqa: E402

from handpose.config import load_config  # noqa: E402
from handpose.pack import pack  # noqa: E402
from handpose.train import TrainConfig  # noqa: E402

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
batch_size = 4
batches_per_epoch = 0
val_batches = 0
schedule = "cosine"
optimizer = "adamw"
lr = 0.002
"""


def test_a_budget_sets_the_epochs_from_the_rate() -> None:
    assert scaling.epochs_for(15, 250.0, 18_776) == 12  # 225,000 samples: 11.98 passes
    assert scaling.epochs_for(60, 250.0, 18_776) == 48
    assert scaling.epochs_for(0.001, 250.0, 18_776) == 1  # never none


def test_the_rate_run_replaces_the_runs_own_batches() -> None:
    """The measuring run trains the given run's data for --rate-batches batches: the run's own
    --batches_per_epoch and --val_batches are replaced, not given a second time."""
    base = ["--config", "r.toml", "--shards", "a,b", "--batches_per_epoch", "782", "--val_batches", "0"]
    assert scaling.rate_run(base, 200) == [
        "--config", "r.toml", "--shards", "a,b",
        "--epochs", "1", "--batches_per_epoch", "200", "--val_batches", "1",
    ]  # fmt: skip
    assert scaling.rate_run(["--config", "r.toml"], 50)[-6:] == [
        "--epochs", "1", "--batches_per_epoch", "50", "--val_batches", "1",
    ]  # fmt: skip


@pytest.mark.slow
def test_scaling_table_from_runs_at_each_budget(tmp_path: Path) -> None:
    hands = tmp_path / "hands"
    pack(
        yolokit.write_dataset(tmp_path / "ds", yolokit.default_spec()),
        hands / "shards",
        fmt="yolo",
        workers=1,
    )
    other = yolokit.Spec({"val": yolokit.default_spec(seed=5).splits["train"]})
    pack(
        yolokit.write_dataset(tmp_path / "other", other),
        hands / "val" / "other",
        fmt="yolo",
        split="0,1,0",
        workers=1,
    )
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    cmd = [sys.executable, "tools/scaling.py", "--hands", str(hands), "--recipe", str(recipe)]
    cmd += ["--minutes", "0.001,0.002", "--rate-batches", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = hands / "scaling"
    result = json.loads((out / "scaling.json").read_text())
    measured = json.loads((out / "rate" / "summary.json").read_text())["final"]["samples_per_s"]
    assert result["rate"] == measured and (out / "rate" / "config.toml").is_file()
    per_epoch = scaling.samples_per_epoch(load_config(TrainConfig, out / "0.001min" / "config.toml"))
    assert result["samples_per_epoch"] == per_epoch == 12  # 9 box crops in batches of 3 (+ 1 whole photo)
    for row, budget in zip(result["rows"], (0.001, 0.002), strict=True):
        run = out / f"{budget:g}min"
        cfg = load_config(TrainConfig, run / "config.toml")
        assert row["epochs"] == cfg.epochs == scaling.epochs_for(budget, measured, per_epoch)
        assert cfg.val_shards == (str(hands / "val" / "other"),) and cfg.crop == ("box", "image")
        summary = json.loads((run / "summary.json").read_text())
        assert row["same source"]["val_error_pct_box"] == summary["best_val_error_pct_box"]
        assert row["other"]["val_error_pct_box"] == summary["val_sets"]["other-box"]["val_error_pct_box"]
        assert row["other"]["val_error_pct"] == summary["val_sets"]["other-image"]["val_error_pct"]
        best = next(
            json.loads(x)
            for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["epoch"] == summary["best_epoch"]
        )
        assert row["same source"]["val_error_pct"] == best["shards-image/val_error_pct"]
    text = (out / "scaling.md").read_text()
    assert text in proc.stdout and text.count("\n| ") == 3
    assert "| budget (min) | epochs | trained (min) | same source: % of box |" in text

    # a re-run trains nothing again
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "$ handpose" not in again.stdout


@pytest.mark.slow
def test_scaling_a_given_run(tmp_path: Path) -> None:
    """--train ARGS scales the run those `handpose train` arguments describe (its own shards,
    crops and weights, its val_shards), at the given rate; --epochs and --out stay the tool's."""
    data = tmp_path / "data"
    pack(yolokit.write_dataset(tmp_path / "ds", yolokit.default_spec()), data, fmt="yolo", workers=1)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    train = f"--config {recipe} --shards {data},{data},{data} --crop box,image,box --weights 0.5,0.3,0.2"
    out = tmp_path / "scaling"
    cmd = [sys.executable, "tools/scaling.py", "--train", train, "--minutes", "0.01", "--rate", "60"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "scaling.json").read_text())
    cfg = load_config(TrainConfig, out / "0.01min" / "config.toml")
    assert cfg.shards == (str(data),) * 3 and cfg.crop == ("box", "image", "box")
    assert cfg.weights == (0.5, 0.3, 0.2) and result["rate"] == 60 and not (out / "rate").exists()
    assert (
        result["rows"][0]["epochs"] == cfg.epochs == scaling.epochs_for(0.01, 60, result["samples_per_epoch"])
    )
    for bad, needle in (
        (["--train", train], "--train: give --out OUT"),
        (["--train", f"{train} --epochs 3", "--out", str(out)], "--epochs is the tool's to set"),
        (["--train", f"--shards {data}", "--out", str(out)], "give the recipe as --config RECIPE"),
        (["--train=--config", "--out", str(out)], "expected --key value pairs"),
        (["--train", train, "--hands", str(tmp_path), "--out", str(out)], "one of them"),
    ):
        proc = subprocess.run(
            [sys.executable, "tools/scaling.py", *bad], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr, bad

"""Trainer: recipes, checkpoints, exact resume, and real multi-process runs through torchrun.

The multi-process tests launch `torchrun` exactly as a user would (from the repo root, gloo on
the CPU) on the shared `packed` fixture, with a tiny model (width 4, 32 px) so each run takes
seconds. Test-only hooks in handpose.train are driven by environment variables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from handpose import checkpoint
from handpose.cli import _pairs
from handpose.config import load_config, to_toml
from handpose.errors import HandposeError
from handpose.model import ShallowUNet
from handpose.skeleton import NUM_JOINTS
from handpose.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "pipelines"
BIN = Path(sys.executable).parent
TINY = {
    "image_size": "32",
    "width": "4",
    "batch_size": "4",
    "val_batches": "0",
    "workers": "0",
    "optimizer": "adamw",
    "lr": "0.01",
    "schedule": "constant",
    "log_every": "1",
}


def _args(overrides: dict[str, str]) -> list[str]:
    return [f"--{k}={v}" for k, v in overrides.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    # One thread per process: several ranks share this machine's two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("HANDPOSE_TEST_RECORD", None)
    env.pop("HANDPOSE_TEST_KILL", None)
    return {**env, **extra}


def _torchrun(launch: list[str], args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    cmd = [str(BIN / "torchrun"), *launch, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run / "checkpoints" / "last.pt")["model"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.toml")))
def test_recipes_load(name: str) -> None:
    """Every key a recipe sets reaches the config with its value (none dropped or mis-typed)."""
    import tomllib

    path = RECIPES / f"{name}.toml"
    recipe = tomllib.loads(path.read_text())
    cfg = load_config(TrainConfig, path, {"shards": "s", "out": "o"})  # one folder, in every crop mode
    for key, value in recipe.items():
        got = getattr(cfg, key)
        if isinstance(value, dict):
            got = {k: getattr(got, k) for k in value}
        if isinstance(got, tuple):  # lists in TOML, frozen tuples in the config
            got = list(got)
        assert got == value and type(got) is type(value), key


def test_every_key_declares_itself_and_the_docs_say_so() -> None:
    """Each TrainConfig field has a meaning and a resume rule in its declaration; docs/train.md's
    table of keys is generated from them (tools/config_table.py --check fails when it is stale);
    the resume rules follow the declarations (reg is the model's: refused)."""
    from handpose.config import field_docs, resume_rule
    from handpose.resume import may_change

    docs = field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        assert docs[f.name] and resume_rule(f), f.name
    p = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "config_table.py"), "--check"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert "| `reg` | `1.0` |" in (ROOT / "docs" / "train.md").read_text()
    assert may_change(TrainConfig, "lr", 0.1, 0.2) and may_change(TrainConfig, "augment.flip", False, True)
    assert may_change(TrainConfig, "precision", "fp32", "bf16")
    assert not may_change(TrainConfig, "precision", "bf16", "fp16")
    assert not may_change(TrainConfig, "reg", 1.0, 0.5) and not may_change(
        TrainConfig, "shards", ["a"], ["b"]
    )
    with pytest.raises(HandposeError, match=r"--plateau_factor: must be in \(0, 1\), got 1.0"):
        load_config(TrainConfig, None, {"plateau_factor": "1"})
    with pytest.raises(HandposeError, match=r"--augment.blur: must be in \[0, 1\], got nan"):
        load_config(TrainConfig, None, {"augment.blur": "nan"})


def test_one_folder_in_several_crops_is_given_once() -> None:
    """--shards S with crop = ["box", "image"]: the folder once, read in each crop (and a list of
    folders still names one crop each)."""
    cfg = load_config(TrainConfig, RECIPES / "hands_cpu.toml", {"shards": "s", "out": "o"})
    assert cfg.shards == ("s", "s") and cfg.crop == ("box", "image") and len(cfg.weights) == 2
    assert load_config(TrainConfig, RECIPES / "hands_cpu.toml", {"shards": "a,b"}).shards == ("a", "b")
    with pytest.raises(HandposeError, match="--crop: give one mode, or one per shards folder"):
        load_config(TrainConfig, None, {"shards": "a,b", "crop": "box,image,box"})


def test_tutorial_recipe_is_the_tutorials() -> None:
    cfg = load_config(TrainConfig, RECIPES / "freihand_tutorial.toml")
    assert (cfg.batch_size, cfg.batches_per_epoch, cfg.val_batches, cfg.image_size) == (48, 50, 20, 128)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.schedule, cfg.plateau_factor) == (
        "sgd",
        0.1,
        0.0,
        "plateau",
        0.5,
    )
    assert (cfg.loss, cfg.width, cfg.depth, cfg.augment.enabled) == ("iou", 16, 3, False)
    assert cfg.patience > 0


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"lrr": "1"}, "--lrr"),
        ({"augment.spin": "1"}, "--augment.spin"),
        ({"epochs": "many"}, "--epochs"),
        ({"optimizer": "adam"}, "--optimizer"),
        ({"image_size": "100"}, "--image_size"),
        ({"negatives": "0.2"}, "--negatives.*presence = true"),
        ({"negatives": "0.2", "presence": "true", "loader": "dali"}, "--negatives.*loader = wds"),
        ({"arch": "simcc", "loss": "l1"}, "simcc.*kl"),
        ({"simcc_k": "0"}, "--simcc_k"),
        ({"augment.perspective_deg": "60"}, "--augment.perspective_deg"),
        ({"augment.rotate_deg": "270"}, "--augment.rotate_deg"),
        ({"val_every": "0"}, "--val_every"),
        ({"val_every": "2", "schedule": "plateau", "plateau_on": "val_loss"}, "--val_every.*val_every = 1"),
    ],
)
def test_recipe_errors_name_the_key(overrides: dict[str, str], needle: str) -> None:
    with pytest.raises(HandposeError, match=needle):
        train(RECIPES / "cpu_demo.toml", {"shards": "s", "out": "o", **overrides})


def test_missing_shards_is_a_clean_error(tmp_path: Path) -> None:
    with pytest.raises(HandposeError, match="manifest"):
        train(RECIPES / "cpu_demo.toml", {"shards": str(tmp_path), "out": str(tmp_path / "run")})


# ----------------------------------------------------------------------------- model, checkpoints


def test_tutorial_weights_load(shared_data: Path) -> None:
    path = shared_data / "tutorial-weights" / "model_final"
    if not path.exists():
        pytest.skip("tutorial weights absent")
    model = ShallowUNet()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 128, 128))
    assert out.shape == (1, 21, 128, 128)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0  # sigmoid heatmaps
    assert sum(p.numel() for p in model.parameters()) == 491_206


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "config": {}, "norm": {}, "epoch": int(value), "step": 0}


def test_corrupt_last_falls_back_to_prev(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "last.pt", _state(1.0), keep_previous=True)
    checkpoint.save(tmp_path / "last.pt", _state(2.0), keep_previous=True)
    assert checkpoint.load_latest(tmp_path)[0]["epoch"] == 2
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(UserWarning, match="last.pt.*unreadable"):
        state, path = checkpoint.load_latest(tmp_path)
    assert path.name == "prev.pt" and state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))


def test_flipped_tensor_byte_is_detected(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "last.pt", _state(1.0))
    data = bytearray((tmp_path / "last.pt").read_bytes())
    at = data.find(torch.ones(3).numpy().tobytes())  # the tensor's raw bytes inside the zip
    data[at] ^= 0xFF
    (tmp_path / "last.pt").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="checksum"):
        checkpoint.load(tmp_path / "last.pt")


def test_rng_state_round_trips(tmp_path: Path) -> None:
    import random

    import numpy as np

    checkpoint.save(tmp_path / "c.pt", {**_state(0.0), "rng": [checkpoint.rng_state(torch.device("cpu"))]})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "c.pt")["rng"][0], torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


# ----------------------------------------------------------------------------- single process


def test_exact_resume(packed: Path, tmp_path: Path) -> None:
    """1 epoch + resume + 1 epoch == 2 straight epochs, bit for bit (loader workers and
    augmentation on, so their RNG streams must continue exactly too)."""
    common = {
        **TINY,
        "shards": str(packed),
        "workers": "1",
        "batches_per_epoch": "3",
        "val_batches": "2",
        "augment.enabled": "true",
        "optimizer": "sgd",
        "momentum": "0.9",
        "schedule": "plateau",
    }
    straight, split = tmp_path / "straight", tmp_path / "split"
    summary = train(None, {**common, "out": str(straight), "epochs": "2"})
    train(None, {**common, "out": str(split), "epochs": "1"})
    from typer.testing import CliRunner

    from handpose.cli import app

    result = CliRunner().invoke(
        app, ["train", "--resume", *_args({**common, "out": str(split), "epochs": "2"})]
    )
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output
    a, b = checkpoint.load(straight / "checkpoints/last.pt"), checkpoint.load(split / "checkpoints/last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 6)
    assert [m["epoch"] for m in _metrics(split)] == [1, 2]
    assert [m["val_error_px"] for m in _metrics(split)] == [m["val_error_px"] for m in _metrics(straight)]
    assert load_config(TrainConfig, split / "config.toml").epochs == 2
    assert summary["epochs"] == 2 and summary["mean_pose_error_px"] > 0
    # a checkpoint's model shape cannot change under a resume
    with pytest.raises(HandposeError, match="width"):
        train(None, {**common, "out": str(split), "epochs": "3", "width": "8"})


def _scripted(monkeypatch: pytest.MonkeyPatch, script: dict[str, list[tuple[float, float]]]) -> None:
    """Replace validation's figures with a script: per crop mode of the folder, per epoch,
    (val_loss, val_error_px); training itself runs for real."""
    import handpose.train as T

    calls: dict[str, int] = defaultdict(int)

    def evaluate(raw, loader, cfg, world, mean_uv):  # noqa: ANN001, ANN202 - evaluate's signature
        crop = loader.sets[0].crop
        loss, err = script[crop][calls[crop]]
        calls[crop] += 1
        return {"val_loss": loss, "val_error_px": err, "val_error_pct": err, "mean_pose_error_px": 9.0}

    monkeypatch.setattr(T, "evaluate", evaluate)


def _best_epoch(run: Path) -> int:
    return checkpoint.load(run / "checkpoints" / "best.pt")["epoch"]


@pytest.mark.parametrize("monitor, best", [("val_loss", 2), ("val_error_px", 3)])
def test_monitor_chooses_best_pt(
    packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, monitor: str, best: int
) -> None:
    """best.pt is the epoch whose `monitor` figure is lowest: val_loss is lowest at epoch 2,
    val_error_px at epoch 3."""
    _scripted(monkeypatch, {"image": [(1.0, 5.0), (0.5, 6.0), (0.7, 4.0)]})
    run = tmp_path / "run"
    args = {**TINY, "shards": str(packed), "out": str(run), "epochs": "3", "batches_per_epoch": "1"}
    summary = train(None, {**args, "monitor": monitor})
    assert _best_epoch(run) == summary["best_epoch"] == best
    assert [m["val_loss"] for m in _metrics(run)] == [1.0, 0.5, 0.7]


@pytest.mark.parametrize(
    "patience, min_delta, epochs",
    [
        (0, 0.0, 5),  # off: every epoch runs
        (1, 0.0, 3),  # 1.0, 0.5 better, 0.7 worse: stop
        (2, 0.0, 4),  # ... 0.6 worse than 0.5 too: stop after two bad epochs
        (2, 0.55, 3),  # 0.5 is not better than 1.0 by more than 0.55: epochs 2 and 3 are bad
    ],
)
def test_early_stopping_counts_epochs_without_improvement(
    packed: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    patience: int,
    min_delta: float,
    epochs: int,
) -> None:
    """patience N stops after N epochs that do not beat the best by more than min_delta; the
    summary and the log say so, and best.pt stays the best epoch."""
    _scripted(monkeypatch, {"image": [(1.0, 5.0), (0.5, 5.0), (0.7, 5.0), (0.6, 5.0), (0.55, 5.0)]})
    run = tmp_path / "run"
    args = {**TINY, "shards": str(packed), "out": str(run), "epochs": "5", "batches_per_epoch": "1"}
    summary = train(None, {**args, "patience": str(patience), "min_delta": str(min_delta)})
    assert len(_metrics(run)) == summary["epochs"] == epochs
    assert summary["early_stopped"] == (epochs < 5)
    assert _best_epoch(run) == (1 if min_delta else 2)


def test_val_every_validates_every_nth_epoch_and_the_last(
    packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """val_every 2 over 5 epochs validates epochs 2, 4 and 5 (the last, always); best.pt and the
    summary come from those alone, and the other epochs' metrics rows carry no val figures."""
    _scripted(monkeypatch, {"image": [(0.9, 5.0), (0.4, 4.0), (0.6, 4.5)]})
    run = tmp_path / "run"
    args = {**TINY, "shards": str(packed), "out": str(run), "epochs": "5", "batches_per_epoch": "1"}
    summary = train(None, {**args, "val_every": "2"})
    rows = _metrics(run)
    assert [m["epoch"] for m in rows] == [1, 2, 3, 4, 5]
    assert [m.get("val_loss") for m in rows] == [None, 0.9, None, 0.4, 0.6]
    assert _best_epoch(run) == summary["best_epoch"] == 4
    assert summary["best_val_loss"] == 0.4 and summary["final"]["epoch"] == 5
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 5


def test_every_folder_is_validated_and_the_first_chooses_best(
    packed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two folders (one folder read as box crops and as whole images): each one's figures are
    written under its own key; the plain val_* keys, best.pt and early stopping are the first's."""
    _scripted(monkeypatch, {"box": [(1.0, 5.0), (2.0, 6.0)], "image": [(5.0, 50.0), (0.1, 1.0)]})
    run = tmp_path / "run"
    args = {**TINY, "shards": str(packed), "out": str(run), "epochs": "2", "batches_per_epoch": "1"}
    train(None, {**args, "crop": "box,image", "batch_size": "4"})
    name = packed.name
    first, second = _metrics(run)
    assert (first[f"{name}-box/val_loss"], first[f"{name}-image/val_loss"], first["val_loss"]) == (
        1.0,
        5.0,
        1.0,
    )
    assert (second[f"{name}-box/val_loss"], second[f"{name}-image/val_loss"]) == (2.0, 0.1)
    assert second["val_loss"] == 2.0 and _best_epoch(run) == 1  # the second folder's 0.1 chooses nothing


def _photo_pack(root: Path, first_sid: int, *, mean: tuple, std: tuple, splits: tuple[str, ...]) -> Path:
    """Photos of one bright hand box each (shardkit.photo_samples), sids from `first_sid`, the
    given pixel statistics: 8 per split."""
    from shardkit import photo_samples, write_pack

    rng = np.random.default_rng(first_sid)
    shards = {}
    for k, split in enumerate(splits):
        shards[split] = [
            [s for i in range(8) for s in photo_samples(first_sid + 100 * k + i, rng, 1, 160, 120, 40)]
        ]
    return write_pack(root, shards, mean=mean, std=std)


def test_val_shards_are_scored_right_and_never_trained_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A val_shards folder (a val-only pack with other pixel statistics and another mean pose):
    none of its samples reaches a training batch; each of its crops is scored at every validation
    under its own keys, in the epoch line and in summary.json; the figures are what predict
    reports for the saved model on the same photos (box crops and whole photos: the same crop and
    the first training folder's normalisation), and its mean-pose baseline is the training one."""
    from handpose.geometry import apply_affine, crop_matrix, source_region
    from handpose.predict import predict
    from handpose.shards import decode_annotation, read_manifest, read_samples

    train_root = _photo_pack(
        tmp_path / "train", 0, mean=(0.5, 0.45, 0.4), std=(0.25, 0.2, 0.3), splits=("train", "val")
    )
    other = _photo_pack(tmp_path / "other", 10**6, mean=(0.2, 0.3, 0.6), std=(0.4, 0.1, 0.2), splits=("val",))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["mean_pose"]["box"] = [[0.2, -0.1]] * NUM_JOINTS  # not the training folder's (the centre)
    (other / "manifest.json").write_text(json.dumps(manifest))
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("HANDPOSE_TEST_RECORD", str(record))
    run = tmp_path / "run"
    args = {**TINY, "shards": str(train_root), "out": str(run), "epochs": "2", "batches_per_epoch": "2"}
    summary = train(None, {**args, "crop": "box,image", "weights": "3,1", "val_shards": str(other)})
    monkeypatch.delenv("HANDPOSE_TEST_RECORD")

    trained = {
        k for line in (record / "keys-rank0.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]
    }
    assert trained and all(int(k) < 100 for k in trained)  # the training folder's train split only

    metrics = _metrics(run)
    for m in metrics:
        for name in ("other-box", "other-image"):
            assert m[f"{name}/val_samples"] == 8 and m[f"{name}/val_error_px"] > 0
        assert {"other-box/val_error_pct_box", "other-box/val_pck_box"} <= m.keys()
        assert "other-image/val_pck_box" not in m  # a whole photo has no box to measure by
    out = capsys.readouterr().out
    assert "scored, never trained on: other-box" in out
    assert f"[other-box {metrics[-1]['other-box/val_error_px']:.2f} px, " in out
    best = next(m for m in metrics if m["epoch"] == summary["best_epoch"])
    saved = json.loads((run / "summary.json").read_text())
    assert saved["val_sets"]["other-box"] == {
        k.split("/", 1)[1]: v for k, v in best.items() if k.startswith("other-box/")
    }
    assert saved["val_sets"]["other-image"]["val_error_px"] == best["other-image/val_error_px"]

    # predict's report of best.pt on the same photos
    model = run / "checkpoints" / "best.pt"
    boxes = predict(model, [other], tmp_path / "p-boxes", split="val", boxes="gt", quiet=True)["report"]
    whole = predict(model, [other], tmp_path / "p-whole", split="val", refine=0, quiet=True)["report"]
    assert best["other-box/val_error_pct_box"] == pytest.approx(boxes["mean_error_pct_box"], rel=1e-4)
    assert best["other-box/val_pck_box"] == pytest.approx(boxes["pck_0.2_box"], abs=1e-9)
    assert best["other-image/val_error_pct"] == pytest.approx(whole["mean_error_pct"], rel=1e-4)

    # the baseline: the training folder's mean pose (the box centre), not the other folder's
    pad, size, errors = 1.25, 32, []
    for tar in read_manifest(other).shards("val"):
        for sample in read_samples(tar, ("kp.f32", "vis.u8", "box.f32")):
            ann = decode_annotation(sample)
            uv = apply_affine(crop_matrix(source_region(160, 120, ann.box, pad), size), ann.uv)
            errors += list(np.linalg.norm(uv - size / 2, axis=1))
    assert best["other-box/mean_pose_error_px"] == pytest.approx(np.mean(errors), rel=1e-5)


def test_monitor_may_choose_best_pt_on_a_val_shards_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """monitor = NAME/val_error_px: best.pt and the summary follow that set's figure, not the
    training folder's."""
    import handpose.train as T

    train_root = _photo_pack(
        tmp_path / "train", 0, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), splits=("train", "val")
    )
    other = _photo_pack(tmp_path / "other", 10**6, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), splits=("val",))
    script = {"train": [5.0, 4.0, 6.0], "other": [3.0, 2.5, 1.0]}
    calls: dict[str, int] = defaultdict(int)

    def evaluate(raw, loader, cfg, world, mean_uv):  # noqa: ANN001, ANN202 - evaluate's signature
        folder = loader.sets[0].manifest.root.name
        err = script[folder][calls[folder]]
        calls[folder] += 1
        return {"val_loss": err, "val_error_px": err, "val_error_pct": err, "mean_pose_error_px": 9.0}

    monkeypatch.setattr(T, "evaluate", evaluate)
    run = tmp_path / "run"
    args = {**TINY, "shards": str(train_root), "out": str(run), "epochs": "3", "batches_per_epoch": "1"}
    summary = train(None, {**args, "val_shards": str(other), "monitor": "other/val_error_px"})
    assert _best_epoch(run) == summary["best_epoch"] == 3
    assert summary["best_monitored"] == 1.0 and summary["best_val_error_px"] == 6.0
    assert [m["other/val_error_px"] for m in _metrics(run)] == [3.0, 2.5, 1.0]


def test_val_shards_may_change_on_resume(tmp_path: Path) -> None:
    """A finished run continued with a val_shards folder added: the coming epochs score it."""
    train_root = _photo_pack(
        tmp_path / "train", 0, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), splits=("train", "val")
    )
    other = _photo_pack(tmp_path / "other", 10**6, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), splits=("val",))
    run = tmp_path / "run"
    args = {**TINY, "shards": str(train_root), "out": str(run), "batches_per_epoch": "1"}
    train(None, {**args, "epochs": "1"})
    train(None, {"out": str(run), "epochs": "2", "val_shards": str(other)})
    first, second = _metrics(run)
    assert "other/val_error_px" not in first and second["other/val_samples"] == 8
    assert load_config(TrainConfig, run / "config.toml").val_shards == (str(other),)


def test_val_shards_mistakes_are_one_line(tmp_path: Path) -> None:
    train_root = _photo_pack(
        tmp_path / "train", 0, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), splits=("train", "val")
    )
    no_val = _photo_pack(
        tmp_path / "noval", 10**6, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), splits=("train",)
    )
    other = _photo_pack(tmp_path / "other", 10**6, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), splits=("val",))
    twin = _photo_pack(tmp_path / "x" / "train", 10**6, mean=(0.5,) * 3, std=(0.2,) * 3, splits=("val",))
    args = {**TINY, "shards": str(train_root), "out": str(tmp_path / "run")}
    cases = [
        ({"val_shards": str(no_val)}, r"--val_shards: .*noval has no val split \(pack a validation-only set"),
        ({"val_shards": str(train_root)}, r"--val_shards: .*train is also a training folder"),
        ({"val_shards": str(twin)}, r"--val_shards: .*both named 'train'"),
        ({"val_shards": str(other), "monitor": "others/val_error_px"}, r"--monitor: .*no set named 'others'"),
        ({"val_shards": str(other), "monitor": "other/val_pck"}, r"--monitor: .*must be one of val_loss"),
        ({"monitor": "train/val_error_px"}, r"--monitor: .*no set named 'train'"),
        (
            {"val_shards": str(other), "val_crop": "box", "arch": "centernet", "loss": "focal"},
            r"val_crop: a detector validates",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(HandposeError, match=message):
            train(None, {**args, **extra})
    cfg = load_config(TrainConfig, None, {**args, "crop": "box,image", "val_shards": str(other)})
    assert cfg.val_crop == ("box", "image") and [n for _, _, n in cfg.val_sets] == [
        "other-box",
        "other-image",
    ]


def test_grad_scaler_and_grad_clip() -> None:
    """One step with the fp16 grad scaler on (scaled loss, unscaled before clipping) and
    grad_clip: the update is the clipped gradient times the rate, exactly as without the scaler."""
    from handpose.distributed import World
    from handpose.train import build, train_step

    cfg = TrainConfig(
        **{**{k: type(getattr(TrainConfig(), k))(v) for k, v in TINY.items()}, "optimizer": "sgd"}
    )
    batch = {
        "image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
        "uv": torch.full((4, NUM_JOINTS, 2), 16.0),
        "visible": torch.ones(4, NUM_JOINTS, dtype=torch.bool),
    }
    updates = []
    for scaler_on, clip in ((False, 0.0), (True, 0.0), (False, 1e-3), (True, 1e-3)):
        torch.manual_seed(0)
        raw, model, opt, _ = build(dataclasses.replace(cfg, grad_clip=clip, lr=1.0), World())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=scaler_on)
        before = [p.detach().clone() for p in raw.parameters()]
        loss = train_step(model, raw, batch, opt, scaler, dataclasses.replace(cfg, grad_clip=clip), World())
        assert torch.isfinite(loss)
        step = torch.cat([(p.detach() - b).flatten() for p, b in zip(raw.parameters(), before, strict=True)])
        updates.append(step)
        if scaler_on:
            assert scaler.get_scale() == 2.0**16  # finite gradients: the scale is kept
    plain, scaled, clipped, both = updates
    assert torch.allclose(scaled, plain, rtol=1e-4, atol=1e-7)  # the scaler changes nothing but precision
    assert float(plain.norm()) > 10 * 1e-3  # so the clip below bites
    assert float(clipped.norm()) == pytest.approx(1e-3, rel=1e-3) and torch.allclose(both, clipped, atol=1e-8)


def test_plateau_rate_changed_on_resume(packed: Path, tmp_path: Path) -> None:
    """A plateau run resumed with --lr, --plateau_factor and --plateau_patience: the new rate is
    the current rate from the first resumed step, and the restored scheduler has the new factor
    and patience."""
    run = tmp_path / "run"
    args = {**TINY, "shards": str(packed), "out": str(run), "batches_per_epoch": "1", "schedule": "plateau"}
    train(None, {**args, "epochs": "2"})
    assert [m["lr"] for m in _metrics(run)] == [0.01, 0.01]
    train(
        None,
        {"out": str(run), "epochs": "3", "lr": "0.05", "plateau_factor": "0.25", "plateau_patience": "7"},
    )
    assert [m["lr"] for m in _metrics(run)] == [0.01, 0.01, 0.05]
    sched = checkpoint.load(run / "checkpoints" / "last.pt")["scheduler"]
    assert (sched["factor"], sched["patience"]) == (0.25, 7)


def test_simcc_with_presence_trains_on_crops_without_a_hand(tmp_path: Path) -> None:
    """arch simcc + presence + negatives + the other-source augmentations, end to end: the
    checkpoint predict loads holds the SimCC head and the presence head."""
    from shardkit import photo_samples, write_pack

    from handpose.checkpoint import load_model
    from handpose.model import SimCCPose

    rng = np.random.default_rng(3)
    samples: list = []
    for photo in range(12):
        samples += photo_samples(len(samples), rng, hands=1 + photo % 2)
    root = write_pack(tmp_path / "shards", {"train": [samples[:12], samples[12:]], "val": [samples[:6]]})
    run = tmp_path / "run"
    overrides = {
        **TINY,
        **{"shards": str(root), "out": str(run), "crop": "box", "epochs": "1", "batches_per_epoch": "3"},
        **{"arch": "simcc", "loss": "kl", "sigma": "1.5", "simcc_k": "2", "depth": "1"},
        **{"presence": "true", "presence_weight": "0.5", "negatives": "0.3"},
        **{"augment.enabled": "true", "augment.rotate_deg": "180", "augment.aspect": "0.2"},
        **{"augment.perspective_deg": "20", "augment.channel_gain": "0.1", "augment.grayscale": "0.1"},
        **{"augment.occlude": "0.5", "augment.occlude_patch": "0.5"},
    }
    summary = train(None, overrides)
    assert summary["epochs"] == 1 and np.isfinite(_metrics(run)[0]["train_loss"])
    net, spec = load_model(run / "checkpoints" / "last.pt", torch.device("cpu"))
    assert isinstance(net, SimCCPose) and net.presence_head is not None and spec.size == 32
    saved = load_config(TrainConfig, run / "config.toml")
    assert (saved.arch, saved.presence, saved.negatives, saved.augment.perspective_deg) == (
        "simcc",
        True,
        0.3,
        20.0,
    )


def test_corrupt_samples_are_counted_in_metrics(tmp_path: Path) -> None:
    """Corrupt JPEGs the loaders skip show up in metrics.jsonl, summed since launch."""
    import numpy as np
    from shardkit import chunk, texture_sample, write_pack

    rng = np.random.default_rng(7)
    meta = [json.dumps({"sid": i, "width": 64, "height": 64}).encode() for i in range(14)]
    samples = [(*texture_sample(i, rng, 64, 64)[:3], {"json": meta[i]}) for i in range(14)]
    sid, jpg, uv, extra = samples[12]
    samples[12] = (sid, jpg[: len(jpg) // 2], uv, extra)  # truncated, in val: read once per epoch
    splits = {"train": chunk(samples[:10], [10]), "val": chunk(samples[10:], [4])}
    root = write_pack(tmp_path / "shards", splits)
    run = {"shards": str(root), "out": str(tmp_path / "run"), "epochs": "2", "batches_per_epoch": "2"}
    train(None, {**TINY, **run})  # 2 train steps an epoch: the corrupt sample is in val, read in full
    assert [m["skipped_samples"] for m in _metrics(tmp_path / "run")] == [1, 2]


def test_tensorboard_off_is_said_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without the tensorboard package, the run's first lines say that TensorBoard logging is off
    and how to turn it on."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    from handpose.distributed import World
    from handpose.train import LoopState, RunLog

    RunLog(TrainConfig(out=str(tmp_path)), World(), tmp_path, LoopState(), [])
    notes = [line for line in capsys.readouterr().out.splitlines() if "TensorBoard" in line]
    assert len(notes) == 1 and "logging is off" in notes[0] and "handpose[tensorboard]" in notes[0]
    assert not (tmp_path / "tensorboard").exists()


def test_resume_without_checkpoint_is_an_error(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(HandposeError, match="no checkpoint"):
        train(None, {**TINY, "shards": str(packed), "out": str(tmp_path)}, resume=True)


def test_bench_train(packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from handpose.bench.train import bench_train

    recipe = tmp_path / "tiny.toml"
    recipe.write_text("image_size = 32\nwidth = 4\nbatch_size = 4\nworkers = 0\n")
    result = bench_train(packed, config=recipe, steps=3)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(json.dumps(result, sort_keys=True))
    # the figures describe the recipe's run, and agree with each other
    assert (line["batch_size"], line["image_size"], line["width"], line["workers"], line["steps"]) == (
        4,
        32,
        4,
        0,
        3,
    )
    assert line["samples_per_s"] > 0 and line["in_memory_samples_per_s"] > 0
    ratio = line["samples_per_s"] / line["in_memory_samples_per_s"]
    assert line["loader_overhead_pct"] == pytest.approx(100 * (1 - ratio))
    assert line["step_ms"] == pytest.approx(1000 * 4 / line["in_memory_samples_per_s"])


# ----------------------------------------------------------------------------- resume rules

# A finished 2-epoch AdamW + cosine run (2 steps per epoch): what the resume tests continue.
BASE = {**TINY, "epochs": "2", "batches_per_epoch": "2", "val_batches": "1", "schedule": "cosine"}
BASE = {**BASE, "min_lr": "0.001"}


@pytest.fixture(scope="module")
def base_run(packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BASE run, trained from a recipe file that is deleted afterwards."""
    root = tmp_path_factory.mktemp("base")
    recipe = root / "recipe.toml"
    recipe.write_text(to_toml(load_config(TrainConfig, None, {**BASE, "shards": str(packed)})))
    train(recipe, {"out": str(root / "run")})
    recipe.unlink()
    return root / "run"


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    """A private copy of the base run (a run folder may be moved: `out` may change on resume)."""
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def _cosine(lr: float, min_lr: float, step: int, total: int) -> float:
    return lr * (min_lr / lr + (1 - min_lr / lr) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1))))


def test_resume_from_the_runs_own_config_with_a_new_lr(run: Path) -> None:
    """`train --out RUN --resume --lr 0.02 --epochs 4`, no recipe: RUN/config.toml is the recipe,
    the new lr is the cosine's new peak from the saved step on, and it still ends at min_lr."""
    from typer.testing import CliRunner

    from handpose.cli import app

    before = _metrics(run)
    result = CliRunner().invoke(
        app, ["train", "--out", str(run), "--resume", "--lr", "0.02", "--epochs", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "epochs 2 -> 4, lr 0.01 -> 0.02)" in result.output  # (changed: out OLD -> RUN, ...)
    metrics = _metrics(run)
    assert metrics[:2] == before and [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert before[-1]["lr"] == pytest.approx(0.001)  # the base run ended at its min_lr
    assert metrics[2]["lr"] == pytest.approx(_cosine(0.02, 0.001, 6, 8))
    assert metrics[3]["lr"] == pytest.approx(0.001)  # not 0.01 * 0.001 / 0.02: the floor holds
    cfg = load_config(TrainConfig, run / "config.toml")
    assert (cfg.lr, cfg.epochs, cfg.out, cfg.optimizer) == (0.02, 4, str(run), "adamw")
    assert checkpoint.load(run / "checkpoints/last.pt")["config"]["lr"] == 0.02


@pytest.mark.parametrize(
    "key, value, old",
    [
        ("optimizer", "sgd", "adamw"),
        ("schedule", "plateau", "cosine"),
        ("loss", "mse", "iou"),
        ("batch_size", "2", "4"),
    ],
)
def test_refused_changes_name_the_key(run: Path, key: str, value: str, old: str) -> None:
    last = (run / "checkpoints/last.pt").read_bytes()
    with pytest.raises(HandposeError, match=rf"cannot resume with a different {key} \({old} -> {value}\)"):
        train(None, {"out": str(run), key: value}, resume=True)
    assert (run / "checkpoints/last.pt").read_bytes() == last


def test_refusal_through_the_cli_is_one_line(run: Path) -> None:
    p = subprocess.run(
        [str(BIN / "handpose"), "train", "--out", str(run), "--resume", "--optimizer", "sgd"],
        capture_output=True,
        text=True,
        env=_env(COLUMNS="1000"),
        timeout=120,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    [line] = [x for x in p.stderr.splitlines() if x.strip()]
    assert "cannot resume with a different optimizer (adamw -> sgd)" in line


@pytest.mark.parametrize("resume", [False, True])
def test_both_checkpoints_damaged_refuses(run: Path, resume: bool) -> None:
    folder = run / "checkpoints"
    for name in ("last.pt", "prev.pt"):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    best, metrics = (folder / "best.pt").read_bytes(), (run / "metrics.jsonl").read_text()
    with pytest.raises(HandposeError) as e:
        train(None, {"out": str(run), "epochs": "3"}, resume=resume)
    assert str(e.value) == (
        f"{folder}: last.pt and prev.pt are damaged, so there is nothing to resume from; refusing to "
        f"start over and overwrite best.pt (to start over on purpose, move {folder} away or train "
        "into a new --out)"
    )
    assert (folder / "best.pt").read_bytes() == best and (run / "metrics.jsonl").read_text() == metrics


# ----------------------------------------------------------------------------- damaged shards


def test_train_checks_the_shards_first(packed: Path, tmp_path: Path) -> None:
    """A changed keypoint (same size) stops train with one line via the real CLI; --no-verify
    skips the sha256 and trains, but never skips the size check."""
    from shardkit import overwrite_member

    from handpose.shards import read_manifest

    shards = tmp_path / "shards"
    shutil.copytree(packed, shards)
    shard = read_manifest(shards).entries("train")[0]["name"]
    overwrite_member(shards, shard, 0, "kp.f32", 0, np.float32(12345.0).tobytes())
    args = _args({**TINY, "shards": str(shards), "epochs": "1", "batches_per_epoch": "1", "val_batches": "1"})
    cmd = [str(BIN / "handpose"), "train", *args]
    p = subprocess.run(
        [*cmd, f"--out={tmp_path / 'a'}"], capture_output=True, text=True, env=_env(COLUMNS="1000")
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert [x for x in p.stderr.splitlines() if x.strip()] == [
        f"error: {shards / shard}: sha256 differs from the manifest (damaged or changed since packing); "
        "re-run handpose pack"
    ]
    assert not (tmp_path / "a" / "checkpoints").exists()
    assert train(None, {**_pairs(args), "out": str(tmp_path / "b"), "verify": "false"})["epochs"] == 1
    (shards / shard).write_bytes((shards / shard).read_bytes()[:-512])
    with pytest.raises(HandposeError, match=f"{shard}: .* bytes, the manifest says .*re-run handpose pack"):
        train(None, {**_pairs(args), "out": str(tmp_path / "c"), "verify": "false"})


def test_train_refuses_a_hand_edited_manifest(packed: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(packed, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["counts"]["train"] = 999
    (shards / "manifest.json").write_text(json.dumps(manifest))
    args = _args({**TINY, "shards": str(shards), "out": str(tmp_path / "run")})
    p = subprocess.run(
        [str(BIN / "handpose"), "train", *args], capture_output=True, text=True, env=_env(COLUMNS="1000")
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    [line] = [x for x in p.stderr.splitlines() if x.strip()]
    assert line.endswith("manifest.json: counts.train: 999, but the train shards hold 48 samples")


# ----------------------------------------------------------------------------- torchrun


def _ddp_args(packed: Path, run: Path, epochs: int = 3) -> list[str]:
    return [
        "handpose",
        "train",
        *_args(
            {**TINY, "shards": str(packed), "out": str(run), "epochs": str(epochs), "batches_per_epoch": "0"}
        ),
    ]


@pytest.fixture(scope="module")
def ddp_run(packed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One uninterrupted 2-process run (3 full passes), recording each rank's keys and parameters."""
    run, record = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("record")
    _torchrun(
        ["--nproc_per_node=2", "--standalone"], _ddp_args(packed, run), _env(HANDPOSE_TEST_RECORD=str(record))
    )
    return run, record


@pytest.mark.slow
def test_ddp_two_ranks(ddp_run: tuple[Path, Path], packed: Path) -> None:
    run, record = ddp_run
    keys: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for rank in (0, 1):
        for line in (record / f"keys-rank{rank}.jsonl").read_text().splitlines():
            step = json.loads(line)
            keys[step["epoch"]][rank] += step["keys"]
    n_train = json.loads((packed / "manifest.json").read_text())["counts"]["train"]
    assert sorted(keys) == [0, 1, 2]
    for epoch, per_rank in keys.items():
        a, b = per_rank[0], per_rank[1]
        assert len(a) == len(b) == n_train // 2 and len(set(a)) == len(a)
        assert not set(a) & set(b), f"epoch {epoch}: ranks shared samples"
        assert len(set(a) | set(b)) == n_train  # together: the whole split, once
    assert keys[0][0] != keys[1][0]  # a new order each epoch
    digests = {(record / f"params-rank{r}.txt").read_text() for r in (0, 1)}
    assert len(digests) == 1, "parameters differ between ranks"
    metrics = _metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert all(
        m["val_samples"] == json.loads((packed / "manifest.json").read_text())["counts"]["val"]
        for m in metrics
    )
    assert (run / "checkpoints" / "best.pt").exists() and (run / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("form", ["-m", "--no-python"])
def test_other_launch_forms(form: str, packed: Path, tmp_path: Path) -> None:
    """`torchrun -m handpose train` and `torchrun --no-python handpose train` (console script)."""
    args = _ddp_args(packed, tmp_path, epochs=1)
    _torchrun(["--nproc_per_node=2", "--standalone", form], args, _env())
    assert [m["epoch"] for m in _metrics(tmp_path)] == [1]


@pytest.mark.slow
def test_killed_rank_restarts_from_checkpoint(
    ddp_run: tuple[Path, Path], packed: Path, tmp_path: Path
) -> None:
    """SIGKILL of rank 1 in epoch 2 under --max-restarts 1: the job restarts from last.pt, finishes,
    and ends with exactly the weights of the uninterrupted run."""
    run, marker = tmp_path / "run", tmp_path / "killed"
    steps_per_epoch = _metrics(ddp_run[0])[0]["step"]
    kill = f"1:{steps_per_epoch + 2}:{marker}"
    out = _torchrun(
        [
            "--nproc_per_node=2",
            "--max-restarts=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        ],
        _ddp_args(packed, run),
        _env(HANDPOSE_TEST_KILL=kill),
    )
    assert marker.exists(), "the kill hook never fired"
    assert f"at epoch 1, step {steps_per_epoch}" in out  # resumed from the epoch-1 checkpoint
    assert [m["epoch"] for m in _metrics(run)] == [1, 2, 3]
    ref = _weights(ddp_run[0])
    got = _weights(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_two_node_launch(ddp_run: tuple[Path, Path], packed: Path, tmp_path: Path) -> None:
    """Two torchrun launchers, --nnodes 2, c10d rendezvous on 127.0.0.1: one job of 2 ranks, the
    same result as 2 ranks on one node."""
    port = _free_port()
    launch = [
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=handpose-test",
    ]
    cmd = [str(BIN / "torchrun"), *launch, *_ddp_args(packed, tmp_path)]
    # The rendezvous store lives here, as a cluster's would on a host of its own: were it hosted
    # by the first agent, that agent may exit before the other's last poll of it (torchrun then
    # fails the late agent with RendezvousConnectionError after the job is done). Both agents
    # find the port taken and connect as clients.
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    nodes = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    try:
        # torchrun's agents meet at an exit barrier after the workers finish (up to 300 s when one
        # agent is slow to get there): give them that before calling it a hang
        outs = [p.communicate(timeout=330)[0] for p in nodes]
    finally:
        for p in nodes:  # never leave a launcher (and its workers) behind
            if p.poll() is None:
                p.kill()
                p.wait()
        del store
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert sum("2 process(es)" in o for o in outs) == 1  # only global rank 0 prints
    ref, got = _weights(ddp_run[0]), _weights(tmp_path)
    assert all(torch.equal(ref[k], got[k]) for k in ref)

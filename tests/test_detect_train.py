"""The detector through `handpose train`: a few steps on a tiny pack with the real recipe shrunk,
the trainer's checkpoint code round trip, and the recipe keys a detector refuses."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from shardkit import hand_dots_pack

from handpose import checkpoint
from handpose.cli import main
from handpose.config import load_config
from handpose.detector import CenterNet, load_detector
from handpose.distributed import setup_world
from handpose.errors import HandposeError
from handpose.model import fold_batchnorm
from handpose.train import LoopState, TrainConfig, build, make_scheduler, save_checkpoints, train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "pipelines" / "hands_detect_cpu.toml"
SHRINK = [
    *("--image_size", "64", "--width", "4", "--batch_size", "4", "--epochs", "2"),
    *("--batches_per_epoch", "2", "--val_batches", "0", "--workers", "0", "--no-verify"),
]


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    return hand_dots_pack(tmp_path_factory.mktemp("detdots"))


@pytest.fixture(scope="module")
def dots(pack: tuple[Path, dict[str, int]]) -> Path:
    return pack[0]


def test_detection_training_through_the_cli(
    pack: tuple[Path, dict[str, int]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dots, hands_of = pack
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(RECIPE), "--shards", str(dots), "--out", str(run), *SHRINK])
    out = capsys.readouterr().out
    assert (e.value.code or 0) == 0, out
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["step"] == 4
    for m in lines:
        assert m["val_samples"] == len(hands_of) and m["val_hands"] == sum(hands_of.values())
        assert 0 <= m["val_ap50"] <= 1 and 0 <= m["val_recall"] <= 1 and np.isfinite(m["val_loss"])
    assert "AP50" in out and "recall" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_ap50"] == max(m["val_ap50"] for m in lines)
    net, spec = load_detector(run / "checkpoints" / "best.pt")
    assert isinstance(net, CenterNet) and spec.size == 64 and spec.min_score == 0.3 and net.stride == 8
    config = (run / "config.toml").read_text()
    assert 'arch = "centernet"' in config and "[layout]" in config and "mosaic = 0.5" in config


def test_trainer_checkpoint_round_trip(dots: Path, tmp_path: Path) -> None:
    """save_checkpoints (the trainer's own code) -> load_detector -> the same outputs."""
    cfg = load_config(
        TrainConfig,
        RECIPE,
        {
            "shards": str(dots),
            "out": str(tmp_path / "run"),
            "image_size": "64",
            "width": "4",
            "device": "cpu",
        },
    )
    world = setup_world("cpu")
    raw, _, opt, scaler = build(cfg, world)
    raw.train()
    raw(torch.randn(4, 3, 64, 64))  # move the BN statistics off their initial values
    raw.eval()
    from handpose.loader import make_loader

    sets = make_loader(dots, "val", task="detect", image_size=64, batch_size=2, workers=0).sets
    save_checkpoints(
        cfg,
        world,
        tmp_path / "run",
        sets,
        raw,
        opt,
        make_scheduler(cfg, opt, 1),
        scaler,
        LoopState(),
        best=True,
    )
    net, spec = load_detector(tmp_path / "run" / "checkpoints" / "best.pt")
    assert spec.mean == tuple(sets[0].mean) and spec.std == tuple(sets[0].std)
    trained, saved = raw.state_dict(), checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")["model"]
    assert trained.keys() == saved.keys() and all(torch.equal(trained[k], saved[k]) for k in trained)
    # load_detector folds BN into the convs; so does this copy of the trainer's model, in the
    # trainer's layout: the same kernels, bit for bit
    folded = fold_batchnorm(copy.deepcopy(raw))
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(folded(x), net(x))
        assert torch.allclose(raw(x), net(x), atol=1e-5)
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["config"]["arch"] == "centernet" and state["config"]["layout"]["mosaic"] == 0.5


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"crop": "box"}, "crop must be 'image'"),
        ({"monitor": "val_error_px"}, "no val_error_px"),
        ({"stride": "16"}, "stride"),
        ({"image_size": "48"}, "multiple of 32"),
        ({"loss": "l1"}, "--loss"),
        ({"min_score": "1.5"}, "--min_score"),
        ({"layout.mosaic": "0.9", "layout.canvas": "0.3"}, "layout"),
        ({"arch": "strided", "loss": "l1"}, "for a detector"),
        ({"presence": "true"}, "--presence: .*no presence head"),
        ({"augment.perspective_deg": "10"}, "--augment.perspective_deg: .*no aspect or perspective"),
        ({"augment.aspect": "0.2"}, "--augment.aspect: .*no aspect or perspective"),
    ],
)
def test_detector_recipe_mistakes_name_the_key(
    overrides: dict[str, str], needle: str, tmp_path: Path
) -> None:
    with pytest.raises(HandposeError, match=needle) as e:
        train(RECIPE, {"shards": str(tmp_path), "out": str(tmp_path / "o"), **overrides})
    assert "\n" not in str(e.value)

"""Bundled models: each card agrees with its file (sha256, size, architecture, input, crop,
parameters) and holds what a user needs to know; a damaged file is refused in one line;
`handpose predict hands` and `handpose.load("hands")` are the bundled model; tools/bundle.py
writes a bundle (weights only, a detector too) that loads with its detector."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from predictkit import encode, smooth_image

import handpose
from handpose import checkpoint, models
from handpose.cli import main
from handpose.model import model_from_config
from handpose.predict import predict
from handpose.shards import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def test_every_card_agrees_with_its_files() -> None:
    """sha256 and size of each file as the card lists them; the architecture, input size, crop and
    parameter count of what the file holds; everything the card must say; under 10 MB in all."""
    names = models.bundled_names()
    assert "hands" in names
    total = 0
    for name in names:
        card = models.read_card(name)
        for role, entry in card["files"].items():
            path = models.BUNDLED / entry["file"]
            assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
            state = checkpoint.load(path)
            config = {**checkpoint.OLD_FILES, **state["config"]}
            assert entry["arch"] == config["arch"] and (config["arch"] == "centernet") == (role == "detector")
            assert entry["input_size"] == config["image_size"] and entry["epochs"] == state["epoch"]
            assert entry["crop"] == (state.get("sets") or [{"crop": "image"}])[0]["crop"]
            assert entry["parameters"] == sum(
                t.numel() for t in state["model"].values() if t.is_floating_point()
            )
            assert not set(checkpoint.TRAINING) & set(state)  # weights only
            total += entry["bytes"]
        assert all(d["licence"] and d["name"] for d in card["data"])
        assert (ROOT / card["recipe"]).is_file() and card["command"] and card["commit"] and card["date"]
        for row in card["figures"]["rows"]:
            assert {"input", "mean_px", "pct_box", "pct_image", "pck_box"} <= row.keys()
        bundle = models.bundle(name)
        _, spec = models.load_model(name, torch.device("cpu"))
        assert spec.size == card["files"]["keypoints"]["input_size"]
        assert (bundle.detector is None) == ("detector" not in card["files"])
    assert total < 10_000_000


def test_handpose_models_prints_the_cards(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["models"])
    text = capsys.readouterr().out
    card = models.read_card("hands")
    assert e.value.code == 0
    for needle in (
        "hands:",
        card["files"]["keypoints"]["sha256"],
        card["data"][0]["licence"],
        card["recipe"],
    ):
        assert needle in text, needle
    assert f"commit {card['commit']}" in text


def test_the_name_is_the_bundled_model(tmp_path: Path) -> None:
    """`predict hands` and `load("hands")` load the bundled file (the same rows); a path is a path,
    even one spelled like the name."""
    (tmp_path / "in").mkdir()
    for k in range(3):
        (tmp_path / "in" / f"p{k}.png").write_bytes(encode(smooth_image(120 + 30 * k, 100, k)))
    photos = sorted((tmp_path / "in").iterdir())
    for detector in (False, None):  # one hand per photo; the bundled detector's hands (maybe none)
        out = tmp_path / f"out-{detector}"
        predict("hands", [tmp_path / "in"], out, quiet=True, device="cpu", detector=detector)
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        hands = handpose.load("hands", detector=detector, device="cpu")(photos)
        got = [[[round(float(x), 3), round(float(y), 3)] for x, y in h.keypoints] for hs in hands for h in hs]
        assert got == [[kp[:2] for kp in r["keypoints"]] for r in rows]
        assert detector is None or len(rows) == len(photos)
    assert (
        models.is_bundled("hands")
        and not models.is_bundled("./hands")
        and not models.is_bundled(Path("hands"))
    )
    with pytest.raises(handpose.HandposeError, match="hands: model file not found"):
        handpose.load(Path("hands"))


def _copy_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "bundled"
    shutil.copytree(models.BUNDLED, folder)
    monkeypatch.setattr(models, "BUNDLED", folder)
    return folder


def test_a_damaged_file_or_card_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A byte changed in the bundled file: load, predict and the CLI refuse it in one line naming
    it; a card without a key names the key."""
    folder = _copy_bundle(tmp_path, monkeypatch)
    data = bytearray((folder / "hands.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "hands.pt").write_bytes(bytes(data))
    needle = "bundled model hands: .*hands.pt has sha256 .*, its card says .* reinstall handpose"
    with pytest.raises(handpose.HandposeError, match=needle):
        handpose.load("hands")
    (tmp_path / "a.png").write_bytes(encode(smooth_image(64, 64, 0)))
    with pytest.raises(SystemExit) as e:
        main(["predict", "hands", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and "its card says" in err
    assert not (tmp_path / "out").exists()
    card = json.loads((folder / "hands.json").read_text())
    del card["commit"]
    (folder / "hands.json").write_text(json.dumps(card))
    with pytest.raises(handpose.HandposeError, match=r"bundled model hands: card .*hands.json lacks commit"):
        handpose.load("hands")


def _detector(path: Path) -> None:
    torch.manual_seed(0)
    config = {"arch": "centernet", "width": 4, "depth": 1, "image_size": 64, "stride": 8, "loss": "focal"}
    state = {
        "model": model_from_config(config).state_dict(),
        # random weights: every peak it finds; trained, as the configs say, on a machine's folders
        "config": config | {"min_score": 0.0, "out": "/machine/runs/det", "shards": ["/machine/data/hk"]},
        "norm": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]},
        "epoch": 3,
        "step": 30,
        "rng": [{"torch": torch.get_rng_state()}],
        "world_size": 1,
    }
    checkpoint.save(path, state)


def _bundle_tool(monkeypatch: pytest.MonkeyPatch, folder: Path) -> Any:
    spec = importlib.util.spec_from_file_location("bundle_tool", ROOT / "tools" / "bundle.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "BUNDLED", folder)
    return tool


def test_bundle_tool_over_the_size_limit_leaves_the_bundle_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _copy_bundle(tmp_path, monkeypatch)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    tool = _bundle_tool(monkeypatch, folder)
    monkeypatch.setattr(tool, "MAX_BYTES", 1000)
    _detector(tmp_path / "det.pt")
    argv = [
        "bundle.py",
        "hands",
        "--keypoints",
        str(folder / "hands.pt"),
        "--detector",
        str(tmp_path / "det.pt"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="over the 0 MB limit"):
        tool.main()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    models.bundle("hands")


def test_bundle_tool_writes_a_bundle_with_a_detector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """tools/bundle.py: weights-only files beside a card the loader accepts; `load(NAME)` then
    finds every hand with the bundle's detector; `handpose models` lists both files."""
    folder = _copy_bundle(tmp_path, monkeypatch)
    tool = _bundle_tool(monkeypatch, folder)
    _detector(tmp_path / "det.pt")
    hands = {
        "rows": [
            {"model": "trained (x)", "input": "labelled boxes", "mean_px": 1.0, "pct_box": 2.0}
            | {"pct_image": 3.0, "pck_0.2_box": 0.9},
            {"model": "mean training pose", "input": "labelled boxes", "mean_px": 9.0, "pct_box": 9.0}
            | {"pct_image": 9.0, "pck_0.2_box": 0.1},
        ]
    }
    (tmp_path / "hands.json").write_text(json.dumps(hands))
    argv = [
        "bundle.py",
        "mini",
        "--keypoints",
        str(folder / "hands.pt"),
        "--detector",
        str(tmp_path / "det.pt"),
        "--min-score",
        "0.05",  # random weights: its peaks score about 0.1
    ]
    argv += ["--figures", str(tmp_path / "hands.json"), "--card", str(folder / "hands.json")]
    monkeypatch.setattr(sys, "argv", argv)
    tool.main()
    card = models.read_card("mini")
    assert (
        set(card["files"]) == {"keypoints", "detector"} and card["files"]["detector"]["arch"] == "centernet"
    )
    assert card["figures"]["rows"] == [
        {"input": "labelled boxes", "mean_px": 1.0, "pct_box": 2.0, "pct_image": 3.0, "pck_box": 0.9}
    ]
    assert "rng" not in checkpoint.load(folder / "mini-detector.pt")
    assert card["files"]["detector"]["min_score"] == 0.05
    config = checkpoint.load(folder / "mini-detector.pt")["config"]  # names, no machine's paths
    assert config["out"] == "det" and list(config["shards"]) == ["hk"]
    assert checkpoint.load(folder / "mini-detector.pt")["config"]["min_score"] == 0.05
    model = handpose.load("mini", device="cpu", min_score=0.05)  # hand scores of random weights are low
    assert model.detector is not None and handpose.load("mini", detector=False, device="cpu").detector is None
    photo = smooth_image(160, 120, 5)
    found = model(photo)
    net, det_spec = model.detector
    from handpose.detector import detect_photos

    # the boxes cropped: those scoring at least the shipped min_score (detect_photos' default)
    ((boxes, scores),) = detect_photos(net, det_spec, [encode(photo)], max_hands=4)
    assert len(found) == len(boxes) > 0
    for h in found:  # every box, with its hand score; the hands ranked by it
        k = int(np.abs(boxes - h.box).max(axis=1).argmin())
        assert np.abs(h.box - boxes[k]).max() < 1e-9  # type: ignore[operator]
        assert h.score == pytest.approx(np.sqrt(scores[k] * np.mean(h.scores)))
    assert [h.score for h in found] == sorted((h.score for h in found), reverse=True)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["models", "mini"])
    text = capsys.readouterr().out
    assert "keypoints: mini.pt" in text and "detector: mini-detector.pt (centernet, 64 px" in text
    # predict runs a bundled model's own detector by default: the API's hands, row for row
    (tmp_path / "p.png").write_bytes(encode(photo))
    predict("mini", [tmp_path / "p.png"], tmp_path / "out", device="cpu", quiet=True, min_score=0.05)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(found)
    for row, hand in zip(rows, found, strict=True):
        assert np.abs(np.array(row["keypoints"])[:, :2] - hand.keypoints).max() <= 5e-4
        assert row["hand_score"] == pytest.approx(hand.score, abs=1e-4)
    predict("mini", [tmp_path / "p.png"], tmp_path / "whole", device="cpu", quiet=True, detector=False)
    assert len((tmp_path / "whole" / "predictions.jsonl").read_text().splitlines()) == 1

"""`handpose export` and the onnxruntime runner: every architecture round trips with PyTorch's
keypoints (inference.forward on the same crops), the metadata reads back into predict's spec, bad
files and a missing extra are one line, and only --out is written."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yolokit
from predictkit import encode, noise_image, smooth_image

from handpose import __version__, checkpoint
from handpose.checkpoint import load_model
from handpose.cli import main
from handpose.errors import HandposeError
from handpose.export import export
from handpose.inference import crops_of, forward, image_size_of
from handpose.model import ShallowUNet, model_from_config
from handpose.models import detector_path
from handpose.onnx_model import METADATA, load_onnx, read_metadata, spec_from_metadata
from handpose.predict import predict
from handpose.skeleton import JOINT_NAMES

MEAN_PX, MAX_PX = 0.01, 0.05  # the parity targets, model-input pixels
CONFIGS = {
    "unet": {"arch": "unet", "width": 4, "depth": 2, "image_size": 32, "sigma": 2.0, "loss": "iou"}
    | {"index_offset": 0.5, "box_pad": 1.4},
    "strided": {"arch": "strided", "width": 4, "depth": 1, "image_size": 32, "sigma": 3.0, "loss": "l1"}
    | {"index_offset": 0.5, "reg": 1.0},
}


def _sharpen(net: torch.nn.Module) -> torch.nn.Module:
    """Random BN statistics and a scaled output layer: maps (and keypoints) that move with the
    input, so parity is tested on keypoints spread over the crop, not on image centres."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        last = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        if isinstance(net, ShallowUNet):  # sigmoid maps: mostly below 0.5, so their means move
            last.weight.mul_(20.0)
            last.weight.sub_(3.0 * last.weight.abs().mean())
        else:  # logits: from near zero (a flat softmax) to peaked maps
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 6.0)
    return net


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source files: the tutorial's bare state_dict and a checkpoint of each arch."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    paths = {"tutorial": d / "model_final"}
    torch.save(_sharpen(ShallowUNet(16, 3)).state_dict(), paths["tutorial"])
    for arch, config in CONFIGS.items():
        paths[arch] = d / f"{arch}.pt"
        state = {
            "model": _sharpen(model_from_config(config)).state_dict(),
            "config": config,
            "norm": {"mean": [0.45, 0.4, 0.35], "std": [0.25, 0.2, 0.22]},
            "epoch": 1,
            "step": 1,
            "sets": [{"crop": "box" if arch == "strided" else "image"}],
            "boxes": {"box_to_keypoints": 1.33},
        }
        checkpoint.save(paths[arch], state)
    return paths


@pytest.fixture(scope="module")
def exported(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, path in models.items():
        out[name] = d / f"{name}.onnx"
        summary = export(path, out[name], quiet=True)
        assert summary["parity_max_px"] <= MAX_PX
    return out


def _input(data: bytes, spec: Any, box: np.ndarray | None = None) -> np.ndarray:
    """The model input predict makes of one photo and box (None: the whole photo)."""
    (crop,) = crops_of(data, *image_size_of(data), [box], spec)
    assert crop.input is not None
    return crop.input


def _crops(spec_size: int, spec: object) -> np.ndarray:
    """Predict's own crops of generated photos: whole images and hand boxes, smooth and noisy."""
    crops = []
    for k, (w, h) in enumerate([(200, 150), (96, 128), (640, 480), (50, 70), (300, 300)]):
        image = smooth_image(w, h, k) if k % 2 == 0 else noise_image(w, h, k)
        data = encode(image, "JPEG", quality=90)
        box = None if k < 3 else np.array([w * 0.2, h * 0.1, w * 0.7, h * 0.8])
        crops.append(_input(data, spec, box))
    out = np.stack(crops)
    assert out.shape[1:] == (spec_size, spec_size, 3)
    return out


@pytest.mark.parametrize("name", ["tutorial", "unet", "strided"])
def test_round_trip_matches_pytorch(name: str, models: dict[str, Path], exported: dict[str, Path]) -> None:
    """The .onnx on onnxruntime gives inference.forward's keypoints and scores for any batch size."""
    net, spec = load_model(models[name], torch.device("cpu"))
    runner, onnx_spec = load_onnx(exported[name], device="cpu")
    crops = _crops(spec.size, spec)
    with torch.inference_mode():
        ref_uv, ref_score = forward(net, torch.from_numpy(crops), spec)
    assert ref_uv.reshape(-1, 2).std(axis=0).min() > 1.0  # keypoints spread: the test can fail
    for batch in (1, len(crops)):
        parts = [runner(crops[k : k + batch]) for k in range(0, len(crops), batch)]
        uv, score = np.concatenate([u for u, _ in parts]), np.concatenate([s for _, s in parts])
        assert uv.shape == (len(crops), 21, 2) and uv.dtype == np.float64
        assert score.shape == (len(crops), 21) and score.dtype == np.float32
        d = np.abs(uv - ref_uv)
        assert d.mean() <= MEAN_PX and d.max() <= MAX_PX, (d.mean(), d.max())
        assert np.abs(score - ref_score).max() <= 1e-4
    assert onnx_spec.size == spec.size and runner.providers[-1] == "CPUExecutionProvider"


@pytest.mark.parametrize("name", ["tutorial", "unet", "strided"])
def test_metadata_reads_back_into_the_spec(
    name: str, models: dict[str, Path], exported: dict[str, Path]
) -> None:
    _, spec = load_model(models[name], torch.device("cpu"))
    meta = read_metadata(exported[name])
    assert set(meta) == set(METADATA)
    assert meta["arch"] == ("unet" if name == "tutorial" else name)
    assert meta["source_sha256"] == hashlib.sha256(models[name].read_bytes()).hexdigest()
    assert meta["handpose.version"] == __version__
    assert meta["joint_names"].count('"') == 2 * len(JOINT_NAMES)
    _, onnx_spec = load_onnx(exported[name], device="cpu")
    assert onnx_spec.kind == f"onnx ({spec.kind})"
    assert onnx_spec.digest == hashlib.sha256(exported[name].read_bytes()).hexdigest()
    same = ("size", "mean", "std", "preprocess", "crop", "pad", "box_to_keypoints")
    assert {k: getattr(onnx_spec, k) for k in same} == {k: getattr(spec, k) for k in same}  # exact floats
    expected = {
        "tutorial": ("tutorial", "image", 1.25, 1.2),
        "unet": ("warp", "image", 1.4, 1.33),
        "strided": ("warp", "box", 1.25, 1.33),
    }[name]
    assert (onnx_spec.preprocess, onnx_spec.crop, onnx_spec.pad, onnx_spec.box_to_keypoints) == expected


def test_export_is_reproducible_and_holds_no_paths(
    models: dict[str, Path], exported: dict[str, Path], tmp_path: Path
) -> None:
    """The same checkpoint gives the same bytes wherever they are written, and they hold no path
    of this machine (the exporter's stack traces are stripped); --out's folder is made."""
    out = tmp_path / "sub" / "m.onnx"
    summary = export(models["strided"], out, quiet=True)
    data = out.read_bytes()
    assert data == exported["strided"].read_bytes()
    assert summary["sha256"] == hashlib.sha256(data).hexdigest() and summary["bytes"] == len(data)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["sub", "sub/m.onnx"]
    for needle in (
        str(tmp_path),
        str(Path(torch.__file__).parent),
        str(Path(__file__).parents[1]),
        "Traceback",
    ):
        assert needle.encode() not in data


def test_bad_onnx_files_are_one_line(exported: dict[str, Path], tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    good = exported["strided"].read_bytes()
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.onnx").write_text("not a model\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    foreign = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    onnx.save(foreign, tmp_path / "foreign.onnx")
    for name, key, value in (("newer", "handpose.format_version", "99"), ("badsize", "input_size", "abc")):
        m = onnx.load(exported["strided"])
        next(p for p in m.metadata_props if p.key == key).value = value
        onnx.save(m, tmp_path / f"{name}.onnx")
    m = onnx.load(exported["strided"])
    next(p for p in m.metadata_props if p.key == "input_size").value = "64"  # the graph takes 32
    onnx.save(m, tmp_path / "wrongsize.onnx")
    cases = {
        "cut.onnx": "not a readable ONNX model",
        "text.onnx": "not a readable ONNX model",
        "empty.onnx": "not a readable ONNX model",
        "foreign.onnx": "an ONNX model without handpose metadata",
        "newer.onnx": r"handpose ONNX format '99' is newer .* upgrade handpose",
        "badsize.onnx": r"ONNX metadata input_size = 'abc': expected a positive integer",
        "wrongsize.onnx": r"expected one input 'image' uint8 \[B, 64, 64, 3\]",
        "missing.onnx": "model file not found",
    }
    for name, message in cases.items():
        with pytest.raises(HandposeError, match=message) as e:
            load_onnx(tmp_path / name, device="cpu")
        assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(HandposeError, match="--device cuda: this onnxruntime has no CUDA provider"):
        load_onnx(exported["strided"], device="cuda")


def test_spec_from_metadata_names_the_key() -> None:
    from handpose.model import ModelSpec
    from handpose.onnx_model import metadata_of

    spec = ModelSpec(64, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), crop="box", pad=1.3, box_to_keypoints=1.1)
    meta = metadata_of(spec, arch="strided", source_sha256="ab", version="9")
    back = spec_from_metadata(meta, "m.onnx", "cd")
    assert back == ModelSpec(
        64, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "onnx (handpose checkpoint)", "warp", "box", 1.3, 1.1, "cd"
    )
    for key, value, needle in (
        ("std", "[0.4, 0, 0.6]", "std = '[0.4, 0, 0.6]': expected [r, g, b], each > 0"),
        ("crop", "hand", "crop = 'hand': expected image | box"),
        ("joint_names", '["wrist"]', "expected the 21 joint names"),
    ):
        with pytest.raises(HandposeError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            spec_from_metadata({**meta, key: value}, "m.onnx", "cd")
    with pytest.raises(HandposeError, match="m.onnx: ONNX metadata lacks 'box_pad'"):
        spec_from_metadata({k: v for k, v in meta.items() if k != "box_pad"}, "m.onnx", "cd")


def test_tutorial_weights_on_real_photos(shared_data: Path, tmp_path: Path) -> None:
    """The tutorial's trained model_final, exported, on predict's crops of real hand photos."""
    source = shared_data / "tutorial-weights" / "model_final"
    photos = sorted((shared_data / "hand-keypoints" / "sample" / "val" / "images").glob("*.jpg"))[:12]
    assert photos
    export(source, tmp_path / "tutorial.onnx", quiet=True)
    net, spec = load_model(source, torch.device("cpu"))
    runner, _ = load_onnx(tmp_path / "tutorial.onnx", device="cpu")
    crops = np.stack([_input(p.read_bytes(), spec) for p in photos])
    with torch.inference_mode():
        ref, _ = forward(net, torch.from_numpy(crops), spec)
    d = np.abs(runner(crops)[0] - ref)
    assert d.mean() <= MEAN_PX and d.max() <= MAX_PX, (d.mean(), d.max())


# ----------------------------------------------------------------------------- predict model.onnx


def _keypoints(out: Path) -> np.ndarray:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return np.array([r["keypoints"] for r in rows])


@pytest.mark.parametrize("name", ["unet", "strided"])
def test_predict_onnx_writes_what_the_checkpoint_writes(
    name: str, models: dict[str, Path], exported: dict[str, Path], tmp_path: Path
) -> None:
    """`predict model.onnx` on a labelled YOLO dataset (whole photos with the default refinement,
    and --boxes gt): the checkpoint's files and report keys, keypoints within the parity targets
    in original pixels, the run recorded as onnx."""
    root = yolokit.write_dataset(tmp_path / "yolo", yolokit.default_spec())
    for boxes in (None, "gt"):
        outs = {}
        for kind, model in (("pt", models[name]), ("onnx", exported[name])):
            outs[kind] = tmp_path / f"{kind}-{boxes}"
            predict(
                model, [root], outs[kind], split="train", boxes=boxes, overlays=2, quiet=True, device="cpu"
            )
        pt, onnx = outs["pt"], outs["onnx"]
        runs = {k: json.loads((v / "run.json").read_text()) for k, v in outs.items()}
        assert runs["pt"]["files"] == runs["onnx"]["files"] and "report.json" in runs["pt"]["files"]
        assert (
            runs["onnx"]["model"] == "onnx (handpose checkpoint)"
            and runs["onnx"]["refine"] == runs["pt"]["refine"]
        )
        reports = [json.loads((v / "report.json").read_text()) for v in (pt, onnx)]
        assert reports[0].keys() == reports[1].keys()
        a, b = _keypoints(pt), _keypoints(onnx)
        assert a.shape == b.shape and a[..., :2].reshape(-1, 2).std(axis=0).min() > 5.0
        d = np.abs(a[..., :2] - b[..., :2])
        assert d.mean() <= MEAN_PX and d.max() <= MAX_PX, (d.mean(), d.max())
        assert np.abs(a[..., 2] - b[..., 2]).max() < 2.5e-4  # two units of the printed 4th decimal
        assert (pt / "errors.jsonl").read_bytes() == (onnx / "errors.jsonl").read_bytes()


def test_bundled_model_onnx_parity_on_real_photos(shared_data: Path, tmp_path: Path) -> None:
    """The bundled keypoint model (trained on real photos), exported, predicts the real val photos
    of the sample within the parity targets of its checkpoint (original pixels), in one pass and
    with the refinement pass, on whole photos and on the bundled detector's boxes (PyTorch in both
    runs: the export holds the keypoint model alone). The refinement crop is cut where the first
    pass put the hand: snapped to a grid (`geometry.steady_region`), the float rounding of the
    two runtimes (3e-5 px) no longer moves it; unsnapped, these photos differed by up to 0.057 px."""
    photos = shared_data / "hand-keypoints" / "sample" / "val" / "images"
    export("hands", tmp_path / "hands.onnx", quiet=True)
    for refine, detector in ((0, False), (1, False), (1, detector_path("hands"))):
        outs = []
        for model in ("hands", tmp_path / "hands.onnx"):
            out = tmp_path / f"{Path(model).suffix or 'pt'}-{refine}-{detector}"
            predict(model, [photos], out, quiet=True, device="cpu", detector=detector, refine=refine)
            outs.append(out)
        a, b = _keypoints(outs[0]), _keypoints(outs[1])
        assert len(a) == len(b) >= (100 if detector is False else 50)  # a row per photo; per hand found
        d = np.abs(a[..., :2] - b[..., :2])
        assert d.mean() <= MEAN_PX and d.max() <= MAX_PX, (refine, detector, d.mean(), d.max())


def test_refinement_does_not_depend_on_the_batch_size(shared_data: Path, tmp_path: Path) -> None:
    """PyTorch at batch 1 and batch 8 answers a crop with float rounding apart (3e-5 input px);
    the refinement crops, snapped to a grid, are the same, so the bundled model's predictions
    (detector, then one refinement pass) agree to the written 0.001 px on the real val photos.
    Unsnapped (the crops cut exactly where the detector and the first pass put the hand), 49 of
    the 75 hands moved by more than 0.001 px."""
    photos = shared_data / "hand-keypoints" / "sample" / "val" / "images"
    outs = []
    for batch in (1, 8):
        outs.append(tmp_path / f"b{batch}")
        predict("hands", [photos], outs[-1], quiet=True, device="cpu", batch_size=batch)
    a, b = _keypoints(outs[0]), _keypoints(outs[1])
    assert len(a) == len(b) > 0
    moved = (np.abs(a[..., :2] - b[..., :2]).max(axis=(1, 2)) > 0.0011).sum()
    assert moved <= 1, f"{moved} of {len(a)} hands moved by more than 0.001 px"


def test_weights_only_export(models: dict[str, Path], tmp_path: Path) -> None:
    """--out NAME.pt: the checkpoint without its training state (optimizer moments here), a
    smaller file that loads to the same model (same keypoints); the tutorial's bare weights and
    an existing --out are refused in one line."""
    source = tmp_path / "full.pt"
    net = model_from_config(CONFIGS["strided"])
    optimizer = torch.optim.AdamW(net.parameters())
    net(torch.zeros(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = checkpoint.load(models["strided"]) | {"optimizer": optimizer.state_dict(), "world_size": 1}
    checkpoint.save(source, {k: v for k, v in state.items() if k not in ("format", "version", "sha256")})
    summary = export(source, tmp_path / "w.pt", quiet=True)
    small = checkpoint.load(tmp_path / "w.pt")
    assert summary["bytes"] < summary["source_bytes"] and summary["arch"] == "strided"
    assert not set(checkpoint.TRAINING) & set(small) and set(checkpoint.REQUIRED) <= set(small)
    full = checkpoint.load(source)
    assert all(torch.equal(small["model"][k], full["model"][k]) for k in full["model"])
    crops = _crops(32, load_model(source, torch.device("cpu"))[1])
    outs = []
    with torch.inference_mode():
        for path in (source, tmp_path / "w.pt"):
            loaded, spec = load_model(path, torch.device("cpu"))
            outs.append(forward(loaded, torch.from_numpy(crops), spec)[0])
    assert np.array_equal(outs[0], outs[1])
    with pytest.raises(HandposeError, match="model_final: not a handpose checkpoint .* weights only already"):
        export(models["tutorial"], tmp_path / "t.pt")
    with pytest.raises(HandposeError, match="unet.pt: exists; pass --overwrite"):
        export(models["strided"], models["unet"])


# ----------------------------------------------------------------------------- the command


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_cli_export_and_its_mistakes(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mistakes are one line and write nothing; --out is replaced only with --overwrite, and it
    is the one file written (no temp file left)."""
    out = tmp_path / "t.onnx"
    out.write_bytes(b"an older export")
    (tmp_path / "folder.onnx").mkdir()
    cases = [
        (["export", str(models["unet"]), "--out", str(out)], "exists; pass --overwrite"),
        (["export", str(models["unet"]), "--out", str(tmp_path / "m.txt")], "ending in .onnx"),
        (["export", str(models["unet"]), "--out", str(tmp_path / "folder.onnx")], "is a folder"),
        (["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "n.onnx")], "model file not found"),
        (["export", str(out), "--out", str(tmp_path / "n2.onnx")], "not a PyTorch file"),
        (
            ["export", str(models["unet"]), "--out", str(tmp_path / "a.txt" / "m.onnx")],
            "a.txt: is a file, not a folder",
        ),
    ]
    (tmp_path / "a.txt").write_text("a file\n")
    for argv, needle in cases:
        code, _, err = _run(argv, capsys)
        assert code == 1 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert out.read_bytes() == b"an older export"
    code, text, _ = _run(["export", str(models["unet"]), "--out", str(out), "--overwrite"], capsys)
    assert code == 0 and "exported unet (handpose checkpoint, 32 px)" in text
    assert load_onnx(out, device="cpu")[1].size == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "folder.onnx", "t.onnx"]


@pytest.mark.parametrize("module", ["onnx", "onnxscript", "onnxruntime"])
def test_export_without_the_extra_is_one_line(
    module: str,
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    code, _, err = _run(["export", str(models["unet"]), "--out", str(tmp_path / "m.onnx")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"handpose export needs {module}: pip install 'handpose[onnx]'" in err
    assert not any(tmp_path.iterdir())
    if module == "onnxruntime":
        with pytest.raises(HandposeError, match=r"needs onnxruntime: pip install 'handpose\[onnx\]'"):
            load_onnx(tmp_path / "m.onnx")


def test_bench_onnx_measures_every_runtime(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The benchmark runs end to end on a given checkpoint: a row per runtime and batch size with
    its ratio to PyTorch's row (no timing is checked)."""
    import json

    from handpose.bench.onnx import bench_onnx

    rows = bench_onnx([models["strided"]], batch_sizes=(1, 2), threads=1, rounds=1)
    assert [(r["batch_size"], r["runtime"]) for r in rows] == [
        (b, rt) for b in (1, 2) for rt in ("pytorch", "onnxruntime", "onnxruntime, spinning")
    ]
    for r in rows:
        base = next(x for x in rows if x["runtime"] == "pytorch" and x["batch_size"] == r["batch_size"])
        assert r["vs_pytorch"] == round(r["images_per_s"] / base["images_per_s"], 3)
        assert (r["arch"], r["input_px"], r["model"]) == ("strided", 32, "strided.pt")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == rows

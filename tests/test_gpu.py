"""The GPU paths, on a CUDA machine: DALI's GPU decode, bf16 + channels_last training,
`compile = true`, predict on CUDA, NCCL. Marked `cuda`: where torch sees no CUDA device they
skip with the reason (conftest.py); `make gpu-check` runs them (tools/gpu_check.py, docs/gpu.md).

Each states its tolerance and records what it measured (`record_property`: the junit XML that
gpu-check reads), so a run on a GPU leaves the figures behind, not only a pass.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from handpose import checkpoint
from handpose.distributed import setup_world
from handpose.loader import denormalise
from handpose.loader import make_loader as make_batches
from handpose.model import model_from_config
from handpose.shards import read_manifest
from handpose.train import TrainConfig, build, loader_for, seed_everything, train, train_step

TESTS = Path(__file__).resolve().parent
Record = Callable[[str, object], None]  # pytest's record_property fixture

# DALI "mixed" (nvJPEG, the GPU's hardware JPEG decoder where it has one) against DALI's CPU
# decoder (libjpeg-turbo), both with libjpeg-turbo's chroma upsampling: the two inverse DCTs may
# round differently by a grey level or two per channel; the warp then averages neighbouring
# pixels. Un-normalised grey levels (0..255):
DALI_MAX_GREY = 4.0  # any pixel of any sample
DALI_MEAN_GREY = 0.5  # mean over a sample's pixels
# predict on CUDA runs the model under bf16 autocast, the CPU in fp32. This test's comparison run
# on the CPU, once plainly and once inside torch.autocast("cpu", torch.bfloat16), moved the
# keypoints by 0.023 px on average and 0.074 px at most (model-input px, 64 px input): these
# bounds leave ten times that for the GPU's own kernels. In a 224 px photo 1 input px = 3.5 px.
PREDICT_MEAN_PX = 0.25
PREDICT_MAX_PX = 1.0


def _by_key(loader: Any, manifest: Any) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{key: (image (3, H, W) in grey levels, uv, visible)} over one pass, on the CPU."""
    out = {}
    for b in loader:
        images = denormalise(b["image"].float().cpu(), manifest).numpy()
        uvs, visible = b["uv"].cpu().numpy(), b["visible"].cpu().numpy()
        for k, im, uv, vis in zip(b["key"], images, uvs, visible, strict=True):
            out[k] = (im, uv, vis)
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("crop", ["image", "box"])
def test_dali_gpu_decode_matches_the_cpu_graph(packed: Path, crop: str, record_property: Record) -> None:
    """The DALI kind on the GPU ("mixed" decode, GPU warp and normalisation) gives the CPU graph's
    batches: the same keys, keypoints to 1e-4 px, the same visibility, images within
    DALI_MAX_GREY / DALI_MEAN_GREY grey levels."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'handpose[dali]')")
    manifest = read_manifest(packed)
    common: dict[str, Any] = dict(kind="dali", batch_size=8, workers=2, crop=crop)
    gpu = _by_key(make_batches(packed, "val", device="cuda", **common), manifest)
    cpu = _by_key(make_batches(packed, "val", device="cpu", **common), manifest)
    assert sorted(gpu) == sorted(cpu) and len(cpu) == manifest.count("val")
    worst, means = 0.0, list[float]()
    for k, (im, uv, vis) in cpu.items():
        g_im, g_uv, g_vis = gpu[k]
        np.testing.assert_allclose(g_uv, uv, atol=1e-4, err_msg=k)
        assert (g_vis == vis).all(), k
        diff = np.abs(g_im - im)
        worst, means = max(worst, float(diff.max())), [*means, float(diff.mean())]
    record_property("max_grey", round(worst, 3))
    record_property("mean_grey", round(float(np.mean(means)), 4))
    record_property("worst_sample_mean_grey", round(max(means), 4))
    assert worst <= DALI_MAX_GREY, f"a pixel differs by {worst:.2f} grey levels"
    assert max(means) <= DALI_MEAN_GREY, f"a sample differs by {max(means):.3f} grey levels on average"


def _step_config(packed: Path, device: str, **kw: Any) -> TrainConfig:
    """A small model on the shared pack: 64 px, width 8, AdamW (converges in few steps)."""
    base: dict[str, Any] = dict(
        shards=(str(packed),), device=device, image_size=64, width=8, sigma=2.0, batch_size=16,
        workers=0, optimizer="adamw", lr=1e-2, schedule="constant", precision="bf16",
        channels_last=True, verify=False,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_train_steps_are_finite_and_lower_the_loss(
    packed: Path, device: str, record_property: Record
) -> None:
    """The recipe's precision = "bf16" and channels_last: on CUDA the forward runs in bf16 on
    channels_last weights; on the CPU the same code runs in fp32. Ten real train steps on one
    batch: every loss finite, the last below the first, every weight finite."""
    cfg = _step_config(packed, device)
    world = setup_world(device)
    seed_everything(cfg.seed)
    raw, model, opt, scaler = build(cfg, world)
    model.train()
    batch = next(iter(loader_for(cfg, world, "train")))
    dtypes: list[torch.dtype] = []
    raw.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    losses = [float(train_step(model, raw, batch, opt, scaler, cfg, world)) for _ in range(10)]
    record_property("losses", [round(x, 5) for x in losses])
    conv = next(p for p in raw.parameters() if p.dim() == 4)
    if device == "cuda":
        assert set(dtypes) == {torch.bfloat16}
        assert conv.is_contiguous(memory_format=torch.channels_last)
    else:
        assert set(dtypes) == {torch.float32}
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    assert all(torch.isfinite(p).all() for p in raw.parameters())


@pytest.mark.cuda
def test_compile_runs_through_the_train_path(packed: Path, tmp_path: Path, record_property: Record) -> None:
    """`compile = true`: the real trainer compiles the model (dynamo captured a graph), trains a
    few bf16 steps with finite losses, validates, and saves the bare model's weights (no
    compile prefixes), which load into a fresh model."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run = tmp_path / "run"
    overrides = {
        "shards": str(packed), "out": str(run), "device": "cuda", "compile": "true",
        "image_size": "64", "width": "8", "depth": "2", "batch_size": "8", "epochs": "1",
        "batches_per_epoch": "4", "val_batches": "1", "workers": "0", "optimizer": "adamw",
        "lr": "0.01", "schedule": "constant", "precision": "bf16",
    }  # fmt: skip
    train(None, overrides)
    record_property("unique_graphs", counters["stats"]["unique_graphs"])
    assert counters["stats"]["unique_graphs"] >= 1, "torch.compile captured no graph"
    (metrics,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_error_px"])
    ck = checkpoint.load(run / "checkpoints" / checkpoint.LAST)
    fresh = model_from_config(ck["config"])
    fresh.load_state_dict(ck["model"])  # strict: the same keys, no "_orig_mod." prefix
    assert ck["step"] == 4


def _predictions(out: Path) -> dict[tuple[str, int], tuple[np.ndarray, float]]:
    """{(path, hand): (uv (21, 2) original px, longer image side)} from predictions.jsonl."""
    rows = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        uv = np.array([k[:2] for k in rec["keypoints"]], np.float64)
        rows[(rec["path"], rec.get("hand", 0))] = (uv, float(max(rec["width"], rec["height"])))
    return rows


@pytest.mark.cuda
def test_predict_on_cuda_matches_the_cpu(
    packed: Path, synth_root: Path, tmp_path: Path, record_property: Record
) -> None:
    """A handpose checkpoint trained for 48 steps on the CPU; `predict` of 8 generated photos on
    CUDA (bf16) and on the CPU (fp32): the same predictions, keypoints within PREDICT_MEAN_PX on
    average and PREDICT_MAX_PX at most (model-input px)."""
    run = tmp_path / "run"
    overrides = {
        "shards": str(packed), "out": str(run), "device": "cpu", "image_size": "64", "width": "8",
        "sigma": "2", "batch_size": "16", "epochs": "1", "batches_per_epoch": "48",
        "val_batches": "1", "workers": "0", "optimizer": "adamw", "lr": "0.01",
        "schedule": "constant", "precision": "fp32",
    }  # fmt: skip
    train(None, overrides)
    model = run / "checkpoints" / checkpoint.BEST
    from handpose.predict import predict

    photos = sorted((synth_root / "training" / "rgb").glob("*.jpg"))[:8]
    for device in ("cpu", "cuda"):
        predict(model, photos, tmp_path / device, device=device, workers=0, quiet=True)
    cpu, gpu = _predictions(tmp_path / "cpu"), _predictions(tmp_path / "cuda")
    assert sorted(cpu) == sorted(gpu) and len(cpu) == len(photos)
    size = checkpoint.load(model)["config"]["image_size"]
    diffs = np.concatenate(
        [np.linalg.norm(gpu[k][0] - uv, axis=1) * size / side for k, (uv, side) in cpu.items()]
    )
    record_property("mean_px", round(float(diffs.mean()), 4))
    record_property("max_px", round(float(diffs.max()), 4))
    assert diffs.mean() <= PREDICT_MEAN_PX and diffs.max() <= PREDICT_MAX_PX, (diffs.mean(), diffs.max())


@pytest.mark.cuda
def test_nccl_initialises(tmp_path: Path, record_property: Record) -> None:
    """torchrun with one process per GPU (at most 2) joins a nccl group and runs all_reduce,
    all_gather_object and broadcast_object_list. On a one-GPU machine that is one process: NCCL
    refuses two ranks on one GPU."""
    n = min(torch.cuda.device_count(), 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    cmd += [str(TESTS / "nccl_probe.py"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]
    record_property("processes", n)
    record_property("nccl", ranks[0]["nccl"])
    for r, got in enumerate(ranks):
        assert got["backend"] == "nccl" and (got["rank"], got["world_size"]) == (r, n)
        assert got["device"] == f"cuda:{r}"
        assert got["sum"] == n * (n + 1) / 2
        assert got["gathered"] == [{"rank": i} for i in range(n)]
        assert got["broadcast"] == {"from": "rank 0"}

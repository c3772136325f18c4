"""Architectures side by side: parameters, forward FLOPs per sample, train-step and inference samples/s.

A train step is what training does for one batch: forward, the model's own loss
(`PoseModel.loss`), backward, an AdamW step, on in-memory random images with random keypoints
(a detector: random boxes) (the step's cost does not depend on the pixel values). Inference is
the forward pass alone in eval mode without gradients plus the model's own `decode` (what
predict runs per batch). The configurations are timed in the SAME
process, interleaved round by round (every configuration once per round), so a load that comes
and goes on a shared machine touches all of them alike; each reports its best and median round,
and the ratio of its best round to the first configuration's (the baseline).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from handpose.model import DETECTORS, PoseModel, model_from_config, model_summary
from handpose.skeleton import NUM_JOINTS

WARMUP = 2  # steps per configuration before the first timed round (allocator, first-call setup)


def _batch(size: int, batch_size: int, gen: torch.Generator, arch: str) -> tuple[torch.Tensor, ...]:
    """Random normalised images with (keypoint models) keypoints inside the frame, ~90% of joints
    visible, or (detectors) up to 4 boxes of 10-60% of the side per image."""
    images = torch.randn(batch_size, 3, size, size, generator=gen)
    if arch in DETECTORS:
        corner = torch.rand(batch_size, 4, 2, generator=gen) * size * 0.4
        side = (0.1 + 0.5 * torch.rand(batch_size, 4, 2, generator=gen)) * size
        hands = torch.rand(batch_size, 4, generator=gen) < 0.6
        return images, torch.cat([corner, corner + side], dim=-1), hands
    uv = torch.rand(batch_size, NUM_JOINTS, 2, generator=gen) * size
    visible = torch.rand(batch_size, NUM_JOINTS, generator=gen) < 0.9
    return images, uv, visible


def _step(model: PoseModel, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    images, *targets = batch
    loss = model.loss(model(images), *targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@torch.no_grad()
def _infer(model: PoseModel, images: torch.Tensor) -> torch.Tensor:
    return model.decode(model(images))[0]


def bench_models(
    configs: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    threads: int = 2,
    steps: int = 5,
    rounds: int = 5,
    seed: int = 0,
    train: bool = True,
) -> list[dict[str, Any]]:
    """Measure each model config dict (MODEL_KEYS, see model.model_from_config) on the CPU in fp32
    with `threads` torch threads; print a table and one JSON line; return one row per config.
    `train=False` times inference only (the train-step columns are then empty)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    runs: list[
        tuple[
            Mapping[str, Any],
            PoseModel,
            torch.optim.Optimizer,
            tuple[torch.Tensor, ...],
            list[float],
            list[float],
        ]
    ] = []
    for cfg in configs:
        model = model_from_config(cfg).train()
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch = _batch(int(cfg["image_size"]), batch_size, gen, str(cfg.get("arch", "unet")))
        for _ in range(WARMUP):
            if train:
                _step(model, opt, batch)
            model.eval()
            _infer(model, batch[0])
            model.train()
        runs.append((cfg, model, opt, batch, [], []))
    for _ in range(rounds):
        for _, model, opt, batch, times, fwd_times in runs:
            if train:
                t0 = time.perf_counter()
                for _ in range(steps):
                    loss = _step(model, opt, batch)
                float(loss)
                times.append(time.perf_counter() - t0)
            model.eval()
            t0 = time.perf_counter()
            for _ in range(steps):
                _infer(model, batch[0])
            fwd_times.append(time.perf_counter() - t0)
            model.train()
    rows = []
    for cfg, model, _, _, times, fwd_times in runs:
        summary = model_summary(model, int(cfg["image_size"]))
        rows.append(
            {
                **{k: cfg[k] for k in ("arch", "width", "depth", "image_size", "stride") if k in cfg},
                **summary,
                "samples_per_s": batch_size * steps / min(times) if times else float("nan"),
                "median_samples_per_s": batch_size * steps / statistics.median(times)
                if times
                else float("nan"),
                "median_infer_per_s": batch_size * steps / statistics.median(fwd_times),
                "infer_per_s": batch_size * steps / min(fwd_times),
            }
        )
    base, infer_base = rows[0]["samples_per_s"], rows[0]["infer_per_s"]
    for row in rows:
        row["vs_first"] = row["samples_per_s"] / base
        row["infer_vs_first"] = row["infer_per_s"] / infer_base
    _print(rows, batch_size, threads, steps, rounds)
    return rows


def _print(rows: list[dict[str, Any]], batch_size: int, threads: int, steps: int, rounds: int) -> None:
    table = Table(
        title=(
            f"train step (forward + loss + backward + AdamW) and inference (forward + decode, eval, "
            f"no grad), batch {batch_size}, fp32, {threads} threads; best of {rounds} interleaved "
            f"rounds of {steps} steps"
        )
    )
    for col in (
        "arch",
        "width",
        "depth",
        "input px",
        "params",
        "fwd MFLOPs",
        "samples/s",
        "median",
        "x first",
        "infer/s",
        "infer x first",
    ):
        table.add_column(col, justify="left" if col == "arch" else "right")
    for r in rows:
        table.add_row(
            str(r.get("arch", "unet")) + (f"/s{r['stride']}" if r.get("arch") in DETECTORS else ""),
            str(r["width"]),
            str(r["depth"]),
            str(r["image_size"]),
            f"{r['params']:,}",
            f"{r['flops_per_sample'] / 1e6:.1f}",
            f"{r['samples_per_s']:.1f}",
            f"{r['median_samples_per_s']:.1f}",
            f"{r['vs_first']:.2f}",
            f"{r['infer_per_s']:.1f}",
            f"{r['infer_vs_first']:.2f}",
        )
    Console(width=max(140, Console().width)).print(table)  # piped output: do not truncate columns
    print(
        json.dumps({"bench": "model", "batch_size": batch_size, "threads": threads, "rows": rows}), flush=True
    )

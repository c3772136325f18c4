"""`handpose bench train`: the real train step fed by the real loader vs by in-memory batches.

Same process, same model, same recipe, same batch shape:
1. `steps` train steps, each taking its batch from the loader (`train.loader_for` with the recipe's
   kind, workers and augmentation), timed after a warm-up that covers worker start-up;
2. `steps` train steps cycling over a few batches already on the device: the step alone.
The difference is the time the step waits for data: `loader_overhead_pct` of the step time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from handpose.config import load_config
from handpose.console import make_console
from handpose.distributed import World, setup_world
from handpose.train import TrainConfig, build, loader_for, seed_everything, train_step

WARMUP = 5  # steps before timing: worker start-up, first-call allocations, (compile)


def _sync(world: World) -> None:
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)


def _time_steps(batches: Any, steps: int, step: Any, world: World) -> float:
    """Seconds for `steps` calls of `step(batch)`; the clock stops when the device is done."""
    _sync(world)
    t0 = time.perf_counter()
    for batch in itertools.islice(batches, steps):
        loss = step(batch)
    loss.item()  # wait for the last step (a host sync point)
    _sync(world)
    return time.perf_counter() - t0


def bench_train(
    shards: str | Path, *, config: str | Path | None = None, loader: str = "wds", steps: int = 30
) -> dict[str, Any]:
    """Print a table and one JSON line: samples_per_s, in_memory_samples_per_s, loader_overhead_pct."""
    cfg = load_config(TrainConfig, config, {"shards": str(shards), "loader": loader})  # "a,b": two folders
    # Resampled training stream of exactly the batches needed, whatever the split's size.
    cfg = dataclasses.replace(cfg, batches_per_epoch=2 * WARMUP + steps)
    world = setup_world(None if cfg.device == "auto" else cfg.device)
    seed_everything(cfg.seed)
    raw, model, opt, scaler = build(cfg, world)
    model.train()

    def step(batch: dict[str, Any]) -> torch.Tensor:
        return train_step(model, raw, batch, opt, scaler, cfg, world)

    stream = iter(loader_for(cfg, world, "train"))
    kept = [next(stream) for _ in range(WARMUP)]  # also the in-memory batches
    for batch in kept:
        step(batch)
    t_loader = _time_steps(stream, steps, step, world)
    for batch in kept:  # warm the in-memory path the same way
        step(batch)
    t_memory = _time_steps(itertools.cycle(kept), steps, step, world)

    samples = steps * cfg.batch_size
    result = {
        "bench": "train",
        "loader": cfg.loader,
        "device": str(world.device),
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "arch": cfg.arch,
        "width": cfg.width,
        "workers": cfg.workers,
        "steps": steps,
        "augment": cfg.augment.enabled,
        "precision": cfg.precision if world.device.type == "cuda" else "fp32",
        "samples_per_s": samples / t_loader,
        "in_memory_samples_per_s": samples / t_memory,
        "step_ms": 1000 * t_memory / steps,
        "loader_overhead_pct": 100 * (t_loader - t_memory) / t_loader,
    }
    table = Table(
        title=f"train step, {cfg.batch_size} x {cfg.image_size} px, width {cfg.width}, {world.device}"
    )
    for col in ("fed by", "samples/s", "ms/step"):
        table.add_column(col, justify="right" if col != "fed by" else "left")
    table.add_row(
        f"{cfg.loader} loader ({cfg.workers} workers)",
        f"{samples / t_loader:.1f}",
        f"{1000 * t_loader / steps:.1f}",
    )
    table.add_row("in-memory batches", f"{samples / t_memory:.1f}", f"{1000 * t_memory / steps:.1f}")
    console = make_console()
    console.print(table)
    console.print(f"loader overhead: {result['loader_overhead_pct']:.1f}% of the step time (target <= 5%)")
    print(json.dumps(result, sort_keys=True), flush=True)
    return result

"""`handpose bench onnx`: onnxruntime against PyTorch, the same model's forward pass on the same
uint8 crops, on the CPU.

Each model is exported by the real `handpose export`; PyTorch runs `inference.forward` on the model
as predict loads it (channels_last, inference mode), onnxruntime runs the exported graph
(`onnx_model.OnnxModel`); both include normalisation and decoding, neither includes cutting the
crops. Both get `threads` intra-op threads; onnxruntime is timed as `load_onnx` sets it up (idle
threads sleep) and with its own default (idle threads spin). Rows are timed in interleaved
rounds (every row once per round) and keep their best round, so a neighbour's burst on a shared
machine slows one sample of a row, not a whole row; the ratios to PyTorch are of best rounds,
by the wall clock and per CPU second of the process (which moves less on a loaded machine).

Without MODEL files it measures every architecture at the input size predict uses for it, with
random weights (the time does not depend on their values): the tutorial's ShallowUNet (width 16,
depth 3, 128 px) and the strided model of pipelines/hands_cpu.toml (width 16, depth 1, 96 px).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from handpose import checkpoint
from handpose.checkpoint import load_model
from handpose.console import make_console
from handpose.errors import HandposeError
from handpose.export import export, probe_crops
from handpose.inference import forward
from handpose.model import ShallowUNet, model_from_config
from handpose.onnx_model import load_onnx

PYTORCH, ONNXRUNTIME = "pytorch", "onnxruntime"
TARGET_S = 0.25  # each timed sample runs about this long (repeats of one batch)
STRIDED = {
    "arch": "strided",
    "width": 16,
    "depth": 1,
    "image_size": 96,
    "sigma": 4.0,
    "loss": "l1",
    "index_offset": 0.5,
    "reg": 1.0,
}


def bench_onnx(
    models: Sequence[str | os.PathLike] = (),
    *,
    batch_sizes: Sequence[int] = (1, 4, 32),
    threads: int = 2,
    rounds: int = 5,
) -> list[dict[str, Any]]:
    """Images/s of PyTorch and onnxruntime for each model and batch size; returns one row each."""
    if not batch_sizes or min(batch_sizes) < 1 or threads < 1 or rounds < 1:
        raise HandposeError("--batch-sizes, --threads and --rounds must be >= 1")
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        sources = [(Path(m).name, Path(m)) for m in models] or _generated(Path(tmp))
        timers: list[tuple[dict[str, Any], Callable[[], None], int]] = []
        for name, path in sources:
            onnx_path = Path(tmp) / f"{len(timers)}.onnx"
            summary = export(path, onnx_path, quiet=True)
            net, spec = load_model(path, torch.device("cpu"))
            runner, _ = load_onnx(onnx_path, device="cpu", threads=threads)
            spinning, _ = load_onnx(onnx_path, device="cpu", threads=threads, spin=True)
            crops = probe_crops(spec.size, max(batch_sizes))
            for b in batch_sizes:
                batch = crops[:b]
                tensor = torch.from_numpy(batch)
                row = {"model": name, "arch": summary["arch"], "input_px": spec.size, "batch_size": b}

                def run_torch(n: torch.nn.Module = net, t: torch.Tensor = tensor, s: Any = spec) -> None:
                    with torch.inference_mode():
                        forward(n, t, s)

                def run_onnx(r: Any = runner, x: np.ndarray = batch) -> None:
                    r(x)

                def run_spinning(r: Any = spinning, x: np.ndarray = batch) -> None:
                    r(x)

                timers.append(({**row, "runtime": PYTORCH}, run_torch, b))
                timers.append(({**row, "runtime": ONNXRUNTIME}, run_onnx, b))
                timers.append(({**row, "runtime": f"{ONNXRUNTIME}, spinning"}, run_spinning, b))
        rows = _time(timers, rounds)
    for row in rows:
        base = next(r for r in rows if r["runtime"] == PYTORCH and _same(r, row))
        row["vs_pytorch"] = round(row["images_per_s"] / base["images_per_s"], 3)
        row["cpu_vs_pytorch"] = round(row["images_per_cpu_s"] / base["images_per_cpu_s"], 3)
    _print(rows, threads, rounds)
    return rows


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["model"] == b["model"] and a["batch_size"] == b["batch_size"]


def _generated(folder: Path) -> list[tuple[str, Path]]:
    """The default models: every architecture at its predict input size, random weights."""
    torch.manual_seed(0)
    tutorial = folder / "tutorial-unet.pt"
    torch.save(ShallowUNet(16, 3).state_dict(), tutorial)  # a bare state_dict: the tutorial's path
    strided = folder / "strided.pt"
    state = {
        "model": model_from_config(STRIDED).state_dict(),
        "config": STRIDED,
        "norm": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "epoch": 0,
        "step": 0,
    }
    checkpoint.save(strided, state)
    return [("tutorial unet w16 d3", tutorial), ("strided w16 d1", strided)]


def _time(timers: list[tuple[dict[str, Any], Callable[[], None], int]], rounds: int) -> list[dict[str, Any]]:
    """Best images/s of each timer over interleaved rounds (each sample repeats its call for about
    TARGET_S, calibrated on a warm call), by the wall clock and per CPU second of this process
    (all its threads: busy-waiting counts). On a loaded machine the CPU figure moves less."""
    repeats = []
    for _, call, _ in timers:
        call()  # warm-up: first-call allocation, onnxruntime's arena
        start = time.perf_counter()
        call()
        repeats.append(max(1, round(TARGET_S / max(time.perf_counter() - start, 1e-6))))
    best, best_cpu = [0.0] * len(timers), [0.0] * len(timers)
    for _ in range(rounds):
        for k, (_, call, images) in enumerate(timers):
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeats[k]):
                call()
            wall, used = time.perf_counter() - start, time.process_time() - cpu
            best[k] = max(best[k], repeats[k] * images / wall)
            best_cpu[k] = max(best_cpu[k], repeats[k] * images / max(used, 1e-6))
    return [
        {**row, "images_per_s": round(rate, 1), "images_per_cpu_s": round(cpu_rate, 1)}
        for (row, _, _), rate, cpu_rate in zip(timers, best, best_cpu, strict=True)
    ]


def _print(rows: list[dict[str, Any]], threads: int, rounds: int) -> None:
    console = make_console()
    table = Table(
        title=f"forward (normalise + net + decode) on uint8 crops, CPU, {threads} threads; "
        f"best of {rounds} interleaved rounds"
    )
    for col in (
        "model",
        "input px",
        "batch",
        "runtime",
        "images/s",
        "x pytorch",
        "images/cpu-s",
        "x pytorch",
    ):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["input_px"]),
            str(r["batch_size"]),
            r["runtime"],
            f"{r['images_per_s']:.1f}",
            f"{r['vs_pytorch']:.2f}",
            f"{r['images_per_cpu_s']:.1f}",
            f"{r['cpu_vs_pytorch']:.2f}",
        )
    Console(width=max(130, console.width)).print(table)  # piped output: do not truncate columns
    print(json.dumps({"bench": "onnx", "threads": threads, "rows": rows}), flush=True)

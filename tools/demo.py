#!/usr/bin/env python3
"""`make demo`: the whole job end to end on the CPU, as a user would type it.

synth (generated FreiHAND-format hands) -> pack (shards) -> inspect (contact sheet) -> train
(pipelines/cpu_demo.toml) -> predict (test split, report). Every step is the real CLI command,
printed before it runs. Re-running reuses finished steps (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    """Print a handpose command, run it, time it; stop with its exit code if it fails (the
    command has already said why in one line)."""
    cmd = [sys.executable, "-m", "handpose", *args]
    print(f"\n$ handpose {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code:
        sys.exit(code)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo"))
    ap.add_argument("--n", type=int, default=2000, help="generated training ids")
    ap.add_argument("--recipe", default="pipelines/cpu_demo.toml")
    args = ap.parse_args()
    out = args.out.resolve()
    data, shards, run_dir, pred = out / "freihand", out / "shards", out / "run", out / "predict"

    if not (data / "training_K.json").exists():
        run("synth", str(data), "--n", str(args.n), "--versions", "1", "--seed", "0")
    if not (shards / "manifest.json").exists():
        run("pack", str(data), str(shards), "--versions", "gs", "--overwrite")
    run("inspect", str(shards), "--split", "train", "--n", "16", "--png", str(out / "inspect-train.png"))
    run("train", "--config", args.recipe, "--shards", str(shards), "--out", str(run_dir))
    run(
        "predict",
        str(run_dir / "checkpoints" / "best.pt"),
        str(shards),
        "--split",
        "test",
        "--out",
        str(pred),
        "--overlays",
        "8",
    )

    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads((pred / "report.json").read_text())
    base, best = summary["mean_pose_error_px"], summary["best_val_error_px"]
    print("\n== demo result ==")
    print(f"validation error      {best:6.2f} px  (model input {summary['image_size']} px)")
    print(f"mean-pose baseline    {base:6.2f} px  ({base / best:.1f}x worse than the model)")
    print(
        f"test split (predict)  {report['mean_error_px']:6.2f} px mean, {report['mean_error_pct']:.2f}% of "
        f"the image side, PCK AUC {report['auc']:.3f}"
    )
    print(f"training time         {summary['train_seconds'] / 60:.1f} min")
    print(f"files: {out / 'inspect-train.png'}, {pred / 'report.md'}, {run_dir / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()

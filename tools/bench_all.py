#!/usr/bin/env python3
"""`make bench`: every benchmark, one after another on one machine, results in OUT/results.json.

Each benchmark measures its own baseline or limit in the same run (see BENCHMARKS.md); this only
prepares the data once and collects the final JSON line of each command.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT.parent / "shared" / "data" / "tutorial-weights" / "model_final"


def handpose(*args: str) -> dict:
    """Run `handpose ARGS`, echo its output, return its last JSON line."""
    print(f"\n$ handpose {shlex.join(args)}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "handpose", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE, check=True
    )
    print(proc.stdout, end="", flush=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--n", type=int, default=2000, help="generated ids for the loader/train/predict data")
    ap.add_argument("--only", default="pack,loader,dali,train,predict,onnx,video")
    args = ap.parse_args()
    out = args.out.resolve()
    only = set(args.only.split(","))
    data, shards = out / "freihand", out / "shards"
    if not (shards / "manifest.json").exists():
        handpose("synth", str(data), "--n", str(args.n), "--seed", "1")
        handpose("pack", str(data), str(shards), "--shard-size", "1", "--overwrite")

    results: dict = {
        "machine": {
            "cpus": __import__("os").cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        }
    }
    if "pack" in only:
        results["pack"] = handpose("bench", "pack", "--n", "10000", "--workdir", str(out / "pack"))
    if "loader" in only:
        results["loader_wds"] = handpose("bench", "loader", str(shards), "--kind", "wds", "--workers", "2")
    if "dali" in only:
        results["loader_dali"] = handpose("bench", "loader", str(shards), "--kind", "dali", "--workers", "2")
    if "train" in only:
        results["train_tutorial"] = handpose(
            "bench", "train", str(shards), "--config", "pipelines/freihand_tutorial.toml", "--steps", "20"
        )
        results["train_demo"] = handpose("bench", "train", str(shards), "--config", "pipelines/cpu_demo.toml")
    if "predict" in only and TUTORIAL.exists():
        results["predict"] = handpose(
            "bench", "predict", str(TUTORIAL), str(data / "training" / "rgb"), "--limit", "256"
        )
    if "onnx" in only:
        results["onnx"] = handpose("bench", "onnx", "--threads", "2")
    if "video" in only:
        results["video"] = handpose("bench", "video", "--workdir", str(out / "video"))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()

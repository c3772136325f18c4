"""How `handpose predict` scales: peak memory for N and 4N images, and torchrun with 2 ranks
against 1 process, measured on generated data (a YOLO-pose folder of small JPEGs with one
labelled hand each, so the report's streamed statistics run too).

    python tools/predict_scale.py --out bench-out/predict-scale [--n 2000] [--images 400]

memory    each run is a fresh process (one torch thread) that prints its peak resident set
          (getrusage ru_maxrss); the model is a tiny random ShallowUNet checkpoint (width 4,
          depth 1, 32 px input) so the run is about the data, not the model.
torchrun  the tutorial-shaped ShallowUNet (16/3, random weights) on --images photos: one process
          (all cores to torch), one process with one torch thread, and `torchrun
          --nproc_per_node 2` (each rank half the cores); best of --rounds, wall time of the whole
          command (start-up included).
Prints a table, then one JSON line. Figures depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """root/images/NNNNNN.jpg + root/labels/NNNNNN.txt: n 96x80 JPEGs, one hand each."""
    import simplejpeg

    if (root / "done").exists():
        return root
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
    for k in range(n):
        img = np.roll(base, k % 96, axis=1)
        (root / "images" / f"{k:06d}.jpg").write_bytes(simplejpeg.encode_jpeg(img, quality=80))
        cx, cy, w, h = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), 0.4, 0.5
        uv = rng.uniform([cx - w / 2, cy - h / 2], [cx + w / 2, cy + h / 2], (21, 2))
        kps = " ".join(f"{x:.5f} {y:.5f} 2" for x, y in uv)
        (root / "labels" / f"{k:06d}.txt").write_text(f"0 {cx:.5f} {cy:.5f} {w} {h} {kps}\n")
    (root / "done").write_text("")
    return root


def save_unet(path: Path, width: int, depth: int) -> Path:
    """A random tutorial-shaped ShallowUNet as a bare state_dict (predict: the tutorial's path)."""
    import torch

    from handpose.model import ShallowUNet

    torch.manual_seed(0)
    torch.save(ShallowUNet(width, depth).state_dict(), path)
    return path


def save_checkpoint(path: Path, width: int, depth: int, size: int) -> Path:
    """A random ShallowUNet as a handpose checkpoint (predict: warp_to_input, box crops)."""
    import torch

    from handpose import checkpoint
    from handpose.model import ShallowUNet

    torch.manual_seed(0)
    config = {"arch": "unet", "width": width, "depth": depth, "image_size": size, "sigma": 2.0, "loss": "iou"}
    config |= {"box_pad": 1.25}
    state = {"model": ShallowUNet(width, depth).state_dict(), "config": config, "epoch": 0, "step": 0}
    checkpoint.save(
        path, {**state, "norm": {"mean": [0.5] * 3, "std": [0.25] * 3}, "sets": [{"crop": "box"}]}
    )
    return path


def child(args: list[str]) -> None:
    """Run predict in this process and print its peak RSS (MiB) as JSON."""
    from handpose.predict import predict

    model, data, out = args
    start = time.perf_counter()
    summary = predict(model, [data], out, boxes="gt", quiet=True, device="cpu")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"peak_rss_mib": round(peak, 1), "predictions": summary["predictions"], "seconds": seconds}
        )
    )


def measure_memory(work: Path, n: int) -> dict[str, dict]:
    model = save_checkpoint(work / "tiny.pt", 4, 1, 32)
    rows = {}
    for count in (n, 4 * n):
        data = write_dataset(work / f"yolo-{count}", count)
        out = work / f"mem-out-{count}"
        cmd = [sys.executable, __file__, "_child", str(model), str(data), str(out)]
        p = subprocess.run(
            cmd, capture_output=True, text=True, env={**_env(), "OMP_NUM_THREADS": "1"}, check=False
        )
        if p.returncode:
            raise SystemExit(p.stderr[-2000:])
        rows[str(count)] = json.loads(p.stdout.strip().splitlines()[-1])
        row = rows[str(count)]
        print(
            f"memory  {count:>7} images: peak RSS {row['peak_rss_mib']:.1f} MiB ({row['seconds']:.1f} s)",
            flush=True,
        )
    return rows


def measure_torchrun(work: Path, images: int, rounds: int) -> dict[str, float]:
    model = save_unet(work / "unet.pt", 16, 3)
    data = write_dataset(work / f"yolo-{images}", images)
    base = ["-m", "handpose", "predict", str(model), str(data), "--boxes", "gt"]
    one = [sys.executable, *base]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *base]
    runs = {
        "1 process": (one, _env()),
        "1 process, 1 thread": (one, {**_env(), "OMP_NUM_THREADS": "1"}),
        "torchrun 2 ranks": (two, _env()),
    }
    best = dict.fromkeys(runs, 0.0)
    for r in range(rounds):  # interleaved: a neighbour's burst spoils one sample, not a row
        for k, (name, (cmd, env)) in enumerate(runs.items()):
            start = time.perf_counter()
            out = ["--out", str(work / f"tr-{r}-{k}")]
            p = subprocess.run([*cmd, *out], capture_output=True, text=True, env=env, check=False)
            if p.returncode:
                raise SystemExit(p.stderr[-2000:])
            rate = images / (time.perf_counter() - start)
            best[name] = max(best[name], rate)
            print(f"speed   round {r}: {name}: {rate:.1f} images/s", flush=True)
    return best


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    return env


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out/predict-scale"))
    ap.add_argument("--n", type=int, default=2000, help="memory: N and 4N images")
    ap.add_argument("--images", type=int, default=400, help="torchrun: images per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", choices=("memory", "torchrun"), help="leave one measurement out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    memory = measure_memory(args.out, args.n) if args.skip != "memory" else {}
    speed = measure_torchrun(args.out, args.images, args.rounds) if args.skip != "torchrun" else {}
    for name, rate in speed.items():
        print(f"speed   {name:>16}: {rate:.1f} images/s")
    print(
        json.dumps(
            {"bench": "predict-scale", "memory": memory, "images_per_s": speed, "cores": os.cpu_count()}
        )
    )


if __name__ == "__main__":
    main()

"""Training samples/s on a CPU: one process against one torchrun rank per core, same recipe.

    python tools/train_ranks.py --config RECIPE --shards SHARDS [TRAIN OPTIONS] --out DIR
                                [--batches 400] [--rounds 2] [--ranks CORES]

one process   `handpose train --config RECIPE ...` as the recipe has it: torch's threads on every
              core, the recipe's loader workers beside them.
ranks         `torchrun --standalone --nproc_per_node=R -m handpose train ... --batch_size B/R
              --workers 0`: R processes of one torch thread each, each loading its own share of
              the batch in-process; the same samples per optimizer step.
Each run trains 2 epochs of --batches steps (every other option passed to train as given) and
the row is its SECOND epoch's samples/s from metrics.jsonl: the first holds start-up and the
shuffle buffer's filling. The two kinds alternate, --rounds times; each keeps its best. Prints a
table, then one JSON line. Figures depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from hands import launched, recipe_batch  # noqa: E402  (make hands' own launch of the train step)

from handpose.cpu import cores  # noqa: E402


def second_epoch_rate(run: Path) -> float:
    """samples/s of a run's second epoch (metrics.jsonl)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return float(next(r["samples_per_s"] for r in rows if r.get("epoch") == 2))


def commands(config: Path, train: list[str], batches: int, ranks: int, out: Path) -> dict[str, list[str]]:
    """The two launches of the same training (as `make hands` launches it: `hands.launched`),
    each into its own new folder `out`/one, `out`/ranks."""
    batch = recipe_batch(tomllib.loads(config.read_text()))
    common = ["train", "--config", str(config), *train, "--epochs", "2"]
    common += ["--batches_per_epoch", str(batches), "--val_batches", "1"]
    return {
        "one process": launched([*common, "--out", str(out / "one")], batch, 1),
        f"{ranks} ranks x 1 thread": launched([*common, "--out", str(out / "ranks")], batch, ranks),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", type=int, default=400, help="steps per epoch (2 epochs a run)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=cores())
    args, train = ap.parse_known_args()
    if not args.config.is_file():
        sys.exit(f"error: --config {args.config}: no such file")
    batch = recipe_batch(tomllib.loads(args.config.read_text()))
    if args.ranks < 2 or batch % args.ranks:
        sys.exit(f"error: --ranks {args.ranks}: the recipe's batch of {batch} must split into 2 or more")
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"error: --out {args.out}: not empty (each run needs a new folder)")
    best: dict[str, float] = {}
    for k in range(args.rounds):
        runs = commands(args.config, train, args.batches, args.ranks, args.out / f"round{k + 1}")
        for name, argv in runs.items():
            folder = Path(argv[-1])
            code = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL).returncode
            if code:
                sys.exit(f"error: the {name} run into {folder} failed (exit {code}; its error is above)")
            rate = second_epoch_rate(folder)
            print(f"{name}: {rate:.1f} samples/s", flush=True)
            best[name] = max(best.get(name, 0.0), rate)
    (one, r1), (many, r2) = best.items()
    print(f"\n| launch | samples/s (best of {args.rounds}) |\n|---|---|")
    print(f"| {one} | {r1:.1f} |\n| {many} | {r2:.1f} |\n{many} = {r2 / r1:.2f}x one process")
    print(
        json.dumps(
            {
                "one_process": round(r1, 1),
                "ranks": args.ranks,
                "ranks_rate": round(r2, 1),
                "ratio": round(r2 / r1, 3),
                "batch": batch,
                "batches": args.batches,
            }
        )
    )


if __name__ == "__main__":
    main()

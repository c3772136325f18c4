#!/usr/bin/env python3
"""The scaling table: one keypoint recipe trained at several budgets of training time, scored on
the same-source and the other-source validations.

    .venv/bin/python tools/scaling.py --hands HANDS [--minutes 15,30,60,120] [--recipe RECIPE]
                                      [--rate SAMPLES_PER_S] [--out HANDS/scaling]
    .venv/bin/python tools/scaling.py --train "--config RECIPE --shards ... [--crop ...]
                                      [--weights ...] [--val_shards ...]" --out OUT [...]

HANDS is a `make hands` folder: its packs are reused as make hands lays them out (DATA's
shards in the recipe's crops, the EXTRA pack and generated hands in their slots, every VAL pack
as val_shards; tools/hands.py `train_args`), so run make hands first (with EXTRA and VAL).
--train instead gives the `handpose train` arguments of the run to scale (its --config first or
anywhere, its data options; never --epochs or --out), e.g. a bundled model's command.

A budget sets the epochs: epochs = round(minutes x 60 x rate / samples per epoch), at least 1,
and the recipe's schedule (cosine, warm-up) is laid over exactly those epochs, so each budget
is a complete run and its checkpoints and figures are deterministic for a given rate. The rate
is the recipe's training rate in samples/s: `--rate`, or measured first by training the recipe
on the same folders for --rate-batches batches (OUT/rate, its metrics.jsonl's samples_per_s; on
a shared machine the rate, and so the minutes a budget really takes, move with the load: the
table shows the measured training minutes of each run beside its budget).

Each budget trains into OUT/NNmin (`handpose train`, printed, resumable: a re-run skips finished
budgets) and gives one row of OUT/scaling.md and OUT/scaling.json from its summary.json at its
best epoch: the same-source val (box crops: % of the box, PCK@0.2; whole photos: % of the image
side) and each val_shards set (the same figures), which are the numbers `handpose predict`
reports for best.pt with --boxes gt and --refine 0.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from hands import Steps, handpose, recipe_path, train_args  # noqa: E402

from handpose.atomic import write_json, write_text  # noqa: E402
from handpose.config import load_config  # noqa: E402
from handpose.datasets import open_sets, train_batches_per_rank  # noqa: E402
from handpose.errors import HandposeError  # noqa: E402
from handpose.train import TrainConfig  # noqa: E402


def epochs_for(minutes: float, rate: float, samples_per_epoch: int) -> int:
    """Epochs that fill `minutes` of training at `rate` samples/s (at least one)."""
    return max(1, round(minutes * 60 * rate / samples_per_epoch))


def samples_per_epoch(cfg: TrainConfig) -> int:
    """Samples one epoch of this config trains on (one process): its steps x batch size."""
    if cfg.batches_per_epoch:
        return cfg.batches_per_epoch * cfg.batch_size
    crops = list(cfg.crop) * len(cfg.shards) if len(cfg.crop) == 1 else list(cfg.crop)
    sets = open_sets(cfg.shards, "train", crops=crops, pad=cfg.box_pad, weights=cfg.weights or None)
    return train_batches_per_rank(sets, cfg.batch_size, 1, None) * cfg.batch_size


def overrides(argv: Sequence[str]) -> dict[str, str]:
    """`handpose train` arguments after the recipe (`--key value` pairs) as a dict."""
    args = list(argv)
    if len(args) % 2 or any(not a.startswith("--") for a in args[::2]):
        raise HandposeError(f"--train {' '.join(args)}: expected --key value pairs")
    return {args[i][2:]: args[i + 1] for i in range(0, len(args), 2)}


def given_run(train: str) -> tuple[Path, list[str], dict[str, str]]:
    """--train's arguments -> (recipe, the arguments as given, the recipe's overrides)."""
    base = shlex.split(train)
    opts = overrides(base)
    if "config" not in opts:
        raise HandposeError(f"--train {train}: give the recipe as --config RECIPE")
    for key in ("epochs", "out"):
        if key in opts:
            raise HandposeError(f"--train {train}: --{key} is the tool's to set")
    return recipe_path(opts.pop("config")), base, opts


def rate_run(base: Sequence[str], batches: int) -> list[str]:
    """The measuring run's arguments: the run's own `--key value` pairs (`overrides` checked them),
    with its epochs, batches per epoch and val batches replaced, not given twice."""
    replaced = ("--epochs", "--batches_per_epoch", "--val_batches")
    pairs = [(k, v) for k, v in zip(base[::2], base[1::2], strict=True) if k not in replaced]
    kept = [a for pair in pairs for a in pair]
    return [*kept, "--epochs", "1", "--batches_per_epoch", str(batches), "--val_batches", "1"]


def layout(hands_dir: Path, recipe: Path, out: Path) -> list[str]:
    """`handpose train` arguments for `recipe` on a make hands folder's packs (its run's layout)."""
    shards = hands_dir / "shards"
    if not (shards / "manifest.json").is_file():
        raise HandposeError(f"--hands {hands_dir}: no shards/manifest.json (run make hands first)")
    extra = [
        hands_dir / f for f in ("extra-shards", "synth-shards") if (hands_dir / f / "manifest.json").is_file()
    ]
    vals = sorted(p.parent for p in (hands_dir / "val").glob("*/manifest.json"))
    return train_args(recipe, shards, extra, vals, out)


FIGURES = (
    ("% of box", "val_error_pct_box", ".2f"),
    ("PCK@0.2", "val_pck_box", ".3f"),
    ("whole photo % of image side", "val_error_pct", ".2f"),
)


def scaling_row(budget: float, epochs: int, cfg: TrainConfig, run: Path) -> dict[str, Any]:
    """One budget's row: its epochs, measured training minutes, and its best epoch's figures
    (metrics.jsonl) on the same source (the first folder's box crops and DATA's whole photos) and
    on every val_shards folder (box crops and whole photos), each as {figure: value}."""
    summary = json.loads((run / "summary.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    best = next(m for m in lines if m["epoch"] == summary["best_epoch"])
    data = cfg.shards[0]
    sets: dict[str, dict[str, Any]] = {
        "same source": {k: best.get(k) for k in ("val_error_pct_box", "val_pck_box")}
    }
    crops = list(cfg.crop) * len(cfg.shards) if len(cfg.crop) == 1 else list(cfg.crop)
    for folder, crop, name in zip(cfg.shards, crops, cfg.train_names, strict=True):
        if folder == data and crop == "image":  # DATA's whole photos
            key = f"{name}/val_error_pct" if len(cfg.shards) > 1 else "val_error_pct"
            sets["same source"]["val_error_pct"] = best.get(key)
    for folder, crop, name in cfg.val_sets:
        keys = ("val_error_pct_box", "val_pck_box") if crop == "box" else ("val_error_pct",)
        sets.setdefault(Path(folder).name, {}).update({k: best.get(f"{name}/{k}") for k in keys})
    return {
        "budget_minutes": budget,
        "epochs": epochs,
        "train_minutes": summary["train_seconds"] / 60,
        "best_epoch": summary["best_epoch"],
        **sets,
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table: one row per budget, three figures per validation set."""
    sets = [k for k in rows[0] if isinstance(rows[0][k], dict)] if rows else []
    head = ["budget (min)", "epochs", "trained (min)"]
    head += [f"{s}: {label}" for s in sets for label, _, _ in FIGURES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['budget_minutes']:g}", str(r["epochs"]), f"{r['train_minutes']:.1f}"]
        for s in sets:
            for _, key, fmt in FIGURES:
                v = r[s].get(key)
                cells.append("-" if v is None else format(v, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hands", type=Path, help="a make hands output folder (its packs)")
    ap.add_argument("--train", help="instead of --hands: the handpose train arguments of the run to scale")
    ap.add_argument("--minutes", default="15,30,60,120", help="training budgets, minutes [15,30,60,120]")
    ap.add_argument("--recipe", default="pipelines/hands_cpu.toml")
    ap.add_argument("--rate", type=float, help="training samples/s (default: measured first)")
    ap.add_argument("--rate-batches", type=int, default=200, help="batches of the measuring run [200]")
    ap.add_argument("--out", type=Path, help="output folder [HANDS/scaling]")
    args = ap.parse_args(argv)
    try:
        run(args)
    except HandposeError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if (args.hands is None) == (args.train is None):
        raise HandposeError("give --hands HANDS (a make hands folder) or --train ARGS, one of them")
    if args.train is not None and args.out is None:
        raise HandposeError("--train: give --out OUT")
    out = (args.out or args.hands.resolve() / "scaling").resolve()
    try:
        budgets = [float(m) for m in args.minutes.split(",") if m.strip()]
    except ValueError:
        raise HandposeError(f"--minutes {args.minutes}: expected numbers, e.g. 15,30,60,120") from None
    if not budgets or min(budgets) <= 0:
        raise HandposeError(f"--minutes {args.minutes}: give positive minutes")
    if args.train is not None:
        recipe, base, opts = given_run(args.train)
        source = "the given run"
    else:
        recipe = recipe_path(args.recipe)
        base = layout(args.hands.resolve(), recipe, out / "rate")[1:-2]  # between train and --out
        opts, source = overrides(base[2:]), str(args.hands.resolve())
    cfg = load_config(TrainConfig, recipe, opts)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out)
    per_epoch = samples_per_epoch(cfg)
    rate = args.rate
    if rate is None:
        argv = rate_run(base, args.rate_batches)
        steps.run(
            "measure rate",
            handpose("train", *argv, "--out", str(out / "rate")),
            out / "rate" / "summary.json",
        )
        rate = json.loads((out / "rate" / "summary.json").read_text())["final"]["samples_per_s"]
    rows = []
    for budget in budgets:
        epochs = epochs_for(budget, rate, per_epoch)
        run_dir = out / f"{budget:g}min"
        argv = handpose("train", *base, "--epochs", str(epochs), "--out", str(run_dir))
        steps.run(f"train {budget:g} min", argv, run_dir / "summary.json")
        rows.append(scaling_row(budget, epochs, cfg, run_dir))
    text = (
        f"{recipe.name} on {source}: {per_epoch} samples per epoch at {rate:.0f} samples/s "
        f"({'given' if args.rate else 'measured'})\n\n" + table(rows)
    )
    result = {
        "recipe": str(recipe),
        "rate": rate,
        "samples_per_epoch": per_epoch,
        "rows": rows,
        "steps": steps.log,
    }
    write_text(out / "scaling.md", text)
    write_json(out / "scaling.json", result)
    print("\n== scaling ==\n" + text)
    return result


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""`make hands DATA=ROOT`: real photos in, a scored model out, as a user would type it.

pack (YOLO-pose root -> shards) -> train (pipelines/hands_cpu.toml) -> predict on the val split
three ways (the labelled boxes; whole photos, one pass; whole photos with refinement) -> the same
for the tutorial's weights when `--tutorial FILE` is given -> the mean training pose -> ONE table
(mean px, % of the box's longer side, % of the image side, PCK@0.2 of the box), also written to
OUT/hands.md and OUT/hands.json. Every step is the real CLI command, printed before it runs;
re-running reuses finished steps (delete OUT to start over).

With `--synth N` the training mix also gets N generated hands (`handpose synth`), packed beside
the photos; the recipe's `shards`/`weights` decide how they are mixed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import run  # noqa: E402  (tools/demo.py: print each CLI command, run it, time it)

from handpose.geometry import apply_affine, crop_matrix, invert, source_region  # noqa: E402
from handpose.report import box_side, spill_rows, summarise  # noqa: E402
from handpose.shards import decode_annotation, read_manifest, read_samples  # noqa: E402


def row(model: str, label: str, rep: dict) -> dict:
    """One table row from a report (report.json's headline keys)."""
    return {
        "model": model,
        "input": label,
        "mean_px": rep["mean_error_px"],
        "pct_box": rep["mean_error_pct_box"],
        "pct_image": rep["mean_error_pct"],
        "pck_0.2_box": rep["pck_0.2_box"],
    }


def predict_rows(name: str, model: Path, shards: Path, out: Path, refine: int) -> list[dict]:
    """The three predict runs of one model on the val split; one table row each."""
    rows = []
    for slug, label, extra in (
        ("boxes", "labelled boxes", ["--boxes", "gt"]),
        ("whole", "whole photo, 1 pass", ["--refine", "0"]),
        (f"refine{refine}", f"whole photo, {refine + 1} passes", ["--refine", str(refine)]),
    ):
        dest = out / f"{name.split()[0]}-{slug}"
        if not (dest / "report.json").exists():
            run("predict", str(model), str(shards), "--split", "val", "--out", str(dest), *extra)
        rows.append(row(name, label, json.loads((dest / "report.json").read_text())))
    return rows


def mean_pose_rows(shards: Path, pad: float) -> list[dict]:
    """Always answering the train split's mean pose: placed in the whole photo (letterbox) and
    in each labelled box; scored like predict's report."""
    manifest = read_manifest(shards)
    mp = {crop: manifest.mean_pose(crop, 1, pad) for crop in ("image", "box")}  # units of the crop
    preds: dict[str, list] = {"image": [], "box": []}
    gts, vis, boxes, sides = [], [], [], []
    for tar in manifest.shards("val"):
        for sample in read_samples(tar, ("json", "kp.f32", "vis.u8", "box.f32")):
            ann = decode_annotation(sample)
            meta = json.loads(sample["json"])
            w, h = int(meta["width"]), int(meta["height"])
            for crop in ("image", "box"):
                region = source_region(w, h, ann.box if crop == "box" else None, pad)
                preds[crop].append(apply_affine(invert(crop_matrix(region, 1)), mp[crop]))
            gts.append(ann.uv)
            vis.append(ann.labelled)
            boxes.append(ann.box)
            sides.append(max(w, h))
    rows = []
    for where, label in (("box", "labelled boxes"), ("image", "whole photo")):
        spill = spill_rows(
            np.stack(preds[where]),
            np.stack(gts),
            np.stack(vis),
            sides,
            [box_side(b) for b in boxes],
            [
                source_region(s, s, b if where == "box" else None, pad)[2]
                for b, s in zip(boxes, sides, strict=True)
            ],
        )
        # the figures predict's report computes, from the same per-joint rows
        rows.append(row("mean training pose", label, summarise(lambda spill=spill: [spill], 1)))
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | input | mean px | % of box | % of image side | PCK@0.2 box |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['mean_px']:.1f} | {r['pct_box']:.1f} | "
            f"{r['pct_image']:.1f} | {r['pck_0.2_box']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a YOLO-pose root or dataset yaml")
    ap.add_argument("--out", type=Path, default=Path("hands"))
    ap.add_argument("--recipe", default="pipelines/hands_cpu.toml")
    ap.add_argument("--tutorial", type=Path, help="the tutorial's model_final, scored the same ways")
    ap.add_argument("--refine", type=int, default=1, help="refinement passes of the third row")
    ap.add_argument("--synth", type=int, default=0, help="also pack N generated hands for the mix")
    args = ap.parse_args()
    out = args.out.resolve()
    shards, run_dir, evals = out / "shards", out / "run", out / "eval"

    if not (shards / "manifest.json").exists():
        run("pack", str(args.data), str(shards), "--format", "yolo", "--overwrite")
    # the recipe's crop list names one mode per shards folder: the photos in every photo crop
    # (train takes one folder once for all of them), or with --synth once per photo crop and the
    # generated hands last
    recipe = Path(args.recipe) if Path(args.recipe).exists() else ROOT / args.recipe
    crops = tomllib.loads(recipe.read_text()).get("crop", ["box"])
    crops = [crops] if isinstance(crops, str) else crops
    train_shards = [str(shards)] * (max(1, len(crops) - 1) if args.synth else 1)
    if args.synth:
        synth, synth_shards = out / "synth", out / "synth-shards"
        if not (synth / "training_K.json").exists():
            run("synth", str(synth), "--n", str(args.synth), "--seed", "0")
        if not (synth_shards / "manifest.json").exists():
            run("pack", str(synth), str(synth_shards), "--split", "0.95,0.05,0", "--overwrite")
        train_shards.append(str(synth_shards))
    if not (run_dir / "summary.json").exists():
        run("train", "--config", str(recipe), "--shards", ",".join(train_shards), "--out", str(run_dir))

    best = run_dir / "checkpoints" / "best.pt"
    rows = predict_rows(f"trained ({recipe.stem})", best, shards, evals, args.refine)
    if args.tutorial:
        rows += predict_rows("tutorial weights", args.tutorial, shards, evals, args.refine)
    config = tomllib.loads((run_dir / "config.toml").read_text())
    rows += mean_pose_rows(shards, float(config["box_pad"]))

    summary = json.loads((run_dir / "summary.json").read_text())
    text = (
        f"{read_manifest(shards).count('val')} val photos of {args.data}; trained "
        f"{summary['train_seconds'] / 60:.1f} min ({summary['epochs']} epochs)\n\n" + table(rows)
    )
    (out / "hands.md").write_text(text)
    (out / "hands.json").write_text(json.dumps({"rows": rows, "train": summary}, indent=1) + "\n")
    print("\n== hands result ==\n" + text)


if __name__ == "__main__":
    main()

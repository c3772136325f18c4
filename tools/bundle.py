#!/usr/bin/env python3
"""Bundle trained models into the package: handpose/bundled/NAME.pt (+ NAME-detector.pt) and the
card NAME.json that `handpose models` prints and `models.bundle` checks on every load.

    tools/bundle.py hands --keypoints runs/hands/checkpoints/best.pt \\
        [--detector runs/detect/checkpoints/best.pt] [--figures hands/hands.json] [--card FIELDS.json]

Each checkpoint is written weights only (`handpose export CKPT --out NAME.pt`: no optimizer, RNG
or loop state) and its card entry is filled in from the file written: sha256, bytes, arch, input
size, crop, parameters. --figures takes `make hands`' hands.json (the trained model's rows: labelled
boxes, whole photo, refinement). --card gives the fields people write (summary, data and their
licences, recipe, command, date, commit, training; models.py's docstring lists them); without it the
existing card's are kept. The bundled files must stay under 10 MB in all (package data).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from handpose import checkpoint  # noqa: E402
from handpose.atomic import write_text  # noqa: E402
from handpose.export import export_weights  # noqa: E402
from handpose.models import BUNDLED, CARD_FORMAT, CARD_VERSION, bundle, read_card  # noqa: E402

MAX_BYTES = 10_000_000  # all bundled files together: package data, not a download


def file_entry(path: Path, name: str) -> dict[str, Any]:
    """A card's entry for a bundled checkpoint (to be called `name`), read from the file itself."""
    from handpose.shards import sha256_file

    state = checkpoint.load(path)
    config = {**checkpoint.OLD_FILES, **state["config"]}
    sets = state.get("sets") or [{"crop": list(config.get("crop") or ["image"])[0]}]
    return {
        "file": name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "arch": str(config["arch"]),
        "input_size": int(config["image_size"]),
        "crop": str(sets[0]["crop"]),
        "parameters": int(sum(t.numel() for t in state["model"].values() if t.is_floating_point())),
        "epochs": int(state["epoch"]),
    }


PATH_KEYS = ("out", "shards", "val_shards", "cache_dir")  # where the training machine kept things


def ship_config(path: Path, min_score: float | None = None) -> None:
    """A shipped file's config: its training folders by name only (the training machine's paths
    mean nothing to a user and are not theirs to read) and, for a detector, `min_score` (its
    default threshold) when given."""
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise SystemExit(f"--min-score {min_score}: must be between 0 and 1")
    state = checkpoint.load(path)
    config = dict(state["config"])
    for key in PATH_KEYS:
        value = config.get(key)
        if isinstance(value, str) and value:
            config[key] = Path(value).name
        elif isinstance(value, (list, tuple)):
            config[key] = type(value)(Path(v).name for v in value)
    if min_score is not None:
        config["min_score"] = min_score
    state["config"] = config
    checkpoint.save(path, state)


def figure_rows(hands_json: Path) -> dict[str, Any]:
    """The trained model's rows of `make hands`' hands.json, in the card's figures format."""
    data = json.loads(hands_json.read_text())
    rows = [
        {
            "input": r["input"],
            "mean_px": r["mean_px"],
            "pct_box": r["pct_box"],
            "pct_image": r["pct_image"],
            "pck_box": r["pck_0.2_box"],
        }
        for r in data["rows"]
        if r["model"].startswith("trained")
    ]
    if not rows:
        raise SystemExit(f"{hands_json}: no trained-model rows")
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="the bundled model's name (what MODEL and handpose.load take)")
    ap.add_argument("--keypoints", type=Path, required=True, help="the keypoint model's checkpoint")
    ap.add_argument("--detector", type=Path, help="a hand detector's checkpoint (arch centernet)")
    ap.add_argument("--figures", type=Path, help="make hands' hands.json: the val figures")
    ap.add_argument("--figures-on", help="what the figures were scored on (one line)")
    ap.add_argument("--card", type=Path, help="a json with the card's written fields")
    ap.add_argument(
        "--min-score",
        type=float,
        help="the bundled detector's default min_score (predict --min-score), when measured to beat "
        "the one it was trained with; recorded in its file's config and on the card",
    )
    args = ap.parse_args()

    card_path = BUNDLED / f"{args.name}.json"
    card: dict[str, Any] = json.loads(card_path.read_text()) if card_path.exists() else {}
    if args.card:
        card |= json.loads(args.card.read_text())
    head = {"format": CARD_FORMAT, "version": CARD_VERSION, "name": args.name}
    card = head | {k: v for k, v in card.items() if k not in head}
    BUNDLED.mkdir(exist_ok=True)
    # Written beside the bundle under temporary names, renamed only once all are checked: a
    # refused bundle leaves the existing one (files and card) as it was.
    files, staged = {}, {}
    try:
        for role, source in (("keypoints", args.keypoints), ("detector", args.detector)):
            if source is None:
                continue
            dest = BUNDLED / (f"{args.name}.pt" if role == "keypoints" else f"{args.name}-{role}.pt")
            tmp = dest.with_name(f".new-{dest.name}")
            export_weights(source, tmp, overwrite=True)
            ship_config(tmp, args.min_score if role == "detector" else None)
            staged[tmp] = dest
            files[role] = file_entry(tmp, dest.name)
            if role == "detector":
                files[role]["min_score"] = float(checkpoint.load(tmp)["config"]["min_score"])
        total = sum(f["bytes"] for f in files.values())
        if total > MAX_BYTES:
            raise SystemExit(
                f"bundled files are {total / 1e6:.1f} MB: over the {MAX_BYTES / 1e6:.0f} MB limit"
            )
    except BaseException:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, dest in staged.items():
        tmp.replace(dest)
    stale = BUNDLED / f"{args.name}-detector.pt"
    if args.detector is None and stale.exists():  # this tool's own file from an earlier bundle
        stale.unlink()
        print(f"note: {stale.name} removed: the new bundle has no detector (give --detector to keep one)")
    card["files"] = files
    if args.figures:
        card["figures"] = {**card.get("figures", {}), **figure_rows(args.figures)}
    if args.figures_on:
        card.setdefault("figures", {})["on"] = args.figures_on
    write_text(card_path, json.dumps(card, indent=1, ensure_ascii=False) + "\n")
    read_card(args.name)  # every key there
    found = bundle(args.name)
    net_device = torch.device("cpu")
    from handpose.models import load_model

    _, spec = load_model(args.name, net_device)
    print(
        f"bundled {args.name}: {', '.join(f['file'] for f in files.values())} ({total / 1e6:.2f} MB), "
        f"keypoints {spec.size} px, detector {'yes' if found.detector else 'no'}"
    )


if __name__ == "__main__":
    main()

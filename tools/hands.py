#!/usr/bin/env python3
"""`make hands DATA=ROOT [EXTRA="DIR ..."] [VAL="DIR ..."]`: real photos in, scored models out.

    .venv/bin/python tools/hands.py --data ROOT [--extra DIR ...] [--val DIR ...] [--out hands]

Every step is the command a user would type, printed before it runs, timed, and recorded in
OUT/steps.json; a re-run skips the steps whose output is there (an interrupted one resumes: train
and predict continue where they stopped), and refuses to reuse an output that another command
made (delete it to redo that step). The steps:

 1. teacher labels (EXTRA and VAL photo folders, searched recursively): tools/teacher_label.py in
    the teacher's environment (`make teacher-env` when it is missing) -> OUT/teacher/NAME; the
    answers are cached there, so a re-run never asks MediaPipe twice. VAL photos go to the val
    split. A folder with Pascal VOC files (NAME.xml beside the photos) is labelled with --voc.
    Marks after the folder, `DIR:mark[,mark]`: `one` (one hand per photo: --keep-hands 1),
    `name=NAME` (its name in OUT and in the table; default the folder's name) and, for EXTRA,
    `cutout` (hands photographed on black).
 2. cut-out sets onto backgrounds: tools/composite.py pastes each onto hand-free crops of the
    other EXTRA sets' photos (their train photos with a kept hand, clear of every hand the teacher
    answered and of their VOC boxes) -> OUT/composite/NAME.
 3. packs: DATA -> OUT/shards; the EXTRA sets as ONE training folder (OUT/extra.yaml lists their
    labelled photos; pack re-splits them 0.8/0.15/0.05) -> OUT/extra-shards; each VAL set, val
    split only (--split 0,1,0) -> OUT/val/NAME.
 4. the keypoint model: `handpose train --config RECIPE` (pipelines/hands_cpu.toml). The recipe's
    crop/weights lists are read as slots: the first slot of each crop mode is DATA's (the one
    photo folder in each crop), a later slot of a mode already seen is for the EXTRA pack (then
    --synth's generated hands); the extra folders without a slot are cropped like DATA's box slot
    and share 0.25 of each batch (--extra-share, default EXTRA_SHARE; by their sizes), DATA's
    slots the rest in their proportions, and an epoch keeps its length on DATA alone
    (--batches_per_epoch), so the recipe's time budget holds; unused slots are dropped. The VAL
    packs are its `val_shards`: scored at every validation, never trained on. A CPU recipe runs
    as one torchrun rank per core (`torchrun --standalone --nproc_per_node=CORES -m handpose
    train ... --batch_size B/CORES --workers 0`: the same samples per step, about 1.2x the
    samples/s of one process on 2 cores; `--ranks N` to choose, see `cpu_ranks`). -> OUT/run
 5. the multi-hand test: tools/multihand.py (seeded) on DATA's val photos -> OUT/multihand (a YOLO
    dataset, photos without a hand included), packed val-only -> OUT/multihand-shards.
 6. the detector: `handpose train --config DETECT_RECIPE` (pipelines/hands_detect_cpu.toml) on
    DATA, as the bundled detector (with extra photos in its mix a detector scored worse on three
    of four photo sets: BENCHMARKS.md), the multi-hand pack as its val_shards (recall and AP on
    mosaics at every validation) -> OUT/detector-run.
 7. the models: OUT/models/keypoints.pt and OUT/models/detector.pt, copies of each run's best.pt
    (the epoch its recipe's `monitor` chose; its figures are the ones the run's summary reports).
 8. predict, and ONE table (OUT/hands.md, OUT/hands.json with each step's wall minutes): the
    trained keypoint model on DATA's val (labelled boxes; whole photo, 1 pass and with
    refinement; detector + keypoints), on each VAL set (labelled boxes; whole photo with
    refinement; detector + keypoints) and on the multi-hand test's YOLO folder (detector +
    keypoints: recall, precision at OKS >= 0.5, pose AP50-95); the tutorial's weights
    (--tutorial) the same three ways as today; the mean training pose.

Without EXTRA it trains on DATA alone; without VAL there are no other-source rows. The detector
rows need a `handpose predict` with --detector; the tool asks predict's --help and leaves them
out, saying so, when it has none. With `--synth N` the training mix also gets N generated hands
(`handpose synth`, packed beside the photos).

Test hook: HANDPOSE_TEST_TEACHER replaces the teacher's command (`PYTHON tools/teacher_label.py`)
with a stand-in labeller (the tests' fake teacher; MediaPipe is not installed in CI).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handpose.atomic import write_json, write_text  # noqa: E402
from handpose.cpu import cores  # noqa: E402
from handpose.datasets import apportion  # noqa: E402
from handpose.errors import HandposeError  # noqa: E402
from handpose.geometry import apply_affine, crop_matrix, invert, source_region  # noqa: E402
from handpose.report import box_side, spill_rows, summarise  # noqa: E402
from handpose.shards import decode_annotation, read_manifest, read_samples  # noqa: E402
from handpose.train import TrainConfig  # noqa: E402

MARKS = ("cutout", "one")
TRAINING_FOLDERS = ("shards", "extra-shards", "synth-shards")  # names a VAL pack may not take
TEST_TEACHER = "HANDPOSE_TEST_TEACHER"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # `torchrun` of this interpreter
DATA_LABEL = "DATA val"


# ---- the photo sets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoSet:
    """An EXTRA or VAL photo folder: where, its name in OUT, and its marks."""

    path: Path
    name: str
    role: str  # "extra" or "val"
    cutout: bool = False
    one: bool = False

    @property
    def voc(self) -> bool:
        """Whether the folder holds Pascal VOC files (NAME.xml beside the photos)."""
        return next(self.path.rglob("*.xml"), None) is not None


def photo_sets(extra: Sequence[str], val: Sequence[str]) -> list[PhotoSet]:
    """`DIR[:mark,...]` of each EXTRA and VAL folder (marks: cutout, one, name=NAME) ->
    PhotoSets with names unique in OUT (name=, else the folder's name; then -2, -3, ...; never a
    training folder's name). A folder given twice, or in both lists, or inside another, is
    refused: a VAL set must never reach training."""
    sets: list[PhotoSet] = []
    taken = set(TRAINING_FOLDERS)
    for role, specs in (("extra", extra), ("val", val)):
        flag = f"--{role}"
        for spec in specs:
            folder, marks = spec, [""]
            head, _, tail = spec.rpartition(":")
            if head and tail and all(m in MARKS or m.startswith("name=") for m in tail.split(",")):
                folder, marks = head, tail.split(",")
            path = Path(os.path.abspath(folder))
            if not path.is_dir():
                raise HandposeError(f"{flag} {spec}: {folder} is not a folder")
            if "cutout" in marks and role == "val":
                raise HandposeError(
                    f"{flag} {spec}: a VAL set is scored as its photos are (cutout is for --extra)"
                )
            for other in sets:
                if path == other.path or path in other.path.parents or other.path in path.parents:
                    raise HandposeError(f"{flag} {spec}: overlaps --{other.role} {other.path}")
            given = [m[len("name=") :] for m in marks if m.startswith("name=")]
            base = given[-1] if given else path.name or "photos"
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", base):
                raise HandposeError(f"{flag} {spec}: name {base!r}: use letters, digits, '.', '_' and '-'")
            name, k = base, 1
            while name in taken:
                k += 1
                name = f"{base}-{k}"
            taken.add(name)
            sets.append(PhotoSet(path, name, role, "cutout" in marks, "one" in marks))
    return sets


# ---- the steps -----------------------------------------------------------------------------------


def shown(argv: Sequence[str]) -> str:
    """A command as a user types it: `handpose ...` for the package, the interpreter of this
    checkout as a relative path, everything else as given."""
    args = list(argv)
    if args[:3] == [sys.executable, "-m", "handpose"]:
        args = ["handpose", *args[3:]]
    elif args[: len(TORCHRUN)] == TORCHRUN:
        args = ["torchrun", *args[len(TORCHRUN) :]]
    return shlex.join(os.path.relpath(a, ROOT) if a.startswith(str(ROOT) + os.sep) else a for a in args)


class Steps:
    """Runs the commands: each printed, run from the checkout, timed; OUT/steps.json records the
    command and its wall minutes once it finished, so a re-run skips it."""

    def __init__(self, out: Path) -> None:
        self.file = out / "steps.json"
        self.done: dict[str, Any] = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self.log: list[dict[str, Any]] = []

    def run(self, name: str, argv: Sequence[str], output: Path, key: str = "", *, check: bool = True) -> None:
        """Run `argv` unless `output` (a file in the step's folder) exists: then it is reused,
        unless another command made it (HandposeError: delete the folder to redo; `check=False`
        skips that, for a step that makes an environment rather than an output). `key` stands
        for inputs the command line does not show (a file it reads)."""
        command = shown(argv)
        record = self.done.get(name)
        if output.exists():
            if check and record is not None and (record["command"], record.get("key", "")) != (command, key):
                raise HandposeError(
                    f"{output.parent}: made by another command than `{command}` (the recorded one: "
                    f"`{record['command']}`); delete that folder to redo this step, or give another --out"
                )
            self.log.append(
                {"step": name, "command": command, "minutes": (record or {}).get("minutes"), "reused": True}
            )
            return
        print(f"\n$ {command}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.run(list(argv), cwd=ROOT).returncode
        if code:
            sys.exit(code)
        minutes = round((time.perf_counter() - t0) / 60, 3)
        print(f"  ({minutes * 60:.0f} s)", flush=True)
        self.done[name] = {"command": command, "key": key, "minutes": minutes}
        write_json(self.file, self.done)
        self.log.append({"step": name, "command": command, "minutes": minutes, "reused": False})


def handpose(*args: str) -> list[str]:
    return [sys.executable, "-m", "handpose", *args]


def tool(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / script), *args]


def teacher_command(venv: Path) -> list[str]:
    """What runs tools/teacher_label.py: the teacher's environment, or the tests' stand-in."""
    if os.environ.get(TEST_TEACHER):
        return shlex.split(os.environ[TEST_TEACHER])
    return [str(venv / "bin" / "python"), str(ROOT / "tools" / "teacher_label.py")]


def teacher_options(s: PhotoSet) -> list[str]:
    """teacher_label.py's options for a set: VAL photos in val; --keep-hands 1 for `one`; --voc
    where VOC files lie beside the photos."""
    return [
        *(["--split", "val"] if s.role == "val" else []),
        *(["--keep-hands", "1"] if s.one else []),
        *(["--voc"] if s.voc else []),
    ]


def extra_yaml(out: Path, folders: Sequence[Path]) -> str:
    """One YOLO dataset of every EXTRA set's labelled train photos (paths relative to OUT)."""
    lines = ["# tools/hands.py: the EXTRA photo sets, packed as one training folder", "path: .", "train:"]
    lines += [f"  - {os.path.relpath(f, out)}" for f in folders]
    return "\n".join([*lines, "kpt_shape: [21, 3]", "names:", "  0: hand", ""])


# ---- the recipe's layout -------------------------------------------------------------------------


# The batch share of the extra folders without a recipe slot: at the hour the share that meets
# both keypoint targets (BENCHMARKS.md, "One rank per core: 44 epochs in the hour"); it divides
# the recipe's batch exactly (8 of 32, 4 of each rank's 16).
EXTRA_SHARE = 0.25


def recipe_layout(
    recipe: dict[str, Any], extras: Sequence[float], share: float = EXTRA_SHARE
) -> tuple[list[str], list[float] | None, int]:
    """(crop per folder, weights or None, DATA's folder count) for DATA and one more folder per
    item of `extras` (each its train samples / DATA's), from a recipe's crop/weights slots (the
    module doc's rule). The extra folders without a slot are cropped like DATA's box slot (else
    its first) and share `share` of the weights, by their sizes; the other slots keep their
    proportions in the rest."""
    crops = recipe.get("crop", ["image"])
    crops = [crops] if isinstance(crops, str) else list(crops)
    weights = [float(w) for w in recipe["weights"]] if recipe.get("weights") else None
    seen: list[str] = []
    data, spare = [], []
    for i, mode in enumerate(crops):
        (spare if mode in seen else data).append(i)
        seen.append(mode)
    out_crops = [crops[i] for i in data]
    slot_weights = [weights[i] for i in data] if weights else [1.0] * len(data)
    fill = out_crops.index("box") if "box" in out_crops else 0
    loose: list[int] = []  # the extra folders without a slot
    for k, size in enumerate(extras):
        if k < len(spare):
            out_crops.append(crops[spare[k]])
            slot_weights.append(weights[spare[k]] if weights else 1.0)
        else:
            out_crops.append(out_crops[fill])
            slot_weights.append(size)
            loose.append(len(slot_weights) - 1)
    if loose:
        extra = sum(slot_weights[i] for i in loose)
        rest = sum(w for i, w in enumerate(slot_weights) if i not in loose)
        slot_weights = [
            round(w * (share / extra if i in loose else (1 - share) / rest), 4)
            for i, w in enumerate(slot_weights)
        ]
    equal = weights is None and len(set(slot_weights)) == 1  # the recipe's default: equal shares
    return out_crops, None if equal else slot_weights, len(data)


def train_args(
    recipe_path: Path,
    data: Path,
    extras: Sequence[Path],
    vals: Sequence[Path],
    out: Path,
    share: float = EXTRA_SHARE,
) -> list[str]:
    """`handpose train` for a recipe on DATA (+ extra folders, + val_shards): --crop and --weights
    only where the layout is not the recipe's own. Reads the packs' train counts. A recipe whose
    epoch is a full pass over DATA's first slot (`batches_per_epoch = 0`) keeps the length of
    that epoch on DATA alone when extra folders join (`--batches_per_epoch`): the extras take a
    share of each batch, not more batches, so the recipe's time budget holds."""
    recipe = tomllib.loads(recipe_path.read_text())
    n = read_manifest(data).count("train")
    sizes = [read_manifest(e).count("train") / n for e in extras]
    crops, weights, n_data = recipe_layout(recipe, sizes, share)
    folders = [data] * n_data + list(extras)
    own = recipe.get("crop", ["image"])
    own = [own] if isinstance(own, str) else list(own)
    args = ["train", "--config", str(recipe_path)]
    args += ["--shards", ",".join(str(f) for f in (folders if extras else [data]))]
    if crops != own and not (len(own) == 1 and set(crops) == set(own)):  # one mode is one for all
        args += ["--crop", ",".join(crops)]
    if weights is not None and weights != [float(w) for w in recipe.get("weights", [])]:
        args += ["--weights", ",".join(f"{w:g}" for w in weights)]
    if extras and recipe.get("batches_per_epoch") == 0:
        # DATA alone's epoch as `datasets.train_batches_per_rank` counts it (one process):
        # DATA's samples // its first slot's share of each batch
        alone = recipe_layout(recipe, [])[1] or [1.0] * n_data
        args += ["--batches_per_epoch", str(n // apportion(recipe_batch(recipe), alone)[0])]
    if vals:
        args += ["--val_shards", ",".join(str(v) for v in vals)]
    return [*args, "--out", str(out)]


MIN_RANK_BATCH = 16  # the smallest per-rank batch the rank rule makes: BatchNorm's statistics are per rank


def recipe_batch(recipe: dict[str, Any]) -> int:
    """A recipe's per-process batch size (TrainConfig's default where it sets none)."""
    return int(recipe.get("batch_size", TrainConfig().batch_size))


def cpu_ranks(recipe_path: Path, folders: int, cores: int) -> int:
    """Processes for a recipe's training step: one per core for a CPU recipe (`device = "cpu"`)
    whose batch splits evenly over them into shares of at least MIN_RANK_BATCH (and of one sample
    of each of `folders`); else 1. On 2 cores, one rank per core, each loading in its own process
    with one thread, trains about 1.2x faster than one process of two threads beside a loader
    worker, whose threads and worker contend for the same cores (BENCHMARKS.md, "One rank per
    core"); with more cores one process keeps its loader workers on cores of their own."""
    recipe = tomllib.loads(recipe_path.read_text())
    batch = recipe_batch(recipe)
    if recipe.get("device") != "cpu" or cores < 2 or batch % cores:
        return 1
    return cores if batch // cores >= max(folders, MIN_RANK_BATCH) else 1


def launched(args: Sequence[str], batch: int, ranks: int) -> list[str]:
    """`handpose ARGS` (a train command ending in --out) as one process, or as `ranks` torchrun
    ranks on this machine, each with 1/ranks of the recipe's `batch` (the same samples per step)
    and no loader worker."""
    if ranks == 1:
        return handpose(*args)
    out = list(args).index("--out")
    per_rank = [*args[:out], "--batch_size", str(batch // ranks), "--workers", "0", *args[out:]]
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", "-m", "handpose", *per_rank]


# ---- predictions and the table -------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One predict run and the table row it gives."""

    slug: str  # its folder under OUT/eval
    model: str  # the row's model column
    on: str  # the photos
    how: str  # the input column
    weights: Path  # the model file
    photos: Path  # a packed folder or a YOLO dataset: predict reads its val split
    args: tuple[str, ...] = ()  # predict's options


def predictions(
    label: str,
    weights: Path,
    data: Path,
    vals: Sequence[tuple[str, Path]],
    refine: int,
    detector: Path | None = None,
    multihand: Path | None = None,
    *,
    prefix: str = "trained",
) -> list[Prediction]:
    """The predict runs of one keypoint model: DATA's val three ways (+ the detector), each VAL
    set (labelled boxes, whole photo with refinement, + the detector), the multi-hand test
    (detector)."""
    passes = (f"whole photo, {refine + 1} passes", ("--refine", str(refine)))
    boxes = ("labelled boxes", ("--boxes", "gt"))
    det = ("detector + keypoints", ("--detector", str(detector)))
    plan = [
        ("boxes", DATA_LABEL, data, boxes),
        ("whole", DATA_LABEL, data, ("whole photo, 1 pass", ("--refine", "0"))),
        (f"refine{refine}", DATA_LABEL, data, passes),
    ]
    plan += [("detector", DATA_LABEL, data, det)] if detector else []
    for name, shards in vals:
        on = f"{name} (other source)"
        plan += [(f"{name}-boxes", on, shards, boxes), (f"{name}-refine{refine}", on, shards, passes)]
        plan += [(f"{name}-detector", on, shards, det)] if detector else []
    if detector and multihand:
        plan += [("multihand", "multi-hand test", multihand, det)]
    return [
        Prediction(f"{prefix}-{slug}", label, on, how, weights, shards, opts)
        for slug, on, shards, (how, opts) in plan
    ]


COLUMNS = (
    ("mean px", "mean_px", ".1f"),
    ("% of box", "pct_box", ".1f"),
    ("% of image side", "pct_image", ".1f"),
    ("PCK@0.2 box", "pck_0.2_box", ".3f"),
    ("pose AP50-95", "pose_ap50_95", ".3f"),
    ("recall", "recall", ".3f"),
    ("precision", "precision", ".3f"),
)


def row(model: str, on: str, how: str, rep: dict[str, Any]) -> dict[str, Any]:
    """One table row from a predict report (report.json's headline keys; the detector's figures,
    recall and precision at OKS >= 0.5 and pose AP50-95, where the report has them)."""
    return {
        "model": model,
        "photos": on,
        "input": how,
        "hands": rep.get("hands"),
        "mean_px": rep.get("mean_error_px"),
        "pct_box": rep.get("mean_error_pct_box"),
        "pct_image": rep.get("mean_error_pct"),
        "pck_0.2_box": rep.get("pck_0.2_box"),
        "pose_ap50_95": rep.get("pose_ap50_95"),
        "recall": rep.get("recall"),
        "precision": rep.get("precision"),
    }


def report_rows(runs: Sequence[Prediction], evals: Path) -> list[dict[str, Any]]:
    """The rows of predict runs, each from its OUT/eval/SLUG/report.json."""
    return [row(p.model, p.on, p.how, json.loads((evals / p.slug / "report.json").read_text())) for p in runs]


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table; a figure a row does not have (or a NaN: no hand to measure) is `-`."""
    lines = [
        "| model | photos | input | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        cells = [
            "-" if r.get(key) is None or r[key] != r[key] else format(r[key], fmt) for _, key, fmt in COLUMNS
        ]
        lines.append(f"| {r['model']} | {r['photos']} | {r['input']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_pose_rows(shards: Path, pad: float, on: str) -> list[dict[str, Any]]:
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
        rep = summarise(lambda spill=spill: [spill], 1)
        rows.append(row("mean training pose", on, label, rep))
    return rows


def predict_has_detector() -> bool:
    """Whether this handpose's predict takes --detector (added beside this tool)."""
    env = {**os.environ, "COLUMNS": "300", "TERM": "dumb", "NO_COLOR": "1"}
    help_text = subprocess.run(
        handpose("predict", "--help"), cwd=ROOT, capture_output=True, text=True, env=env
    )
    return "--detector" in help_text.stdout


def copy_model(src: Path, dest: Path) -> None:
    """Copy a checkpoint through a temp name (nothing to do when the bytes are there)."""
    if dest.is_file() and dest.read_bytes() == src.read_bytes():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    print(f"{dest} <- {src}", flush=True)


# ---- the whole job -------------------------------------------------------------------------------


def recipe_path(name: str) -> Path:
    path = Path(name)
    return path.resolve() if path.exists() else ROOT / name


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a YOLO-pose root or dataset yaml")
    ap.add_argument(
        "--extra", nargs="*", default=[], help="photo folders to label and train on (DIR[:cutout,one])"
    )
    ap.add_argument("--val", nargs="*", default=[], help="photo folders to label and validate on (DIR[:one])")
    ap.add_argument("--out", type=Path, default=Path("hands"))
    ap.add_argument("--recipe", default="pipelines/hands_cpu.toml")
    ap.add_argument("--detect-recipe", default="pipelines/hands_detect_cpu.toml")
    ap.add_argument("--no-detector", action="store_true", help="train no detector (no detector rows)")
    ap.add_argument("--monitor", help="the keypoint run's monitor, e.g. NAME-box/val_error_px of a VAL set")
    ap.add_argument("--tutorial", type=Path, help="the tutorial's model_final, scored the same ways")
    ap.add_argument("--refine", type=int, default=1, help="refinement passes of the whole-photo rows")
    ap.add_argument(
        "--extra-share",
        type=float,
        default=EXTRA_SHARE,
        help=f"batch share of the EXTRA photos where the recipe has no slot for them [{EXTRA_SHARE}]",
    )
    ap.add_argument(
        "--ranks",
        type=int,
        help="processes of the keypoint training step [default: one per core for a CPU recipe "
        "whose batch splits evenly over them, else 1]",
    )
    ap.add_argument("--synth", type=int, default=0, help="also pack N generated hands for the mix")
    ap.add_argument(
        "--multihand", type=int, default=200, help="mosaics and single photos of the multi-hand test"
    )
    ap.add_argument("--seed", type=int, default=0, help="composites and the multi-hand test")
    ap.add_argument("--teacher-venv", type=Path, default=ROOT / ".venv-teacher")
    args = ap.parse_args(argv)
    try:
        run(args)
    except HandposeError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job (the module doc's steps); returns what OUT/hands.json holds."""
    out = args.out.resolve()
    if not 0.0 < args.extra_share < 1.0:
        share = args.extra_share
        raise HandposeError(f"--extra-share {share}: must be between 0 and 1 (a share of each batch)")
    recipe = recipe_path(args.recipe)
    if not recipe.is_file():
        raise HandposeError(f"--recipe {args.recipe}: no such file")
    batch = recipe_batch(tomllib.loads(recipe.read_text()))
    if args.ranks is not None and (args.ranks < 1 or batch % args.ranks):
        raise HandposeError(
            f"--ranks {args.ranks}: {recipe}'s batch of {batch} does not split into {args.ranks} equal shares"
        )
    sets = photo_sets(args.extra, args.val)
    extras = [s for s in sets if s.role == "extra"]
    if extras and all(s.cutout for s in extras) and any(s.cutout for s in extras):
        raise HandposeError("--extra: a cutout set needs another EXTRA photo set to take backgrounds from")
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out)
    data, shards = args.data.resolve(), out / "shards"

    label_sets(steps, out, sets, args.teacher_venv.resolve(), args.seed)
    steps.run(
        "pack DATA", handpose("pack", str(data), str(shards), *YOLO, "--overwrite"), shards / "manifest.json"
    )
    extra = pack_extra(steps, out, extras)
    vals = []
    for s in (s for s in sets if s.role == "val"):
        dest = out / "val" / s.name
        argv = handpose("pack", str(out / "teacher" / s.name), str(dest), *YOLO, *VAL_ONLY, "--overwrite")
        steps.run(f"pack {s.name}", argv, dest / "manifest.json")
        vals.append((s.name, dest))
    synth = []
    if args.synth:
        raw, synth_shards = out / "synth", out / "synth-shards"
        steps.run(
            "synth",
            handpose("synth", str(raw), "--n", str(args.synth), "--seed", "0"),
            raw / "training_K.json",
        )
        argv = handpose("pack", str(raw), str(synth_shards), "--split", "0.95,0.05,0", "--overwrite")
        steps.run("pack synth", argv, synth_shards / "manifest.json")
        synth = [synth_shards]

    argv = train_args(recipe, shards, [*extra, *synth], [v for _, v in vals], out / "run", args.extra_share)
    if args.monitor:
        argv[-2:-2] = ["--monitor", args.monitor]
    folders = len(argv[argv.index("--shards") + 1].split(","))
    ranks = args.ranks or cpu_ranks(recipe, folders, cores())
    if batch // ranks < folders:
        raise HandposeError(
            f"--ranks {ranks}: each rank's {batch // ranks} of the batch cannot hold one sample of each "
            f"of the {folders} training folders"
        )
    steps.run("train keypoints", launched(argv, batch, ranks), out / "run" / "summary.json")
    model, detector = out / "models" / "keypoints.pt", out / "models" / "detector.pt"
    copy_model(out / "run" / "checkpoints" / "best.pt", model)
    multihand = None
    if not args.no_detector:
        multihand, packed = multihand_test(steps, out, data, args)
        argv = train_args(recipe_path(args.detect_recipe), shards, [], [packed], out / "detector-run")
        steps.run("train detector", handpose(*argv), out / "detector-run" / "summary.json")
        copy_model(out / "detector-run" / "checkpoints" / "best.pt", detector)

    scored_detector = None if args.no_detector else detector
    if scored_detector is not None and not predict_has_detector():
        print("\nnote: this handpose predict has no --detector: the detector rows are left out", flush=True)
        scored_detector = None
    runs = predictions(
        f"trained ({recipe.stem})", model, shards, vals, args.refine, scored_detector, multihand
    )
    if args.tutorial:
        runs += predictions(
            "tutorial weights", args.tutorial.resolve(), shards, [], args.refine, prefix="tutorial"
        )
    evals = out / "eval"
    for p in runs:
        argv = handpose(
            "predict", str(p.weights), str(p.photos), "--split", "val", "--out", str(evals / p.slug)
        )
        steps.run(f"predict {p.slug}", [*argv, *p.args], evals / p.slug / "report.json")
    rows = report_rows(runs, evals)
    box_pad = tomllib.loads((out / "run" / "config.toml").read_text())["box_pad"]
    rows += mean_pose_rows(shards, float(box_pad), DATA_LABEL)

    summary = json.loads((out / "run" / "summary.json").read_text())
    counts = "".join(f"; {name}: {read_manifest(v).count('val')} val hands" for name, v in vals)
    text = (
        f"{DATA_LABEL}: {read_manifest(shards).count('val')} val hands of {args.data}{counts}; keypoints "
        f"trained {summary['train_seconds'] / 60:.1f} min ({summary['epochs']} epochs)\n\n" + table(rows)
    )
    result = {
        "rows": rows,
        "train": summary,
        "detector": None
        if args.no_detector
        else json.loads((out / "detector-run" / "summary.json").read_text()),
        "models": {"keypoints": str(model), "detector": None if args.no_detector else str(detector)},
        "sets": [
            {"name": s.name, "role": s.role, "folder": str(s.path), "cutout": s.cutout, "one": s.one}
            for s in sets
        ],
        "steps": steps.log,
    }
    write_text(out / "hands.md", text)
    write_json(out / "hands.json", result)
    print("\n== hands result ==\n" + text)
    return result


YOLO = ("--format", "yolo")
VAL_ONLY = ("--split", "0,1,0")  # pack re-splits a one-split dataset: every photo to val


def label_sets(steps: Steps, out: Path, sets: Sequence[PhotoSet], venv: Path, seed: int) -> None:
    """Teacher labels of every EXTRA and VAL set (the teacher's environment made first), then the
    cut-out sets pasted onto the other EXTRA sets' photos."""
    if sets and not os.environ.get(TEST_TEACHER):
        steps.run(
            "teacher-env", ["make", "teacher-env", f"TEACHER_VENV={venv}"], venv / ".installed", check=False
        )
    teacher = teacher_command(venv)
    for s in sets:
        dest = out / "teacher" / s.name
        argv = [*teacher, str(s.path), str(dest), *teacher_options(s)]
        steps.run(f"teacher {s.name}", argv, dest / "report.json")
    extras = [s for s in sets if s.role == "extra"]
    backgrounds = [str(out / "teacher" / b.name) for b in extras if not b.cutout]
    for s in (s for s in extras if s.cutout):
        dest = out / "composite" / s.name
        argv = tool(
            "composite.py", str(out / "teacher" / s.name), *backgrounds, str(dest), "--seed", str(seed)
        )
        steps.run(f"composite {s.name}", argv, dest / "composite.json")


def pack_extra(steps: Steps, out: Path, extras: Sequence[PhotoSet]) -> list[Path]:
    """The EXTRA sets' labelled photos (the composites of cut-out sets) packed as ONE training
    folder through OUT/extra.yaml; [] without EXTRA."""
    if not extras:
        return []
    labelled = [out / ("composite" if s.cutout else "teacher") / s.name / "train" / "images" for s in extras]
    missing = [f for f in labelled if not f.is_dir()]
    if missing:
        raise HandposeError(f"{missing[0].parents[1]}: no labelled photo (the teacher kept no hand)")
    text = extra_yaml(out, labelled)
    yaml = out / "extra.yaml"
    if not (yaml.is_file() and yaml.read_text() == text):
        write_text(yaml, text)
    dest = out / "extra-shards"
    key = hashlib.sha256(text.encode()).hexdigest()[:16]  # the yaml's folders, which the command hides
    steps.run(
        "pack EXTRA",
        handpose("pack", str(yaml), str(dest), *YOLO, "--overwrite"),
        dest / "manifest.json",
        key,
    )
    return [dest]


def multihand_test(steps: Steps, out: Path, data: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """tools/multihand.py on DATA's val photos (seeded), and packed val-only; returns both. predict
    reads the YOLO folder (pack keeps photos with hands only, and the photos without one test
    precision); the pack is the detector run's val_shards (its recall and AP on mosaics)."""
    mh, packed = out / "multihand", out / "multihand-shards"
    n, half = str(args.multihand), str(args.multihand // 2)
    counts = ("--mosaics", n, "--singles", n, "--backgrounds", half, "--blanked", half)
    argv = tool("multihand.py", "--data", str(data), "--out", str(mh), "--seed", str(args.seed), *counts)
    steps.run("multihand", argv, mh / "multihand.json")
    steps.run(
        "pack multihand",
        handpose("pack", str(mh), str(packed), *YOLO, *VAL_ONLY, "--overwrite"),
        packed / "manifest.json",
    )
    return mh, packed


if __name__ == "__main__":
    main()

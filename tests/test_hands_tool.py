"""`make hands` (tools/hands.py): end to end on generated photos with tiny recipes (pack -> train
with the recipe's crop slots -> predict -> one table; EXTRA and VAL photo folders labelled by a
stand-in teacher, a cut-out set composited, the detector, a re-run that repeats nothing), and its
pieces: the recipe's layout, the photo-set options, the table built from predict's reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yolokit
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import hands  # noqa: E402
import teacher_label  # noqa: E402
from fake_teacher import photo_key  # noqa: E402

from handpose import checkpoint  # noqa: E402
from handpose.config import load_config  # noqa: E402
from handpose.errors import HandposeError  # noqa: E402
from handpose.train import TrainConfig  # noqa: E402

TINY = """
loader = "wds"
workers = 0
device = "cpu"
crop = ["box", "image"]
weights = [0.75, 0.25]
arch = "strided"
loss = "l1"
width = 4
depth = 1
image_size = 32
epochs = 1
batch_size = 4
val_batches = 0
"""

TINY_DETECTOR = """
loader = "wds"
workers = 0
device = "cpu"
crop = ["image"]
arch = "centernet"
loss = "focal"
width = 4
depth = 1
stride = 8
image_size = 64
epochs = 1
batch_size = 4
batches_per_epoch = 2
val_batches = 0
monitor = "val_ap50"
optimizer = "adamw"
lr = 2e-3

[layout]
mosaic = 0.5
canvas = 0.25
"""


def _hand_uv(rng: np.random.Generator, width: int, height: int, side: float) -> np.ndarray:
    """21 keypoints (fractions of the photo) inside a `side` px box in the photo's left third."""
    x0, y0 = rng.uniform(2, width / 3 - side), rng.uniform(2, height - side - 2)
    return np.column_stack([rng.uniform(x0, x0 + side, 21) / width, rng.uniform(y0, y0 + side, 21) / height])


def photo_folder(root: Path, n: int, seed: int, answers: dict, *, cutout: bool = False) -> Path:
    """`n` photos (in two subfolders, as photo sets come) with one hand each; what the stand-in
    teacher answers about each goes into `answers`. Cut-outs: a bright hand-shaped block on black."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        w, h = 200, 150
        uv = _hand_uv(rng, w, h, 40)
        path = root / f"p{k % 2}" / f"photo{k}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if cutout:
            img = rng.integers(0, 10, (h, w, 3)).astype(np.uint8)
            (x0, y0), (x1, y1) = (uv * (w, h)).min(0).astype(int) - 3, (uv * (w, h)).max(0).astype(int) + 3
            img[y0:y1, x0:x1] = (200, 150, 120)
            Image.fromarray(img).save(path, quality=95)
        else:
            path.write_bytes(yolokit.jpeg(w, h, seed * 100 + k))
        answers[photo_key(teacher_label.load_rgb(path))] = [uv.tolist()]
    return root


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _stamps(out: Path) -> dict[Path, int]:
    return {
        p: p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.is_file() and p.name not in ("hands.md", "hands.json")
    }


def _check_rows_are_reports(rows: list[dict], out: Path, slugs: list[str]) -> None:
    """Each row holds its predict run's report figures (NaN where the report has NaN: a tiny
    detector may find no hand to measure)."""
    keys = {
        "mean_px": "mean_error_px",
        "pct_box": "mean_error_pct_box",
        "pct_image": "mean_error_pct",
        "pck_0.2_box": "pck_0.2_box",
        "pose_ap50_95": "pose_ap50_95",
        "recall": "recall",
        "precision": "precision",
    }
    for r, slug in zip(rows, slugs, strict=False):
        rep = json.loads((out / "eval" / slug / "report.json").read_text())
        for mine, theirs in keys.items():
            a, b = r[mine], rep.get(theirs)
            assert a == b or (a != a and b != b), (slug, mine)


@pytest.mark.slow
def test_make_hands_prints_one_table_from_the_reports(tmp_path: Path) -> None:
    data = yolokit.write_dataset(tmp_path / "ds", yolokit.default_spec())
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    out = tmp_path / "hands"
    cmd = [sys.executable, "tools/hands.py", "--data", str(data), "--out", str(out), "--recipe", str(recipe)]
    proc = _run([*cmd, "--no-detector", "--ranks", "2"])

    # the recipe's two crops got the photo folder (given once, as a user would); two ranks, each
    # with half the recipe's batch of 4 and no loader worker
    config = (out / "run" / "config.toml").read_text()
    assert f'shards = ["{out / "shards"}", "{out / "shards"}"]' in config
    assert "batch_size = 2\n" in config and "workers = 0\n" in config
    assert (
        f"$ torchrun --standalone --nproc_per_node=2 -m handpose train --config {recipe} "
        f"--shards {out / 'shards'} --batch_size 2 --workers 0 --out {out / 'run'}"
    ) in proc.stdout
    assert "2 process(es) on cpu" in proc.stdout

    rows = json.loads((out / "hands.json").read_text())["rows"]
    assert [(r["model"], r["photos"], r["input"]) for r in rows] == [
        ("trained (tiny)", "DATA val", "labelled boxes"),
        ("trained (tiny)", "DATA val", "whole photo, 1 pass"),
        ("trained (tiny)", "DATA val", "whole photo, 2 passes"),
        ("mean training pose", "DATA val", "labelled boxes"),
        ("mean training pose", "DATA val", "whole photo"),
    ]
    _check_rows_are_reports(rows, out, ["trained-boxes", "trained-whole", "trained-refine1"])
    assert json.loads((out / "eval" / "trained-boxes" / "report.json").read_text())["hands"] == 6
    table = (out / "hands.md").read_text()
    assert table.count("\n| ") == 1 + len(rows) and "| trained (tiny) | DATA val | labelled boxes |" in table
    assert table in proc.stdout
    best = out / "run" / "checkpoints" / "best.pt"
    assert (out / "models" / "keypoints.pt").read_bytes() == best.read_bytes()
    assert not (out / "models" / "detector.pt").exists()

    # a re-run reuses every finished step: nothing is packed, trained or predicted again
    stamps = _stamps(out)
    again = _run([*cmd, "--no-detector", "--ranks", "2"])
    assert "$ " not in again.stdout and _stamps(out) == stamps
    steps = json.loads((out / "hands.json").read_text())["steps"]
    assert steps and all(s["reused"] and s["minutes"] is not None for s in steps)


@pytest.mark.slow
def test_make_hands_with_extra_and_val_photo_folders_and_the_detector(tmp_path: Path) -> None:
    """EXTRA (a photo folder and a cut-out folder) and VAL photo folders labelled by a stand-in
    teacher: the cut-outs composited onto the other set's photos, EXTRA packed as one box-crop
    training folder after DATA's box and image folders, VAL packed val-only and scored at every
    validation and in the table; the detector trained on DATA alone; the models left in
    OUT/models; every row its predict run's report; a re-run repeats no step."""
    data = yolokit.write_dataset(tmp_path / "ds", yolokit.default_spec())
    answers: dict = {}
    plain = photo_folder(tmp_path / "rooms", 10, 1, answers)
    cutouts = photo_folder(tmp_path / "signs", 6, 2, answers, cutout=True)
    other = photo_folder(tmp_path / "digits", 6, 3, answers)
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    recipe, det_recipe = tmp_path / "tiny.toml", tmp_path / "tinydet.toml"
    recipe.write_text(TINY)
    det_recipe.write_text(TINY_DETECTOR)
    out = tmp_path / "hands"
    env = {
        **os.environ,
        "HANDPOSE_TEST_TEACHER": f"{sys.executable} {ROOT / 'tests' / 'fake_teacher.py'}",
        "FAKE_TEACHER_ANSWERS": str(tmp_path / "answers.json"),
    }
    cmd = [
        *(sys.executable, "tools/hands.py", "--data", str(data), "--out", str(out), "--recipe", str(recipe)),
        *("--detect-recipe", str(det_recipe), "--multihand", "4", "--refine", "1"),
        *("--extra", str(plain), f"{cutouts}:cutout,one", "--val", f"{other}:one"),
    ]
    proc = _run(cmd, env)

    # the teacher's labels, the composites (on the other set's photos), the one EXTRA pack
    labelled = out / "teacher" / "digits"
    assert f"tests/fake_teacher.py {other} {labelled} --split val --keep-hands 1" in proc.stdout
    assert len(list((out / "teacher" / "rooms" / "train" / "labels").rglob("*.txt"))) == 10
    log = json.loads((out / "composite" / "signs" / "composite.json").read_text())
    assert len(log["photos"]) == 6 and all(Path(p["photo"]).parent.parent == plain for p in log["photos"])
    extra = json.loads((out / "extra-shards" / "manifest.json").read_text())["counts"]
    assert sum(extra.values()) == 16
    assert json.loads((out / "val" / "digits" / "manifest.json").read_text())["counts"] == {
        "train": 0,
        "val": 6,
        "test": 0,
    }

    # the keypoint run: DATA in box and image crops, EXTRA as a box crop, VAL scored, never trained on
    cfg = load_config(TrainConfig, out / "run" / "config.toml")
    assert cfg.shards == (str(out / "shards"), str(out / "shards"), str(out / "extra-shards"))
    layout = (("box", "image", "box"), (0.5625, 0.1875, 0.25))
    assert extra["train"] > 0 and (cfg.crop, cfg.weights) == layout
    assert cfg.val_shards == (str(out / "val" / "digits"),) and cfg.val_crop == ("box", "image")
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["digits-box/val_samples"] == 6 and "digits-image/val_error_px" in metrics[-1]
    det = load_config(TrainConfig, out / "detector-run" / "config.toml")
    assert (det.arch, det.shards, det.crop) == ("centernet", (str(out / "shards"),), ("image",))
    assert det.val_shards == (str(out / "multihand-shards"),)
    det_metrics = json.loads((out / "detector-run" / "summary.json").read_text())["final"]
    assert 0 <= det_metrics["multihand-shards/val_ap50"] <= 1
    for name, run in (("keypoints", "run"), ("detector", "detector-run")):
        model = (out / "models" / f"{name}.pt").read_bytes()
        assert model == (out / run / "checkpoints" / checkpoint.BEST).read_bytes()

    # one row per predict run, each its report; the detector rows where predict has --detector
    result = json.loads((out / "hands.json").read_text())
    rows = result["rows"]
    want = [
        ("DATA val", "labelled boxes", "trained-boxes"),
        ("DATA val", "whole photo, 1 pass", "trained-whole"),
        ("DATA val", "whole photo, 2 passes", "trained-refine1"),
        ("DATA val", "detector + keypoints", "trained-detector"),
        ("digits (other source)", "labelled boxes", "trained-digits-boxes"),
        ("digits (other source)", "whole photo, 2 passes", "trained-digits-refine1"),
        ("digits (other source)", "detector + keypoints", "trained-digits-detector"),
        ("multi-hand test", "detector + keypoints", "trained-multihand"),
    ]
    with_detector = hands.predict_has_detector()
    if not with_detector:
        want = [w for w in want if w[1] != "detector + keypoints"]
        assert "predict has no --detector: the detector rows are left out" in proc.stdout
    # the multi-hand test from DATA's val photos: 4 mosaics, 4 single photos, 2 + 2 without a hand
    made = json.loads((out / "multihand" / "multihand.json").read_text())
    assert made["counts"] == {"mosaic": 4, "single": 4, "background": 2, "blanked": 2}
    assert (
        json.loads((out / "multihand-shards" / "manifest.json").read_text())["counts"]["val"] == made["hands"]
    )
    assert [(r["photos"], r["input"]) for r in rows[: len(want)]] == [w[:2] for w in want]
    _check_rows_are_reports(rows, out, [w[2] for w in want])
    assert json.loads((out / "eval" / "trained-digits-boxes" / "report.json").read_text())["hands"] == 6
    steps = {s["step"]: s for s in result["steps"]}
    assert {"teacher rooms", "teacher signs", "teacher digits", "composite signs", "pack EXTRA"} <= set(steps)
    assert {"pack digits", "train keypoints", "train detector", "predict trained-digits-boxes"} <= set(steps)
    assert all(s["minutes"] >= 0 and not s["reused"] for s in steps.values())

    # a re-run labels, packs, trains and predicts nothing again
    stamps = _stamps(out)
    again = _run(cmd, env)
    assert "$ " not in again.stdout and _stamps(out) == stamps
    assert json.loads((out / "hands.json").read_text())["rows"] == rows


# ---- the pieces ----------------------------------------------------------------------------------


def test_the_recipe_layout_gives_data_its_crops_and_extra_folders_their_slots() -> None:
    two = {"crop": ["box", "image"], "weights": [0.75, 0.25]}
    three = {"crop": ["box", "image", "box"], "weights": [0.5, 0.25, 0.25]}
    assert hands.recipe_layout(two, []) == (["box", "image"], [0.75, 0.25], 2)
    # no slot: DATA box's crop, 0.25 of the weights (EXTRA_SHARE); DATA's slots keep their 3:1 in
    # the rest (18/6/8 of a batch of 32, 9/3/4 of each rank's 16)
    assert hands.recipe_layout(two, [0.4]) == (["box", "image", "box"], [0.5625, 0.1875, 0.25], 2)
    # two folders without a slot share the 0.25 by their sizes
    assert hands.recipe_layout(two, [0.4, 0.2]) == (
        ["box", "image", "box", "box"],
        [0.5625, 0.1875, 0.1667, 0.0833],
        2,
    )
    assert hands.recipe_layout(three, []) == (["box", "image"], [0.5, 0.25], 2)  # EXTRA's slot dropped
    assert hands.recipe_layout(three, [0.4]) == (["box", "image", "box"], [0.5, 0.25, 0.25], 2)
    assert hands.recipe_layout(three, [0.4, 2.0]) == (
        ["box", "image", "box", "box"],
        [0.375, 0.1875, 0.1875, 0.25],
        2,
    )
    # --extra-share: another share, the same rule
    assert hands.recipe_layout(two, [0.4], 0.2) == (["box", "image", "box"], [0.6, 0.2, 0.2], 2)
    assert hands.recipe_layout(two, [0.4, 0.2], 0.15) == (
        ["box", "image", "box", "box"],
        [0.6375, 0.2125, 0.1, 0.05],
        2,
    )
    assert hands.recipe_layout({"crop": "image"}, [0.5]) == (["image", "image"], [0.75, 0.25], 1)
    assert hands.recipe_layout({"crop": "image"}, []) == (["image"], None, 1)
    assert hands.recipe_layout({}, []) == (["image"], None, 1)


def test_train_args_name_only_what_differs_from_the_recipe(tmp_path: Path) -> None:
    from shardkit import photo_samples, write_pack

    rng = np.random.default_rng(0)
    d, e, v, o = (tmp_path / x for x in ("d", "e", "v", "o"))
    write_pack(d, {"train": [[s for i in range(10) for s in photo_samples(i, rng, 1)]]})
    write_pack(e, {"train": [[s for i in range(4) for s in photo_samples(i, rng, 1)]]})
    recipe = tmp_path / "r.toml"
    recipe.write_text('crop = ["box", "image", "box"]\nweights = [0.5, 0.25, 0.25]\n')
    base = ["train", "--config", str(recipe)]
    assert hands.train_args(recipe, d, [e], [], o) == [*base, "--shards", f"{d},{d},{e}", "--out", str(o)]
    assert hands.train_args(recipe, d, [], [v], o) == [
        *(*base, "--shards", str(d), "--crop", "box,image", "--weights", "0.5,0.25"),
        *("--val_shards", str(v), "--out", str(o)),
    ]
    recipe.write_text('crop = ["box", "image"]\nweights = [0.75, 0.25]\n')
    assert hands.train_args(recipe, d, [e], [], o) == [
        *(*base, "--shards", f"{d},{d},{e}", "--crop", "box,image,box", "--weights", "0.5625,0.1875,0.25"),
        *("--out", str(o)),
    ]
    # an epoch of full passes over DATA's box crops keeps its length on DATA alone: 10 photos at 3
    # box crops of each batch of 4 -> 3 batches, with the extra folder or without it
    recipe.write_text(
        'crop = ["box", "image"]\nweights = [0.75, 0.25]\nbatch_size = 4\nbatches_per_epoch = 0\n'
    )
    assert hands.train_args(recipe, d, [e], [], o) == [
        *(*base, "--shards", f"{d},{d},{e}", "--crop", "box,image,box", "--weights", "0.5625,0.1875,0.25"),
        *("--batches_per_epoch", "3", "--out", str(o)),
    ]
    assert hands.train_args(recipe, d, [e], [], o, 0.2) == [
        *(*base, "--shards", f"{d},{d},{e}", "--crop", "box,image,box", "--weights", "0.6,0.2,0.2"),
        *("--batches_per_epoch", "3", "--out", str(o)),
    ]
    assert hands.train_args(recipe, d, [], [], o) == [*base, "--shards", str(d), "--out", str(o)]


def test_photo_sets_marks_names_and_teacher_options(tmp_path: Path) -> None:
    for name in ("a/photos", "b/photos", "shards", "voc"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "voc" / "x.xml").write_text("<annotation/>")
    sets = hands.photo_sets(
        [f"{tmp_path / 'a/photos'}:cutout,one", str(tmp_path / "shards")],
        [str(tmp_path / "b/photos"), str(tmp_path / "voc")],
    )
    assert [(s.name, s.role, s.cutout, s.one) for s in sets] == [
        ("photos", "extra", True, True),
        ("shards-2", "extra", False, False),  # never a training folder's name
        ("photos-2", "val", False, False),
        ("voc", "val", False, False),
    ]
    assert hands.teacher_options(sets[0]) == ["--keep-hands", "1"]
    assert hands.teacher_options(sets[2]) == ["--split", "val"]
    assert hands.teacher_options(sets[3]) == ["--split", "val", "--voc"]
    with pytest.raises(HandposeError, match="--val .*: overlaps --extra"):
        hands.photo_sets([str(tmp_path / "a")], [str(tmp_path / "a/photos")])
    with pytest.raises(HandposeError, match="cutout is for --extra"):
        hands.photo_sets([], [f"{tmp_path / 'voc'}:cutout"])
    with pytest.raises(HandposeError, match="is not a folder"):
        hands.photo_sets([str(tmp_path / "nope:one")], [])
    named = hands.photo_sets([], [f"{tmp_path / 'voc'}:one,name=digits", f"{tmp_path / 'a'}:name=digits"])
    assert [(s.name, s.one) for s in named] == [("digits", True), ("digits-2", False)]
    with pytest.raises(HandposeError, match="name '../x'"):
        hands.photo_sets([], [f"{tmp_path / 'voc'}:name=../x"])


def _report(k: int, detector: bool) -> dict:
    rep = {
        "hands": 10 + k,
        "mean_error_px": 1.0 + k,
        "mean_error_pct_box": 2.0 + k,
        "mean_error_pct": 3.0 + k,
        "pck_0.2_box": 0.5 + k / 100,
    }
    if detector:
        rep.update(pose_ap50_95=0.4 + k / 100, recall=0.9 - k / 100, precision=0.8 + k / 200)
    return rep


def test_the_table_is_built_from_the_predict_reports(tmp_path: Path) -> None:
    """Every planned predict run's report.json (written here, with the detector's figures where
    it ran) gives its row; the table shows each figure and `-` where a row has none."""
    model, data, val, mh, det = (tmp_path / x for x in ("k.pt", "s", "v", "m", "d.pt"))
    runs = hands.predictions("trained (r)", model, data, [("digits", val)], 2, det, mh)
    assert [(p.slug, p.on, p.how, p.photos) for p in runs] == [
        ("trained-boxes", "DATA val", "labelled boxes", data),
        ("trained-whole", "DATA val", "whole photo, 1 pass", data),
        ("trained-refine2", "DATA val", "whole photo, 3 passes", data),
        ("trained-detector", "DATA val", "detector + keypoints", data),
        ("trained-digits-boxes", "digits (other source)", "labelled boxes", val),
        ("trained-digits-refine2", "digits (other source)", "whole photo, 3 passes", val),
        ("trained-digits-detector", "digits (other source)", "detector + keypoints", val),
        ("trained-multihand", "multi-hand test", "detector + keypoints", mh),
    ]
    assert runs[3].args == ("--detector", str(det)) and runs[2].args == ("--refine", "2")
    assert runs[0].args == ("--boxes", "gt") and all(p.weights == model for p in runs)
    evals = tmp_path / "eval"
    for k, p in enumerate(runs):
        (evals / p.slug).mkdir(parents=True)
        (evals / p.slug / "report.json").write_text(json.dumps(_report(k, "detector" in p.how)))
    rows = hands.report_rows(runs, evals)
    rep = _report(7, True)
    assert rows[7] == {
        "model": "trained (r)",
        "photos": "multi-hand test",
        "input": "detector + keypoints",
        "hands": rep["hands"],
        "mean_px": rep["mean_error_px"],
        "pct_box": rep["mean_error_pct_box"],
        "pct_image": rep["mean_error_pct"],
        "pck_0.2_box": rep["pck_0.2_box"],
        "pose_ap50_95": rep["pose_ap50_95"],
        "recall": rep["recall"],
        "precision": rep["precision"],
    }
    assert rows[0]["pose_ap50_95"] is None and rows[0]["pct_box"] == 2.0
    lines = hands.table(rows).splitlines()
    assert lines[0] == (
        "| model | photos | input | mean px | % of box | % of image side | PCK@0.2 box | pose AP50-95 "
        "| recall | precision |"
    )
    assert lines[2] == "| trained (r) | DATA val | labelled boxes | 1.0 | 2.0 | 3.0 | 0.500 | - | - | - |"
    assert lines[9] == (
        "| trained (r) | multi-hand test | detector + keypoints | 8.0 | 9.0 | 10.0 | 0.570 | 0.470 "
        "| 0.830 | 0.835 |"
    )
    # without a detector: no detector rows, no multi-hand test
    plain = hands.predictions("t", model, data, [("digits", val)], 1, None, mh)
    assert [p.how for p in plain] == ["labelled boxes", "whole photo, 1 pass", "whole photo, 2 passes"] + [
        "labelled boxes",
        "whole photo, 2 passes",
    ]


@pytest.mark.parametrize("share", ["0", "1", "1.5", "-0.1"])
def test_an_extra_share_outside_0_1_is_one_line(tmp_path: Path, share: str) -> None:
    """`make hands EXTRA_SHARE=S` (`--extra-share S`) outside (0, 1): one line naming the flag,
    exit 1, and nothing written."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "hands.py"), "--data", str(tmp_path), "--out", str(out)]
    done = subprocess.run([*cmd, "--extra-share", share], capture_output=True, text=True, check=False)
    assert done.returncode == 1 and not out.exists()
    assert done.stderr.strip().splitlines() == [
        f"error: --extra-share {float(share)}: must be between 0 and 1 (a share of each batch)"
    ]


def test_a_cpu_recipe_trains_as_one_rank_per_core_where_its_batch_splits(tmp_path: Path) -> None:
    """`cpu_ranks`: a CPU recipe whose batch splits evenly over the cores into shares of at least
    16, each holding one sample of every folder, runs one rank per core; `launched` gives each
    rank its share of the batch and no loader worker, and the step prints as torchrun."""
    recipe = ROOT / "pipelines" / "hands_cpu.toml"  # device "cpu", batch 32
    assert hands.cpu_ranks(recipe, 3, 2) == 2
    assert hands.cpu_ranks(recipe, 3, 1) == 1
    assert hands.cpu_ranks(recipe, 3, 3) == 1  # 32 does not split in 3
    assert hands.cpu_ranks(recipe, 3, 4) == 1  # 8 a rank: BatchNorm on fewer than MIN_RANK_BATCH
    big = tmp_path / "big.toml"
    big.write_text('device = "cpu"\nbatch_size = 64\n')
    assert hands.cpu_ranks(big, 3, 4) == 4
    assert hands.cpu_ranks(big, 20, 4) == 1  # 16 a rank cannot hold 20 folders
    gpu = tmp_path / "gpu.toml"
    gpu.write_text('device = "auto"\nbatch_size = 32\n')
    assert hands.cpu_ranks(gpu, 1, 2) == 1
    args = ["train", "--config", str(recipe), "--shards", "a,a,b", "--out", "run"]
    assert hands.launched(args, 32, 1) == [sys.executable, "-m", "handpose", *args]
    argv = hands.launched(args, 32, 2)
    assert argv == [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("-m", "handpose", "train", "--config", str(recipe), "--shards", "a,a,b"),
        *("--batch_size", "16", "--workers", "0", "--out", "run"),
    ]
    typed = "torchrun --standalone --nproc_per_node=2 -m handpose train --config "
    assert hands.shown(argv).startswith(typed)


@pytest.mark.parametrize(
    ("flag", "line"),
    [
        (["--ranks", "0"], "--ranks 0: {recipe}'s batch of 32 does not split into 0 equal shares"),
        (["--ranks", "3"], "--ranks 3: {recipe}'s batch of 32 does not split into 3 equal shares"),
        (["--recipe", "nowhere.toml"], "--recipe nowhere.toml: no such file"),
    ],
)
def test_a_ranks_or_recipe_mistake_is_one_line(tmp_path: Path, flag: list[str], line: str) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "hands.py"), "--data", str(tmp_path), "--out", str(out)]
    done = subprocess.run([*cmd, *flag], capture_output=True, text=True, check=False)
    assert done.returncode == 1 and not out.exists()
    recipe = ROOT / "pipelines" / "hands_cpu.toml"
    assert done.stderr.strip().splitlines() == ["error: " + line.format(recipe=recipe)]


def test_a_step_made_by_another_command_is_refused(tmp_path: Path) -> None:
    steps = hands.Steps(tmp_path)
    marker = tmp_path / "made"
    steps.run("make", [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"], marker)
    assert (
        marker.read_text() == "x"
        and json.loads((tmp_path / "steps.json").read_text())["make"]["minutes"] >= 0
    )
    again = hands.Steps(tmp_path)
    again.run("make", [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"], marker)  # reused
    assert again.log[0]["reused"]
    with pytest.raises(HandposeError, match="made by another command"):
        again.run("make", [sys.executable, "-c", "print('other')"], marker)


def test_train_ranks_launches_the_same_training_both_ways(tmp_path: Path) -> None:
    """tools/train_ranks.py: one process as the recipe has it, and one torchrun rank per core with
    its share of the batch and no worker; each run's second epoch is its rate."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_ranks", ROOT / "tools" / "train_ranks.py")
    assert spec is not None and spec.loader is not None
    tr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tr)
    recipe = ROOT / "pipelines" / "hands_cpu.toml"
    runs = tr.commands(recipe, ["--shards", "a,a,b"], 400, 2, tmp_path)
    common = ["train", "--config", str(recipe), "--shards", "a,a,b", "--epochs", "2"]
    common += ["--batches_per_epoch", "400", "--val_batches", "1"]
    assert runs == {
        "one process": [sys.executable, "-m", "handpose", *common, "--out", str(tmp_path / "one")],
        "2 ranks x 1 thread": [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
            *("-m", "handpose", *common, "--batch_size", "16", "--workers", "0"),
            *("--out", str(tmp_path / "ranks")),
        ],
    }
    rows = [{"epoch": 1, "samples_per_s": 280.5}, {"epoch": 2, "samples_per_s": 301.25}, {"epoch": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tr.second_epoch_rate(tmp_path) == 301.25

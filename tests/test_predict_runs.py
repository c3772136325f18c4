"""`handpose predict` runs: it writes only its own files, a previous result stays intact until a
new one is complete, an interrupted run (Ctrl-C, SIGKILL) resumes to the bytes of an
uninterrupted one, torchrun ranks merge into one process's result, and user mistakes are one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from predictkit import WARP, FixedPoseModel, encode, smooth_image

from handpose.errors import HandposeError
from handpose.predict import predict
from handpose.predict_staging import STAGING
from handpose.skeleton import NUM_JOINTS

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RESULT = (
    "predictions.jsonl",
    "errors.jsonl",
    "report.json",
    "report.md",
    "error_hist.png",
    "pck.png",
    "gallery.png",
)


def _pose_model() -> FixedPoseModel:
    rng = np.random.default_rng(0)
    return FixedPoseModel(rng.uniform(30, 100, (NUM_JOINTS, 2)), WARP.size)


def _photos(folder: Path, n: int, *, corrupt: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        data = encode(smooth_image(96 + 8 * (k % 4), 80, k), "JPEG", quality=85)
        (folder / f"p{k:03d}.jpg").write_bytes(data[: len(data) // 2] if k == corrupt else data)
    return folder


def _files(out: Path) -> dict[str, bytes]:
    """Every file under OUT (relative name -> bytes), run.json and the staging folder aside."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run.json" and STAGING not in p.parts
    }


def _run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


# ----------------------------------------------------------------------------- its own files only


def test_only_its_own_files_are_written_or_removed(synth_root: Path, tmp_path: Path) -> None:
    """A user's report.md and notes in --out survive every run; predict refuses to overwrite a file
    it did not write; its own stale outputs (old overlays, an old report) are replaced only by a
    complete new run; run.json lists exactly what the run wrote."""
    model, out = _pose_model(), tmp_path / "out"
    photos = _photos(tmp_path / "photos", 5)
    out.mkdir()
    (out / "report.md").write_text("my own notes\n")
    (out / "notes.txt").write_text("keep me\n")
    predict((model, WARP), [photos], out, overlays=2, quiet=True)
    run = _run_json(out)
    assert run["status"] == "complete" and run["files"] == [
        "predictions.jsonl",
        "errors.jsonl",
        "overlays/0001-p000.png",
        "overlays/0002-p001.png",
    ]
    assert (out / "report.md").read_text() == "my own notes\n"
    before = _files(out)
    with pytest.raises(HandposeError, match=r"report\.md: exists and handpose predict did not write it"):
        predict(
            (model, WARP), [synth_root], out, split="train", quiet=True
        )  # labelled: would write report.md
    assert _files(out) == before and not (out / STAGING).exists()
    (out / "report.md").unlink()
    predict((model, WARP), [synth_root], out, split="train", overlays=2, quiet=True)
    names = set(_run_json(out)["files"])
    assert {"report.md", "report.json", "gallery.png"} <= names
    assert not (out / "overlays" / "0001-p000.png").exists()  # our stale overlays went
    assert sorted(p.name.split("-")[0] for p in (out / "overlays").iterdir()) == ["best", "worst"]
    predict((model, WARP), [photos], out, quiet=True)
    assert _run_json(out)["files"] == ["predictions.jsonl", "errors.jsonl"]
    assert not (out / "report.md").exists() and not any((out / "overlays").iterdir())
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert sorted(p.name for p in out.iterdir()) == [
        "errors.jsonl",
        "notes.txt",
        "overlays",
        "predictions.jsonl",
        "run.json",
    ]


def test_coco_must_be_a_new_file_inside_out(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", 2)
    model, out = _pose_model(), tmp_path / "out"
    out.mkdir()
    (out / "mine.json").write_text("[]\n")
    (out / "afile").write_text("x")
    refused = {
        out / "predictions.jsonl": "one of predict's own outputs",
        out / "overlays" / "c.json": "one of predict's own outputs",
        out / STAGING / "c.json": "one of predict's own outputs",
        out: "is the output folder",
        tmp_path / "c.json": "outside the output folder",
        out / ".." / "c.json": "outside the output folder",
        out / "mine.json": "mine.json: exists and handpose predict did not write it",
        out / "afile" / "c.json": "afile is a file, not a folder",
    }
    for coco, message in refused.items():
        with pytest.raises(HandposeError, match=message):
            predict((model, WARP), [photos], out, coco=coco, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["afile", "mine.json"]
    predict(
        (model, WARP), [photos], out, coco=out / "sub" / "dir" / "c.json", quiet=True
    )  # its folder is made
    assert len(json.loads((out / "sub" / "dir" / "c.json").read_text())) == 2
    assert "sub/dir/c.json" in _run_json(out)["files"]
    predict(
        (model, WARP), [photos], out, coco=out / "sub" / "dir" / "c.json", quiet=True
    )  # ours now: replaced


# ----------------------------------------------------------------------------- interrupted runs


class _Interrupting(FixedPoseModel):
    """The same model (same class, weights and spec: the same job) that raises Ctrl-C's
    KeyboardInterrupt on its n-th forward call when armed."""

    interrupt_at = 0
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        if type(self).calls == type(self).interrupt_at:
            raise KeyboardInterrupt
        return super().forward(x)


def test_interrupted_run_keeps_the_previous_result_and_resumes(synth_root: Path, tmp_path: Path) -> None:
    """Ctrl-C mid-run: the previous complete result in --out is untouched; the re-run continues
    after the last checkpoint (fewer forward passes) and its outputs equal an uninterrupted run's
    byte for byte."""
    rng = np.random.default_rng(0)
    model = _Interrupting(rng.uniform(30, 100, (NUM_JOINTS, 2)), WARP.size)
    opts = {"split": "train", "batch_size": 4, "overlays": 2, "quiet": True}
    clean, out = tmp_path / "clean", tmp_path / "out"
    predict((model, WARP), [synth_root], clean, coco=clean / "c.json", **opts)
    full_calls = _Interrupting.calls
    predict((model, WARP), [_photos(tmp_path / "photos", 3)], out, quiet=True)
    previous, previous_run = _files(out), _run_json(out)

    _Interrupting.calls, _Interrupting.interrupt_at = 0, 12  # in the second chunk (8 batches each)
    with pytest.raises(KeyboardInterrupt):
        predict((model, WARP), [synth_root], out, coco=out / "c.json", **opts)
    assert _files(out) == previous and _run_json(out) == previous_run
    progress = json.loads((out / STAGING / "rank-0" / "progress.json").read_text())
    assert progress["chunks"] == 1

    _Interrupting.calls, _Interrupting.interrupt_at = 0, 0
    predict((model, WARP), [synth_root], out, coco=out / "c.json", **opts)
    assert _Interrupting.calls == full_calls - 8  # the first chunk was not predicted again
    got, want = _files(out), _files(clean)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want), [
        k for k in want if got.get(k) != want[k]
    ]
    assert set(RESULT) <= set(want) and not (out / STAGING).exists()


def test_a_refused_commit_leaves_the_result_waiting(tmp_path: Path) -> None:
    """A file of the user's under a name predict only learns at the end (an overlay) stops the
    commit with one line; the finished result waits in the staging folder, and the re-run after
    the user moved the file commits it without predicting again."""
    photos = _photos(tmp_path / "photos", 3)
    rng = np.random.default_rng(0)
    model = _Interrupting(rng.uniform(30, 100, (NUM_JOINTS, 2)), WARP.size)
    predict((model, WARP), [photos], tmp_path / "clean", overlays=1, quiet=True)
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "0001-p000.png").write_bytes(b"mine")
    with pytest.raises(HandposeError, match=r"0001-p000\.png: exists and handpose predict did not write it"):
        predict((model, WARP), [photos], out, overlays=1, quiet=True)
    assert not (out / "predictions.jsonl").exists() and (out / STAGING).is_dir()
    (out / "overlays" / "0001-p000.png").unlink()
    _Interrupting.calls = 0
    predict((model, WARP), [photos], out, overlays=1, quiet=True)
    assert _Interrupting.calls == 0 and _files(out) == _files(tmp_path / "clean")


def _save_unet(path: Path) -> None:
    """A random tutorial-shaped ShallowUNet as a bare state_dict (a real model file for the CLI)."""
    from handpose.model import ShallowUNet

    torch.manual_seed(0)
    net = ShallowUNet(16, 3)
    with torch.no_grad():
        net.conv_out[0].weight.mul_(40.0)
    torch.save(net.state_dict(), path)


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "handpose", "predict", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_a_clean_run(synth_root: Path, tmp_path: Path) -> None:
    """A real `kill -9` of `handpose predict` after its first checkpoint, then the same command
    again: the result equals an uninterrupted run's, byte for byte."""
    _save_unet(tmp_path / "model.pt")
    photos = _photos(tmp_path / "photos", 90, corrupt=40)  # 3 chunks of 32, one corrupt photo
    args = [str(tmp_path / "model.pt"), str(photos), "--batch-size", "4", "--overlays", "2"]
    clean = _cli(*args, "--out", str(tmp_path / "clean"), "--coco", str(tmp_path / "clean" / "c.json"))
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "handpose", "predict", *args, "--out", str(out), "--coco", f"{out}/c.json"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / STAGING / "rank-0" / "progress.json"
    deadline = time.monotonic() + 240
    while not progress.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["chunks"]
    assert 1 <= done < 3 and not (out / "run.json").exists()  # killed mid-run
    again = _cli(*args, "--out", str(out), "--coco", str(out / "c.json"))
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    got, want = _files(out), _files(tmp_path / "clean")
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 89
    assert _run_json(out)["errors"] == 1


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(synth_root: Path, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 handpose predict`: the ranks split the inputs and rank 0
    merges them into the result one process writes (same bytes, same report)."""
    _save_unet(tmp_path / "model.pt")
    args = [
        str(tmp_path / "model.pt"),
        str(synth_root),
        "--split",
        "train",
        "--batch-size",
        "2",
        "--overlays",
        "2",
    ]
    one = _cli(*args, "--out", str(tmp_path / "one"), "--coco", str(tmp_path / "one" / "c.json"))
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "handpose", "predict", *args, "--out", str(tmp_path / "two")]
    cmd += ["--coco", str(tmp_path / "two" / "c.json")]
    two = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    got, want = _files(tmp_path / "two"), _files(tmp_path / "one")
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)
    assert set(RESULT) <= set(want)
    assert _run_json(tmp_path / "two")["world_size"] == 2 and _run_json(tmp_path / "one")["world_size"] == 1


# ----------------------------------------------------------------------------- user mistakes


def test_mistakes_are_one_line_exit_1(
    packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the real CLI entry: exit code 1, one line naming the flag or file, no traceback."""
    from handpose.cli import main

    _save_unet(tmp_path / "model.pt")
    (tmp_path / "notes.txt").write_text("not a model\n")
    photos = _photos(tmp_path / "photos", 1)
    model = str(tmp_path / "model.pt")
    cases = [
        ([model, str(photos), "--batch-size", "0"], "--batch-size 0: must be >= 1"),
        ([model, str(photos), "--workers", "-1"], "--workers -1: must be >= 0"),
        ([model, str(photos), "--overlays", "-1"], "--overlays -1: must be >= 0"),
        ([model, str(photos), "--refine", "-1"], "--refine -1: must be >= 0"),
        (
            [model, str(packed), "--split", "bogus"],
            "no shards for split 'bogus' (have: eval, test, train, val)",
        ),
        ([model, str(photos), "--split", "val"], "--split val: applies to shards folders"),
        (
            [str(tmp_path / "notes.txt"), str(photos)],
            "notes.txt: not a handpose checkpoint or tutorial state_dict",
        ),
        ([model, str(photos), "--boxes", str(tmp_path / "nope.json")], "--boxes"),
        ([model, str(photos), "--boxes", "gt"], "--boxes gt: no input carries labels"),
        ([model, str(photos / "p000.jpg"), "--out", str(photos / "p000.jpg")], "is a file, not a folder"),
    ]
    for args, message in cases:
        argv = ["handpose", "predict", *args]
        if "--out" not in args:
            argv += ["--out", str(tmp_path / "out")]
        old = sys.argv
        sys.argv = argv
        try:
            with pytest.raises(SystemExit) as e:
                main()
        finally:
            sys.argv = old
        err = capsys.readouterr().err
        assert e.value.code == 1, (args, err)
        assert message in " ".join(err.split()), (message, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()

"""tools/gpu_check.py, the driver of `make gpu-check`, on the CPU: a failing, timed-out or
skipped step is reported in the summary and the next step still runs; pytest's junit XML and
each bench's JSON line are read back; without CUDA it does nothing and says so in one line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
assert _spec is not None and _spec.loader is not None
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up by name
_spec.loader.exec_module(gc)

PY = sys.executable


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent's reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_failures_timeouts_and_figures_land_in_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    hang = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(120)"
    )
    bench = "print('a table'); print('{\"x\": 1.23456, \"y\": 2}')"
    steps = [
        gc.Step("a", [PY, "-c", bench], 60, (), gc.bench_figures(("x",))),
        gc.Step("b", [PY, "-c", "import sys; print('working'); sys.exit('error: --shards: broken')"], 60),
        gc.Step("c", [PY, "-c", hang], 3),
        gc.Step("d", [PY, "-c", "print('never')"], 60, ("b",)),
        gc.Step("e", [PY, "-c", "print('no json here')"], 60, (), gc.bench_figures(("x",))),
        gc.Step("f", [PY, "-c", "print('never')"], 60, (), None, "nvidia.no_such_package"),
    ]  # fmt: skip
    monkeypatch.setattr(gc, "plan", lambda out, cpu: steps)
    summary = gc.check(tmp_path / "out", cpu=True, budget_s=120)
    s = summary["steps"]
    assert list(s) == ["a", "b", "c", "d", "e", "f"]
    assert s["a"]["ok"] and s["a"]["figures"] == {"x": 1.235}
    assert not s["b"]["ok"] and s["b"]["rc"] == 1 and s["b"]["error"] == "error: --shards: broken"
    assert "working" in Path(s["b"]["log"]).read_text()
    assert s["c"]["error"] == "timed out after 3 s"
    assert not _alive(int(pidfile.read_text())), "the timed-out step's child process survived"
    assert s["d"]["error"] == "not run: step b failed"
    assert s["e"]["error"] == "ValueError: no JSON line in the output"
    assert s["f"] == {"ok": True, "seconds": 0.0, "skipped": "nvidia.no_such_package is not installed"}
    assert summary["gpu_check"] == "failed" and summary["failed"] == ["b", "c", "d", "e"]
    assert summary["skipped"] == ["f"]


def test_a_spent_budget_runs_nothing_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = [gc.Step("a", [PY, "-c", "print(1)"], 60)]
    monkeypatch.setattr(gc, "plan", lambda out, cpu: steps)
    summary = gc.check(tmp_path / "out", cpu=True, budget_s=gc.MIN_STEP_S - 1)
    assert summary["steps"]["a"]["error"] == f"not run: the {gc.MIN_STEP_S - 1} s budget was spent"


def test_junit_outcomes_and_recorded_figures(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok(record_property):\n    record_property('mean_px', 0.125)\n"
        "    record_property('label', 'nccl 2.27')\n"
        "def test_bad():\n    assert 1 == 2, 'off by one'\n"
        "@pytest.mark.skip(reason='CUDA is not available')\ndef test_gpu():\n    pass\n"
    )
    xml = tmp_path / "t.xml"
    subprocess.run(
        [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "test_x.py"],
        cwd=tmp_path,
        capture_output=True,
    )
    tests = gc.read_junit(xml)
    assert tests["test_ok"]["outcome"] == "passed"
    assert tests["test_ok"]["figures"] == {"mean_px": 0.125, "label": "nccl 2.27"}
    assert tests["test_bad"]["outcome"] == "failed" and "off by one" in tests["test_bad"]["message"]
    assert tests["test_gpu"] == {"outcome": "skipped", "seconds": 0.0, "message": "CUDA is not available"}


def test_progress_lines_when_pytest_was_killed(tmp_path: Path) -> None:
    """No junit XML when pytest is killed (the tests step timed out): the outcomes of the tests
    that finished come from `pytest -v`'s lines, and the running one is "unfinished"."""
    (tmp_path / "test_x.py").write_text(
        "import os, signal\n"
        "def test_one():\n    pass\n"
        "def test_two():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "def test_three():\n    pass\n"
    )
    log = tmp_path / "tests.log"
    argv = [PY, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(tmp_path / "test_x.py")]
    result = gc.run_step(argv, log, 120)
    assert not result.ok and result.rc == -9
    assert gc.read_progress(log.read_text()) == {
        "test_one": {"outcome": "passed"},
        "test_two": {"outcome": "unfinished"},
    }


def test_only_adds_what_the_steps_need(tmp_path: Path) -> None:
    names = [s.name for s in gc.select(gc.plan(tmp_path, cpu=False), "bench-predict,tests")]
    assert names == ["tests", "synth", "pack", "train", "bench-predict"]
    with pytest.raises(SystemExit, match="unknown step bench-gpu"):
        gc.select(gc.plan(tmp_path, cpu=False), "bench-gpu")


def test_a_folder_it_did_not_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not written by gpu-check"):
        gc.prepare_out(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep"
    out = tmp_path / "out"
    gc.prepare_out(out)
    (out / "logs").mkdir()
    (out / "notes.txt").write_text("the user's")
    gc.prepare_out(out)  # a second run clears its own outputs only
    assert not (out / "logs").exists() and (out / "notes.txt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_and_nothing_done(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PY, str(ROOT / "tools" / "gpu_check.py"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stderr == ""
    (line,) = proc.stdout.splitlines()
    assert line.startswith("gpu-check: CUDA is not available") and "TORCH_SPEC=torch" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cpu_smoke_run(tmp_path: Path) -> None:
    """`gpu_check.py --cpu` through the real steps (tiny sizes): the CUDA tests are reported as
    skipped, a bench's JSON line becomes its figures, and the summary is the last line."""
    out = tmp_path / "out"
    cmd = [
        PY,
        str(ROOT / "tools" / "gpu_check.py"),
        "--cpu",
        "--out",
        str(out),
        "--only",
        "tests,bench-train-wds",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert list(summary["steps"]) == ["tests", "synth", "pack", "bench-train-wds"]
    assert {t["outcome"] for t in summary["tests"].values()} == {"skipped"}
    assert "test_nccl_initialises" in summary["tests"]
    figures = summary["steps"]["bench-train-wds"]["figures"]
    assert (figures["device"], figures["loader"], figures["image_size"], figures["batch_size"]) == (
        "cpu",
        "wds",
        32,
        8,
    )
    assert figures["samples_per_s"] > 0 and figures["step_ms"] > 0

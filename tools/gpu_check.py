#!/usr/bin/env python3
"""`make gpu-check`: the GPU paths tested and benchmarked on generated data, then ONE JSON line.

On a CUDA machine, in this order (each step a subprocess with its own log and time limit):
  tests              pytest -m cuda tests/test_gpu.py: DALI "mixed" decode vs the CPU graph (both
                     crops), bf16 + channels_last steps, compile = true, predict CUDA vs CPU, NCCL
  synth, pack        generated hands -> shards (the data of BENCHMARKS.md's CPU figures)
  train              handpose train on CUDA: the checkpoint bench-predict times
  bench-loader-wds, bench-loader-dali, bench-train-wds, bench-train-dali, bench-predict
Every step gets min(its own limit, what is left of --budget): the whole check ends inside the
budget, and a step that no longer fits is reported as not run. A failing or timed-out step is
reported in the summary and the next one runs. The last line of stdout is the summary:
{"gpu_check": "ok"|"failed", "machine": {...}, "tests": {name: {outcome, seconds, figures,
message}}, "steps": {name: {ok, seconds, figures | error, log}}}; OUT/summary.json holds it too,
OUT/logs/STEP.log each step's output. Exit code 0 when every step and test passed (skips allowed).

Without CUDA it prints one line saying so and exits 0, having done nothing. `--cpu` runs the same
steps with tiny sizes on the CPU (the CUDA tests then skip): the plumbing, as CI checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".handpose-gpu-check"  # OUT holds this: the folder is ours to clear on the next run
OWN = ("freihand", "shards", "run", "logs", "tests.xml", "summary.json", "tiny.toml")  # what we write
MIN_STEP_S = 15  # a step with less time than this left is not started

# Sizes on a CUDA machine, for one H200 and 16 cores; estimates (not yet measured there) in
# seconds, limits in brackets. Data: 2000 generated 224 px hands (1600 train / 300 val / 100
# test), the data of BENCHMARKS.md's CPU figures. synth makes ~80-150 images/s per core (2-core
# VM), so 16 workers take ~2 s; pack ran 2,700 images/s on 2 cores: ~1 s.
#   tests 150 [240]: compile ~60 (inductor, forward + backward of a depth-2 UNet), predict's
#     48-step CPU training ~10 and two predicts ~10, DALI 2 x ~10, NCCL torchrun ~15, CUDA
#     start and imports ~20
#   synth 10 [60], pack 5 [60]
#   train 30 [90]: the tutorial's model (128 px, width 16, batch 48), 30 steps + 2 val batches
#   bench-loader-wds 40 [120]: 2 rounds x (image + box crop, 40 batches of 48 at ~5-10k
#     samples/s with 8 workers, ~2 s worker start each) + the limit loops + the tutorial-style
#     baseline (336 samples at ~120/s: 3 s)
#   bench-loader-dali 60 [150]: the same + DALI's decode-only and decode + warp pipelines
#   bench-train-wds 40 [120], bench-train-dali 50 [120]: freihand_strong.toml (bf16, width 32,
#     batch 64, augmentation), 2 x (5 warm-up + 50 timed) steps, ~20 s start-up
#   bench-predict 60 [150]: 256 photos, 8 rows x 3 rounds, 12 predict() calls of ~3 s each
#     (model load, decode threads, outputs)
# Estimates add up to ~445 s; the budget, 450 s, caps the steps whatever they take, and the
# data, parsing and Python start-up add ~10 s: under 8 minutes.
BUDGET_S = 450.0
GPU = {
    "synth": "--n 2000 --seed 1",
    "pack": "--shard-size 1",
    "train": "--config pipelines/freihand_tutorial.toml --epochs 1 --batches_per_epoch 30 --val_batches 2"
    " --workers 8",
    "loader": "--workers 8 --batches 40 --rounds 2",
    "bench-train": "--config pipelines/freihand_strong.toml --steps 50",
    "bench-predict": "--limit 256",
}
# --cpu: the same steps on 48 hands with a 32 px, width 4 model (OUT/tiny.toml), one worker.
CPU = {
    "synth": "--n 48 --seed 1 --workers 2",
    "pack": "--shard-size 0.1 --workers 2",
    "train": "--config {out}/tiny.toml --epochs 1 --batches_per_epoch 2 --val_batches 1",
    "loader": "--workers 1 --batches 3 --batch-size 8 --rounds 1",
    "bench-train": "--config {out}/tiny.toml --steps 2",
    "bench-predict": "--limit 8 --batch-size 4",
}
TINY_RECIPE = 'image_size = 32\nwidth = 4\nbatch_size = 8\nworkers = 1\ndevice = "cpu"\n'

# The figures of each bench's JSON line that go into the summary.
LOADER_KEYS = (
    *("kind", "workers", "samples_per_s", "box_samples_per_s", "limit_samples_per_s", "vs_limit"),
    *("decode_samples_per_s", "baseline_samples_per_s", "vs_baseline", "loader_cores_used"),
    *("dali_decode_samples_per_s", "vs_dali_decode", "dali_decode_warp_samples_per_s"),
)
TRAIN_KEYS = (
    *("device", "loader", "precision", "batch_size", "image_size", "width", "workers"),
    *("samples_per_s", "in_memory_samples_per_s", "step_ms", "loader_overhead_pct"),
)
PREDICT_KEYS = (
    *("device", "images", "batch_size", "images_per_s", "model_only_images_per_s"),
    *("tutorial_loop_images_per_s", "end_to_end_vs_model_only", "end_to_end_vs_tutorial"),
)


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: float
    needs: tuple[str, ...] = ()
    figures: Callable[[Path, str], dict[str, Any]] | None = None  # (OUT, log text) -> figures
    module: str | None = None  # skip the step, saying why, where this module is not installed


@dataclass
class Result:
    ok: bool
    seconds: float
    figures: dict[str, Any] = field(default_factory=dict)
    rc: int | None = None
    error: str | None = None
    log: str | None = None
    skipped: str | None = None  # the reason

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "seconds": round(self.seconds, 1)}
        if self.figures:
            out["figures"] = self.figures
        if self.skipped:
            out["skipped"] = self.skipped
        if not self.ok:
            out.update(rc=self.rc, error=self.error, log=self.log)
        return out


# ----------------------------------------------------------------------------- running steps


def run_step(argv: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None) -> Result:
    """Run `argv` from the repository root, output (stdout + stderr) to `log`; after `timeout_s`
    kill its whole process group (loader workers, torchrun ranks). Never raises for the command."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return Result(
                False, time.perf_counter() - t0, error=f"timed out after {timeout_s:.0f} s", log=str(log)
            )
        except BaseException:  # Ctrl-C: in its own session, the step did not get the terminal's SIGINT
            _kill(proc)
            raise
    seconds = time.perf_counter() - t0
    if rc != 0:
        return Result(False, seconds, rc=rc, error=last_line(log.read_text(errors="replace")), log=str(log))
    return Result(True, seconds, rc=0, log=str(log))


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the step's process group: it was started in its own session, so this reaches the
    step and its children (loader workers, pytest's subprocesses) and nothing else."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def last_line(text: str) -> str:
    """The last non-empty line (a handpose error line, or a traceback's exception), shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:300]


def last_json(text: str) -> dict[str, Any]:
    """The last line of `text` that is a JSON object (each bench ends with one); ValueError if none."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise ValueError("no JSON line in the output")


def pick(values: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """`keys` of `values` that are present, floats rounded for reading."""
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items() if k in keys}


def bench_figures(keys: tuple[str, ...]) -> Callable[[Path, str], dict[str, Any]]:
    return lambda _out, text: pick(last_json(text), keys)


def train_figures(out: Path, _text: str) -> dict[str, Any]:
    summary = json.loads((out / "run" / "summary.json").read_text())
    final = summary.get("final") or {}
    figures = {k: summary.get(k) for k in ("best_val_error_px", "mean_pose_error_px", "steps")}
    figures["samples_per_s"] = final.get("samples_per_s")
    return pick(figures, tuple(figures))


def read_junit(path: Path) -> dict[str, dict[str, Any]]:
    """pytest's junit XML -> {test name: {"outcome", "seconds", "figures", "message"}}; figures are
    the values a test recorded with `record_property`."""
    tests: dict[str, dict[str, Any]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        entry: dict[str, Any] = {"outcome": "passed", "seconds": round(float(case.get("time", 0)), 1)}
        for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                entry["outcome"] = outcome
                # the message's first line: "AssertionError: <the test's own words>" or the reason
                message = node.get("message") or ""
                entry["message"] = (
                    message.strip().splitlines()[0][:300] if message.strip() else last_line(node.text or "")
                )
                break
        props = {p.get("name"): _value(p.get("value", "")) for p in case.iter("property")}
        if props:
            entry["figures"] = props
        tests[case.get("name", "?")] = entry
    return tests


def read_progress(text: str) -> dict[str, dict[str, Any]]:
    """Outcomes from `pytest -v` output, for when pytest was killed before writing its junit XML:
    finished tests have their outcome, the one that was running when it stopped "unfinished"."""
    tests: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        m = re.match(r"^\S+\.py::(\S+)(?: (PASSED|FAILED|SKIPPED|ERROR))?", line)
        if m:
            tests[m.group(1)] = {"outcome": (m.group(2) or "unfinished").lower()}
    return tests


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ----------------------------------------------------------------------------- the check


def plan(out: Path, cpu: bool) -> list[Step]:
    """The steps, in order; sizes from GPU or CPU (see the comments above them)."""
    sizes = {k: [a.replace("{out}", str(out)) for a in v.split()] for k, v in (CPU if cpu else GPU).items()}
    hp = [sys.executable, "-m", "handpose"]
    shards, data = str(out / "shards"), str(out / "freihand")
    junit = ["--junitxml", str(out / "tests.xml"), "-p", "no:cacheprovider"]
    steps = [
        Step(
            "tests",
            [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_gpu.py", "-v", "-rA", *junit],
            240,
        ),
        Step("synth", [*hp, "synth", data, *sizes["synth"]], 60),
        Step("pack", [*hp, "pack", data, shards, *sizes["pack"]], 60, ("synth",)),
        Step(
            "train",
            [*hp, "train", "--shards", shards, "--out", str(out / "run"), *sizes["train"]],
            90,
            ("pack",),
            train_figures,
        ),
    ]
    for kind, limit in (("wds", 120), ("dali", 150)):
        argv = [*hp, "bench", "loader", shards, "--kind", kind, *sizes["loader"]]
        module = "nvidia.dali" if kind == "dali" else None
        figures = bench_figures(LOADER_KEYS)
        steps.append(Step(f"bench-loader-{kind}", argv, limit, ("pack",), figures, module))
    for kind in ("wds", "dali"):
        argv = [*hp, "bench", "train", shards, "--loader", kind, *sizes["bench-train"]]
        module = "nvidia.dali" if kind == "dali" else None
        steps.append(Step(f"bench-train-{kind}", argv, 120, ("pack",), bench_figures(TRAIN_KEYS), module))
    model = str(out / "run" / "checkpoints" / "best.pt")
    argv = [
        *hp,
        "bench",
        "predict",
        model,
        str(out / "freihand" / "training" / "rgb"),
        *sizes["bench-predict"],
    ]
    steps.append(Step("bench-predict", argv, 150, ("train",), bench_figures(PREDICT_KEYS)))
    return steps


def select(steps: list[Step], only: str | None) -> list[Step]:
    """`only` (comma list) plus every step they need, in plan order; all steps when None."""
    if not only:
        return steps
    by_name = {s.name: s for s in steps}
    wanted = {n.strip() for n in only.split(",") if n.strip()}
    unknown = wanted - set(by_name)
    if unknown:
        raise SystemExit(
            f"error: --only: unknown step {', '.join(sorted(unknown))} (steps: {', '.join(by_name)})"
        )
    todo = list(wanted)
    while todo:
        for need in by_name[todo.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                todo.append(need)
    return [s for s in steps if s.name in wanted]


def prepare_out(out: Path) -> None:
    """Make OUT ours: create it, or clear what an earlier gpu-check wrote there. A folder that is
    not empty and was not written by gpu-check is refused (nothing in it is deleted)."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(
            f"error: --out {out} is not empty and was not written by gpu-check; give another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    for name in OWN:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def machine(cpu: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "mode": "cpu" if cpu else "cuda",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dali": _dist_version("nvidia-dali-cuda130"),
        "commit": _command(["git", "rev-parse", "--short", "HEAD"]),
    }
    if not cpu:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["driver"] = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return info


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _command(argv: list[str]) -> str | None:
    try:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None


def check(out: Path, *, cpu: bool, budget_s: float, only: str | None = None) -> dict[str, Any]:
    """Run the plan into OUT; print one line per step on stderr; return the summary."""
    t_start = time.perf_counter()
    steps = select(plan(out, cpu), only)  # before prepare_out: a mistyped --only clears nothing
    prepare_out(out)
    if cpu:
        (out / "tiny.toml").write_text(TINY_RECIPE)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath()}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, also on a machine with a GPU
    results: dict[str, Result] = {}
    for i, step in enumerate(steps, 1):
        left = budget_s - (time.perf_counter() - t_start)
        failed_need = next((n for n in step.needs if n in results and not results[n].ok), None)
        if failed_need:
            results[step.name] = Result(False, 0.0, error=f"not run: step {failed_need} failed")
        elif step.module and not _installed(step.module):
            results[step.name] = Result(True, 0.0, skipped=f"{step.module} is not installed")
        elif left < MIN_STEP_S:
            results[step.name] = Result(False, 0.0, error=f"not run: the {budget_s:.0f} s budget was spent")
        else:
            res = run_step(step.argv, out / "logs" / f"{step.name}.log", min(step.limit_s, left), env)
            if res.ok and step.figures is not None:
                try:
                    res.figures = step.figures(out, Path(res.log or "").read_text(errors="replace"))
                except (OSError, ValueError, KeyError) as e:
                    res.ok, res.error = False, f"{type(e).__name__}: {e}"
            results[step.name] = res
        r = results[step.name]
        status = f"skipped ({r.skipped})" if r.skipped else "ok" if r.ok else f"FAILED: {r.error}"
        print(
            f"gpu-check [{i}/{len(steps)}] {step.name}: {status} ({r.seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    tests: dict[str, dict[str, Any]] = {}
    if (out / "tests.xml").exists():
        tests = read_junit(out / "tests.xml")
    elif (out / "logs" / "tests.log").exists():  # pytest was killed: what its progress lines say
        tests = read_progress((out / "logs" / "tests.log").read_text(errors="replace"))
    failed = [n for n, r in results.items() if not r.ok] + [
        n for n, t in tests.items() if t["outcome"] in ("failed", "error", "unfinished")
    ]
    skipped = [n for n, r in results.items() if r.skipped] + [
        n for n, t in tests.items() if t["outcome"] == "skipped"
    ]
    return {
        "gpu_check": "failed" if failed else "ok",
        "failed": failed,
        "skipped": skipped,
        "machine": machine(cpu),
        "seconds": round(time.perf_counter() - t_start, 1),
        "budget_s": budget_s,
        "tests": tests,
        "steps": {n: r.to_dict() for n, r in results.items()},
    }


def _pythonpath() -> str:
    """The repository first, so the steps import this checkout's handpose also without install."""
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([str(ROOT), rest]) if rest else str(ROOT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="scratch folder [gpu-check-out]")
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: the driver's plumbing")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all steps [{BUDGET_S:.0f}]")
    ap.add_argument("--only", help="comma list of steps (plus the steps they need)")
    args = ap.parse_args(argv)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        why = "it is a CPU build" if torch.version.cuda is None else "it finds no CUDA device"
        print(
            f"gpu-check: CUDA is not available (torch {torch.__version__}: {why}); nothing to check here. "
            "On a CUDA machine, from a fresh clone: make gpu-check TORCH_SPEC=torch (docs/gpu.md)"
        )
        return 0
    out = args.out.resolve()
    try:
        summary = check(out, cpu=args.cpu, budget_s=args.budget, only=args.only)
    except KeyboardInterrupt:
        print("gpu-check: interrupted", file=sys.stderr)
        return 130
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary), flush=True)
    return 0 if summary["gpu_check"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

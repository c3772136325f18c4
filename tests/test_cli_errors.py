"""The command line's promise: a user's mistake is ONE line on stderr naming the flag or file,
exit code 1, never a traceback; Ctrl-C is one line "interrupted" and exit code 130.

The table runs each mistake through `handpose.cli.main`, the console script's own entry (the
same boundary code as the installed `handpose` command, in-process so the table stays fast); a
few cases run as real `python -m handpose` processes to check the process-level exit status.
Inputs are made by hand here (no packing), so every case fails on the mistake itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image

from handpose import __version__
from handpose.cli import main
from handpose.config import load_config
from handpose.model import ShallowUNet

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Everything the table refers to, made by hand: models good and bad, images, labels, recipes."""
    from handpose.synth import synth

    d = tmp_path_factory.mktemp("cli")
    p = {"model": d / "model.pt", "text_model": d / "text.pt", "truncated_model": d / "truncated.pt"}
    p |= {"linear_model": d / "linear.pt", "file": d / "file.txt"}
    torch.save(ShallowUNet(width=4, depth=2).state_dict(), p["model"])
    p["text_model"].write_text("these are not weights\n")
    data = p["model"].read_bytes()
    p["truncated_model"].write_bytes(data[: len(data) // 2])
    torch.save(torch.nn.Linear(2, 3).state_dict(), p["linear_model"])
    p["file"].write_text("a file, not a folder\n")
    p["folder"] = d / "folder"
    p["folder"].mkdir()
    p["images"] = d / "images"
    p["images"].mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(p["images"] / name)
    p["nomatch"] = d / "nomatch.json"
    p["nomatch"].write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "elsewhere/zzz.jpg", "width": 48, "height": 40}],
                "annotations": [
                    {"id": 1, "image_id": 1, "bbox": [5, 5, 10, 10], "keypoints": [10.0, 10.0, 2] * 21}
                ],
            }
        )
    )
    p["freihand"] = d / "freihand"
    synth(p["freihand"], n=2, size=64, workers=1)
    p["zero_sigma"] = d / "zero_sigma.toml"
    p["zero_sigma"].write_text("sigma = 0.0\n")
    p["ok_recipe"] = d / "ok.toml"
    p["ok_recipe"].write_text("sigma = 2.0\n")
    p["tmp"] = d
    return p


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


# (id, argv with {name} placeholders, what the one line must contain)
PREDICT = ["predict", "{model}", "{images}", "--out", "{tmp}/p"]
TRAIN = ["train", "--shards", "{folder}", "--out"]
MISTAKES = [
    ("shards is a file", ["train", "--shards", "{file}", "--out", "{tmp}/run"], ["--shards", "{file}"]),
    ("inspect a file", ["inspect", "{file}"], ["{file}", "is a file"]),
    ("out is a file", [*TRAIN, "{file}"], ["--out", "{file}"]),
    ("out under a file", [*TRAIN, "{file}/run"], ["--out", "is a file"]),
    ("shards not packed", [*TRAIN, "{tmp}/run"], ["--shards", "manifest.json"]),
    ("sigma 0", ["train", "--sigma", "0"], ["--sigma", "> 0"]),
    ("sigma negative", ["train", "--sigma=-1"], ["--sigma", "> 0"]),
    ("sigma 0 in a recipe", ["train", "--config", "{zero_sigma}"], ["{zero_sigma}: sigma"]),
    ("flag over a good recipe", ["train", "--config", "{ok_recipe}", "--sigma", "0"], ["--sigma"]),
    ("unknown recipe key", ["train", "--lrr", "1"], ["--lrr", "did you mean lr"]),
    ("unknown nested key", ["train", "--augment.spin", "1"], ["--augment.spin"]),
    ("bad nested value", ["train", "--augment.scale_min", "2"], ["--augment.scale_min"]),
    ("bad choice", ["train", "--optimizer", "adam"], ["--optimizer", "sgd | adamw"]),
    ("image size vs depth", ["train", "--image_size", "100"], ["--image_size", "2**depth"]),
    ("not a number", ["train", "--epochs", "many"], ["--epochs"]),
    ("missing recipe", ["train", "--config", "{tmp}/missing.toml"], ["--config", "missing.toml"]),
    ("predict workers", [*PREDICT, "--workers", "-1"], ["--workers"]),
    ("predict batch size", [*PREDICT, "--batch-size", "0"], ["--batch-size"]),
    ("predict overlays", [*PREDICT, "--overlays", "-1"], ["--overlays"]),
    ("predict out is a file", ["predict", "{model}", "{images}", "--out", "{file}"], ["--out", "{file}"]),
    ("predict no out", ["predict", "{model}", "{images}"], ["--out"]),
    ("model is text", ["predict", "{text_model}", "{images}", "--out", "{tmp}/p"],
     ["{text_model}", "not a handpose checkpoint or tutorial state_dict"]),
    ("model truncated", ["predict", "{truncated_model}", "{images}", "--out", "{tmp}/p"],
     ["{truncated_model}", "truncated or damaged"]),
    ("model of another net", ["predict", "{linear_model}", "{images}", "--out", "{tmp}/p"],
     ["{linear_model}", "weights are for another architecture (", "missing, 2 unexpected keys)"]),
    ("model missing", ["predict", "{tmp}/none.pt", "{images}", "--out", "{tmp}/p"], ["none.pt", "not found"]),
    ("labels match nothing", [*PREDICT, "--labels", "{nomatch}"],
     ["--labels", "{nomatch}", "matches none of the 2 input images"]),
    ("labels not json", [*PREDICT, "--labels", "{file}"], ["--labels", "{file}"]),
    ("bogus FreiHAND split", ["predict", "{model}", "{freihand}", "--out", "{tmp}/p", "--split", "bogus"],
     ["--split", "bogus"]),
    ("png is a folder", ["inspect", "{folder}", "--png", "{folder}"], ["--png", "is a folder"]),
    ("inspect n", ["inspect", "{folder}", "--n", "0"], ["--n"]),
    ("unknown command", ["tarin"], ["tarin"]),
    ("brackets in a path", ["train", "--shards", "{tmp}/data[v2]", "--out", "{tmp}/run"], ["{tmp}/data[v2]"]),
    ("markup closer in a path", ["inspect", "{tmp}/a[/]b"], ["{tmp}/a[/]b"]),
]  # fmt: skip


@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in MISTAKES])
def test_mistake_is_one_line(
    argv: list[str], needles: list[str], inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fill = {k: str(v) for k, v in inputs.items()}
    code, out, err = _run_main([a.format(**fill) for a in argv], capsys)
    assert code == 1, err
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle.format(**fill) in lines[0]


def test_a_flag_is_named_not_the_recipe(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = _run_main(["train", "--config", str(inputs["ok_recipe"]), "--sigma", "0"], capsys)
    assert str(inputs["ok_recipe"]) not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "predict"])
def test_cuda_on_a_cpu_machine(
    command: str, inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(inputs["tmp"] / "run-cuda")
    if command == "train":
        argv = ["train", "--shards", str(inputs["folder"]), "--out", out, "--device", "cuda"]
    else:
        argv = ["predict", str(inputs["model"]), str(inputs["images"]), "--out", out, "--device", "cuda"]
    code, _, err = _run_main(argv, capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert "--device" in err and "CUDA is not available" in err


def test_refused_runs_leave_nothing(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A refused command writes nothing: no run or output folder appears."""
    out = inputs["tmp"] / "never"
    _run_main(["train", "--config", str(inputs["ok_recipe"]), "--sigma", "0", "--out", str(out)], capsys)
    _run_main(["predict", str(inputs["linear_model"]), str(inputs["images"]), "--out", str(out)], capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------- help, version, recipe keys


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"handpose {__version__}"


@pytest.mark.parametrize(
    "command",
    [["synth"], ["pack"], ["inspect"], ["train"], ["predict"], ["bench", "pack"], ["bench", "loader"]]
    + [["bench", "train"], ["bench", "predict"], ["export"], ["bench", "onnx"], ["bench", "video"]],
)
def test_help_has_an_example_and_literal_defaults(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run_main([*command, "--help"], capsys)
    assert code == 0
    assert "Example" in out and f"handpose {' '.join(command)} " in out
    if command in (["synth"], ["pack"]):
        assert "[default: all cores]" in out  # written in brackets: not eaten as markup


def test_show_config_lists_every_key(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Every recipe key with a description, the default where the value differs; the text is a
    recipe that loads back to the same config."""
    from handpose.train import TrainConfig

    recipe = ROOT / "pipelines" / "cpu_demo.toml"
    code, out, _ = _run_main(["train", "--config", str(recipe), "--sigma", "2.5", "--show-config"], capsys)
    assert code == 0
    written = inputs["tmp"] / "shown.toml"
    written.write_text(out)
    expected = load_config(TrainConfig, recipe, {"sigma": "2.5"})
    assert load_config(TrainConfig, written) == expected
    lines = {
        line.split(" = ")[0]: line for line in out.splitlines() if " = " in line and not line.startswith("#")
    }
    tables = ("augment", "layout")  # nested dataclasses: [augment], [layout]
    keys = [f.name for f in TrainConfig.__dataclass_fields__.values() if f.name not in tables]
    keys += [k for t in tables for k in tomllib.loads(out)[t]]
    assert set(keys) <= set(lines)
    for key in keys:
        assert " # " in lines[key] and lines[key].split(" # ", 1)[1].strip(), f"{key} has no description"
    assert "sigma = 2.5" in lines["sigma"] and "(default: 3.0)" in lines["sigma"]
    assert "(default:" not in lines["depth"]  # cpu_demo keeps the default depth


# ----------------------------------------------------------------------------- real processes


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["inspect", "{tmp}/a[/]b"], "{tmp}/a[/]b"),
        (["train", "--epochs", "many"], "--epochs"),
        (["predict", "{text_model}", "{images}", "--out", "{tmp}/p"], "{text_model}"),
    ],
)
def test_process_exit_status(argv: list[str], needle: str, inputs: dict[str, Path]) -> None:
    fill = {k: str(v) for k, v in inputs.items()}
    cmd = [sys.executable, "-m", "handpose", *(a.format(**fill) for a in argv)]
    p = subprocess.run(cmd, cwd=inputs["tmp"], env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and needle.format(**fill) in p.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_ctrl_c_interrupts_pack_cleanly(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while pack waits on an
    image that never arrives (a named pipe): "interrupted", exit 130, no traceback from any
    process, the shards already complete stay, no temporary file is left, and a re-run finishes."""
    import shutil

    src, out = tmp_path / "src", tmp_path / "shards"
    shutil.copytree(inputs["freihand"], src)
    blocked = sorted((src / "training" / "rgb").glob("*.jpg"))[-1]
    image = blocked.read_bytes()
    blocked.unlink()
    os.mkfifo(blocked)
    cmd = [
        sys.executable,
        "-m",
        "handpose",
        "pack",
        str(src),
        str(out),
        "--workers",
        "2",
        "--split",
        "0.5,0.5,0",
    ]
    p = subprocess.Popen(
        [*cmd, "--shard-size", "0.001"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores it
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.tar")) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert list(out.glob("*.tar")), "pack wrote no shard"
        time.sleep(0.5)  # let the workers settle on the pipe
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    assert err.splitlines()[-1] == "interrupted" and err.count("interrupted") == 1
    assert "Traceback" not in err
    done = sorted(x.name for x in out.glob("*.tar"))
    assert done and not [x.name for x in out.iterdir() if ".tmp" in x.name]
    assert not (out / "manifest.json").exists()  # the pack is not complete, and does not say it is
    blocked.unlink()
    blocked.write_bytes(image)
    again = subprocess.run(
        [*cmd, "--shard-size", "0.001"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 2 and set(done) <= {s["name"] for s in manifest["shards"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_mistake_is_one_line(inputs: dict[str, Path]) -> None:
    """Under torchrun a mistake stops every rank with exit code 1 and is printed once (by rank 0);
    torchrun's own failure summary follows (not ours to change) and names the same line."""
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node=2",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        "--rdzv-backend=c10d",
        "handpose",
        "train",
        "--shards",
        str(inputs["folder"]),
        "--out",
        str(inputs["tmp"] / "ddp"),
        "--sigma",
        "0",
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    output = p.stdout + p.stderr
    assert p.returncode == 1, output
    ours = [line for line in output.splitlines() if line.startswith("error: ")]
    assert ours == ["error: --sigma: must be > 0, got 0.0"], output
    assert "traceback : error: --sigma" in output  # torchrun's summary quotes the ranks' error files
    assert 'handpose/cli.py"' not in output and 'handpose/train.py"' not in output


_WORKER = """
import atexit, sys
import torch.distributed  # a worker of a distributed job has it loaded
from handpose.cli import main


class Late:
    def __del__(self, open=open, path=sys.argv[1] + ".teardown"):  # runs in the interpreter's
        open(path, "w").write("teardown ran")  # teardown, where gloo's threads can abort


late = Late()
atexit.register(lambda: open(sys.argv[1], "w").write("atexit ran"))
print("printed before the exit", end="")  # unflushed: os._exit would drop it unless flushed
main(sys.argv[2:])
"""


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("argv, code", [(["--version"], 0), (["train", "--epochs", "many"], 1)])
def test_torchrun_worker_leaves_cleanly(argv: list[str], code: int, world: int, tmp_path: Path) -> None:
    """A torchrun worker (WORLD_SIZE > 1) skips the interpreter's teardown (os._exit), where gloo's
    threads abort one DDP run in ten; it still keeps its exit code, its output and its atexit
    handlers. A single process ends as usual."""
    marker = tmp_path / "atexit.txt"
    env = _env() | {"WORLD_SIZE": str(world), "RANK": "0"}
    p = subprocess.run(
        [sys.executable, "-c", _WORKER, str(marker), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == code, p.stderr
    assert p.stdout.startswith("printed before the exit"), p.stdout
    assert marker.read_text() == "atexit ran"
    assert (tmp_path / "atexit.txt.teardown").exists() == (world == 1)
    if code:
        assert p.stderr.startswith("error: ") and "--epochs" in p.stderr and "Traceback" not in p.stderr

"""The `handpose` command line: parse options, call one function per command, nothing else.

A HandposeError (bad data, bad options) becomes a one-line message and exit code 1; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from handpose.errors import HandposeError

app = typer.Typer(
    name="handpose",
    help="Train and run 21-joint 2D hand-keypoint models (FreiHAND -> shards -> DDP UNet -> predict).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: each prints a table, then one JSON line.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
err = Console(stderr=True)

Workers = Annotated[Optional[int], typer.Option(help="Worker processes [default: all cores].")]
Verify = Annotated[
    bool,
    typer.Option(
        "--verify/--no-verify",
        help="Check the shards read against the manifest's sha256s first (sizes are always checked).",
    ),
]


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write (FreiHAND layout).")],
    n: Annotated[int, typer.Option(help="Unique training ids.")] = 500,
    eval: Annotated[int, typer.Option("--eval", help="Unique evaluation ids (0: no evaluation set).")] = 0,
    versions: Annotated[int, typer.Option(help="Versions per id (1-4: gs, hom, sample, auto).")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 224,
    workers: Workers = None,
) -> None:
    """Generate a FreiHAND-format folder of synthetic hands on cluttered backgrounds."""
    from handpose.synth import synth as run

    run(out, n=n, n_eval=eval, versions=versions, seed=seed, size=size, workers=workers)


@app.command()
def pack(
    src: Annotated[
        Path,
        typer.Argument(
            help="FreiHAND root; COCO keypoints json (--format coco); YOLO-pose dataset root "
            "(SRC/{split}/images + labels, SRC/images/{split} + SRC/labels/{split}, SRC/images + "
            "SRC/labels) or its dataset yaml (--format yolo)."
        ),
    ],
    out: Annotated[Path, typer.Argument(help="Output folder for shards and manifest.json.")],
    format: Annotated[str, typer.Option("--format", help="freihand | coco | yolo.")] = "freihand",
    images: Annotated[
        Optional[Path], typer.Option(help="COCO: image folder [default: the json's folder].")
    ] = None,
    versions: Annotated[
        Optional[str],
        typer.Option(help="FreiHAND: gs | all | comma list of gs,hom,sample,auto [default: gs]."),
    ] = None,
    split: Annotated[
        Optional[str],
        typer.Option(
            help="train,val,test fractions of the split units (FreiHAND ids, images) [default: "
            "0.8,0.15,0.05]; a YOLO dataset with split folders keeps its own splits."
        ),
    ] = None,
    split_seed: Annotated[
        Optional[int], typer.Option(help="Shuffle split units with this seed [default: id order].")
    ] = None,
    shard_size: Annotated[float, typer.Option(help="Target shard size in MB.")] = 4.0,
    workers: Workers = None,
    on_error: Annotated[
        str, typer.Option(help="fail | skip (skipped samples are listed in the manifest).")
    ] = "fail",
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier pack in OUT.")] = False,
) -> None:
    """Pack FreiHAND, COCO keypoints or YOLO-pose labels into WebDataset shards (one sample per
    hand, with its box and per-joint visibility), DALI indexes and a manifest."""
    from handpose.pack import pack as run

    run(
        src,
        out,
        fmt=format,
        images=images,
        versions=versions,
        split=split,
        split_seed=split_seed,
        shard_size_mb=shard_size,
        workers=workers,
        on_error=on_error,
        overwrite=overwrite,
    )


@app.command()
def inspect(
    shards: Annotated[Path, typer.Argument(help="A packed shards folder.")],
    split: Annotated[str, typer.Option(help="Split to draw samples from.")] = "train",
    n: Annotated[int, typer.Option(help="Samples to draw.")] = 16,
    png: Annotated[
        Optional[Path], typer.Option(help="Contact sheet to write [default: SHARDS/inspect-SPLIT.png].")
    ] = None,
    verify: Verify = True,
) -> None:
    """Print the manifest and draw N samples with their skeletons, read back from the shards."""
    from handpose.inspector import inspect_shards

    inspect_shards(shards, split=split, n=n, png=png, verify=verify)


@app.command()
def verify(shards: Annotated[Path, typer.Argument(help="A packed shards folder.")]) -> None:
    """Check a packed folder: manifest schema, every shard's and index's size and sha256, every
    index line against its tar, and every sample's label members. Exit 1 naming each damaged shard."""
    from handpose.verify import verify as run

    run(shards)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(help="Recipe TOML (pipelines/*.toml).")] = None,
    shards: Annotated[Optional[Path], typer.Option(help="Packed shards folder.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (checkpoints, metrics, config).")] = None,
    loader: Annotated[Optional[str], typer.Option(help="wds | dali.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs to train.")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue OUT from its last checkpoint, with OUT/config.toml as the recipe "
            "(automatic when a checkpoint exists); --key value changes what may change."
        ),
    ] = False,
    verify: Annotated[
        Optional[bool],
        typer.Option(
            "--verify/--no-verify",
            help="Check the shards against the manifest's sha256s at start (default: the recipe's "
            "verify key, true); sizes are always checked.",
        ),
    ] = None,
) -> None:
    """Train the UNet (one process, or many under torchrun). Any recipe key: --key value."""
    from handpose.train import train as run

    overrides = _pairs(ctx.args)
    for key, value in (("shards", shards), ("out", out), ("loader", loader), ("epochs", epochs)):
        if value is not None:
            overrides[key] = str(value)
    if verify is not None:
        overrides["verify"] = str(verify).lower()
    run(config, overrides, resume=resume)


@app.command()
def predict(
    model: Annotated[
        Path, typer.Argument(help="A handpose checkpoint, or a bare state_dict (tutorial weights).")
    ],
    inputs: Annotated[
        list[Path], typer.Argument(help="Images, folders, a FreiHAND root, or a shards folder.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder (nothing is written elsewhere).")],
    split: Annotated[str, typer.Option(help="Split to read when INPUT is a shards folder.")] = "test",
    labels: Annotated[Optional[Path], typer.Option(help="COCO keypoints json with ground truth.")] = None,
    coco: Annotated[
        Optional[Path], typer.Option(help="Also write COCO keypoint results here (inside --out).")
    ] = None,
    overlays: Annotated[int, typer.Option(help="Draw this many images with skeletons.")] = 0,
    batch_size: Annotated[
        Optional[int], typer.Option(help="Images per forward pass [default: 64 on CUDA, 4 on CPU].")
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option(help="Decode workers [default: cores - 1 on CUDA, 0 on CPU].")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda [default: cuda if available].")] = None,
    verify: Verify = True,
) -> None:
    """Predict keypoints for every image; with labels, write an error report."""
    from handpose.predict import predict as run

    run(
        model,
        inputs,
        out,
        split=split,
        labels=labels,
        coco=coco,
        overlays=overlays,
        batch_size=batch_size,
        workers=workers,
        device=device,
        verify=verify,
    )


@bench_app.command("pack")
def bench_pack(
    n: Annotated[int, typer.Option(help="Generated images to pack.")] = 10_000,
    workdir: Annotated[Path, typer.Option(help="Scratch folder.")] = Path("bench-out/pack"),
    workers: Workers = None,
) -> None:
    """Pack N generated images; same run: `tar cf` floor and a decode of all images."""
    from handpose.bench.pack import bench_pack as run

    run(n=n, workdir=workdir, workers=workers)


@bench_app.command("loader")
def bench_loader(
    shards: Annotated[Path, typer.Argument(help="A packed shards folder.")],
    kind: Annotated[str, typer.Option(help="wds | dali.")] = "wds",
    workers: Annotated[int, typer.Option(help="Loader workers.")] = 2,
    batches: Annotated[int, typer.Option(help="Batches to time.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 48,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds; each figure keeps its best.")] = 3,
    verify: Verify = True,
) -> None:
    """Loader samples/s vs the decode and decode+warp limits and a tutorial-style baseline."""
    from handpose.bench.loader import bench_loader as run

    run(
        shards,
        kind=kind,
        workers=workers,
        batches=batches,
        batch_size=batch_size,
        rounds=rounds,
        verify=verify,
    )


@bench_app.command("train")
def bench_train(
    shards: Annotated[Path, typer.Argument(help="A packed shards folder.")],
    config: Annotated[Optional[Path], typer.Option(help="Recipe TOML.")] = None,
    loader: Annotated[str, typer.Option(help="wds | dali.")] = "wds",
    steps: Annotated[int, typer.Option(help="Train steps to time.")] = 30,
) -> None:
    """Train-step samples/s fed by the real loader vs by in-memory batches: the loader overhead."""
    from handpose.bench.train import bench_train as run

    run(shards, config=config, loader=loader, steps=steps)


@bench_app.command("predict")
def bench_predict(
    model: Annotated[Path, typer.Argument(help="Checkpoint or bare state_dict.")],
    images: Annotated[Path, typer.Argument(help="Folder of images.")],
    batch_size: Annotated[
        Optional[int], typer.Option(help="Images per forward pass [default: 64 on CUDA, 4 on CPU].")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many images.")] = 512,
) -> None:
    """Predict images/s end to end vs model-only forward vs a tutorial-style loop."""
    from handpose.bench.predict import bench_predict as run

    run(model, images, batch_size=batch_size, limit=limit)


def _pairs(args: list[str]) -> dict[str, str]:
    """['--lr', '0.1', '--augment.flip=true'] -> {'lr': '0.1', 'augment.flip': 'true'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise HandposeError(f"unexpected argument {a!r} (recipe keys are given as --key value)")
        key = a[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 2
        else:
            raise HandposeError(f"option {a!r} needs a value")
        out[key.replace("-", "_")] = value
    return out


def main() -> None:
    """Console-script entry: run the app, turning HandposeError into a clean exit 1."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:webdataset")
    try:
        app()
    except HandposeError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)

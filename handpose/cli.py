"""The `handpose` command line: parse options, call one function per command, nothing else.

Every user mistake ends the same way: ONE line `error: ...` on stderr that names the flag, file,
sample or field, and exit code 1, whether the code raised a HandposeError or the option parser
refused a value. Ctrl-C prints `interrupted` and exits 130 (writes are atomic, so what was
complete stays complete). Anything else is a bug and keeps its traceback. Under torchrun every
rank exits with that code and only rank 0 prints the line.

Help text is printed as written (no rich markup): `[default: ...]` and paths with brackets stay.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.text import Text
from typer.core import TyperGroup

from handpose import __version__
from handpose.console import make_console
from handpose.errors import HandposeError

try:  # Typer vendors click since 0.2x; before, it used the click package
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    import click.exceptions as click_errors  # type: ignore[no-redef]


class Interrupted(Exception):
    """Ctrl-C, carried past Typer's own handler (which exits 130 without a word)."""


class _Group(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted from None


app = typer.Typer(
    name="handpose",
    cls=_Group,
    help="Train and run 21-joint 2D hand-keypoint models (labelled photos -> shards -> DDP training of a "
    "keypoint model -> predict).",
    epilog="Each command's --help lists its options and ends with examples: handpose train --help",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
bench_app = typer.Typer(
    help="Benchmarks: each prints a table, then one JSON line.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(bench_app, name="bench")
err = make_console(stderr=True)

Workers = Annotated[Optional[int], typer.Option(help="Worker processes [default: all cores].")]
Verify = Annotated[
    bool,
    typer.Option(
        "--verify/--no-verify",
        help="Check the shards read against the manifest's sha256s first (sizes are always checked).",
    ),
]
# A shards location: a folder, or a URL (https://, http://, s3://, file://); str, not Path (which
# would fold the // of a URL).
ShardsArg = Annotated[str, typer.Argument(help="A packed shards folder or URL (https://, s3://, file://).")]
Cache = Annotated[
    Optional[str],
    typer.Option(help="Shards URLs: keep each verified shard in this local folder (default: stream them)."),
]
CacheLimit = Annotated[
    Optional[str],
    typer.Option(help="Bound on --cache, e.g. 50G or 200GiB; least recently used shards out."),
]


def _version(value: bool) -> None:
    if value:
        print(f"handpose {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


# Examples end each --help; "\b" keeps the lines as written.
EXAMPLES = {
    "synth": """\b
Example:
  handpose synth data/freihand --n 2000 --eval 200""",
    "pack": """\b
Examples:
  handpose pack data/freihand data/shards
  handpose pack FreiHAND_pub_v2 data/shards-all --versions all --split-seed 0
  handpose pack annotations.json data/shards-coco --format coco --images images/""",
    "inspect": """\b
Example:
  handpose inspect data/shards --split val --n 25 --png val-samples.png""",
    "train": """\b
Examples:
  handpose train --config pipelines/cpu_demo.toml --shards data/shards --out runs/demo
  handpose train --config pipelines/cpu_demo.toml --show-config     (every recipe key)
  torchrun --nproc_per_node=8 handpose train --config pipelines/freihand_strong.toml \\
      --shards data/shards --out runs/strong --lr 3e-3 --augment.rotate_deg 45""",
    "predict": """\b
Examples:
  handpose predict runs/demo/checkpoints/best.pt ~/photos --out runs/photos --overlays 8
  handpose predict runs/demo/checkpoints/best.pt data/shards --split test --out runs/test
  handpose predict best.pt data/hand-keypoints --split val --boxes gt --out runs/val
  handpose predict keypoints.pt --detector detector.pt ~/photos --out runs/hands --max-hands 2
  handpose predict model_final images/ --labels images/annotations.json --out runs/tutorial
  handpose predict hands ~/photos --out runs/photos          (the bundled model)
  handpose predict hands.onnx ~/photos --out runs/photos     (onnxruntime)
  handpose predict hands clip.mp4 --out runs/clip --every 2 --overlay-video
  torchrun --nproc_per_node=2 -m handpose predict best.pt ~/photos --out runs/photos""",
    "export": """\b
Examples:
  handpose export runs/hands/checkpoints/best.pt --out hands.onnx
  handpose export model_final --out tutorial.onnx     (the tutorial's weights)
  handpose export hands --out hands.onnx               (the bundled model)
  handpose export runs/hands/checkpoints/best.pt --out hands.pt   (weights only, a third the size)""",
    "models": """\b
Examples:
  handpose models
  handpose predict hands ~/photos --out runs/photos""",
    "bench onnx": """\b
Example:
  handpose bench onnx --batch-sizes 1,4,32 --threads 2""",
    "bench video": """\b
Example:
  handpose bench video --frames 150 --workdir bench-out/video
  handpose bench video --frames 150 --model hands""",
    "bench pack": """\b
Examples:
  handpose bench pack --n 2000 --workdir bench-out/pack
  handpose bench pack --src data/hand-keypoints --format yolo --workdir bench-out/pack-real""",
    "bench loader": """\b
Example:
  handpose bench loader data/shards --kind wds --workers 2 --batches 50
  handpose bench loader data/shards --serve     # + from http://127.0.0.1, streamed and cached""",
    "bench train": """\b
Example:
  handpose bench train data/shards --config pipelines/cpu_demo.toml --steps 20""",
    "bench predict": """\b
Example:
  handpose bench predict runs/demo/checkpoints/best.pt ~/photos --limit 256
  handpose bench predict keypoints.pt photos-224/ --detector detector.pt
  handpose bench predict hands ~/photos --limit 256 --onnx""",
}


@app.command(epilog=EXAMPLES["synth"])
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


@app.command(epilog=EXAMPLES["pack"])
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


@app.command(epilog=EXAMPLES["inspect"])
def inspect(
    shards: ShardsArg,
    split: Annotated[str, typer.Option(help="Split to draw samples from.")] = "train",
    n: Annotated[int, typer.Option(help="Samples to draw.")] = 16,
    png: Annotated[
        Optional[Path], typer.Option(help="Contact sheet to write [default: SHARDS/inspect-SPLIT.png].")
    ] = None,
    verify: Verify = True,
    cache: Cache = None,
    cache_limit: CacheLimit = None,
) -> None:
    """Print the manifest and draw N samples with their skeletons, read back from the shards."""
    from handpose.inspector import inspect_shards
    from handpose.remote import make_cache

    inspect_shards(shards, split=split, n=n, png=png, verify=verify, cache=make_cache(cache, cache_limit))


@app.command()
def verify(shards: ShardsArg) -> None:
    """Check a packed folder: manifest schema, every shard's and index's size and sha256, every
    index line against its tar, and every sample's label members. Exit 1 naming each damaged shard."""
    from handpose.verify import verify as run

    run(shards)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, epilog=EXAMPLES["train"]
)
def train(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(help="Recipe TOML (pipelines/*.toml).")] = None,
    shards: Annotated[
        Optional[str], typer.Option(help="Packed shards folder or URL (https://, s3://, file://).")
    ] = None,
    cache: Annotated[
        Optional[str],
        typer.Option(
            help="Shards URLs: keep each verified shard in this local folder (recipe key cache_dir)."
        ),
    ] = None,
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
    show_config: Annotated[
        bool,
        typer.Option(
            "--show-config",
            help="Print every recipe key with its value, default and meaning (TOML, from --config "
            "and the flags given), then exit.",
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
    """Train a keypoint model (arch unet or strided; one process, or many under torchrun).

    Every recipe key is also a flag: --key value (e.g. --lr 3e-3, --augment.flip true); a flag
    overrides the recipe. --show-config lists the keys with their defaults.
    """
    overrides = _pairs(ctx.args)
    for key, value in (
        *(("shards", shards), ("out", out), ("loader", loader), ("epochs", epochs)),
        ("cache_dir", cache),
    ):
        if value is not None:
            overrides[key] = str(value)
    if verify is not None:
        overrides["verify"] = str(verify).lower()
    if show_config:
        from handpose.config import describe_toml, load_config
        from handpose.train import TrainConfig

        cfg = load_config(TrainConfig, config, overrides)
        print(describe_toml(cfg, "handpose train recipe: every key, its value, its meaning"), end="")
        return
    from handpose.train import train as run

    run(config, overrides, resume=resume)


@app.command(epilog=EXAMPLES["predict"])
def predict(
    model: Annotated[
        str,
        typer.Argument(
            help="A bundled model's name (hands; see handpose models), a handpose checkpoint (any "
            "architecture), an exported .onnx (run on onnxruntime), or a bare state_dict (tutorial weights).",
            show_default=False,
        ),
    ],
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Images, videos, folders (of images and videos), a FreiHAND root, a YOLO-pose "
            "dataset (root or dataset yaml), or a shards folder or URL (https://, s3://, file://)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Output folder: predict writes only its own files there (listed in run.json); "
            "an interrupted run resumes."
        ),
    ],
    split: Annotated[
        Optional[str],
        typer.Option(
            help="Split of a shards folder or YOLO dataset [default: test]; of a FreiHAND root: "
            "train | eval | test (test: eval when labelled, else train)."
        ),
    ] = None,
    labels: Annotated[Optional[Path], typer.Option(help="COCO keypoints json with ground truth.")] = None,
    boxes: Annotated[
        Optional[str],
        typer.Option(
            help="Predict one hand per box: gt (the labelled boxes), a COCO detections json "
            "([{image_id or file_name, bbox, score}]) or a YOLO labels folder [default: the whole image]."
        ),
    ] = None,
    detector: Annotated[
        Optional[Path],
        typer.Option(
            help="A hand detector checkpoint (arch centernet): predict every hand it finds "
            "(one line per hand) [default: a bundled model's own detector, else the whole image]."
        ),
    ] = None,
    no_detector: Annotated[
        bool,
        typer.Option("--no-detector", help="Run a bundled model without its detector (the whole image)."),
    ] = False,
    min_score: Annotated[
        Optional[float],
        typer.Option(
            help="--detector: keep hands whose hand score, sqrt(box score x keypoint score), "
            "is at least this [default: 0.45]."
        ),
    ] = None,
    max_hands: Annotated[
        Optional[int], typer.Option(help="--detector: at most this many hands per photo [default: 4].")
    ] = None,
    min_presence: Annotated[
        Optional[float],
        typer.Option(
            help="Models with a presence head: drop hands whose presence probability is lower "
            "[default: 0.5 for whole images and the detector's boxes, 0 for --boxes]."
        ),
    ] = None,
    refine: Annotated[
        Optional[int],
        typer.Option(
            help="Whole images and the detector's boxes: N more passes, each in the box of the "
            "keypoints the last pass found (grown to the training data's box size, padded as in "
            "training) [default: with --detector 1; else 1 for models trained on box crops, 0 for "
            "whole-image models, where a pass zooms in on the hand]."
        ),
    ] = None,
    refine_mode: Annotated[
        str,
        typer.Option(
            help="box | upright: the refinement crop turned so that wrist -> middle knuckle points up "
            "(MediaPipe's second pass; implies --refine 1 unless given)."
        ),
    ] = "box",
    flip_test: Annotated[
        bool, typer.Option(help="Average each crop's keypoints with its mirror's (2x the model's work).")
    ] = False,
    coco: Annotated[
        Optional[Path], typer.Option(help="Also write COCO keypoint results: a new file inside --out.")
    ] = None,
    overlays: Annotated[int, typer.Option(help="Draw this many hands with skeletons.")] = 0,
    batch_size: Annotated[
        Optional[int], typer.Option(help="Crops per forward pass [default: 64 on CUDA, 4 on CPU].")
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option(help="Decode threads [default: cores - 1 on CUDA, 0 on CPU].")
    ] = None,
    device: Annotated[
        Optional[str], typer.Option(help="cpu | cuda | cuda:N [default: cuda if the model's runtime has it].")
    ] = None,
    verify: Verify = True,
    cache: Cache = None,
    cache_limit: CacheLimit = None,
    every: Annotated[
        Optional[int], typer.Option(help="Videos: predict every Nth frame (0, N, 2N, ...) [default: 1].")
    ] = None,
    overlay_video: Annotated[
        bool,
        typer.Option(
            "--overlay-video", help="Videos: also write each one with the skeletons drawn (overlays/*.mp4)."
        ),
    ] = False,
) -> None:
    """Predict keypoints for every image (or every hand box) and every video frame; with labels,
    write an error report. Under torchrun the inputs are split across the ranks and merged into
    one result."""
    from handpose.predict import predict as run
    from handpose.remote import make_cache

    run(
        model,
        inputs,
        out,
        detector=False if no_detector else detector,
        min_score=min_score,
        max_hands=max_hands,
        min_presence=min_presence,
        split=split,
        labels=labels,
        boxes=boxes,
        refine=refine,
        refine_mode=refine_mode,
        flip_test=flip_test,
        coco=coco,
        overlays=overlays,
        batch_size=batch_size,
        workers=workers,
        device=device,
        verify=verify,
        cache=make_cache(cache, cache_limit),
        every=every,
        overlay_video=overlay_video,
    )


@app.command(epilog=EXAMPLES["export"])
def export(
    model: Annotated[
        str,
        typer.Argument(
            help="A bundled model's name, a handpose checkpoint (any architecture), or a bare "
            "state_dict (tutorial weights).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="The file to write (only this file is written): model.onnx, or model.pt for the "
            "checkpoint's weights alone (no optimizer or RNG state: the file to ship)."
        ),
    ],
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Export a model to ONNX: uint8 RGB crops in, keypoints (input px) and scores out, with
    everything predict needs in its metadata (needs the onnx extra: pip install 'handpose[onnx]').
    With --out NAME.pt: the checkpoint without its training state."""
    from handpose.export import export as run

    run(model, out, overwrite=overwrite)


@app.command(epilog=EXAMPLES["models"])
def models(
    name: Annotated[
        Optional[str], typer.Argument(help="One bundled model [default: all].", show_default=False)
    ] = None,
) -> None:
    """The models bundled with handpose (use a name as MODEL: handpose predict hands photos/ --out p),
    each with its card: files and sha256, training data and licences, recipe, command, figures."""
    from handpose.models import bundled_names, describe

    names = bundled_names()
    if name is not None and name not in names:
        raise HandposeError(f"{name}: no bundled model of that name (bundled: {', '.join(names) or 'none'})")
    print("\n\n".join(describe(n) for n in ([name] if name else names)) or "no bundled models")


@bench_app.command("pack", epilog=EXAMPLES["bench pack"])
def bench_pack(
    n: Annotated[int, typer.Option(help="Generated images to pack.")] = 10_000,
    workdir: Annotated[Path, typer.Option(help="Scratch folder.")] = Path("bench-out/pack"),
    workers: Workers = None,
    src: Annotated[
        Optional[Path], typer.Option(help="A real data set to pack instead of N generated images.")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="--src's format: freihand | coco | yolo.")] = "yolo",
) -> None:
    """Pack N generated images (or --src); same run: `tar cf` floor and a decode of all images."""
    from handpose.bench.pack import bench_pack as run

    run(n=n, workdir=workdir, workers=workers, src=src, fmt=format)


@bench_app.command("loader", epilog=EXAMPLES["bench loader"])
def bench_loader(
    shards: Annotated[str, typer.Argument(help="A packed shards folder (or URL).")],
    kind: Annotated[str, typer.Option(help="wds | dali.")] = "wds",
    workers: Annotated[int, typer.Option(help="Loader workers.")] = 2,
    batches: Annotated[int, typer.Option(help="Batches to time.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 48,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds; each figure keeps its best.")] = 3,
    verify: Verify = True,
    url: Annotated[
        Optional[str],
        typer.Option(help="The same shards at a URL: also timed streamed, unchecked and from a warm cache."),
    ] = None,
    serve: Annotated[
        bool, typer.Option("--serve", help="Serve SHARDS over http://127.0.0.1 and time that as --url.")
    ] = False,
) -> None:
    """Loader samples/s vs the decode and decode+warp limits and a tutorial-style baseline (and,
    with --url or --serve, from a URL against the same shards read locally)."""
    from handpose.bench.loader import bench_loader as run

    run(
        shards,
        kind=kind,
        workers=workers,
        batches=batches,
        batch_size=batch_size,
        rounds=rounds,
        verify=verify,
        url=url,
        serve=serve,
    )


@bench_app.command("train", epilog=EXAMPLES["bench train"])
def bench_train(
    shards: Annotated[Path, typer.Argument(help="A packed shards folder, or several: a,b (as train).")],
    config: Annotated[Optional[Path], typer.Option(help="Recipe TOML.")] = None,
    loader: Annotated[str, typer.Option(help="wds | dali.")] = "wds",
    steps: Annotated[int, typer.Option(help="Train steps to time.")] = 30,
) -> None:
    """Train-step samples/s fed by the real loader vs by in-memory batches: the loader overhead."""
    from handpose.bench.train import bench_train as run

    run(shards, config=config, loader=loader, steps=steps)


@bench_app.command("predict", epilog=EXAMPLES["bench predict"])
def bench_predict(
    model: Annotated[
        str,
        typer.Argument(help="A bundled model's name, a checkpoint or a bare state_dict.", show_default=False),
    ],
    images: Annotated[Path, typer.Argument(help="Folder of images.")],
    batch_size: Annotated[
        Optional[int], typer.Option(help="Images per forward pass [default: 64 on CUDA, 4 on CPU].")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many images.")] = 512,
    detector: Annotated[
        Optional[Path],
        typer.Option(
            help="A detector checkpoint: time the detector path against both models' forward passes."
        ),
    ] = None,
    min_score: Annotated[
        Optional[float], typer.Option(help="--detector: predict's --min-score (hand score) [default: 0.45].")
    ] = None,
    max_hands: Annotated[
        Optional[int], typer.Option(help="--detector: predict's --max-hands [default: 4].")
    ] = None,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Also export the model and time it on onnxruntime.")
    ] = False,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds; each row keeps its best.")] = 3,
) -> None:
    """Predict images/s end to end vs model-only forward vs a tutorial-style loop, and the Python
    API's (handpose.load) on the same images; --onnx: onnxruntime's against PyTorch's; with
    --detector, detector + keypoints end to end vs the two models' forward passes alone."""
    from handpose.bench.predict import bench_predict as run

    run(
        model,
        images,
        detector=detector,
        min_score=min_score,
        max_hands=max_hands,
        batch_size=batch_size,
        limit=limit,
        onnx=onnx,
        repeats=rounds,
    )


@bench_app.command("onnx", epilog=EXAMPLES["bench onnx"])
def bench_onnx(
    models: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Checkpoints or bare state_dicts [default: every arch, random weights]."),
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,4,32",
    threads: Annotated[int, typer.Option(help="Intra-op threads of each runtime.")] = 2,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds; each row keeps its best.")] = 5,
) -> None:
    """onnxruntime vs PyTorch images/s: the same model's forward pass on the same uint8 crops."""
    from handpose.bench.onnx import bench_onnx as run

    run(models or [], batch_sizes=_ints(batch_sizes, "--batch-sizes"), threads=threads, rounds=rounds)


@bench_app.command("video", epilog=EXAMPLES["bench video"])
def bench_video(
    frames: Annotated[int, typer.Option(help="Frames per generated clip.")] = 150,
    workdir: Annotated[Path, typer.Option(help="Scratch folder for the clips.")] = Path("bench-out/video"),
    rounds: Annotated[int, typer.Option(help="Interleaved rounds; each row keeps its best.")] = 3,
    model: Annotated[
        Optional[str],
        typer.Option(help="Also predict each clip with this model (a bundled name, a checkpoint, a .onnx)."),
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="--model's device [default: as predict].")] = None,
) -> None:
    """Video decoding frames/s of a generated 224 px and a 720p clip: decoder alone vs RGB frames;
    with --model, predict's frames/s against decoding alone and the model alone."""
    from handpose.bench.video import bench_video as run

    run(workdir, frames=frames, rounds=rounds, model=model, device=device)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HandposeError(f"{flag} {text!r}: expected comma-separated integers") from None


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


# ----------------------------------------------------------------------------- the boundary


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _should_print() -> bool:
    """Under torchrun a mistake found before the ranks connect is found by every rank alike: rank 0
    says so (under torchrun the others wait to be stopped: `_fail`). Past that point an error may
    be one rank's own (its shard), so that rank prints."""
    if _rank() == 0:
        return True
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _reply_to_torchrun(message: str) -> None:
    """Put the line in this rank's torchelastic error file (the `@record` mechanism), so torchrun's
    failure summary shows it in place of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as f:
            json.dump({"message": f"error: {message}", "timestamp": int(time.time())}, f)


def _fail(message: str) -> NoReturn:
    """One line, exit code 1."""
    message = " ".join(message.split())  # one line, whatever the message held
    _reply_to_torchrun(message)
    if not _should_print():
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            sys.exit(1)  # another launcher: rank 0 says it
        # torchrun ends every rank as soon as one fails: leaving first would end rank 0 before it
        # prints. Rank 0 finds the same mistake within a second or two; a rank still here after
        # 30 s (rank 0 did not fail: a path missing on this node only) prints its own line.
        time.sleep(30.0)
    rank = f"rank {_rank()}: " if _rank() else ""
    err.print(Text.assemble(("error: ", "bold red"), rank, message))
    sys.exit(1)


def _interrupted() -> NoReturn:
    if _rank() == 0:
        err.print(Text("interrupted", style="yellow"))
    sys.exit(130)


def _usage_line(e: Any) -> str:
    """A parser error (unknown option, bad number, missing argument) as one line with its command."""
    ctx = getattr(e, "ctx", None)
    where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    return f"{e.format_message()}{where}"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app; user mistakes become one line and exit code 1."""
    try:
        _main(argv)
    except SystemExit as e:
        _leave(e.code)
        raise


def _leave(code: int | str | None) -> None:
    """End a torchrun worker (WORLD_SIZE > 1) without the interpreter's teardown.

    DDP's reducer keeps the gloo process group, and its worker threads, alive past
    destroy_process_group; when the interpreter then tears down, gloo aborts one run in ten
    ("terminate called without an active exception", SIGABRT), after everything was written, and
    torchrun reports a finished job as failed (tests/test_train.py's DDP tests, and a plain DDP
    script, hit it). So a worker runs the atexit handlers (multiprocessing stops its loader
    workers there), flushes its streams and leaves with os._exit. Other processes return."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or "torch.distributed" not in sys.modules:
        return
    import atexit

    status = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    atexit._run_exitfuncs()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


def _main(argv: list[str] | None) -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:webdataset")
    command = typer.main.get_command(app)
    try:
        # standalone_mode=False: errors come back to us instead of Typer printing a boxed,
        # wrapped message and exiting 2.
        code = command.main(args=argv, prog_name="handpose", standalone_mode=False)
    except HandposeError as e:
        _fail(str(e))
    except Interrupted:
        _interrupted()
    except click_errors.ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `handpose`: the help is what was asked for
            print(e.format_message())
            sys.exit(0)
        _fail(_usage_line(e))
    sys.exit(code if isinstance(code, int) else 0)

"""`handpose predict`: keypoints for every image of files, folders, FreiHAND roots, YOLO-pose
datasets or shards: one prediction per hand the detector finds (--detector), per hand box
(--boxes) or per image, mapped back to original pixels; an error report when labels exist.
Resumable, and split across ranks under torchrun.

This module is the job: the inputs and options checked before anything is written, the chunks
of the input stream shared out to the ranks, the resume point, and the end. Per chunk of images
(`predict_inputs` streams them; chunk c belongs to rank c mod world size):
  read the bytes -> labelled hands (`labels_of`) and boxes (--boxes) -> the inference path
  (`inference`: the detector's boxes, or a crop per given box, or the whole image; the model's
  forward and decoder, back to original pixels, --refine passes, the presence threshold) ->
  the chunk's lines (`predict_outputs`) appended to this
  rank's part with a checkpoint (`predict_staging`). Rank 0 then merges the parts, writes the
  report (`report.py`) and the overlays, and commits them into --out (`predict_outputs.finish`).
The model comes from `models.load_model` (a bundled model's name, a handpose checkpoint, the
tutorial's weights, or a `handpose export` .onnx run on onnxruntime), the detector from
`detector.load_detector` (a bundled model's own, by default).

OUT/
  predictions.jsonl  one line per hand, input order: {"path", "width", "height", "hand",
                     "box" ([x0, y0, x1, y1] original px, null: the whole image), "keypoints":
                     [[x, y, score] x 21], "score"} (+ "box_score" from a detector or a boxes
                     file; + "error_px", "error_pct_box", "oks" when paired with a labelled hand)
  errors.jsonl       one line per input or label line that could not be used: {"path", "reason"}
  --coco FILE        COCO keypoint results (a new file inside OUT)
  overlays/          --overlays N: drawings (labelled: the worst and the best hands)
  report.json, report.md, error_hist.png, pck.png, gallery.png   with labels (see report.py)
  run.json           written last: status, the files this run wrote, counts, timing, model
"Original pixels" follow geometry.py's convention in the image as displayed (EXIF applied).
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from handpose import checkpoint, predict_video, report
from handpose.atomic import check_output_dir, inside
from handpose.console import make_console
from handpose.cpu import cores, keep_freed_memory
from handpose.detector import DetectorSpec, load_detector
from handpose.distributed import World, barrier, broadcast_object, setup_world, teardown
from handpose.errors import HandposeError
from handpose.inference import (
    DATA_ERRORS,
    REFINE_MODES,
    Finder,
    Net,
    Runner,
    default_batch_size,
    default_refine,
    image_size_of,
    photo_of,
)
from handpose.model import ModelSpec
from handpose.models import detector_path, is_onnx, load_model, pick_device
from handpose.predict_inputs import (
    BadInput,
    BoxSource,
    CocoLabels,
    Input,
    LabelledBoxes,
    Scan,
    Source,
    Unit,
    WholeImage,
    check_split,
    iter_units,
    labelled_kinds,
    labels_of,
    load_coco_labels,
    open_boxes,
    plan_inputs,
    read_image,
    scan,
    stamp_of,
    suffix_list,
    verify_shard_inputs,
)
from handpose.predict_outputs import InputImage, RankState, chunk_outputs, commit_only, finish, keep_counts
from handpose.predict_staging import (
    ERRORS,
    JOB_FORMAT,
    PREDICTIONS,
    RUN_JSON,
    STAGING,
    Part,
    Staging,
    check_not_foreign,
)
from handpose.remote import Cache

__all__ = ["predict"]

MIN_CHUNK = 32  # images per chunk at least: the unit of checkpoints and of the ranks' split
OWN_NAMES = (PREDICTIONS, ERRORS, RUN_JSON, *report.OUTPUTS)


# ---------------------------------------------------------------------------------------------
# Entry


Detector = tuple[torch.nn.Module, DetectorSpec]


def predict(
    model: str | os.PathLike | tuple[Net, ModelSpec],
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    detector: str | os.PathLike | Detector | bool | None = None,
    min_score: float | None = None,
    max_hands: int | None = None,
    min_presence: float | None = None,
    split: str | None = None,
    labels: str | os.PathLike | None = None,
    boxes: str | os.PathLike | None = None,
    refine: int | None = None,
    refine_mode: str = "box",
    flip_test: bool = False,
    coco: str | os.PathLike | None = None,
    overlays: int = 0,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    quiet: bool = False,
    channels_last: bool = True,
    verify: bool = True,
    cache: Cache | None = None,
    every: int | None = None,
    overlay_video: bool = False,
) -> dict[str, Any]:
    """Predict keypoints for every input image into `out`; with labels, write an error report.

    model: a bundled model's name (`hands`), a checkpoint / state_dict / .onnx path, or an
    already loaded (module with `decode` or `onnx_model.OnnxModel`, ModelSpec) pair.
    inputs: images, folders (their images and videos), videos, datasets, shards folders or URLs.
    detector: a detector checkpoint path (or a loaded (CenterNet, DetectorSpec) pair; False: none;
    default: the bundled model's own when it ships one): predict every hand it finds whose hand score,
    sqrt(box score x keypoint score), is >= min_score (default `inference.DEFAULT_MIN_HAND_SCORE`),
    at most max_hands per photo (default 4). boxes: None (the
    detector's, else whole images), "gt" (the labelled boxes), a COCO detections json or a YOLO
    labels folder; given boxes win over the detector. min_presence: drop hands whose presence
    probability (models with a presence head) is lower (None: `inference.shows_hand`'s default).
    refine: passes in the predicted hand's box (None: `inference.default_refine`; 1 with
    refine_mode "upright"), refine_mode "box" or "upright" (the crop turned so that wrist ->
    middle MCP points up). flip_test: average each crop with its mirror. verify: check a shards
    folder's sha256s before reading it (sizes are always checked; a URL's are checked as they
    stream). cache: where the shards of a shards URL are kept (remote.Cache; None: streamed).
    every: videos: predict every Nth frame (default 1: all). overlay_video: also write each video
    with the skeletons drawn (OUT/overlays/video-K-NAME.mp4).
    Returns a summary ({"images", "predictions", "errors", "seconds", "images_per_s", "report",
    ...}; under torchrun rank 0's holds the whole run). Re-running an interrupted run resumes it.
    Raises HandposeError for a user mistake, or when nothing could be predicted (after writing
    errors.jsonl).
    """
    if detector is None and not isinstance(model, tuple):
        detector = detector_path(model)  # a bundled model's own detector (models.detector_path)
    if isinstance(detector, bool):
        if detector:
            raise HandposeError("detector=True: give a detector checkpoint, or False for none")
        detector = None
    _check_numbers(
        batch_size=batch_size,
        workers=workers,
        overlays=overlays,
        refine=refine,
        max_hands=max_hands,
        every=every,
    )
    _check_options(detector, min_score, max_hands, min_presence, refine_mode)
    out = check_output_dir(out, "--out")
    coco_rel = coco_name(out, coco)
    keep_freed_memory()  # batch buffers reused, not page-faulted in again (cpu.keep_freed_memory)
    world = _join_world(pick_device(device, onnx=is_onnx(model)))
    net: Net
    if isinstance(model, tuple):
        net, spec = model
        spec = replace(spec, digest=spec.digest or _module_digest(net, spec))
    else:
        net, spec = load_model(model, world.device, channels_last=channels_last)
    if refine_mode == "upright" and spec.preprocess == "tutorial":
        raise HandposeError(
            "--refine-mode upright: the tutorial's weights are fed by a Pillow resize, which cannot "
            "turn a crop; use --refine-mode box"
        )
    finder = _finder(detector, world.device, min_score, max_hands) if detector is not None else None
    job = _plan_job(
        spec,
        world,
        inputs,
        out,
        split=split,
        labels=labels,
        boxes=boxes,
        finder=finder,
        min_presence=min_presence,
        refine=refine,
        refine_mode=refine_mode,
        flip_test=flip_test,
        coco_rel=coco_rel,
        overlays=overlays,
        batch_size=batch_size,
        workers=workers,
        channels_last=channels_last,
        cache=cache,
        every=every,
        overlay_video=overlay_video,
    )
    staging = Staging(out)
    mode = None
    if world.is_main:
        # Fail before the work on a file that would have to be overwritten at the end.
        check_not_foreign(out, job.names)
        if verify:
            verify_shard_inputs(job.plan, job.split, progress=not quiet)
        out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
        mode = staging.open(job.fingerprint)
    mode = broadcast_object(mode, world)
    console = make_console(stderr=True, quiet=quiet or not world.is_main)
    if mode == "commit":  # an earlier run finished everything but moving its files into place
        return _end(world, commit_only(staging) if world.is_main else {"rank": world.rank}, console)
    if mode == "resume":
        console.print(f"resuming the interrupted run in {staging.root}")
    start = time.perf_counter()
    pool = ThreadPoolExecutor(job.workers, thread_name_prefix="predict-decode") if job.workers else None
    runner = Runner(
        net,
        spec,
        batch_size=job.batch_size,
        refine=job.refine,
        refine_mode=refine_mode,
        flip_test=flip_test,
        min_presence=min_presence,
        finder=job.finder,
        channels_last=channels_last,
        pool=pool,
    )
    try:
        state = _run_part(job, _Context(runner, job.boxes, pool), world, staging.part(world.rank), console)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    barrier(world)
    if not world.is_main:
        return _end(world, {"rank": world.rank, **state.counts}, console)
    run = {
        "inputs": job.found.units,
        "model": spec.kind,
        "model_size": spec.size,
        "device": str(world.device),
        "world_size": world.world_size,
        "batch_size": job.batch_size,
        "boxes": "detector" if job.finder is not None else job.boxes.spec,
        "refine": job.refine,
        "refine_mode": refine_mode,
        "flip_test": flip_test,
        "min_presence": min_presence,
        "detector": None
        if job.finder is None
        else {
            "size": job.finder.spec.size,
            "min_score": job.finder.min_score,
            "max_hands": job.finder.max_hands,
        },
        **({"videos": len(job.found.videos), "every": job.every} if job.found.videos else {}),
    }
    summary = finish(
        staging,
        world.world_size,
        overlays=overlays,
        coco=coco_rel,
        model_size=spec.size,
        run=run,
        seconds=time.perf_counter() - start,
        console=console,
        videos=job.found.videos if job.overlay_video else [],
        every=job.every,
    )
    return _end(world, summary, console)


def _finder(
    detector: str | os.PathLike | Detector,
    device: torch.device,
    min_score: float | None,
    max_hands: int | None,
) -> Finder:
    """--detector loaded (one line naming the flag and the file when it is not a detector), with
    the hands it keeps: hand score >= --min-score (default: DEFAULT_MIN_HAND_SCORE), at most
    --max-hands."""
    if isinstance(detector, tuple):
        dnet, dspec = detector
        dspec = replace(dspec, digest=dspec.digest or _module_digest(dnet, dspec))
    else:
        try:
            dnet, dspec = load_detector(detector, device)
        except HandposeError as e:
            raise HandposeError(f"--detector {e}") from None
    return Finder.of(dnet, dspec, min_score, max_hands)


def _check_options(
    detector: object,
    min_score: float | None,
    max_hands: int | None,
    min_presence: float | None,
    refine_mode: str,
) -> None:
    """The detector's and the thresholds' options, checked before anything is loaded."""
    if detector is None:
        for flag, value in (("--min-score", min_score), ("--max-hands", max_hands)):
            if value is not None:
                raise HandposeError(f"{flag} {value}: applies with --detector (the detector's boxes)")
    for flag, value in (("--min-score", min_score), ("--min-presence", min_presence)):
        if value is not None and not (0.0 <= value <= 1.0):
            raise HandposeError(f"{flag} {value}: must be between 0 and 1")
    if refine_mode not in REFINE_MODES:
        raise HandposeError(f"--refine-mode {refine_mode!r}: must be one of {', '.join(REFINE_MODES)}")


@dataclass(frozen=True)
class _Job:
    """A run, resolved: the inputs, the options, and the fingerprint a resumed run must match."""

    plan: list[Input]
    out: Path
    split: str | None
    labels: CocoLabels | None
    boxes: BoxSource
    finder: Finder | None  # the detector, when it finds the boxes (no --boxes)
    refine: int
    coco: str | None  # relative to out
    overlays: int
    batch_size: int
    workers: int
    chunk: int  # images per chunk
    found: Scan
    names: list[str]  # files the run will (or may) write in OUT
    fingerprint: dict[str, Any]
    every: int = 1  # videos: every Nth frame
    overlay_video: bool = False


def _plan_job(
    spec: ModelSpec,
    world: World,
    inputs: Sequence[str | os.PathLike],
    out: Path,
    *,
    split: str | None,
    labels: str | os.PathLike | None,
    boxes: str | os.PathLike | None,
    finder: Finder | None,
    min_presence: float | None,
    refine: int | None,
    refine_mode: str,
    flip_test: bool,
    coco_rel: str | None,
    overlays: int,
    batch_size: int | None,
    workers: int | None,
    channels_last: bool,
    cache: Cache | None = None,
    every: int | None = None,
    overlay_video: bool = False,
) -> _Job:
    """Check the inputs and options (HandposeError before anything is written) and scan the
    inputs once: their fingerprint and count."""
    label_set = load_coco_labels(labels) if labels is not None else None
    box_source = open_boxes(boxes)
    finder = finder if isinstance(box_source, WholeImage) else None  # given boxes win
    refine = _resolve_refine(refine, spec, box_source, finder is not None, refine_mode)
    plan = plan_inputs(inputs, out, cache=cache)
    check_split(plan, split)
    labelled = labelled_kinds(plan, label_set)
    if isinstance(box_source, LabelledBoxes) and not labelled:
        raise HandposeError(
            "--boxes gt: no input carries labels (shards, a YOLO dataset, a FreiHAND root, or --labels)"
        )
    found = scan(iter_units(plan, out, split=split, labels=label_set))
    if not found.units:
        raise HandposeError(
            f"no images found in {', '.join(str(p) for p in inputs) or '(no inputs)'} "
            f"(looked for {suffix_list()})"
        )
    if labels is not None and found.plain and not found.plain_labelled:
        raise HandposeError(
            f"--labels {labels}: matches none of the {found.plain} input images (by file_name under "
            f"{Path(labels).parent}, or by a base name that occurs once)"
        )
    _check_video_options(found, box_source, every, overlay_video)
    batch_size = batch_size or default_batch_size(world.device)
    chunk = _chunk_size(batch_size)
    fingerprint = {
        "format": JOB_FORMAT,
        "model": spec.digest,
        "inputs": found.digest,
        "world_size": world.world_size,
        "chunk": chunk,
        "options": {
            "split": split,
            "labels": stamp_of(labels),
            "boxes": stamp_of(boxes),
            "detector": None if finder is None else [finder.spec.digest, finder.min_score, finder.max_hands],
            "min_presence": min_presence,
            "refine": refine,
            "refine_mode": refine_mode,
            "flip_test": flip_test,
            "coco": coco_rel,
            "overlays": overlays,
            "batch_size": batch_size,
            "channels_last": channels_last,
            "device": world.device.type,
            "every": every or 1,
            "overlay_video": overlay_video,
        },
    }
    names = [*OWN_NAMES[:3], *(report.OUTPUTS if labelled else ()), *([coco_rel] if coco_rel else [])]
    return _Job(
        plan,
        out,
        split,
        label_set,
        box_source,
        finder,
        refine,
        coco_rel,
        overlays,
        batch_size,
        default_workers(world.device) if workers is None else workers,
        chunk,
        found,
        names,
        fingerprint,
        every or 1,
        overlay_video,
    )


def _run_part(job: _Job, ctx: _Context, world: World, folder: Path, console: Console) -> RankState:
    """This rank's chunks, each predicted, appended to its part and checkpointed; a part left by
    an interrupted run continues after its last checkpoint."""
    part = Part(folder)
    try:
        state = RankState.load(part.state, *keep_counts(job.overlays))
        state.counts["fresh_images"] = 0
        units = iter_units(job.plan, job.out, split=job.split, labels=job.labels)
        W, done_before = world.world_size, part.chunks

        def wanted(c: int) -> bool:  # this rank's chunks after those an interrupted run did
            return c % W == world.rank and c // W >= done_before

        cut = predict_video.chunks(units, job.chunk, every=job.every, wanted=wanted)
        mine = ((c, u) for c, u in cut if c % world.world_size == world.rank)
        todo = max(0, _my_units(job.found.units, job.chunk, world) - part.chunks * job.chunk)
        start = time.perf_counter()
        with _progress(console) as progress, torch.inference_mode():
            # videos: frames are counted as they come; the next chunk decodes while this one runs
            task = progress.add_task("predict", total=None if job.found.videos else todo, rate=0.0)
            done = 0
            todo_chunks = _skip(mine, part.chunks)
            if job.found.videos:
                todo_chunks = predict_video.prefetch(todo_chunks)
            for cid, opened in _opened(todo_chunks, ctx):
                ctx.runner.run([x.photo for x in opened if isinstance(x, InputImage)])
                data = chunk_outputs(cid, opened, state, job.overlays, ctx.runner.spec.box_to_keypoints)
                state.counts["fresh_images"] += len(opened)
                part.write_chunk(cid, data, state.to_json())
                done += len(opened)
                progress.update(task, completed=done, rate=done / (time.perf_counter() - start))
    finally:
        part.close()
    return state


def _skip(chunks: Iterator[tuple[int, list[Unit]]], n: int) -> Iterator[tuple[int, list[Unit]]]:
    """This rank's chunks after the first `n` (done by an interrupted run: resume after them)."""
    for k, item in enumerate(chunks):
        if k >= n:
            yield item


def _my_units(units: int, chunk: int, world: World) -> int:
    """Units of the first `units` that fall in this rank's chunks."""
    full, rest = divmod(units, chunk)
    mine = len(range(world.rank, full, world.world_size)) * chunk
    return mine + (rest if full % world.world_size == world.rank else 0)


def _end(world: World, summary: dict[str, Any], console: Console) -> dict[str, Any]:
    teardown(world)
    if world.is_main and summary.get("predictions") == 0:
        where = summary.get("out", "")
        if summary.get("errors") and not summary.get("images"):
            raise HandposeError(
                f"no image could be predicted: all {summary['errors']} inputs failed "
                f"(reasons in {Path(where) / ERRORS})"
            )
        given = summary.get("boxes") not in ("detector", "whole image")
        if given and summary.get("images_without_boxes") == summary.get("images"):
            raise HandposeError(f"no prediction: no input image had a box (--boxes {summary.get('boxes')})")
        # The detector or the presence threshold found no hand: an answer, not a failure.
        console.print(f"no hand found in {summary.get('images')} images")
    return summary


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>6.1f} img/s"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


# ---------------------------------------------------------------------------------------------
# One chunk of images


@dataclass(frozen=True)
class _Context:
    """What every chunk needs: the model's runner, the boxes to predict in, the decode threads."""

    runner: Runner
    boxes: BoxSource
    pool: ThreadPoolExecutor | None


def _open_image(unit: Unit, ctx: _Context) -> InputImage | BadInput:
    """Read one input, its labels and boxes, and make its photo for the inference path (the
    model inputs of its boxes, or the detector's input); a data error makes it a BadInput (one
    errors.jsonl line)."""
    if isinstance(unit, BadInput):
        return unit
    assert isinstance(unit, Source), "chunks hold a video's frames, never the video"
    spec, finder = ctx.runner.spec, ctx.runner.finder
    try:
        data = read_image(unit)
        width, height = image_size_of(data)
        hands, problems = labels_of(unit, width, height)
        read = functools.partial(read_image, unit)
        if finder is not None:
            photo = photo_of(data, width, height, None, spec, finder, read, ctx.runner.cache)
        else:
            tasks = ctx.boxes.boxes(unit, width, height, hands)
            photo = photo_of(data, width, height, [t.box for t in tasks], spec, None, read, ctx.runner.cache)
            for t, crop in zip(tasks, photo.crops, strict=True):
                crop.hand, crop.label, crop.box_score = t.hand, t.label, t.score
    except DATA_ERRORS as e:
        return BadInput(unit.ordinal, unit.path, _reason(e))
    return InputImage(unit, width, height, hands, photo, problems)


def _opened(chunks: Iterator[tuple[int, list[Unit]]], ctx: _Context) -> Iterator[tuple[int, list[Any]]]:
    """Each chunk with its images opened; with a pool, the next chunk is read and decoded while
    the caller runs the model on this one."""
    if ctx.pool is None:
        for cid, units in chunks:
            yield cid, [_open_image(u, ctx) for u in units]
        return
    pending: tuple[int, list[Future[Any]]] | None = None
    for cid, units in chunks:
        submitted = (cid, [ctx.pool.submit(_open_image, u, ctx) for u in units])
        if pending is not None:
            yield pending[0], [f.result() for f in pending[1]]
        pending = submitted
    if pending is not None:
        yield pending[0], [f.result() for f in pending[1]]


# ---------------------------------------------------------------------------------------------
# Options and the job


def _check_numbers(**values: int | None) -> None:
    least = {"batch_size": 1, "workers": 0, "overlays": 0, "refine": 0, "max_hands": 1, "every": 1}
    for name, value in values.items():
        if value is not None and value < least[name]:
            raise HandposeError(f"--{name.replace('_', '-')} {value}: must be >= {least[name]}")


def _check_video_options(found: Scan, boxes: BoxSource, every: int | None, overlay_video: bool) -> None:
    """--every and --overlay-video need a video among the inputs; --boxes cannot name a frame."""
    if found.videos and not isinstance(boxes, WholeImage):
        raise HandposeError(
            f"--boxes {boxes.spec}: applies to images; {found.videos[0]} is a video "
            "(predict videos without --boxes)"
        )
    for flag, given in (("--every", every is not None), ("--overlay-video", overlay_video)):
        if given and not found.videos:
            raise HandposeError(f"{flag}: applies to videos; none is among the inputs")


def coco_name(out: Path, coco: str | os.PathLike | None) -> str | None:
    """--coco as a path relative to --out: a new file inside --out, not one of predict's own
    names, under no file. Its folder is created inside --out when missing."""
    if coco is None:
        return None
    try:
        path = inside(out, coco)
    except ValueError as e:
        raise HandposeError(f"--coco: {e}") from None
    rel = path.relative_to(out.resolve()).as_posix()
    if rel == ".":
        raise HandposeError(f"--coco {coco}: is the output folder; give a file name inside it")
    if path.is_dir():
        raise HandposeError(f"--coco {coco}: is a folder; give a file name")
    top = rel.split("/")[0]
    if rel in OWN_NAMES or top in ("overlays", STAGING) or rel.endswith(".partial"):
        raise HandposeError(f"--coco {coco}: {rel} is one of predict's own outputs; choose another name")
    for p in path.parents:
        if p == out.resolve():
            break
        if p.exists() and not p.is_dir():
            raise HandposeError(f"--coco {coco}: {p} is a file, not a folder")
    return rel


def _resolve_refine(
    refine: int | None, spec: ModelSpec, boxes: BoxSource, detector: bool, refine_mode: str
) -> int:
    """--refine: N passes in the predicted hand's box (default: `inference.default_refine`, at
    least 1 with --refine-mode upright, a mode of the second pass); never with --boxes (the
    boxes are given)."""
    if not isinstance(boxes, WholeImage):
        if refine:
            raise HandposeError(
                "--refine applies to whole images and the detector's boxes; it cannot be used with --boxes"
            )
        if refine_mode != "box":
            raise HandposeError(
                f"--refine-mode {refine_mode}: refines whole images and the detector's boxes, not --boxes"
            )
        return 0
    return default_refine(spec, detector=detector, refine_mode=refine_mode) if refine is None else refine


def _chunk_size(batch_size: int) -> int:
    """Images per chunk: whole batches (one box per image), at least MIN_CHUNK."""
    return batch_size * max(1, math.ceil(MIN_CHUNK / batch_size))


def _join_world(dev: torch.device) -> World:
    """One process, or this rank of a torchrun job (each rank its own device: cuda:LOCAL_RANK,
    else the CPU, where each rank gets its share of the cores)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return World(device=dev)
    world = setup_world(dev.type)
    if world.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size) or 1)
        # torchrun sets OMP_NUM_THREADS=1 for every rank; give each rank its share of the cores.
        torch.set_num_threads(max(1, cores() // local))
    return world


def _reason(e: BaseException) -> str:
    """A data error as one deterministic line (Pillow names its BytesIO object's address)."""
    return re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__


def _module_digest(net: Net | torch.nn.Module, spec: ModelSpec | DetectorSpec) -> str:
    """An in-memory model's identity for resuming: its class, spec and weights (an ONNX model's
    spec holds its file's digest)."""
    weights = net.state_dict() if isinstance(net, torch.nn.Module) else {}
    return checkpoint.digest({"class": type(net).__qualname__, "spec": repr(spec), "weights": weights})


def default_workers(device: torch.device) -> int:
    """Decode threads: cores - 1 beside a GPU; none on a CPU, where the model already uses every
    core and decoding elsewhere only competes with it (see BENCHMARKS.md)."""
    return max(0, cores() - 1) if device.type == "cuda" else 0

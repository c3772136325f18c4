"""`handpose pack`: FreiHAND, COCO keypoints or YOLO-pose -> WebDataset shards + DALI indexes + manifest.

How a pack runs (each step is deterministic, so a re-run reproduces every byte):
1. read and validate the labels (handpose.sources: one Record per hand), assign splits (the
   source's own, or `--split` by split unit: FreiHAND id, image), `os.stat` every image;
2. plan shards from the file sizes alone, before decoding anything: samples in split order, then
   image path, then hand, cut into ~`shard_size_mb` shards only between images (all hands of an
   image share a shard), each with a digest of everything that goes in it;
3. worker processes each write whole shards (temporary names, then `os.replace` of .tar and
   .idx), read and decode every image once, strictly (truncation is caught here), turn
   normalised labels into pixels of the displayed image, sum the stats split's pixels exactly
   (integers, each image once) and the label statistics, and drop a done-record in OUT/.pack/;
4. the main process adds the per-shard results in shard order and writes manifest.json LAST,
   then removes OUT/.pack/.
A crashed or interrupted pack leaves OUT/.pack/: the next run reuses every shard whose
done-record matches its planned digest and whose bytes still hash to the recorded sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from handpose import __version__
from handpose.atomic import tmp_name, tmp_target, write_json
from handpose.console import make_console
from handpose.cpu import collect_before_fork, cores
from handpose.errors import HandposeError
from handpose.imageio import decode_jpeg, image_format, image_size
from handpose.shards import (
    BLOCK_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    ShardWriter,
    file_problem,
    index_name,
    is_shard_file,
    sample_key,
    sample_members,
    sha256_blocks,
    sha256_file,
    shard_name,
)
from handpose.skeleton import NUM_JOINTS
from handpose.sources import Problem, Record, read_source

STATE_DIR = ".pack"  # OUT/.pack/: plan.json + one done-record per finished shard; gone when complete
MB = 1_000_000
DEFAULT_FRACTIONS = "0.8,0.15,0.05"  # --split: train, val, test
# Estimated tar bytes per sample besides the image: 6 member headers plus padded json, kp, vis,
# box and sid members. Only used to plan shard boundaries, so it must depend on nothing but the input.
_SAMPLE_OVERHEAD = 7168
_INSPECT_SHEET = re.compile(r"^inspect-\w+\.png$")  # `handpose inspect`'s default contact sheets
console = make_console(stderr=True)


@dataclass(frozen=True)
class Sample:
    """A record placed in a split, with the file stat that the plan (and its digest) rests on."""

    record: Record
    split: str
    bytes: int
    mtime_ns: int


@dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    samples: tuple[Sample, ...]
    digest: str  # hash of everything that determines the shard's bytes (and its done-record)
    stats: bool  # sum this shard's pixels and poses into the dataset mean/std and mean pose


def pack(
    src: str | Path,
    out: str | Path,
    *,
    fmt: str = "freihand",
    images: str | Path | None = None,
    versions: str | None = None,
    split: str | None = None,
    split_seed: int | None = None,
    shard_size_mb: float = 4.0,
    workers: int | None = None,
    on_error: str = "fail",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pack `src` into shards in `out`; returns the manifest (also written to OUT/manifest.json).

    `split` (default 0.8,0.15,0.05) and `split_seed` divide the split units of a source without
    splits of its own; for a source with split folders they are an error. Raises HandposeError
    for bad options, a non-empty `out` holding something else, and (with on_error="fail") the
    first bad sample, naming its file (and id or line).
    """
    src, out = Path(src), Path(out)
    fractions = parse_split(split if split is not None else DEFAULT_FRACTIONS)
    if on_error not in ("fail", "skip"):
        raise HandposeError(f"--on-error {on_error!r}: expected 'fail' or 'skip'")
    if not shard_size_mb > 0:
        raise HandposeError(f"--shard-size {shard_size_mb}: must be > 0 MB")
    if workers is not None and workers < 1:
        raise HandposeError(f"--workers {workers}: must be >= 1")
    data = read_source(src, fmt, images=images, versions=versions)
    if data.own_splits and (split is not None or split_seed is not None):
        flag = "--split" if split is not None else "--split-seed"
        raise HandposeError(
            f"{flag}: {src} has its own split folders, which pack keeps; "
            f"{flag} divides a dataset in one folder"
        )
    for note in data.notes:
        console.print(f"note: {note}")

    problems = list(data.problems)
    samples = _stat_samples(data.records, assign_splits(data.ids, fractions, split_seed), problems)
    if problems and on_error == "fail":
        raise HandposeError(_fail_message(problems))
    options = {
        "format": fmt,
        "versions": (versions or "gs").strip().lower() if fmt == "freihand" else None,
        "split": "folders" if data.own_splits else list(fractions),
        "split_seed": split_seed,
        "shard_size_mb": float(shard_size_mb),  # 4 and 4.0 must give the same manifest
        "on_error": on_error,
    }
    plan = plan_shards(samples, int(shard_size_mb * MB), options)
    if not plan:
        raise HandposeError(
            f"{src}: no samples to pack ({len(problems)} skipped, {data.background} background images)"
        )

    state = _prepare_out(out, overwrite)
    write_json(state / "plan.json", _plan_summary(plan, options, data.source))
    results = _write_all(plan, out, on_error, workers or cores())
    _remove_stale(out, {p.name for p in plan if results[p.name]["samples"]})
    manifest = build_manifest(plan, results, problems, data.source, options, background=data.background)
    write_json(out / MANIFEST, manifest)  # last: its presence means the pack is complete
    shutil.rmtree(state)
    _report(manifest, out)
    return manifest


def parse_split(spec: str) -> tuple[float, float, float]:
    """'0.8,0.15,0.05' -> (0.8, 0.15, 0.05): three fractions >= 0 that sum to 1."""
    try:
        parts = tuple(float(s) for s in spec.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(not math.isfinite(f) or f < 0 for f in parts) or abs(sum(parts) - 1) > 1e-6:
        raise HandposeError(f"--split {spec!r}: expected three fractions train,val,test >= 0 summing to 1")
    return parts  # type: ignore[return-value]


def assign_splits(ids: list[int], fractions: tuple[float, float, float], seed: int | None) -> dict[int, str]:
    """Split unique ids in id order (or a shuffle seeded by `seed`) by cumulative fractions.

    Every id counts, even one whose samples are skipped, so a bad sample never moves others.
    """
    order = sorted(ids)
    if seed is not None:
        random.Random(seed).shuffle(order)  # CPython's shuffle is stable across versions
    n = len(order)
    cut1 = math.floor(fractions[0] * n + 1e-9)
    cut2 = math.floor((fractions[0] + fractions[1]) * n + 1e-9)
    return {i: ("train" if k < cut1 else "val" if k < cut2 else "test") for k, i in enumerate(order)}


def _stat_samples(records: list[Record], split_of: dict[int, str], problems: list[Problem]) -> list[Sample]:
    samples = []
    stats: dict[Path, os.stat_result | str] = {}  # one stat per image, however many hands it holds
    for r in records:
        if r.path not in stats:
            try:
                stats[r.path] = os.stat(r.path)
            except OSError as e:
                stats[r.path] = f"missing image ({e.strerror})"
        st = stats[r.path]
        if isinstance(st, str):
            problems.append(r.problem(st))
            continue
        samples.append(Sample(r, r.split or split_of[r.id], st.st_size, st.st_mtime_ns))
    return samples


def plan_shards(samples: list[Sample], shard_bytes: int, options: dict[str, Any]) -> list[ShardPlan]:
    """Cut samples (split order, then image path, then hand) into shards of about `shard_bytes`
    tar bytes, only between images: every hand of an image lands in one shard."""
    by_split: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for s in samples:
        by_split[s.split].append(s)
    # Mean/std and the mean pose come from the train split; a pack without one uses all samples.
    stats_splits = {"train"} if by_split["train"] else set(SPLITS)
    plan: list[ShardPlan] = []
    for split in SPLITS:
        chunks: list[list[Sample]] = []
        size = 0
        for s in sorted(by_split[split], key=lambda s: (s.record.file, s.record.hand)):
            est = 512 + -(-s.bytes // 512) * 512 + _SAMPLE_OVERHEAD  # header + padded image
            if not chunks or (s.record.file != chunks[-1][-1].record.file and size + est > shard_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(s)
            size += est
        plan += [_shard(split, k, c, split in stats_splits, options) for k, c in enumerate(chunks)]
    return plan


def _shard(split: str, index: int, chunk: list[Sample], stats: bool, options: dict[str, Any]) -> ShardPlan:
    h = hashlib.sha256(f"{FORMAT_VERSION} {__version__} {split} {stats} {options['on_error']}".encode())
    for s in chunk:
        r = s.record
        h.update(
            f"|{r.sid} {r.id} {r.hand} {r.version} {r.split} {r.file} {s.bytes} {s.mtime_ns} {r.size} "
            f"{r.normalised} {r.image_id} {r.label} {r.cls}".encode()
        )
        for a in (r.uv, r.visibility, r.box, r.xyz, r.K):
            h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
    return ShardPlan(shard_name(split, index), split, tuple(chunk), h.hexdigest(), stats)


def _plan_summary(plan: list[ShardPlan], options: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    return {
        "tool_version": __version__,
        "options": options,
        "source": source,
        "shards": [{"name": p.name, "samples": len(p.samples), "digest": p.digest} for p in plan],
    }


def _fail_message(problems: list[Problem]) -> str:
    first = min(problems, key=lambda p: _entry_order(p.entry()))
    more = f" (and {len(problems) - 1} more; --on-error skip packs the rest)" if len(problems) > 1 else ""
    return f"{first.message()}{more}"


def _entry_order(e: dict[str, Any]) -> tuple[str, int, str, int]:
    """Skipped entries by file, line ('labels/a.txt:10' after ':9'), key, id."""
    path, _, line = e["file"].rpartition(":")
    where = (path, int(line)) if path and line.isdigit() else (e["file"], 0)
    return (*where, e.get("key", ""), e.get("id", -1))


# ---- the output folder ------------------------------------------------------------------------


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """Make OUT ready and return OUT/.pack: resume our unfinished pack, refuse anything else."""
    if out.exists() and not out.is_dir():
        raise HandposeError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in out.iterdir())
    ours = [n for n in names if _ours(n)]
    foreign = [n for n in names if not _ours(n)]
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise HandposeError(f"{out}: not empty and not a handpose pack ({shown}); choose an empty folder")
    state = out / STATE_DIR
    if ours and not state.is_dir() and not overwrite:
        raise HandposeError(f"{out}: holds an earlier pack; pass --overwrite to replace it")
    # An unfinished pack of ours (OUT/.pack) is resumed: its shards are reused only if verified.
    for name in ours:
        if name == STATE_DIR or (state.is_dir() and is_shard_file(name)):
            continue
        (out / name).unlink()
    state.mkdir(exist_ok=True)
    return state


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete our shard files that are not part of this pack (an earlier, different plan's)."""
    keep |= {index_name(n) for n in keep}
    for p in out.iterdir():
        if is_shard_file(p.name) and p.name not in keep:
            p.unlink()


def _clean_tmp(out: Path) -> None:
    for p in out.iterdir():
        if tmp_target(p.name) is not None and _ours(p.name):
            p.unlink(missing_ok=True)


def _ours(name: str) -> bool:
    """What pack writes in OUT: shards, indexes, the manifest, OUT/.pack, and the temporaries of
    the files (`atomic.tmp_name`); also `handpose inspect`'s default sheets, which live there."""
    target = tmp_target(name)
    if target is not None:
        return target == MANIFEST or is_shard_file(target)
    return name in (MANIFEST, STATE_DIR) or is_shard_file(name) or _INSPECT_SHEET.match(name) is not None


# ---- writing shards -----------------------------------------------------------------------------


def _write_all(plan: list[ShardPlan], out: Path, on_error: str, workers: int) -> dict[str, dict[str, Any]]:
    """Write every planned shard not already done; results by shard name."""
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for p in plan:
        done = _verified_done(out, p)
        if done is not None:
            results[p.name] = done
        else:
            todo.append(p)
    total = sum(len(p.samples) for p in plan)
    columns = (
        TextColumn("pack"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("hands"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(
            "pack", total=total, completed=sum(len(p.samples) for p in plan if p.name in results)
        )
        jobs = _run(todo, out, on_error, min(workers, max(len(todo), 1)))
        try:
            for res in jobs:
                results[res["name"]] = res
                bar.advance(task, res["planned"])
        finally:
            jobs.close()  # stops the pool now, wherever the error or Ctrl-C arrived
            _clean_tmp(out)  # a failed or interrupted worker may leave temporary files
    return results


def _run(
    todo: list[ShardPlan], out: Path, on_error: str, workers: int
) -> Generator[dict[str, Any], None, None]:
    """Yield shard results as they finish: in-process for one worker, else a process pool."""
    jobs = [(p, out, on_error) for p in todo]
    if workers <= 1:
        yield from (write_shard(*job) for job in jobs)
        return
    collect_before_fork()
    pool = mp.get_context().Pool(workers, initializer=_ignore_sigint)
    try:
        yield from pool.imap_unordered(_write_shard_job, jobs)
        pool.close()
    finally:
        pool.terminate()  # on error or Ctrl-C: stop the others now; completed shards stay done
        pool.join()


def _ignore_sigint() -> None:
    # Ctrl-C is handled once, in the main process, which terminates the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_shard_job(job: tuple[ShardPlan, Path, str]) -> dict[str, Any]:
    return write_shard(*job)


def write_shard(plan: ShardPlan, out: Path, on_error: str) -> dict[str, Any]:
    """Write one shard under temporary names, rename it into place, record it as done."""
    tar_path, idx_path = out / plan.name, out / index_name(plan.name)
    tmp_tar, tmp_idx = tmp_name(tar_path), tmp_name(idx_path)
    writer = ShardWriter(tmp_tar, tmp_idx)
    acc = _ShardStats(plan.stats)
    skipped: list[dict[str, Any]] = []
    image: _SourceImage | None = None
    try:
        for s in plan.samples:
            if image is None or image.path != s.record.path:  # the hands of an image are adjacent
                image = _read_image(s.record.path, full=plan.stats)
            try:
                members = _sample_members(s, image, acc)
            except _DataError as e:
                problem = s.record.problem(str(e))
                if on_error == "fail":
                    raise HandposeError(problem.message()) from None
                skipped.append(problem.entry())
                continue
            writer.write(sample_key(s.record.sid), members)
            acc.add_image(image)
        writer.close()
    except BaseException:
        writer.abort()
        tmp_tar.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise
    result: dict[str, Any] = {
        "name": plan.name,
        "digest": plan.digest,
        "planned": len(plan.samples),
        "samples": writer.samples,
        "skipped": skipped,
        "stats": acc.result().to_json(),
    }
    if writer.samples:
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_tar, tar_path)
        sha256, blocks = sha256_blocks(tar_path, BLOCK_BYTES)
        result.update(
            bytes=tar_path.stat().st_size,
            sha256=sha256,
            block_bytes=BLOCK_BYTES,
            block_sha256=blocks,
            idx_bytes=idx_path.stat().st_size,
            idx_sha256=sha256_file(idx_path),
        )
    else:  # every sample skipped: no empty shard for the loaders to trip on
        tmp_tar.unlink()
        tmp_idx.unlink()
    # Through json and back: a fresh result equals one reused from its done-record, bit for bit.
    result = json.loads(json.dumps(result))
    write_json(out / STATE_DIR / f"{plan.name}.json", result)
    return result


class _DataError(Exception):
    """A sample's image is unusable (the reason becomes a skip entry or the error)."""


@dataclass
class _SourceImage:
    """One source image, read and checked once for all its hands."""

    path: Path
    data: bytes = b""
    width: int = 0  # as displayed (EXIF orientation applied): the frame of the labels
    height: int = 0
    pixels: np.ndarray | None = None  # decoded at full size (stats shards only), for the pixel sums
    error: str | None = None
    hands: int = 0  # hands of it packed so far


def _read_image(path: Path, *, full: bool) -> _SourceImage:
    """Read and strictly decode an image. Decoding is the only reliable corruption check; outside
    the stats split it runs at 1/8 scale, which still reads every entropy-coded byte."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return _SourceImage(path, error=f"unreadable image ({e.strerror})")
    kind = image_format(data)
    if kind == "unknown":
        return _SourceImage(
            path, error="corrupt JPEG (not an image format pack knows; pack stores JPEG only)"
        )
    if kind != "JPEG":
        return _SourceImage(path, error=f"{kind} image: pack stores JPEG only (convert it to JPEG)")
    try:
        pixels = decode_jpeg(data) if full else decode_jpeg(data, min_side=1)
        width, height = image_size(data)
    except ValueError as e:
        return _SourceImage(path, error=f"corrupt JPEG ({e})")
    return _SourceImage(path, data, width, height, pixels if full else None)


def _sample_members(s: Sample, image: _SourceImage, acc: _ShardStats) -> dict[str, bytes]:
    r = s.record
    if image.error is not None:
        raise _DataError(image.error)
    if r.size is not None and r.size != (image.width, image.height):
        w, h = r.size
        raise _DataError(f"image is {image.width}x{image.height}, the label file says {w}x{h}")
    uv, box = r.in_pixels(image.width, image.height)
    # What the shard stores (float32): the statistics are taken from it, so they equal a read-back.
    uv32, box32 = np.asarray(uv, "<f4"), np.asarray(box, "<f4")
    if not (box32[2] > box32[0] and box32[3] > box32[1]):
        raise _DataError(f"hand box {box32.astype(np.float64).tolist()} px is empty in float32")
    acc.add_hand(uv32, r.visibility, box32, image.width, image.height)
    meta: dict[str, Any] = {
        "key": sample_key(r.sid),
        "sid": r.sid,
        "id": r.id,
        "hand": r.hand,
        "version": r.version,
        "split": s.split,
        "source": r.file,
        "width": image.width,
        "height": image.height,
        "uv": np.asarray(uv, np.float64).tolist(),
        "visibility": r.visibility.tolist(),
        "box": np.asarray(box, np.float64).tolist(),
    }
    if r.xyz is not None and r.K is not None:
        meta["xyz"], meta["K"] = r.xyz.tolist(), r.K.tolist()
    if r.image_id is not None:
        meta["image_id"] = r.image_id
    if r.label is not None:
        meta["label"], meta["class"] = r.label, r.cls
    return sample_members(image.data, meta, uv32, r.visibility, box32, r.sid)


def _figure(how: str, empty: Any = int) -> Any:
    """A PackStats field: `how` two shards' values combine ("sum", elementwise for lists;
    "min"/"max"; "concat"), `empty` makes a shard's value before any hand (a zero-argument
    callable)."""
    return dataclasses.field(default_factory=empty, metadata={"merge": how})


def _add(a: Any, b: Any) -> Any:
    """a + b, elementwise through nested lists (exact for ints; floats add as numpy's float64)."""
    return [_add(x, y) for x, y in zip(a, b, strict=True)] if isinstance(a, list) else a + b


def _zero_pose() -> list[list[float]]:
    return [[0.0, 0.0] for _ in range(NUM_JOINTS)]


@dataclass
class PackStats:
    """What pack counts over the hands it writes, each figure declared once with how two shards'
    figures combine: one shard's (a worker's `_ShardStats.result`, stored in its done-record)
    and, merged in shard order, the pack's, which `build_manifest` turns into the manifest's
    stats, mean_pose, boxes, images and keypoint_bounds. Sums are exact or in a fixed order, so
    the totals never depend on the worker count."""

    pixel_sum: list[int] = _figure("sum", lambda: [0, 0, 0])  # per channel, stats shards (exact ints)
    pixel_sumsq: list[int] = _figure("sum", lambda: [0, 0, 0])  # squares, likewise
    pixels: int = _figure("sum")  # pixels summed
    uv_min: list[float] | None = _figure("min", lambda: None)  # labelled keypoints' lowest x, y (px)
    uv_max: list[float] | None = _figure("max", lambda: None)  # and highest
    outside: int = _figure("sum")  # hands with a labelled keypoint outside the image
    labelled: int = _figure("sum")  # labelled joints
    joints: int = _figure("sum")  # joints
    pose_image: list[list[float]] = _figure("sum", _zero_pose)  # labelled joints, letterbox units (stats)
    pose_box: list[list[float]] = _figure("sum", _zero_pose)  # labelled joints, box units (stats)
    pose_count: list[int] = _figure("sum", lambda: [0] * NUM_JOINTS)  # labelled hands per joint (stats)
    box_side: list[float] = _figure("concat", list)  # per hand: the box's longer side, px
    box_frac: list[float] = _figure("concat", list)  # box side / the image's longer side
    box_to_kp: list[float] = _figure("concat", list)  # box side / the keypoint extent's longer side
    boxes_outside: int = _figure("sum")  # boxes reaching past the image
    images: int = _figure("sum")  # images with at least one packed hand
    max_hands: int = _figure("max")  # hands of the most crowded image

    def merge(self, other: PackStats) -> None:
        """Add `other`'s figures to these (the next shard's, in shard order)."""
        for f in dataclasses.fields(self):
            a, b, how = getattr(self, f.name), getattr(other, f.name), f.metadata["merge"]
            if how == "concat":
                value = a + b
            elif how == "sum":
                value = _add(a, b)
            elif a is None or b is None:
                value = b if a is None else a
            else:
                pick = min if how == "min" else max
                value = [pick(x, y) for x, y in zip(a, b, strict=True)] if isinstance(a, list) else pick(a, b)
            setattr(self, f.name, value)

    def to_json(self) -> dict[str, Any]:
        """The figures as a dict (plain JSON values already: no deep copy)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class _ShardStats:
    """One shard's PackStats as its worker writes it: images (and their pixels, once) as they are
    packed, hands collected and measured in one vectorised pass at the end (numpy calls per hand
    cost more than the hand's share of decoding)."""

    def __init__(self, stats: bool) -> None:
        self.stats = stats  # a stats shard: pixel sums and the mean pose come from its hands
        self.totals = PackStats()
        self.uv: list[np.ndarray] = []  # per hand (21, 2) px, as stored (float32)
        self.visibility: list[np.ndarray] = []
        self.box: list[np.ndarray] = []  # per hand (4,) px, as stored (float32)
        self.size: list[tuple[int, int]] = []

    def add_hand(
        self, uv: np.ndarray, visibility: np.ndarray, box: np.ndarray, width: int, height: int
    ) -> None:
        self.uv.append(uv)
        self.visibility.append(visibility)
        self.box.append(box)
        self.size.append((width, height))

    def add_image(self, image: _SourceImage) -> None:
        """After each packed hand: count its image (and its pixels, once) the first time."""
        t = self.totals
        image.hands += 1
        t.max_hands = max(t.max_hands, image.hands)
        if image.hands > 1:
            return
        t.images += 1
        if image.pixels is not None:
            s, q = pixel_sums(image.pixels)
            t.pixel_sum = [a + b for a, b in zip(t.pixel_sum, s, strict=True)]
            t.pixel_sumsq = [a + b for a, b in zip(t.pixel_sumsq, q, strict=True)]
            t.pixels += image.pixels.shape[0] * image.pixels.shape[1]
            image.pixels = None  # counted; free it

    def result(self) -> PackStats:
        """The shard's figures (see PackStats), computed over all its hands at once."""
        t = self.totals
        if not self.uv:
            return t
        uv = np.stack(self.uv).astype(np.float64)  # (N, 21, 2): float32 values, computed in float64
        box = np.stack(self.box).astype(np.float64)  # (N, 4)
        lab, wh = np.stack(self.visibility) > 0, np.array(self.size, np.float64)  # (N, 21), (N, 2)
        pts = lab[..., None]
        t.uv_min = np.where(pts, uv, np.inf).min(axis=(0, 1)).tolist()
        t.uv_max = np.where(pts, uv, -np.inf).max(axis=(0, 1)).tolist()
        t.outside = int((((uv < 0) | (uv > wh[:, None, :])) & pts).any(axis=(1, 2)).sum())
        t.labelled, t.joints = int(lab.sum()), NUM_JOINTS * len(uv)
        long_side = wh.max(axis=1)
        side = np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
        if self.stats:  # image units: letterboxed square 0..1; box units: box sides about its centre
            image_units = (uv - wh[:, None, :] / 2) / long_side[:, None, None] + 0.5
            box_units = (uv - ((box[:, :2] + box[:, 2:]) / 2)[:, None, :]) / side[:, None, None]
            # Summed over hands in order (numpy adds along the first axis one row at a time)
            t.pose_image = np.where(pts, image_units, 0.0).sum(axis=0).tolist()
            t.pose_box = np.where(pts, box_units, 0.0).sum(axis=0).tolist()
            t.pose_count = lab.sum(axis=0).tolist()
        t.box_side = side.tolist()
        t.box_frac = (side / long_side).tolist()
        lo, hi = np.where(pts, uv, np.inf).min(axis=1), np.where(pts, uv, -np.inf).max(axis=1)
        extent = (hi - lo).max(axis=1)
        t.box_to_kp = (side[extent > 0] / extent[extent > 0]).tolist()
        outside = (box[:, 0] < 0) | (box[:, 1] < 0) | (box[:, 2] > wh[:, 0]) | (box[:, 3] > wh[:, 1])
        t.boxes_outside = int(outside.sum())
        return t


def pixel_sums(img: np.ndarray) -> tuple[list[int], list[int]]:
    """Exact per-channel sums of values and of squares of an RGB uint8 image, as Python ints.

    float32 is exact for integers below 2**24, and a run of 256 squares stays below it
    (256 * 255**2 < 2**24), so runs are summed in fast float32 and the run totals in float64
    (exact below 2**53). Exact sums make the mean/std independent of the order of addition.
    """
    x = img.reshape(-1, 3).astype(np.float32)
    m = len(x) - len(x) % 256
    runs = x[:m].reshape(-1, 256, 3)
    ones = np.ones(256, np.float32)  # a batched matrix-vector product is the fastest run sum
    sums = (ones @ runs).sum(0, dtype=np.float64)
    squares = (ones @ np.square(runs)).sum(0, dtype=np.float64)
    if m < len(x):
        tail = x[m:].astype(np.float64)
        sums += tail.sum(0)
        squares += np.square(tail).sum(0)
    return [int(v) for v in sums], [int(v) for v in squares]


def _verified_done(out: Path, plan: ShardPlan) -> dict[str, Any] | None:
    """The done-record of a shard if it matches the plan and the files on disk, else None."""
    path = out / STATE_DIR / f"{plan.name}.json"
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if done.get("digest") != plan.digest or "stats" not in done:  # another plan's, or an older pack's
        return None
    if not done["samples"]:
        return done
    try:
        files = [
            (out / plan.name, done["bytes"], done["sha256"]),
            (out / index_name(plan.name), done["idx_bytes"], done["idx_sha256"]),
        ]
    except KeyError:  # not a done-record this version wrote
        return None
    return done if all(file_problem(*f) is None for f in files) else None


# ---- the manifest ------------------------------------------------------------------------------


def build_manifest(
    plan: list[ShardPlan],
    results: dict[str, dict[str, Any]],
    problems: list[Problem],
    source: dict[str, Any],
    options: dict[str, Any],
    *,
    background: int = 0,
) -> dict[str, Any]:
    """Aggregate shard results in shard order into the manifest (see shards.py for the format)."""
    counts: Counter[str] = Counter({s: 0 for s in ("train", "val", "test")})
    shards = []
    skipped = [p.entry() for p in problems]
    t = PackStats()  # only stats shards have pixel sums and mean-pose sums: the others add zeros
    for p in plan:
        r = results[p.name]
        skipped += r["skipped"]
        counts[p.split] += r["samples"]
        t.merge(PackStats(**r["stats"]))
        if r["samples"]:
            shards.append(
                {
                    "name": p.name,
                    "index": index_name(p.name),
                    "split": p.split,
                    "samples": r["samples"],
                    "bytes": r["bytes"],
                    "sha256": r["sha256"],
                    "index_bytes": r["idx_bytes"],
                    "index_sha256": r["idx_sha256"],
                    "block_bytes": r["block_bytes"],
                    "block_sha256": r["block_sha256"],
                }
            )
    skipped.sort(key=_entry_order)
    total = sum(counts.values())
    # plan_shards falls back to every split when there is no train split
    stats_split = "train" if any(p.split == "train" for p in plan) else "all"
    pose = mean_pose(np.array(t.pose_image), np.array(t.pose_box), np.array(t.pose_count))
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "source": source,
        "options": options,
        "counts": dict(counts),
        "shards": shards,
        "stats": {**pixel_stats(t.pixel_sum, t.pixel_sumsq, t.pixels), "split": stats_split},
        "mean_pose": {**pose, "split": stats_split},
        "boxes": {
            "side_px": spread(t.box_side),
            "side_frac": spread(t.box_frac),
            "box_to_keypoints": round(float(np.median(t.box_to_kp)), 6) if t.box_to_kp else None,
            "outside_image": t.boxes_outside,
            "hands_per_image": {"mean": round(total / t.images, 6) if t.images else None, "max": t.max_hands},
        },
        "images": {"with_hands": t.images, "background": background},
        "keypoint_bounds": {
            "min_px": t.uv_min,
            "max_px": t.uv_max,
            "samples_outside_image": t.outside,
            "labelled_fraction": round(t.labelled / t.joints, 6) if t.joints else None,
        },
        "skipped": skipped,
    }


def mean_pose(pose_image: np.ndarray, pose_box: np.ndarray, count: np.ndarray) -> dict[str, Any]:
    """Mean labelled pose from per-joint sums: "image" in letterbox units (0..1), "box" in units
    of the box's longer side about its centre (see shards.Manifest.mean_pose). A joint that is
    never labelled gets the crop's centre (its count, 0, says so)."""
    n = np.maximum(count, 1)[:, None]
    image = np.where(count[:, None] > 0, pose_image / n, 0.5)
    box = np.where(count[:, None] > 0, pose_box / n, 0.0)
    return {"image": image.tolist(), "box": box.tolist(), "labelled": count.tolist()}


def spread(values: list[float]) -> dict[str, float] | None:
    """min, p10, median, p90, max (linear interpolation), or None when there are no values."""
    if not values:
        return None
    q = np.percentile(np.asarray(values, np.float64), [0, 10, 50, 90, 100])
    return {k: round(float(v), 6) for k, v in zip(("min", "p10", "median", "p90", "max"), q, strict=True)}


def pixel_stats(sums: list[int], sumsqs: list[int], pixels: int) -> dict[str, Any]:
    """Per-channel mean and std in [0, 1] from exact integer sums (population std)."""
    if not pixels:
        return {"mean": None, "std": None, "pixels": 0}
    mean = [s / (pixels * 255) for s in sums]
    # Var * n^2 * 255^2 = n * sum(x^2) - sum(x)^2, an exact integer: no cancellation error.
    std = [math.sqrt(pixels * q - s * s) / (pixels * 255) for s, q in zip(sums, sumsqs, strict=True)]
    return {"mean": mean, "std": std, "pixels": pixels}


def _report(manifest: dict[str, Any], out: Path) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    total, shards = sum(manifest["counts"].values()), len(manifest["shards"])
    im = manifest["images"]
    console.print(f"packed {total} hands ({counts}) into {shards} shards: {out}")
    console.print(f"images: {im['with_hands']} with hands, {im['background']} background (no hands)")
    skipped = manifest["skipped"]
    if skipped:
        console.print(f"skipped {len(skipped)} samples (all listed in manifest.json 'skipped'):")
        for e in skipped[:10]:
            console.print(f"  {skip_message(e)}")
        if len(skipped) > 10:
            console.print(f"  ... and {len(skipped) - 10} more")


def skip_message(e: dict[str, Any]) -> str:
    """A manifest 'skipped' entry as the one line pack would have failed with."""
    where = e["file"] if e.get("id") is None else f"id {e['id']} ({e['file']})"
    return f"{where}: {e['reason']}"

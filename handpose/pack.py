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
from handpose.atomic import tmp_name, write_json
from handpose.console import make_console
from handpose.errors import HandposeError
from handpose.geometry import keypoints_box
from handpose.imageio import decode_jpeg, image_format, image_size
from handpose.shards import (
    BLOCK_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    ShardWriter,
    index_name,
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
DEFAULT_SPLIT = "0.8,0.15,0.05"
# Estimated tar bytes per sample besides the image: 6 member headers plus padded json, kp, vis,
# box and sid members. Only used to plan shard boundaries, so it must depend on nothing but the input.
_SAMPLE_OVERHEAD = 7168
_OURS = re.compile(
    r"^(?:(?:train|val|test|eval)-\d{6}\.(?:tar|idx)|manifest\.json|inspect-\w+\.png|\.pack"
    r"|\.(?:(?:train|val|test|eval)-\d{6}\.(?:tar|idx)|manifest\.json)\.tmp\d+)$"
)
_TMP = re.compile(r"^\..+\.tmp\d+$")
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
    fractions = parse_split(split if split is not None else DEFAULT_SPLIT)
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
    results = _write_all(plan, out, on_error, workers or _cores())
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
    ours = [n for n in names if _OURS.match(n)]
    foreign = [n for n in names if not _OURS.match(n)]
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise HandposeError(f"{out}: not empty and not a handpose pack ({shown}); choose an empty folder")
    state = out / STATE_DIR
    if ours and not state.is_dir() and not overwrite:
        raise HandposeError(f"{out}: holds an earlier pack; pass --overwrite to replace it")
    # An unfinished pack of ours (OUT/.pack) is resumed: its shards are reused only if verified.
    for name in ours:
        if name == STATE_DIR or (state.is_dir() and not _TMP.match(name) and name.endswith((".tar", ".idx"))):
            continue
        (out / name).unlink()
    state.mkdir(exist_ok=True)
    return state


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete our shard files that are not part of this pack (an earlier, different plan's)."""
    keep |= {index_name(n) for n in keep}
    for p in out.iterdir():
        if _OURS.match(p.name) and p.name.endswith((".tar", ".idx")) and p.name not in keep:
            p.unlink()


def _clean_tmp(out: Path) -> None:
    for p in out.iterdir():
        if _TMP.match(p.name) and _OURS.match(p.name):
            p.unlink(missing_ok=True)


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
    acc = _Accumulator(plan.stats)
    skipped: list[dict[str, Any]] = []
    image: _Image | None = None
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
        **acc.result(),
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
class _Image:
    """One image, read and checked once for all its hands."""

    path: Path
    data: bytes = b""
    width: int = 0  # as displayed (EXIF orientation applied): the frame of the labels
    height: int = 0
    pixels: np.ndarray | None = None  # decoded at full size (stats shards only), for the pixel sums
    error: str | None = None
    hands: int = 0  # hands of it packed so far


def _read_image(path: Path, *, full: bool) -> _Image:
    """Read and strictly decode an image. Decoding is the only reliable corruption check; outside
    the stats split it runs at 1/8 scale, which still reads every entropy-coded byte."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return _Image(path, error=f"unreadable image ({e.strerror})")
    kind = image_format(data)
    if kind == "unknown":
        return _Image(path, error="corrupt JPEG (not an image format pack knows; pack stores JPEG only)")
    if kind != "JPEG":
        return _Image(path, error=f"{kind} image: pack stores JPEG only (convert it to JPEG)")
    try:
        pixels = decode_jpeg(data) if full else decode_jpeg(data, min_side=1)
        width, height = image_size(data)
    except ValueError as e:
        return _Image(path, error=f"corrupt JPEG ({e})")
    return _Image(path, data, width, height, pixels if full else None)


def _sample_members(s: Sample, image: _Image, acc: _Accumulator) -> dict[str, bytes]:
    r = s.record
    if image.error is not None:
        raise _DataError(image.error)
    if r.size is not None and r.size != (image.width, image.height):
        w, h = r.size
        raise _DataError(f"image is {image.width}x{image.height}, the label file says {w}x{h}")
    uv, box = r.in_pixels(image.width, image.height)
    # Statistics are taken from what the shard stores (float32), so they equal a read-back.
    box32 = np.asarray(box, "<f4").astype(np.float64)
    if not (box32[2] > box32[0] and box32[3] > box32[1]):
        raise _DataError(f"hand box {box32.tolist()} px is empty in float32")
    acc.add_hand(np.asarray(uv, "<f4").astype(np.float64), r.visibility, box32, image.width, image.height)
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
    return sample_members(image.data, meta, uv, r.visibility, box, r.sid)


class _Accumulator:
    """One shard's statistics, in sample order (so the totals, added in shard order, never depend
    on the worker count): exact integer pixel sums, keypoint bounds over labelled joints, the
    mean-pose sums (stats shards), per-hand box figures, images with hands."""

    def __init__(self, stats: bool) -> None:
        self.stats = stats
        self.sum = [0, 0, 0]
        self.sumsq = [0, 0, 0]
        self.pixels = 0
        self.lo = [math.inf, math.inf]
        self.hi = [-math.inf, -math.inf]
        self.outside = 0  # hands with a labelled keypoint outside the image
        self.labelled = 0  # labelled joints
        self.joints = 0
        self.pose_image = np.zeros((NUM_JOINTS, 2))  # sums of labelled joints, letterbox units
        self.pose_box = np.zeros((NUM_JOINTS, 2))  # sums of labelled joints, box units
        self.pose_count = np.zeros(NUM_JOINTS, np.int64)
        self.box_side: list[float] = []  # box longer side, px
        self.box_frac: list[float] = []  # box longer side / image longer side
        self.box_to_kp: list[float] = []  # box longer side / keypoint-extent longer side
        self.boxes_outside = 0
        self.images = 0  # images with at least one packed hand
        self.max_hands = 0

    def add_image(self, image: _Image) -> None:
        """After each packed hand: count its image (and its pixels, once) the first time."""
        image.hands += 1
        self.max_hands = max(self.max_hands, image.hands)
        if image.hands > 1:
            return
        self.images += 1
        if image.pixels is not None:
            s, q = pixel_sums(image.pixels)
            self.sum = [a + b for a, b in zip(self.sum, s, strict=True)]
            self.sumsq = [a + b for a, b in zip(self.sumsq, q, strict=True)]
            self.pixels += image.pixels.shape[0] * image.pixels.shape[1]
            image.pixels = None  # counted; free it

    def add_hand(
        self, uv: np.ndarray, visibility: np.ndarray, box: np.ndarray, width: int, height: int
    ) -> None:
        labelled = visibility > 0
        pts = uv[labelled]
        self.lo = [min(a, float(b)) for a, b in zip(self.lo, pts.min(0), strict=True)]
        self.hi = [max(a, float(b)) for a, b in zip(self.hi, pts.max(0), strict=True)]
        self.outside += int(bool(np.any(pts < 0) or np.any(pts > (width, height))))
        self.labelled += int(labelled.sum())
        self.joints += NUM_JOINTS
        long_side = max(width, height)
        box_side = max(box[2] - box[0], box[3] - box[1])
        if self.stats:  # image units: letterboxed square 0..1; box units: box sides about its centre
            self.pose_image[labelled] += (pts - (width / 2, height / 2)) / long_side + 0.5
            self.pose_box[labelled] += (pts - (box[:2] + box[2:]) / 2) / box_side
            self.pose_count[labelled] += 1
        self.box_side.append(float(box_side))
        self.box_frac.append(float(box_side / long_side))
        kx0, ky0, kx1, ky1 = keypoints_box(uv, labelled)
        if max(kx1 - kx0, ky1 - ky0) > 0:
            self.box_to_kp.append(float(box_side / max(kx1 - kx0, ky1 - ky0)))
        self.boxes_outside += int(bool(box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height))

    def result(self) -> dict[str, Any]:
        finite = math.isfinite(self.lo[0])
        return {
            "pixel_sum": self.sum,
            "pixel_sumsq": self.sumsq,
            "pixels": self.pixels,
            "uv_min": self.lo if finite else None,
            "uv_max": self.hi if finite else None,
            "outside": self.outside,
            "labelled": self.labelled,
            "joints": self.joints,
            "pose_image": self.pose_image.tolist(),
            "pose_box": self.pose_box.tolist(),
            "pose_count": self.pose_count.tolist(),
            "box_side": self.box_side,
            "box_frac": self.box_frac,
            "box_to_kp": self.box_to_kp,
            "boxes_outside": self.boxes_outside,
            "images": self.images,
            "max_hands": self.max_hands,
        }


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
    if done.get("digest") != plan.digest:
        return None
    if not done["samples"]:
        return done
    tar_path, idx_path = out / plan.name, out / index_name(plan.name)
    try:
        if tar_path.stat().st_size != done["bytes"] or idx_path.stat().st_size != done.get("idx_bytes"):
            return None
        if sha256_file(tar_path) != done["sha256"] or sha256_file(idx_path) != done["idx_sha256"]:
            return None
    except OSError:
        return None
    return done


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
    sums, sumsqs, pixels = [0, 0, 0], [0, 0, 0], 0
    lo, hi, outside, labelled, joints = [math.inf] * 2, [-math.inf] * 2, 0, 0, 0
    pose_image, pose_box = np.zeros((NUM_JOINTS, 2)), np.zeros((NUM_JOINTS, 2))
    pose_count = np.zeros(NUM_JOINTS, np.int64)
    box_side: list[float] = []
    box_frac: list[float] = []
    box_to_kp: list[float] = []
    boxes_outside = images = max_hands = 0
    for p in plan:
        r = results[p.name]
        skipped += r["skipped"]
        counts[p.split] += r["samples"]
        if p.stats:
            sums = [a + b for a, b in zip(sums, r["pixel_sum"], strict=True)]
            sumsqs = [a + b for a, b in zip(sumsqs, r["pixel_sumsq"], strict=True)]
            pixels += r["pixels"]
            pose_image += r["pose_image"]
            pose_box += r["pose_box"]
            pose_count += r["pose_count"]
        if r["uv_min"] is not None:
            lo = [min(a, b) for a, b in zip(lo, r["uv_min"], strict=True)]
            hi = [max(a, b) for a, b in zip(hi, r["uv_max"], strict=True)]
        outside += r["outside"]
        labelled += r["labelled"]
        joints += r["joints"]
        box_side += r["box_side"]
        box_frac += r["box_frac"]
        box_to_kp += r["box_to_kp"]
        boxes_outside += r["boxes_outside"]
        images += r["images"]
        max_hands = max(max_hands, r["max_hands"])
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
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "source": source,
        "options": options,
        "counts": dict(counts),
        "shards": shards,
        "stats": {**pixel_stats(sums, sumsqs, pixels), "split": stats_split},
        "mean_pose": {**mean_pose(pose_image, pose_box, pose_count), "split": stats_split},
        "boxes": {
            "side_px": spread(box_side),
            "side_frac": spread(box_frac),
            "box_to_keypoints": round(float(np.median(box_to_kp)), 6) if box_to_kp else None,
            "outside_image": boxes_outside,
            "hands_per_image": {"mean": round(total / images, 6) if images else None, "max": max_hands},
        },
        "images": {"with_hands": images, "background": background},
        "keypoint_bounds": {
            "min_px": lo if math.isfinite(lo[0]) else None,
            "max_px": hi if math.isfinite(lo[0]) else None,
            "samples_outside_image": outside,
            "labelled_fraction": round(labelled / joints, 6) if joints else None,
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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

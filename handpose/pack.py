"""`handpose pack`: FreiHAND (or COCO keypoints) -> WebDataset shards + DALI indexes + manifest.

How a pack runs (each step is deterministic, so a re-run reproduces every byte):
1. read and validate the labels (freihand.py), assign splits by id, `os.stat` every image;
2. plan shards from the file sizes alone, before decoding anything: samples in split order then
   sample-id order, cut into ~`shard_size_mb` shards, each with a digest of what goes in it;
3. worker processes each write whole shards (temporary names, then `os.replace` of .tar and
   .idx), decode every image strictly (truncation is caught here), sum train pixels exactly
   (integers), and drop a done-record in OUT/.pack/;
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
from handpose.freihand import Dataset, Problem, Record, parse_versions, read_coco, read_freihand
from handpose.imageio import decode_jpeg, jpeg_size
from handpose.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    ShardWriter,
    encode_keypoints,
    index_name,
    sample_key,
    sha256_file,
    shard_name,
)

STATE_DIR = ".pack"  # OUT/.pack/: plan.json + one done-record per finished shard; gone when complete
MB = 1_000_000
# Estimated tar bytes per sample besides the image: 4 member headers plus padded json, kp and sid
# members. Only used to plan shard boundaries, so it must depend on nothing but the input.
_SAMPLE_OVERHEAD = 4096
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
    stats: bool  # sum this shard's pixels into the dataset mean/std


def pack(
    src: str | Path,
    out: str | Path,
    *,
    fmt: str = "freihand",
    images: str | Path | None = None,
    versions: str = "gs",
    split: str = "0.8,0.15,0.05",
    split_seed: int | None = None,
    shard_size_mb: float = 4.0,
    workers: int | None = None,
    on_error: str = "fail",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pack `src` into shards in `out`; returns the manifest (also written to OUT/manifest.json).

    Raises HandposeError for bad options, a non-empty `out` holding something else, and (with
    on_error="fail") the first bad sample, naming its id and file.
    """
    src, out = Path(src), Path(out)
    fractions = parse_split(split)
    if on_error not in ("fail", "skip"):
        raise HandposeError(f"--on-error {on_error!r}: expected 'fail' or 'skip'")
    if not shard_size_mb > 0:
        raise HandposeError(f"--shard-size {shard_size_mb}: must be > 0 MB")
    if workers is not None and workers < 1:
        raise HandposeError(f"--workers {workers}: must be >= 1")
    data = read_source(src, fmt=fmt, images=images, versions=versions)
    for note in data.notes:
        console.print(f"note: {note}")

    problems = list(data.problems)
    samples = _stat_samples(data.records, assign_splits(data.ids, fractions, split_seed), problems)
    if problems and on_error == "fail":
        raise HandposeError(_fail_message(problems))
    options = {
        "format": fmt,
        "versions": versions.strip().lower() if fmt == "freihand" else None,
        "split": list(fractions),
        "split_seed": split_seed,
        "shard_size_mb": float(shard_size_mb),  # 4 and 4.0 must give the same manifest
        "on_error": on_error,
    }
    plan = plan_shards(samples, int(shard_size_mb * MB), options)
    if not plan:
        raise HandposeError(f"{src}: no samples to pack ({len(problems)} skipped)")

    state = _prepare_out(out, overwrite)
    write_json(state / "plan.json", _plan_summary(plan, options, data.source))
    results = _write_all(plan, out, on_error, workers or _cores())
    _remove_stale(out, {p.name for p in plan if results[p.name]["samples"]})
    manifest = build_manifest(plan, results, problems, data.source, options)
    write_json(out / MANIFEST, manifest)  # last: its presence means the pack is complete
    shutil.rmtree(state)
    _report(manifest, out)
    return manifest


def read_source(src: Path, *, fmt: str, images: str | Path | None, versions: str) -> Dataset:
    """Dispatch to the reader of `fmt` ('freihand' | 'coco')."""
    if not src.exists():
        raise HandposeError(f"{src}: not found")
    if fmt == "freihand":
        if images is not None:
            raise HandposeError(
                "--images is only for --format coco (FreiHAND images are in SRC/training/rgb)"
            )
        return read_freihand(src, parse_versions(versions))
    if fmt == "coco":
        if versions.strip().lower() != "gs":
            raise HandposeError("--versions is only for --format freihand (COCO images have no versions)")
        return read_coco(src, images)
    raise HandposeError(f"--format {fmt!r}: expected 'freihand' or 'coco'")


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
    for r in records:
        try:
            st = os.stat(r.path)
        except OSError as e:
            problems.append(Problem(r.id, r.file, f"missing image ({e.strerror})"))
            continue
        split = "eval" if r.evaluation else split_of[r.id]
        samples.append(Sample(r, split, st.st_size, st.st_mtime_ns))
    return samples


def plan_shards(samples: list[Sample], shard_bytes: int, options: dict[str, Any]) -> list[ShardPlan]:
    """Cut samples (split order, then sample id) into shards of about `shard_bytes` tar bytes."""
    by_split: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for s in samples:
        by_split[s.split].append(s)
    # Mean/std come from the train split; a pack without one falls back to all its samples.
    stats_splits = {"train"} if by_split["train"] else set(SPLITS)
    plan: list[ShardPlan] = []
    for split in SPLITS:
        chunks: list[list[Sample]] = []
        size = 0
        for s in sorted(by_split[split], key=lambda s: s.record.sid):
            est = 512 + -(-s.bytes // 512) * 512 + _SAMPLE_OVERHEAD  # header + padded image
            if not chunks or (chunks[-1] and size + est > shard_bytes):
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
        h.update(f"|{r.sid} {r.id} {r.version} {r.file} {s.bytes} {s.mtime_ns} {r.size}".encode())
        for a in (r.uv, r.xyz, r.K):
            h.update(b"-" if a is None else a.tobytes())
    return ShardPlan(shard_name(split, index), split, tuple(chunk), h.hexdigest(), stats)


def _plan_summary(plan: list[ShardPlan], options: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    return {
        "tool_version": __version__,
        "options": options,
        "source": source,
        "shards": [{"name": p.name, "samples": len(p.samples), "digest": p.digest} for p in plan],
    }


def _fail_message(problems: list[Problem]) -> str:
    first = min(problems, key=lambda p: (p.file, p.id))
    more = f" (and {len(problems) - 1} more; --on-error skip packs the rest)" if len(problems) > 1 else ""
    return f"{first.message()}{more}"


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
        TextColumn("images"),
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
    acc = _Accumulator()
    skipped: list[dict[str, Any]] = []
    try:
        for s in plan.samples:
            try:
                members = _sample_members(s, plan.stats, acc)
            except _DataError as e:
                problem = Problem(s.record.id, s.record.file, str(e))
                if on_error == "fail":
                    raise HandposeError(problem.message()) from None
                skipped.append(_skip_entry(problem))
                continue
            writer.write(sample_key(s.record.sid), members)
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
        result.update(
            bytes=tar_path.stat().st_size, sha256=sha256_file(tar_path), idx_sha256=sha256_file(idx_path)
        )
    else:  # every sample skipped: no empty shard for the loaders to trip on
        tmp_tar.unlink()
        tmp_idx.unlink()
    write_json(out / STATE_DIR / f"{plan.name}.json", result)
    return result


class _DataError(Exception):
    """A sample's image is unusable (the reason becomes a skip entry or the error)."""


def _sample_members(s: Sample, stats: bool, acc: _Accumulator) -> dict[str, bytes]:
    r = s.record
    try:
        with open(r.path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _DataError(f"unreadable image ({e.strerror})") from None
    try:
        # Decoding is the only reliable corruption check; samples outside the stats split
        # decode at 1/8 scale, which still reads every entropy-coded byte (truncation raises).
        img = decode_jpeg(data) if stats else decode_jpeg(data, min_side=1)
        width, height = jpeg_size(data)
    except ValueError as e:
        raise _DataError(f"corrupt JPEG ({e})") from None
    if r.size is not None and r.size != (width, height):
        raise _DataError(f"image is {width}x{height}, the label file says {r.size[0]}x{r.size[1]}")
    if stats:
        acc.add_pixels(img)
    acc.add_keypoints(r.uv, width, height)
    meta: dict[str, Any] = {
        "key": sample_key(r.sid),
        "sid": r.sid,
        "id": r.id,
        "version": r.version,
        "split": s.split,
        "source": r.file,
        "width": width,
        "height": height,
        "uv": r.uv.tolist(),
    }
    if r.xyz is not None and r.K is not None:
        meta["xyz"], meta["K"] = r.xyz.tolist(), r.K.tolist()
    return {
        "jpg": data,
        "json": json.dumps(meta, separators=(",", ":")).encode(),
        "kp.f32": encode_keypoints(r.uv),
        "sid.i64": np.array([r.sid], dtype="<i8").tobytes(),
    }


class _Accumulator:
    """Exact per-shard sums: integer pixel sums (so the mean/std never depend on the order of
    addition, hence on the worker count) and keypoint bounds."""

    def __init__(self) -> None:
        self.sum = [0, 0, 0]
        self.sumsq = [0, 0, 0]
        self.pixels = 0
        self.lo = [math.inf, math.inf]
        self.hi = [-math.inf, -math.inf]
        self.outside = 0

    def add_pixels(self, img: np.ndarray) -> None:
        s, q = pixel_sums(img)
        self.sum = [a + b for a, b in zip(self.sum, s, strict=True)]
        self.sumsq = [a + b for a, b in zip(self.sumsq, q, strict=True)]
        self.pixels += img.shape[0] * img.shape[1]

    def add_keypoints(self, uv: np.ndarray, width: int, height: int) -> None:
        lo, hi = uv.min(0), uv.max(0)
        self.lo = [min(a, float(b)) for a, b in zip(self.lo, lo, strict=True)]
        self.hi = [max(a, float(b)) for a, b in zip(self.hi, hi, strict=True)]
        self.outside += int(bool(np.any(lo < 0) or hi[0] >= width or hi[1] >= height))

    def result(self) -> dict[str, Any]:
        finite = math.isfinite(self.lo[0])
        return {
            "pixel_sum": self.sum,
            "pixel_sumsq": self.sumsq,
            "pixels": self.pixels,
            "uv_min": self.lo if finite else None,
            "uv_max": self.hi if finite else None,
            "outside": self.outside,
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
        if tar_path.stat().st_size != done["bytes"]:
            return None
        if sha256_file(tar_path) != done["sha256"] or sha256_file(idx_path) != done["idx_sha256"]:
            return None
    except OSError:
        return None
    return done


def _skip_entry(p: Problem) -> dict[str, Any]:
    return {"id": p.id, "file": p.file, "reason": p.reason}


# ---- the manifest ------------------------------------------------------------------------------


def build_manifest(
    plan: list[ShardPlan],
    results: dict[str, dict[str, Any]],
    problems: list[Problem],
    source: dict[str, Any],
    options: dict[str, Any],
) -> dict[str, Any]:
    """Aggregate shard results in shard order into the manifest (see shards.py for the format)."""
    counts: Counter[str] = Counter({s: 0 for s in ("train", "val", "test")})
    shards = []
    skipped = [_skip_entry(p) for p in problems]
    total = _Accumulator()
    for p in plan:
        r = results[p.name]
        skipped += r["skipped"]
        counts[p.split] += r["samples"]
        if p.stats:
            for c in range(3):
                total.sum[c] += r["pixel_sum"][c]
                total.sumsq[c] += r["pixel_sumsq"][c]
            total.pixels += r["pixels"]
        if r["uv_min"] is not None:
            total.lo = [min(a, b) for a, b in zip(total.lo, r["uv_min"], strict=True)]
            total.hi = [max(a, b) for a, b in zip(total.hi, r["uv_max"], strict=True)]
            total.outside += r["outside"]
        if r["samples"]:
            shards.append(
                {
                    "name": p.name,
                    "index": index_name(p.name),
                    "split": p.split,
                    "samples": r["samples"],
                    "bytes": r["bytes"],
                    "sha256": r["sha256"],
                }
            )
    skipped.sort(key=lambda e: (e["file"], e["id"]))
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "source": source,
        "options": options,
        "counts": dict(counts),
        "shards": shards,
        "stats": {
            **pixel_stats(total.sum, total.sumsq, total.pixels),
            # plan_shards falls back to every split when there is no train split
            "split": "train" if any(p.split == "train" for p in plan) else "all",
        },
        "keypoint_bounds": {
            "min_px": total.lo if math.isfinite(total.lo[0]) else None,
            "max_px": total.hi if math.isfinite(total.lo[0]) else None,
            "samples_outside_image": total.outside,
        },
        "skipped": skipped,
    }


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
    console.print(f"packed {total} samples ({counts}) into {shards} shards: {out}")
    skipped = manifest["skipped"]
    if skipped:
        console.print(f"skipped {len(skipped)} samples (all listed in manifest.json 'skipped'):")
        for e in skipped[:10]:
            console.print(f"  id {e['id']} ({e['file']}): {e['reason']}")
        if len(skipped) > 10:
            console.print(f"  ... and {len(skipped) - 10} more")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

"""Where `handpose predict` writes: a staging folder inside --out, resumable parts, one commit.

OUT/.predict-partial/            the run in progress (hidden; removed when the run completes)
  job.json                       what the run is: model digest, options, input fingerprint, ranks
  rank-R/                        one per rank (one without torchrun), appended chunk by chunk:
    predictions.jsonl, errors.jsonl, coco.jsonl (one COCO result per line), spill.f32 (report rows),
    matches.u8 (detection records: recall, precision, AP)
    chunks.i64                   per chunk: id and the bytes it added to each file
    progress.json                the checkpoint: chunks done, each file's size, counters, heaps
  final/                         rank 0's merged result, moved into OUT by the commit
  commit.json                    the commit plan: written before the first file moves

A chunk is CHUNK images of the input stream; chunk c belongs to rank c mod world size. After each
chunk a part flushes and fsyncs its files, then replaces progress.json atomically: a killed run
resumes from its last checkpoint, cutting each file back to the size progress.json records (what
was written after it is redone, identically). Merging takes the parts' chunks in chunk order, so
any number of ranks gives the bytes one process gives.

The commit moves each file from final/ into OUT with `os.replace`, then deletes the files the
PREVIOUS run listed in its run.json that this run did not write, then writes run.json last: its
presence with status "complete" means complete. Until then the previous complete result stays
as it was; a crash during the commit is finished by the next run from commit.json. predict
never writes a file it did not write before (one that no run.json of ours lists) and never
deletes anything else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO, Any

import numpy as np

from handpose.atomic import tmp_target, write_json
from handpose.errors import HandposeError

STAGING = ".predict-partial"
RUN_JSON = "run.json"
RUN_FORMAT = "handpose-predict-run"
JOB_FORMAT = "handpose-predict-job-2"  # job.json's "format": what a resumed run must match (2: matches.u8)
# The files a chunk appends to (and rank 0 merges): the first two are committed into OUT as they are.
PREDICTIONS, ERRORS, COCO_LINES, SPILL = "predictions.jsonl", "errors.jsonl", "coco.jsonl", "spill.f32"
MATCHES = "matches.u8"  # per prediction of a labelled photo: its score and true positives (recall, AP)
PART_FILES = (PREDICTIONS, ERRORS, COCO_LINES, SPILL, MATCHES)
CHUNKS = "chunks.i64"
PROGRESS = "progress.json"
JOB, COMMIT = "job.json", "commit.json"
OUR_STAGING_NAMES = (*PART_FILES, CHUNKS, PROGRESS, JOB, COMMIT)


# ---------------------------------------------------------------------------------------------
# One rank's part


class Part:
    """One rank's share of the results, appended chunk by chunk and checkpointed after each."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        progress = _read_json(folder / PROGRESS)
        if progress and any(
            (folder / name).stat().st_size < int(size) if (folder / name).exists() else int(size) > 0
            for name, size in progress["sizes"].items()
        ):
            progress = None  # files shorter than their checkpoint: not ours to trust, redo this part
        self.chunks = int(progress["chunks"]) if progress else 0
        self.state: dict[str, Any] = progress["state"] if progress else {}
        sizes = progress["sizes"] if progress else {}
        self.files: dict[str, IO[bytes]] = {}
        for name in (*PART_FILES, CHUNKS):
            f = os.fdopen(os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
            size = int(sizes.get(name, 0))
            f.truncate(size)  # drop what was written after the last checkpoint
            f.seek(size)
            self.files[name] = f

    @property
    def resumed(self) -> bool:
        return self.chunks > 0

    def write_chunk(self, chunk: int, data: dict[str, bytes], state: dict[str, Any]) -> None:
        """Append one chunk's bytes to each file, make them durable, then checkpoint."""
        for name in PART_FILES:
            self.files[name].write(data.get(name, b""))
        row = [chunk, *(len(data.get(name, b"")) for name in PART_FILES)]
        self.files[CHUNKS].write(np.asarray(row, "<i8").tobytes())
        for name, f in self.files.items():
            f.flush()
            if name == CHUNKS or data.get(name):  # a file this chunk left alone is as durable as before
                os.fsync(f.fileno())
        self.chunks += 1
        self.state = state
        sizes = {name: f.tell() for name, f in self.files.items()}
        write_json(
            self.folder / PROGRESS, {"chunks": self.chunks, "sizes": sizes, "state": state}, indent=None
        )

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def part_state(folder: Path) -> dict[str, Any]:
    """The state a part checkpointed with its last chunk (rank 0 reads every rank's: counts and
    kept hands); {} when it has none."""
    progress = _read_json(folder / PROGRESS)
    return progress.get("state", {}) if isinstance(progress, dict) else {}


def chunk_table(folder: Path) -> np.ndarray:
    """A part's chunks.i64 as rows (chunk, bytes of each of PART_FILES)."""
    return np.fromfile(folder / CHUNKS, dtype="<i8").reshape(-1, 1 + len(PART_FILES))


def merge_parts(parts: list[Path], dest: Path) -> None:
    """The parts' files merged in chunk order into dest/ (chunk c comes from part c mod len(parts)).

    The parts stay as they are (copied, never moved) until the commit: a run that fails after
    this point resumes with every chunk done and merges again."""
    dest.mkdir(parents=True, exist_ok=True)
    tables = [chunk_table(p) for p in parts]
    sources = [{name: open(p / name, "rb") for name in PART_FILES} for p in parts]
    try:
        with _open_all(dest) as outs:
            pos = [0] * len(parts)
            chunk = 0
            while pos[chunk % len(parts)] < len(tables[chunk % len(parts)]):
                r = chunk % len(parts)
                row = tables[r][pos[r]]
                if int(row[0]) != chunk:
                    raise HandposeError(f"{parts[r]}: chunk {int(row[0])} where {chunk} was expected")
                for k, name in enumerate(PART_FILES):
                    _copy(sources[r][name], outs[name], int(row[1 + k]))
                pos[r] += 1
                chunk += 1
            left = [str(parts[r]) for r in range(len(parts)) if pos[r] != len(tables[r])]
            if left:
                raise HandposeError(f"{', '.join(left)}: chunks past the end of the merged run")
    finally:
        for files in sources:
            for f in files.values():
                f.close()


class _open_all:
    def __init__(self, dest: Path):
        self.dest = dest

    def __enter__(self) -> dict[str, IO[bytes]]:
        self.files: dict[str, IO[bytes]] = {name: open(self.dest / name, "wb") for name in PART_FILES}
        return self.files

    def __exit__(self, *exc: Any) -> None:
        for f in self.files.values():
            f.close()


def _copy(src: IO[bytes], dst: IO[bytes], n: int) -> None:
    while n > 0:
        block = src.read(min(n, 1 << 20))
        if not block:
            raise HandposeError(f"{src.name}: shorter than its chunk table says")
        dst.write(block)
        n -= len(block)


def write_coco_array(lines: Path, dest: Path) -> None:
    """COCO results as one json array, from one entry per line."""
    with open(lines, "rb") as src, open(dest, "wb") as out:
        out.write(b"[")
        for k, line in enumerate(src):
            out.write((b",\n" if k else b"") + line.rstrip(b"\n"))
        out.write(b"]\n")


# ---------------------------------------------------------------------------------------------
# The staging folder and the commit


def read_run(out: Path) -> dict[str, Any] | None:
    """OUT/run.json when it is one of ours, else None."""
    run = _read_json(out / RUN_JSON)
    return run if isinstance(run, dict) and run.get("format") == RUN_FORMAT else None


def owned_files(out: Path) -> set[str]:
    """The files (relative to OUT) that our previous run in OUT listed as its own."""
    run = read_run(out)
    return {RUN_JSON, *run.get("files", [])} if run else set()


def check_not_foreign(out: Path, names: list[str]) -> None:
    """Refuse to write onto a file in OUT that predict did not write (no run.json of ours lists it)."""
    if (out / RUN_JSON).exists() and read_run(out) is None:
        raise HandposeError(
            f"{out / RUN_JSON}: exists and was not written by handpose predict; "
            "move it away or choose another --out"
        )
    owned = owned_files(out)
    for name in names:
        target = out / name
        if (target.exists() or target.is_symlink()) and name not in owned:
            raise HandposeError(
                f"{target}: exists and handpose predict did not write it (no {RUN_JSON} here lists "
                "it); move it away or choose another --out"
            )


class Staging:
    """OUT/.predict-partial: the job, the ranks' parts, the merged result and the commit."""

    def __init__(self, out: Path):
        self.out = out
        self.root = out / STAGING

    @property
    def final(self) -> Path:
        return self.root / "final"

    def part(self, rank: int) -> Path:
        return self.root / f"rank-{rank}"

    def open(self, job: dict[str, Any]) -> str:
        """Rank 0, before any rank writes: "resume" when the staging holds this same job, "new"
        when it held nothing or another job (then it is cleared), "commit" when only the
        commit of this job is left to do."""
        old = _read_json(self.root / JOB)
        if old == job:
            return "commit" if (self.root / COMMIT).is_file() else "resume"
        if self.root.exists():
            self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / JOB, job)
        return "new"

    def clear(self) -> None:
        """Remove the staging folder's files, ours only (by name), then its empty folders."""
        if not self.root.is_dir():
            return
        if self.final.is_dir():  # final/ only ever holds what rank 0 put there
            shutil.rmtree(self.final)
        for folder in [*(p for p in self.root.glob("rank-*") if p.is_dir()), self.root]:
            _remove_ours(folder)
        for folder in [*self.root.glob("rank-*"), self.root]:
            try:
                folder.rmdir()
            except OSError:
                pass  # absent, or holds something that is not ours: left alone

    def plan_commit(self, files: list[str], record: dict[str, Any]) -> None:
        """Write the commit plan (its presence means: the result is complete in final/)."""
        check_not_foreign(self.out, files)
        stale = sorted(owned_files(self.out) - {RUN_JSON, *files})
        write_json(self.root / COMMIT, {"files": files, "stale": stale, "record": record})

    def commit(self) -> dict[str, Any]:
        """Move final/ into OUT, delete our previous run's stale files, write run.json last, clear
        the staging. Idempotent: a commit interrupted half way is finished by calling it again."""
        plan = _read_json(self.root / COMMIT)
        assert plan is not None, "commit without a plan"
        files, stale, record = plan["files"], plan["stale"], plan["record"]
        # While files move, run.json says "incomplete" and lists both runs' files as ours.
        write_json(
            self.out / RUN_JSON, {"format": RUN_FORMAT, "status": "incomplete", "files": files + stale}
        )
        for name in files:
            src, dst = self.final / name, self.out / name
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        for name in stale:
            (self.out / name).unlink(missing_ok=True)
        record = {"format": RUN_FORMAT, "status": "complete", "files": files, **record}
        write_json(self.out / RUN_JSON, record)
        for leftover in self.out.glob(f".{RUN_JSON}.tmp*"):  # a killed earlier write of run.json
            if tmp_target(leftover.name) == RUN_JSON:
                leftover.unlink(missing_ok=True)
        self.clear()
        return record


def _remove_ours(folder: Path) -> None:
    """Delete the files of `folder` that carry our names (or our atomic writes' temporaries)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_file() and (p.name in OUR_STAGING_NAMES or tmp_target(p.name) is not None):
            p.unlink()


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

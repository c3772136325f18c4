"""`handpose verify SHARDS`: check everything about a packed folder that needs no model.

1. the manifest against its schema (`shards.read_manifest`: one line per problem);
2. every shard's and index's size and sha256 against the manifest (v3: and each block's sha256);
3. every index: as many lines as the manifest's sample count, each member inside its tar right
   after a ustar header that names it with the same size, members in increasing order, all of
   `shards.MEMBERS` present, the fixed-size ones of their format size (kp.f32 168 bytes, vis.u8
   21, box.f32 16, sid.i64 8);
4. every sample's members decode: keypoints, visibility, a valid box (`decode_annotation`), the
   json parses, and the sid member equals the key.

Prints a table per split, then one row per problem of each damaged shard; when anything is wrong
it raises (exit 1) naming the damaged shards with "re-run handpose pack". Consumers do the cheap
part of this on their own (size always, sha256 unless --no-verify); this is the full check.
"""

from __future__ import annotations

import json
import mmap
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from handpose.errors import HandposeError
from handpose.remote import shard_folder
from handpose.shards import (
    MEMBER_BYTES,
    MEMBERS,
    REPACK,
    SPLITS,
    IndexEntry,
    decode_annotation,
    entry_blocks,
    file_problem,
    hash_progress,
    read_index,
    read_manifest,
)

MAX_SAMPLE_PROBLEMS = 3  # per shard: the first few bad samples are named, the rest counted


def verify(root: str | Path) -> dict[str, Any]:
    """Check the packed folder `root` (see the module docstring; a URL: each shard and index is
    downloaded to a temporary folder, one at a time, and checked there); print the tables.

    Returns {"shards": n, "samples": n, "bytes": n} when everything is intact; raises
    HandposeError naming each damaged shard otherwise."""
    console = Console()
    manifest = read_manifest(root)
    entries = manifest.entries()
    total = sum(e["bytes"] + e.get("index_bytes", 0) for e in entries)
    damaged: dict[str, list[str]] = {}
    with hash_progress(total) as advance:
        for e in entries:
            with shard_folder(manifest, e) as folder:  # a URL's shard: downloaded, then checked here
                problems = shard_problems(folder, e, advance)
            if problems:
                damaged[e["name"]] = problems
    console.print(split_table(entries, damaged))
    if damaged:
        console.print(damage_table(manifest.root, damaged))
        names = ", ".join(list(damaged)[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        raise HandposeError(f"{root}: {len(damaged)} of {len(entries)} shards damaged ({names}); {REPACK}")
    samples = sum(e["samples"] for e in entries)
    console.print(
        f"all {len(entries)} shards intact ({samples} samples): sizes, sha256s, indexes and labels checked"
    )
    return {"shards": len(entries), "samples": samples, "bytes": total}


def shard_problems(root: Path, entry: dict[str, Any], on_bytes: Callable[[int], None]) -> list[str]:
    """Everything wrong with one shard and its index, one line each (empty: intact)."""
    tar, idx = root / entry["name"], root / entry["index"]
    # v3: each block's sha256 too (what remote reads check), in the same pass
    problems = named(tar, file_problem(tar, entry["bytes"], entry["sha256"], on_bytes, entry_blocks(entry)))
    if not tar.is_file():
        return problems
    if not idx.is_file():
        return [*problems, f"{idx.name}: missing (DALI and predict read by it)"]
    if "index_bytes" in entry:
        problems += named(idx, file_problem(idx, entry["index_bytes"], entry.get("index_sha256"), on_bytes))
    try:
        index = read_index(idx)
    except HandposeError as e:
        return [*problems, idx.name + str(e).removeprefix(str(idx))]  # "NAME: bad index header ..."
    if len(index) != entry["samples"]:
        problems.append(f"{idx.name}: {len(index)} samples, the manifest says {entry['samples']}")
    bad = list(_sample_problems(tar, index))
    problems += bad[:MAX_SAMPLE_PROBLEMS]
    if len(bad) > MAX_SAMPLE_PROBLEMS:
        problems.append(f"... and {len(bad) - MAX_SAMPLE_PROBLEMS} more bad samples")
    return problems


def named(path: Path, problem: str | None) -> list[str]:
    """A `shards.file_problem` as a table row naming the file (the table names the folder)."""
    return [] if problem is None else [f"{path.name}: {problem}"]


def _sample_problems(tar: Path, index: list[IndexEntry]) -> Iterator[str]:
    """One line per sample of `index` whose members are not where, what or as big as they
    should be in `tar`, or do not decode."""
    with open(tar, "rb") as f, _mapped(f) as data:
        for key, members in index:
            problem = member_problem(data, key, members)
            if problem is not None:
                yield problem


@contextmanager
def _mapped(f: Any) -> Iterator[bytes | mmap.mmap]:
    """The open file's bytes, memory-mapped (an empty file cannot be mapped: empty bytes)."""
    try:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:
        yield b""
        return
    with m:
        yield m


def member_problem(data: bytes | mmap.mmap, key: str, members: dict[str, tuple[int, int]]) -> str | None:
    """What is wrong with one sample's members in the tar bytes `data` (naming the member, or the
    sample), or None."""
    missing = [ext for ext in MEMBERS if ext not in members]
    if missing:
        return f"sample {key}: no {missing[0]} member"
    end = 0
    for ext, (offset, size) in members.items():
        name = f"{key}.{ext}"
        if offset < end + tarfile.BLOCKSIZE or offset % tarfile.BLOCKSIZE:
            return f"{name}: index offset {offset} overlaps the previous member or is not after a header"
        if offset + size > len(data):
            return f"{name}: bytes {offset}..{offset + size} lie past the end of the tar ({len(data)} bytes)"
        header = ustar_member(bytes(data[offset - tarfile.BLOCKSIZE : offset]))
        if header is None:
            return f"{name}: no tar header before offset {offset}"
        if header != (name, size):
            return f"{name}: the tar header before offset {offset} is {header[0]}, {header[1]} bytes"
        if ext in MEMBER_BYTES and size != MEMBER_BYTES[ext]:
            return f"{name}: {size} bytes, the format's is {MEMBER_BYTES[ext]}"
        end = offset + size
    read = {ext: bytes(data[o : o + n]) for ext, (o, n) in members.items() if ext != "jpg"}
    try:
        decode_annotation(read)
        json.loads(read["json"])
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"sample {key}: does not decode ({e})"
    sid = int(np.frombuffer(read["sid.i64"], "<i8")[0])
    if f"{sid:010d}" != key:
        return f"sample {key}: its sid member says {sid}"
    return None


def ustar_member(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a 512-byte ustar header, or None if it is not one (bad checksum)."""
    if len(header) != tarfile.BLOCKSIZE:
        return None
    try:
        checksum = int(header[148:156].strip(b" \0") or b"-1", 8)
        size = int(header[124:136].strip(b" \0") or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(header[:148]) + 8 * ord(" ") + sum(header[156:]):
        return None
    return header[:100].split(b"\0", 1)[0].decode("utf-8", "replace"), size


def split_table(entries: list[dict[str, Any]], damaged: dict[str, list[str]]) -> Table:
    """Per split: shards, samples, MB, damaged shards."""
    table = Table(title="shards")
    for col in ("split", "shards", "samples", "MB", "damaged"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split in SPLITS:
        mine = [e for e in entries if e["split"] == split]
        if mine:
            bad = sum(e["name"] in damaged for e in mine)
            table.add_row(
                split,
                str(len(mine)),
                str(sum(e["samples"] for e in mine)),
                f"{sum(e['bytes'] for e in mine) / 1e6:.1f}",
                f"[red]{bad}[/]" if bad else "0",
            )
    return table


def damage_table(root: Path, damaged: dict[str, list[str]]) -> Table:
    """One row per problem of each damaged shard."""
    table = Table(title=escape(f"damaged shards in {root}: {REPACK}"))
    table.add_column("shard")
    table.add_column("problem")
    for name, problems in damaged.items():
        for i, p in enumerate(problems):
            table.add_row(escape(name) if i == 0 else "", escape(p))
    return table

"""Atomic writes: a temp name in the same folder, then os.replace, so a crash never leaves a
file that looks complete. Also the checks that an output path can be written, made before any
work starts."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from handpose.errors import HandposeError


def tmp_name(path: Path) -> Path:
    """The temporary sibling a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp\d+$")  # what `tmp_name` makes


def tmp_target(name: str) -> str | None:
    """The file name a temporary name of `tmp_name` stands for (`.a.json.tmp12` -> `a.json`),
    or None when `name` is not one: how a crashed run's leftovers are recognised as ours."""
    m = _TMP_NAME.match(name)
    return m.group("target") if m else None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp sibling of `path`; on clean exit fsync and rename it onto `path`."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
    """Write JSON atomically with sorted keys, so equal objects give equal bytes."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Resolve `path` and refuse it unless it lies inside `root` (we never write elsewhere)."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if root_r != path_r and root_r not in path_r.parents:
        raise ValueError(f"refusing to write {path_r}: outside the output folder {root_r}")
    return path_r


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work starts, an output folder that cannot be one: an existing file, a
    path under a file, or a place we may not write. `what` names it for the user (`--out`)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.is_dir():
            if not os.access(p, os.W_OK | os.X_OK):
                raise HandposeError(f"{what} {path}: {p} is not writable")
            return path
        if p.exists() or p.is_symlink():
            where = "is a file" if p == path else f"is under {p}, which is a file"
            raise HandposeError(f"{what} {path}: {where}, not a folder")
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Refuse an output file name that is a folder, or whose folder `check_output_dir` refuses."""
    path = Path(path)
    if path.is_dir():
        raise HandposeError(f"{what} {path}: is a folder; give a file name")
    check_output_dir(path.parent, what)
    return path

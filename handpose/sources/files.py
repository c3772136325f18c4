"""The input-file rules pack's readers and predict share: which files are images, how a folder is
walked. (How a YOLO label line or dataset layout is read is `sources.yolo`'s.)

One set of image suffixes everywhere, so a file is an image in a plain folder exactly when it is
one inside a YOLO dataset: Ultralytics' list, the widest in use. A file with one of these suffixes
that handpose cannot decode (a raw `.dng`, a `.heic` without a HEIF plug-in) is reported where it
is met (pack: a skipped sample naming it; predict: a line in errors.jsonl), never passed over.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

# The suffixes Ultralytics reads as images (ultralytics.data.utils.IMG_FORMATS), lower case, no dot.
IMAGE_SUFFIXES = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm", "heic")
_IMAGE_SUFFIXES = frozenset(IMAGE_SUFFIXES)


def is_image(name: str) -> bool:
    """Whether a file name has an image suffix (any case): `a.JPG` yes, `a.txt` and `jpg` no."""
    stem, dot, suffix = name.rpartition(".")
    return bool(dot) and suffix.lower() in _IMAGE_SUFFIXES


def walk(
    folder: str | os.PathLike,
    keep: Callable[[str], bool] = is_image,
    *,
    skip: str | os.PathLike | None = None,
) -> Iterator[str]:
    """Paths (str, `folder` joined with the relative path) of the files under `folder` whose name
    passes `keep`, in the order of their relative paths; one directory is listed at a time, so
    memory holds one directory's names, not the tree's. Hidden names (a leading dot), symlinked
    folders and `skip` (an output folder inside an input: a re-run must not read its own
    outputs) are left out; a symlinked file counts as a file."""
    skip_real = os.path.realpath(skip) if skip is not None else None

    def visit(d: str) -> Iterator[str]:
        # A folder sorts as "name/": the order of the files' relative paths ("a.jpg" < "a/x.jpg").
        with os.scandir(d) as it:
            keys = sorted(
                e.name + "/" if e.is_dir(follow_symlinks=False) else e.name
                for e in it
                if not e.name.startswith(".")
                and (e.is_dir(follow_symlinks=False) or (keep(e.name) and e.is_file()))
            )
        for key in keys:
            path = os.path.join(d, key.rstrip("/"))
            if not key.endswith("/"):
                yield path
            elif skip_real is None or os.path.realpath(path) != skip_real:
                yield from visit(path)

    yield from visit(os.fspath(folder))

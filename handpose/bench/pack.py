"""`handpose bench pack`: pack images end to end, against two floors in the same run.

The images: N generated ones (default), or a real data set (`--src ROOT --format yolo|coco|freihand`).
1. `handpose pack SRC OUT` in a subprocess, exactly as a user runs it (CLI start-up included);
2. `tar cf` of the same source images: the I/O floor (read every byte, write an archive);
3. one strict simplejpeg decode of every image on all cores: the decode floor (pack must decode
   each image once to validate it).
Generating the images (synth) is not timed; it is reused when WORKDIR/src already holds N ids.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from handpose.console import make_console
from handpose.cpu import collect_before_fork, cores
from handpose.errors import HandposeError
from handpose.imageio import decode_jpeg
from handpose.sources.files import is_image, walk


def bench_pack(
    *,
    n: int = 10_000,
    workdir: str | Path,
    workers: int | None = None,
    src: str | Path | None = None,
    fmt: str = "freihand",
) -> dict[str, Any]:
    """Time pack vs `tar cf` vs decode-all of `n` generated images (or every image of `src`, a
    data set in format `fmt`); print a table and a JSON line."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workers = workers or cores()
    out = workdir / "shards"
    console = make_console()
    if src is None:  # generated FreiHAND-format hands
        src, fmt = workdir / "src", "freihand"
        _ensure_source(src, n, workers, console)
        files = sorted((src / "training" / "rgb").iterdir())[:n]
    else:
        src = Path(src)
        if not src.is_dir():
            raise HandposeError(f"--src {src}: not a folder")
        # what pack reads: the images and the label files
        files = [Path(p) for p in walk(src, lambda n: is_image(n) or n.endswith((".txt", ".json")))]
    images = [f for f in files if f.suffix.lower() in (".jpg", ".jpeg")]  # the decode floor: JPEG
    n = len(images)
    mb = sum(f.stat().st_size for f in files) / 1e6

    # tar first: it also warms the page cache, so no stage pays for cold reads the others skip.
    tar_s = _time_tar(src, files, workdir / "floor.tar")
    pack_s, manifest = _time_pack(src, out, workers, fmt)
    decode_s = _time_decode(images, workers)
    packed = manifest["images"]["with_hands"] + manifest["images"]["background"] + len(manifest["skipped"])
    if packed < n and fmt == "freihand":
        raise HandposeError(f"bench: packed {packed} images, expected {n}")

    rows = [
        ("handpose pack (CLI)", pack_s),
        ("tar cf (I/O floor)", tar_s),
        ("decode all (simplejpeg)", decode_s),
    ]
    table = Table(title=f"pack {n} images ({mb:.0f} MB, format {fmt}), {workers} workers")
    for col in ("stage", "seconds", "images/s", "x pack time"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, s in rows:
        table.add_row(name, f"{s:.2f}", f"{n / s:,.0f}", f"{s / pack_s:.2f}")
    console.print(table)
    result = {
        "bench": "pack",
        "images": n,
        "hands": sum(manifest["counts"].values()),
        "format": fmt,
        "workers": workers,
        "source_mb": round(mb, 1),
        "shards": len(manifest["shards"]),
        "pack_s": round(pack_s, 3),
        "images_per_s": round(n / pack_s, 1),
        "tar_images_per_s": round(n / tar_s, 1),
        "decode_images_per_s": round(n / decode_s, 1),
    }
    print(json.dumps(result), flush=True)
    return result


def _ensure_source(src: Path, n: int, workers: int, console: Console) -> None:
    xyz = src / "training_xyz.json"
    if xyz.is_file() and len(json.loads(xyz.read_text())) == n:
        return
    from handpose.synth import synth

    console.print(f"generating {n} images in {src} (not timed)")
    synth(src, n=n, versions=1, seed=0, size=224, workers=workers)


def _time_pack(src: Path, out: Path, workers: int, fmt: str) -> tuple[float, dict[str, Any]]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "handpose", "pack", str(src), str(out), "--workers", str(workers)]
    cmd += ["--format", fmt]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise HandposeError(f"bench: `{' '.join(cmd)}` failed:\n{proc.stderr.strip()}")
    return seconds, json.loads((out / "manifest.json").read_text())


def _time_tar(src: Path, files: list[Path], archive: Path) -> float:
    names = archive.with_name("floor-files.txt")
    names.write_text("".join(f"{f.relative_to(src)}\n" for f in files))
    t0 = time.perf_counter()
    subprocess.run(["tar", "cf", str(archive), "-C", str(src), "-T", str(names)], check=True)
    seconds = time.perf_counter() - t0
    archive.unlink()
    names.unlink()
    return seconds


def _time_decode(files: list[Path], workers: int) -> float:
    chunks = [files[i::workers] for i in range(workers)]
    collect_before_fork()  # before the clock: not part of decoding
    t0 = time.perf_counter()
    with mp.get_context().Pool(workers) as pool:
        pool.map(_decode_all, chunks)
    return time.perf_counter() - t0


def _decode_all(files: list[Path]) -> int:
    for f in files:
        decode_jpeg(f.read_bytes())
    return len(files)

"""`handpose inspect`: print a pack's manifest and draw samples read back from its shards.

The contact sheet is how a user checks that labels survived packing: every sample is read with
plain `tarfile` (only the .jpg, .json and .kp.f32 members are decoded, nothing is unpickled),
letterboxed into a CELL x CELL tile with the same matrix for image and keypoints, and drawn
with the skeleton. Sheet size: ceil(sqrt(k)) columns x ceil(k / columns) rows of CELL pixels,
k = min(n, samples in the split).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from rich.table import Table

from handpose.atomic import check_output_file, write_bytes
from handpose.console import make_console
from handpose.errors import HandposeError
from handpose.geometry import apply_affine, fit_matrix
from handpose.imageio import decode_jpeg, warp_affine
from handpose.shards import SPLITS, Manifest, decode_keypoints, split_shards
from handpose.skeleton import BONES, FINGER_COLORS, NUM_JOINTS, joint_finger

CELL = 224  # tile side in pixels
WRIST_COLOR = (255, 255, 255)


def inspect_shards(
    root: str | Path, *, split: str = "train", n: int = 16, png: str | Path | None = None
) -> Path:
    """Print the manifest of `root` as tables and write a contact sheet of `n` samples of `split`.

    Returns the PNG path (default: ROOT/inspect-{split}.png).
    """
    if n < 1:
        raise HandposeError(f"--n {n}: must be >= 1")
    if png is not None:
        check_output_file(png, "--png")
    root = Path(root)
    manifest, shards = split_shards(root, split)
    console = make_console()
    for table in manifest_tables(manifest):
        console.print(table)
    samples = list(read_samples(shards, n))
    png = Path(png) if png is not None else root / f"inspect-{split}.png"
    sheet = contact_sheet(samples)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    png.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(png, buf.getvalue())
    console.print(f"drew {len(samples)} {split} samples ({sheet.width}x{sheet.height}): {png}")
    return png


def manifest_tables(m: Manifest) -> list[Table]:
    """The manifest as rich tables: summary, splits, stats, skipped samples."""
    d = m.data
    summary = Table(title=f"pack {m.root}", show_header=False)
    summary.add_row("format", f"{d['format']} v{d['format_version']} (handpose {d.get('tool_version', '?')})")
    for key, value in d.get("source", {}).items():
        summary.add_row(f"source.{key}", str(value))
    for key, value in d.get("options", {}).items():
        summary.add_row(f"options.{key}", str(value))

    splits = Table(title="splits")
    for col in ("split", "samples", "shards", "MB", "samples/shard"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for split in sorted(d["counts"], key=lambda s: SPLITS.index(s) if s in SPLITS else len(SPLITS)):
        count = d["counts"][split]
        sizes = [s for s in d["shards"] if s["split"] == split]
        mb = sum(s["bytes"] for s in sizes) / 1e6
        per = f"{min(s['samples'] for s in sizes)}-{max(s['samples'] for s in sizes)}" if sizes else "-"
        splits.add_row(split, str(count), str(len(sizes)), f"{mb:.1f}", per)

    stats = Table(title="stats")
    stats.add_column("")
    for col in ("R", "G", "B"):
        stats.add_column(col, justify="right")
    st = d.get("stats", {})
    for key in ("mean", "std"):
        if st.get(key):
            stats.add_row(key, *(f"{v:.4f}" for v in st[key]))
    stats.caption = f"{st.get('pixels', 0):,} pixels of split {st.get('split', 'train')}"
    kb = d.get("keypoint_bounds", {})
    if kb.get("min_px"):
        stats.add_row("uv min px", f"{kb['min_px'][0]:.1f}", f"{kb['min_px'][1]:.1f}", "")
        stats.add_row("uv max px", f"{kb['max_px'][0]:.1f}", f"{kb['max_px'][1]:.1f}", "")
        stats.caption += f"; {kb.get('samples_outside_image', 0)} samples have keypoints outside the image"

    tables = [summary, splits, stats]
    skipped = d.get("skipped", [])
    if skipped:
        sk = Table(title=f"skipped ({len(skipped)})")
        for col in ("id", "file", "reason"):
            sk.add_column(col)
        for e in skipped[:20]:
            sk.add_row(str(e["id"]), e["file"], e["reason"])
        if len(skipped) > 20:
            sk.caption = f"... and {len(skipped) - 20} more in manifest.json"
        tables.append(sk)
    return tables


def read_samples(shards: list[Path], n: int) -> Iterator[dict[str, Any]]:
    """The first `n` samples of `shards` in order: {key, image, meta, uv} per sample."""
    count = 0
    for shard in shards:
        for sample in _tar_samples(shard):
            yield sample
            count += 1
            if count == n:
                return


def _tar_samples(shard: Path) -> Iterator[dict[str, Any]]:
    """Group a shard's members by key; decode only the members we know (never unpickle)."""
    current: dict[str, bytes] = {}
    key = None
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, _, ext = info.name.partition(".")
                if k != key and current:
                    yield _decode(shard, key, current)  # type: ignore[arg-type]
                    current = {}
                key = k
                if ext in ("jpg", "json", "kp.f32"):
                    current[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
            if current:
                yield _decode(shard, key, current)  # type: ignore[arg-type]
    except (OSError, tarfile.TarError) as e:
        raise HandposeError(f"{shard}: unreadable shard: {e}") from None


def _decode(shard: Path, key: str, members: dict[str, bytes]) -> dict[str, Any]:
    try:
        meta = json.loads(members["json"])
        uv = decode_keypoints(members["kp.f32"])
        image = decode_jpeg(members["jpg"])
    except (KeyError, ValueError) as e:
        raise HandposeError(f"{shard}: sample {key}: bad or missing member ({e})") from None
    return {"key": key, "image": image, "meta": meta, "uv": uv}


def contact_sheet(samples: list[dict[str, Any]]) -> Image.Image:
    """Tiles of CELL px, each image letterboxed with its keypoints moved by the same matrix."""
    cols = max(1, math.ceil(math.sqrt(len(samples))))
    rows = max(1, math.ceil(len(samples) / cols))
    sheet = Image.new("RGB", (cols * CELL, rows * CELL), (0, 0, 0))
    for k, s in enumerate(samples):
        h, w = s["image"].shape[:2]
        M = fit_matrix(w, h, CELL)
        tile = Image.fromarray(warp_affine(s["image"], M, CELL))
        draw_skeleton(ImageDraw.Draw(tile), apply_affine(M, s["uv"]))
        ImageDraw.Draw(tile).text((3, 2), s["key"], fill=(255, 255, 255))
        sheet.paste(tile, ((k % cols) * CELL, (k // cols) * CELL))
    return sheet


def draw_skeleton(draw: ImageDraw.ImageDraw, uv: np.ndarray, *, radius: int = 3, width: int = 2) -> None:
    """Bones and joints in finger colours. uv puts pixel i's centre at i + 0.5, while Pillow
    puts it at integer i: hence the -0.5. Pillow truncates float boxes, so each dot is drawn
    around the nearest whole pixel, keeping it symmetric about the keypoint (within 0.5 px)."""
    p = np.asarray(uv, np.float64).reshape(NUM_JOINTS, 2) - 0.5
    for a, b in BONES:
        draw.line([tuple(p[a]), tuple(p[b])], fill=FINGER_COLORS[joint_finger(b)], width=width)
    for j in range(NUM_JOINTS):
        colour = WRIST_COLOR if j == 0 else FINGER_COLORS[joint_finger(j)]
        x, y = round(p[j, 0]), round(p[j, 1])
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(0, 0, 0))

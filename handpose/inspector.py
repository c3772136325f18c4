"""`handpose inspect`: print a pack's manifest and draw samples read back from its shards.

The contact sheet is how a user checks that labels survived packing: every sample is read with
the shard reader (`shards.read_samples`; only the .jpg, .json and label members are decoded,
nothing is unpickled), letterboxed into a CELL x CELL tile by THE preprocessing
(`imageio.warp_to_input` with `geometry.fit_matrix`), and its keypoints and hand box moved by
the same matrix and drawn (`skeleton.draw_skeleton`: bones and joints in finger colours, joints
that are not labelled left out), the box in white. Sheet size: ceil(sqrt(k)) columns x
ceil(k / columns) rows of CELL pixels, k = min(n, samples in the split).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from rich.table import Table

from handpose.atomic import check_output_file, write_bytes
from handpose.console import make_console
from handpose.errors import HandposeError
from handpose.geometry import apply_affine, fit_matrix
from handpose.imageio import image_size, warp_to_input
from handpose.remote import Cache, Store, Url, parse_location
from handpose.shards import (
    READ_LABELS,
    SPLITS,
    Annotation,
    Manifest,
    decode_annotation,
    read_samples,
    split_shards,
    verify_shards,
)
from handpose.skeleton import draw_skeleton

CELL = 224  # tile side in pixels
BOX_COLOR = (255, 255, 255)


@dataclass(frozen=True)
class Drawable:
    """One sample read back from a shard: what a tile shows."""

    key: str
    jpg: bytes  # the stored image bytes
    width: int  # displayed size (EXIF orientation applied): the frame of the labels
    height: int
    annotation: Annotation
    meta: dict[str, Any]


def inspect_shards(
    root: str | Path,
    *,
    split: str = "train",
    n: int = 16,
    png: str | Path | None = None,
    verify: bool = True,
    cache: Cache | None = None,
) -> Path:
    """Print the manifest of `root` as tables and write a contact sheet of `n` samples of `split`.

    The shards drawn from are first checked against the manifest's sha256s (`verify=False`:
    sizes only; a URL's are checked as they stream). Returns the PNG path (default:
    ROOT/inspect-{split}.png; for a URL `png` must be given).
    """
    if n < 1:
        raise HandposeError(f"--n {n}: must be >= 1")
    if png is not None:
        check_output_file(png, "--png")
    location = parse_location(root)
    if png is None and isinstance(location, Url):
        raise HandposeError(f"{location}: a URL; give --png FILE for the contact sheet")
    manifest, shards = split_shards(location, split, cache=cache)
    shards = shards[: covering(manifest.shard_samples(split), n)]
    if verify:
        verify_shards(manifest, manifest.entries(split)[: len(shards)])
    console = make_console()
    for table in manifest_tables(manifest):
        console.print(table)
    samples = list(read_back(shards, n, manifest.store))
    png = Path(png) if png is not None else Path(root) / f"inspect-{split}.png"
    sheet = contact_sheet(samples)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    png.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(png, buf.getvalue())
    console.print(f"drew {len(samples)} {split} samples ({sheet.width}x{sheet.height}): {png}")
    return png


def covering(counts: list[int], n: int) -> int:
    """How many of the leading shards (of `counts` samples each) hold the first `n` samples."""
    total = 0
    for i, c in enumerate(counts, 1):
        total += c
        if total >= n:
            return i
    return len(counts)


def manifest_tables(m: Manifest) -> list[Table]:
    """The manifest as rich tables: summary, splits, stats, hands (images and boxes), skipped."""
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

    tables = [summary, splits, stats, hands_table(d)]
    skipped = d.get("skipped", [])
    if skipped:
        sk = Table(title=f"skipped ({len(skipped)})")
        for col in ("id", "file", "reason"):
            sk.add_column(col)
        for e in skipped[:20]:
            sk.add_row(str(e.get("id", "-")), e["file"], e["reason"])
        if len(skipped) > 20:
            sk.caption = f"... and {len(skipped) - 20} more in manifest.json"
        tables.append(sk)
    return tables


def hands_table(d: dict[str, Any]) -> Table:
    """Images (with hands, background), hands per image, labelled joints and the hand boxes."""
    table = Table(title="hands")
    table.add_column("")
    for col in ("min", "p10", "median", "p90", "max"):
        table.add_column(col, justify="right")
    boxes, images = d.get("boxes", {}), d.get("images", {})
    for key, name, fmt in (
        ("side_px", "box side px", "{:.1f}"),
        ("side_frac", "box side / image side", "{:.3f}"),
    ):
        if boxes.get(key):
            table.add_row(name, *(fmt.format(boxes[key][c]) for c in ("min", "p10", "median", "p90", "max")))
    per = boxes.get("hands_per_image", {})
    fraction = d.get("keypoint_bounds", {}).get("labelled_fraction")
    notes = [
        f"images: {images.get('with_hands', '?')} with hands, {images.get('background', '?')} background",
        f"hands per image: mean {per.get('mean')}, max {per.get('max')}",
        f"labelled joints: {fraction * 100:.1f}%" if fraction is not None else "",
        f"box / keypoint extent (median): {boxes.get('box_to_keypoints')}",
        f"boxes reaching past the image: {boxes.get('outside_image', 0)}",
    ]
    table.caption = "; ".join(n for n in notes if n)
    return table


def read_back(shards: list[Path], n: int, store: Store | None = None) -> Iterator[Drawable]:
    """The first `n` samples of `shards` in order, decoded; a bad member is a HandposeError
    naming the shard and key. (`store`: a remote pack's reader, its `Manifest.store`.)"""
    count = 0
    for shard in shards:
        for sample in read_samples(shard, ("jpg", "json", *READ_LABELS), 0, n - count, store=store):
            key = sample["__key__"]
            try:
                meta = json.loads(sample["json"])
                annotation = decode_annotation(sample)
                width, height = image_size(sample["jpg"])
            except (KeyError, ValueError) as e:
                raise HandposeError(f"{shard}: sample {key}: bad or missing member ({e})") from None
            yield Drawable(key, sample["jpg"], width, height, annotation, meta)
            count += 1
        if count == n:
            return


def contact_sheet(samples: list[Drawable]) -> Image.Image:
    """Tiles of CELL px, each image letterboxed with its keypoints and box moved by the same matrix."""
    cols = max(1, math.ceil(math.sqrt(len(samples))))
    rows = max(1, math.ceil(len(samples) / cols))
    sheet = Image.new("RGB", (cols * CELL, rows * CELL), (0, 0, 0))
    for k, s in enumerate(samples):
        M = fit_matrix(s.width, s.height, CELL)
        try:
            tile = Image.fromarray(warp_to_input(s.jpg, M, CELL))
        except ValueError as e:
            raise HandposeError(f"sample {s.key}: undecodable image ({e})") from None
        draw = ImageDraw.Draw(tile)
        box = apply_affine(M, s.annotation.box.reshape(2, 2)) - 0.5  # the letterbox keeps the corner order
        draw.rectangle([tuple(box[0]), tuple(box[1])], outline=BOX_COLOR, width=1)
        draw_skeleton(draw, apply_affine(M, s.annotation.uv), s.annotation.labelled)
        draw.text((3, 2), s.key, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
        sheet.paste(tile, ((k % cols) * CELL, (k // cols) * CELL))
    return sheet

#!/usr/bin/env python3
"""Build the multi-hand test set from the val photos of a YOLO-pose dataset, seeded.

    .venv/bin/python tools/multihand.py --data ROOT --out multihand [--split val] [--seed 0]

Writes a YOLO-pose dataset (OUT/val/images/*.jpg, OUT/val/labels/*.txt with one line per hand,
OUT/data.yaml with kpt_shape [21, 3]) and OUT/multihand.json saying what each image is. Read it
with `handpose predict MODEL OUT --split val`, or pack it with
`handpose pack OUT SHARDS --format yolo --split 0,1,0` (pack re-splits a dataset of one split
folder; 0,1,0 keeps every image in val).
Four kinds of image:

  mosaic_NNNN      2x2 mosaic on a 640 x 640 canvas: four photos, each letterboxed into a square
                   of its 320 px cell at a random scale (--mosaic-scale, default 0.6-1.0) and a
                   random position inside the cell
  single_NNNN      one photo shrunk onto a 640 x 480 canvas: its letterbox square's side is
                   --single-scale (default 0.25-0.6) x 480, at a random position
  background_NNNN  a generated cluttered background (handpose.synth.render_background), 640 x 480,
                   no hand
  blanked_NNNN     a photo with each labelled hand's box (grown by 20%) filled with the mean colour
                   of a ring around it: no hand AS LABELLED (a hand the labels missed stays)

Canvases are black outside the photos, as the training layouts are. Every photo is moved by one
matrix (`geometry.place_matrix`), which moves its boxes (`geometry.move_boxes`, clipped to the
canvas) and keypoints (`geometry.apply_affine`) too; pixels are warped by `imageio.warp_to_input`,
the loaders' preprocessing. The same arguments write the same bytes; a re-run overwrites only
this tool's own files, each written atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handpose.atomic import check_output_dir, write_bytes, write_json, write_text  # noqa: E402
from handpose.errors import HandposeError  # noqa: E402
from handpose.geometry import Square, apply_affine, move_boxes, place_matrix  # noqa: E402
from handpose.imageio import decode_image, image_size, warp_to_input  # noqa: E402
from handpose.skeleton import NUM_JOINTS  # noqa: E402
from handpose.sources import read_source, yolo  # noqa: E402

MOSAIC = (640, 640)  # canvas width, height
SINGLE = (640, 480)
BLANK_GROW = 1.2  # a blanked box is the hand box grown by this, about its centre
RING = 0.15  # the fill is the mean colour of a ring this wide (x the grown box side) around it
JPEG_QUALITY = 95


@dataclass(frozen=True)
class Photo:
    """A val photo with its labelled hands, in pixels of the photo as displayed."""

    name: str  # path relative to the dataset root
    data: bytes
    width: int
    height: int
    boxes: np.ndarray  # (n, 4)
    uv: np.ndarray  # (n, 21, 2)
    visibility: np.ndarray  # (n, 21) uint8, 0 = not labelled


def split_folders(data: Path, split: str) -> list[Path]:
    """The image folders of `split` (a dataset with one split folder keeps its name here, as for
    predict's --split, rather than being re-split as pack does)."""
    if data.is_file():
        _, folders, _ = yolo.read_dataset_yaml(data, resplit=False)
    else:
        folders, _ = yolo.find_folders(data, resplit=False)
    return [Path(os.path.abspath(f.images)) for f in folders if f.split == split]


def read_photos(data: Path, split: str) -> list[Photo]:
    """The photos of `split` with at least one valid hand, in path order (sources.yolo's rules)."""
    dataset = read_source(data, "yolo")
    folders = split_folders(data, split)
    by_path: dict[Path, list] = {}
    for r in dataset.records:
        # by the path as found and as resolved: a photo may be a symlink, or a folder may be
        real = [Path(os.path.abspath(r.path)), Path(os.path.realpath(r.path))]
        if any(f in p.parents or Path(os.path.realpath(f)) in p.parents for f in folders for p in real):
            by_path.setdefault(r.path, []).append(r)
    photos = []
    for path, records in sorted(by_path.items(), key=lambda kv: kv[1][0].file):
        raw = path.read_bytes()
        w, h = image_size(raw)
        pix = [r.in_pixels(w, h) for r in records]
        photos.append(
            Photo(
                records[0].file,
                raw,
                w,
                h,
                np.stack([b for _, b in pix]).astype(np.float64),
                np.stack([uv for uv, _ in pix]).astype(np.float64),
                np.stack([r.visibility for r in records]).astype(np.uint8),
            )
        )
    if not photos:
        raise HandposeError(f"{data}: no labelled hand in split {split!r} (use --split to pick another)")
    return photos


def compose(
    photos: Sequence[Photo], squares: Sequence[Square], width: int, height: int
) -> tuple[np.ndarray, list]:
    """Photos letterboxed into their squares of a black width x height canvas -> (uint8 canvas,
    hands: (box (4,), uv (21, 2), visibility (21,)) in canvas pixels, boxes clipped to it)."""
    side = max(width, height)
    canvas = np.zeros((side, side, 3), np.uint16)
    hands = []
    for photo, square in zip(photos, squares, strict=True):
        M = place_matrix(photo.width, photo.height, square)
        canvas += warp_to_input(photo.data, M, side)  # squares never overlap: the tiles add up
        boxes = move_boxes(M, photo.boxes)
        boxes = np.clip(boxes, 0, [width, height, width, height])
        uv = apply_affine(M, photo.uv.reshape(-1, 2)).reshape(-1, NUM_JOINTS, 2)
        hands += list(zip(boxes, uv, photo.visibility, strict=True))
    return np.minimum(canvas, 255).astype(np.uint8)[:height, :width], hands


def mosaic_squares(rng: np.random.Generator, scale: tuple[float, float]) -> list[Square]:
    """Each photo's square in its 320 px cell of the 640 px canvas: side cell x U(scale), anywhere inside."""
    cell = MOSAIC[0] / 2
    squares = []
    for cy in range(2):
        for cx in range(2):
            side = cell * rng.uniform(*scale)
            x0, y0 = cx * cell + rng.uniform(0, cell - side), cy * cell + rng.uniform(0, cell - side)
            squares.append((float(x0), float(y0), float(side)))
    return squares


def single_square(rng: np.random.Generator, scale: tuple[float, float]) -> Square:
    w, h = SINGLE
    side = h * rng.uniform(*scale)
    return (float(rng.uniform(0, w - side)), float(rng.uniform(0, h - side)), float(side))


def blank_hands(photo: Photo) -> np.ndarray:
    """The photo with each hand's grown box filled with the mean colour of the ring around it."""
    image, _ = decode_image(photo.data)
    image = image.copy()
    h, w = image.shape[:2]
    for box in photo.boxes:
        c, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) / 2 * BLANK_GROW
        x0, y0 = np.floor(np.clip(c - half, 0, [w, h])).astype(int)
        x1, y1 = np.ceil(np.clip(c + half, 0, [w, h])).astype(int)
        pad = int(np.ceil(RING * max(x1 - x0, y1 - y0)))
        rx0, ry0, rx1, ry1 = max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, w), min(y1 + pad, h)
        ring = np.ones((ry1 - ry0, rx1 - rx0), bool)
        ring[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0] = False
        region = image[ry0:ry1, rx0:rx1]
        fill = region[ring].mean(axis=0) if ring.any() else image.reshape(-1, 3).mean(axis=0)
        image[y0:y1, x0:x1] = np.round(fill).astype(np.uint8)
    return image


def background(rng: np.random.Generator) -> np.ndarray:
    from handpose.synth import SS, render_background

    w, h = SINGLE
    img = render_background(rng, w).reduce(SS)  # a square of side w, drawn supersampled
    return np.asarray(img)[:h, :w]


def encode(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def label_lines(hands: list, width: int, height: int) -> str:
    """YOLO-pose lines `0 cx cy w h x y v ...`, normalised by the canvas; unlabelled joints 0 0 0."""
    lines = []
    for box, uv, vis in hands:
        cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
        bw, bh = (box[2] - box[0]) / width, (box[3] - box[1]) / height
        fields = ["0", *(f"{v:.6f}" for v in (cx, cy, bw, bh))]
        for (x, y), v in zip(uv, vis, strict=True):
            fields += [f"{x / width:.6f}", f"{y / height:.6f}", str(int(v))] if v else ["0", "0", "0"]
        lines.append(" ".join(fields) + "\n")
    return "".join(lines)


def build(
    data: Path,
    out: Path,
    *,
    split: str = "val",
    mosaics: int = 200,
    singles: int = 200,
    backgrounds: int = 100,
    blanked: int = 100,
    mosaic_scale: tuple[float, float] = (0.6, 1.0),
    single_scale: tuple[float, float] = (0.25, 0.6),
    seed: int = 0,
) -> dict:
    """Write the test set (see the module docstring); returns the summary written to multihand.json."""
    for name, lo_hi in (("--mosaic-scale", mosaic_scale), ("--single-scale", single_scale)):
        if not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise HandposeError(f"{name}: expected 0 < LOW <= HIGH <= 1, got {lo_hi[0]} {lo_hi[1]}")
    if min(mosaics, singles, backgrounds, blanked) < 0:
        raise HandposeError("--mosaics/--singles/--backgrounds/--blanked must be >= 0")
    check_output_dir(out, "--out")
    photos = read_photos(data, split)
    previous = _previous_images(out)
    rng = np.random.default_rng(seed)
    images, labels = out / "val" / "images", out / "val" / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    order = iter(
        np.concatenate(
            [
                rng.permutation(len(photos))
                for _ in range(1 + (4 * mosaics + singles + blanked) // len(photos))
            ]
        )
    )
    entries = []

    def write(name: str, image: np.ndarray, hands: list, what: dict) -> None:
        h, w = image.shape[:2]
        write_bytes(images / f"{name}.jpg", encode(image))
        write_text(labels / f"{name}.txt", label_lines(hands, w, h))
        entries.append({"image": f"val/images/{name}.jpg", "hands": len(hands), **what})

    for k in range(mosaics):
        chosen = [photos[int(next(order))] for _ in range(4)]
        squares = mosaic_squares(rng, mosaic_scale)
        image, hands = compose(chosen, squares, *MOSAIC)
        write(
            f"mosaic_{k:04d}",
            image,
            hands,
            {"kind": "mosaic", "photos": [p.name for p in chosen], "squares": squares},
        )
    for k in range(singles):
        photo = photos[int(next(order))]
        square = single_square(rng, single_scale)
        image, hands = compose([photo], [square], *SINGLE)
        write(
            f"single_{k:04d}", image, hands, {"kind": "single", "photos": [photo.name], "squares": [square]}
        )
    for k in range(backgrounds):
        write(f"background_{k:04d}", background(rng), [], {"kind": "background", "photos": []})
    for k in range(blanked):
        photo = photos[int(next(order))]
        write(f"blanked_{k:04d}", blank_hands(photo), [], {"kind": "blanked", "photos": [photo.name]})
    write_text(out / "data.yaml", "path: .\nval: val/images\nkpt_shape: [21, 3]\nnames:\n  0: hand\n")
    summary = {
        "data": str(data),
        "split": split,
        "seed": seed,
        "mosaic_scale": list(mosaic_scale),
        "single_scale": list(single_scale),
        "counts": {
            k: sum(e["kind"] == k for e in entries) for k in ("mosaic", "single", "background", "blanked")
        },
        "hands": sum(e["hands"] for e in entries),
        "images": entries,
    }
    write_json(out / "multihand.json", summary)
    for stale in previous - {e["image"] for e in entries}:  # ours, from a run with larger counts
        (out / stale).unlink(missing_ok=True)
        (out / stale.replace("/images/", "/labels/")).with_suffix(".txt").unlink(missing_ok=True)
    return summary


def _previous_images(out: Path) -> set[str]:
    """The images an earlier run of this tool wrote into `out` (its multihand.json lists them)."""
    try:
        entries = json.loads((out / "multihand.json").read_text())["images"]
        return {e["image"] for e in entries if e["image"].startswith("val/images/")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="YOLO-pose dataset root or dataset yaml")
    ap.add_argument("--out", type=Path, required=True, help="output folder (a YOLO-pose dataset)")
    ap.add_argument("--split", default="val", help="the split whose photos are used [val]")
    ap.add_argument("--mosaics", type=int, default=200)
    ap.add_argument("--singles", type=int, default=200)
    ap.add_argument("--backgrounds", type=int, default=100)
    ap.add_argument("--blanked", type=int, default=100)
    ap.add_argument("--mosaic-scale", type=float, nargs=2, default=(0.6, 1.0), metavar=("LOW", "HIGH"))
    ap.add_argument("--single-scale", type=float, nargs=2, default=(0.25, 0.6), metavar=("LOW", "HIGH"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        summary = build(
            args.data,
            args.out,
            split=args.split,
            mosaics=args.mosaics,
            singles=args.singles,
            backgrounds=args.backgrounds,
            blanked=args.blanked,
            mosaic_scale=tuple(args.mosaic_scale),
            single_scale=tuple(args.single_scale),
            seed=args.seed,
        )
    except HandposeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    c = summary["counts"]
    print(
        f"{args.out}: {c['mosaic']} mosaics, {c['single']} single photos, {c['background']} backgrounds, "
        f"{c['blanked']} blanked photos; {summary['hands']} hands"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

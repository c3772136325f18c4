"""Paste cut-out hands (photos of hands on black) onto hand-free crops of other photos.

    .venv/bin/python tools/composite.py HANDS BACKGROUNDS [BACKGROUNDS ...] DEST [--copies 1] [--seed 0]

HANDS is a YOLO-pose dataset of photos whose background is black (the ASL set labelled by
tools/teacher_label.py); each BACKGROUNDS is a teacher_label.py output of other photos. Written
with --voc (the HandsDataset photos), its voc.json lists every photo with its VOC hand boxes;
without, its photos are the ones it kept a hand in ({split}/images), since a photo where the
teacher answered nothing may still show a hand it missed. Its cache holds every hand the teacher
answered (kept or not, in the photo or its mirror). A background is a random square crop of one
of those photos that overlaps none of these boxes (each grown by AVOID_PAD); only photos of
--background-split (default train) are used, so a validation split of the background set never
leaks into training photos.

Each hand photo gives --copies new photos in DEST/{split}/images/REL_bgK.jpg with the hand photo's
label file copied unchanged beside them (DEST/{split}/labels/REL_bgK.txt): the hand stays where it
was, only the black around it changes. The hand's mask is its non-black pixels (max channel >
BLACK), opened (specks go) and closed (small dark gaps inside the hand stay hand), its edge
softened over about a pixel. The large holes of signs such as O stay holes and show the new
background, as they should. Seeded per photo (seed, photo index, copy), so the output does not
depend on the order or the number of photos processed and a re-run writes the same bytes.
Writes nothing outside DEST.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handpose.atomic import check_output_dir, inside, write_bytes, write_json  # noqa: E402
from handpose.errors import HandposeError  # noqa: E402
from handpose.sources.yolo import find_folders, label_path, list_images  # noqa: E402
from handpose.teacher import hand_box, iou, to_pixels  # noqa: E402

BLACK = 24  # a pixel whose brightest channel is at most this is background (JPEG noise on black)
OPEN_PX = 3  # opening removes non-black specks smaller than this
CLOSE_PX = 7  # closing fills dark gaps inside the hand narrower than this
AVOID_PAD = 0.15  # hand boxes grow by this fraction of their side on every side before a crop avoids them
CROP_SIDE = (0.35, 0.9)  # crop side as a fraction of the background photo's shorter side
TRIES = 50  # crops tried per background photo before another photo is drawn
QUALITY = 95


def hand_mask(rgb: np.ndarray) -> np.ndarray:
    """Alpha (H, W) float32 in [0, 1] of a hand photographed on black: non-black pixels, opened,
    closed, edge softened."""
    m = Image.fromarray(((rgb.max(axis=2) > BLACK) * 255).astype(np.uint8))
    m = m.filter(ImageFilter.MinFilter(OPEN_PX)).filter(ImageFilter.MaxFilter(OPEN_PX))
    m = m.filter(ImageFilter.MaxFilter(CLOSE_PX)).filter(ImageFilter.MinFilter(CLOSE_PX))
    m = m.filter(ImageFilter.GaussianBlur(0.8))
    return np.asarray(m, np.float32) / 255.0


def composite(hand: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """alpha x hand + (1 - alpha) x background, uint8 (all three the same height and width)."""
    a = alpha[..., None]
    out = a * hand.astype(np.float32) + (1.0 - a) * background.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def hand_free_crop(
    width: int, height: int, avoid: list[np.ndarray], rng: np.random.Generator
) -> tuple[float, float, float] | None:
    """A random square (x0, y0, side) inside a width x height photo that meets none of the
    `avoid` boxes grown by AVOID_PAD; None after TRIES misses."""
    grown = []
    for b in avoid:
        pad = AVOID_PAD * np.array([b[2] - b[0], b[3] - b[1]])
        grown.append(np.array([b[0] - pad[0], b[1] - pad[1], b[2] + pad[0], b[3] + pad[1]]))
    short = min(width, height)
    for _ in range(TRIES):
        side = rng.uniform(*CROP_SIDE) * short
        x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
        crop = np.array([x0, y0, x0 + side, y0 + side])
        if all(iou(crop, g) == 0.0 for g in grown):
            return float(x0), float(y0), float(side)
    return None


@dataclass(frozen=True)
class Background:
    path: Path
    avoid: list[np.ndarray]  # pixel boxes of every hand known in the photo


def read_backgrounds(folder: Path, split: str) -> list[Background]:
    """The photos of a teacher_label.py output that may give backgrounds, with the boxes of
    every hand in them: its VOC boxes (with --voc) and every hand the teacher answered (photo or
    mirror). Without voc.json: the photos of `split` it kept a hand in."""
    try:
        report = json.loads((folder / "report.json").read_text())
        rows = json.loads((folder / "voc.json").read_text()) if (folder / "voc.json").is_file() else None
    except (OSError, ValueError) as e:
        raise HandposeError(f"{folder}: not a teacher_label.py output ({e})") from None
    src = Path(report["src"])
    if rows is None:
        images = folder / split / "images"
        rows = (
            [
                {"photo": os.path.relpath(p, images).replace(os.sep, "/"), "split": split, "boxes": []}
                for p in list_images(images)
            ]
            if images.is_dir()
            else []
        )
    out = []
    for row in rows:
        if row["split"] != split:
            continue
        avoid = [np.asarray(b, np.float64) for b in row["boxes"]]
        cache = folder / ".teacher-cache" / (row["photo"] + ".json")
        entry = json.loads(cache.read_text())
        w, h = entry["size"]
        for a in entry["photo"]:
            avoid.append(hand_box(to_pixels(np.asarray(a["uv"]), w, h), w, h))
        for a in entry["mirror"]:  # answered about the mirror: move back onto the photo
            uv = np.asarray(a["uv"], np.float64)
            uv[:, 0] = 1.0 - uv[:, 0]
            avoid.append(hand_box(to_pixels(uv, w, h), w, h))
        out.append(Background(src / row["photo"], avoid))
    if not out:
        raise HandposeError(f"{folder}: no {split} photos to take backgrounds from")
    return out


def draw_background(
    backgrounds: list[Background], size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """A hand-free crop of a randomly drawn background photo, resized to `size` (w, h)."""
    for _ in range(100):
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        with Image.open(bg.path) as im:
            photo = ImageOps.exif_transpose(im).convert("RGB")
        crop = hand_free_crop(photo.width, photo.height, bg.avoid, rng)
        if crop is None:
            continue
        x0, y0, side = crop
        region = photo.resize(size, Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
        return np.asarray(region), {
            "photo": str(bg.path),
            "crop": [round(x0, 2), round(y0, 2), round(side, 2)],
        }
    raise HandposeError(
        "no hand-free crop found in 100 background photos: give photos with room around the hands"
    )


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hands", type=Path, help="YOLO-pose dataset of hands on black")
    p.add_argument(
        "backgrounds", type=Path, nargs="+", help="teacher_label.py outputs whose photos give backgrounds"
    )
    p.add_argument("dest", type=Path, help="output folder (a YOLO-pose dataset)")
    p.add_argument("--copies", type=int, default=1, help="composites per hand photo [1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--background-split", default="train", help="split of the background photos to use [train]"
    )
    args = p.parse_args(argv)
    if args.copies < 1:
        raise HandposeError(f"--copies {args.copies}: must be >= 1")
    hands = Path(os.path.abspath(args.hands))
    folders, _ = find_folders(hands, resplit=False)
    backgrounds = [b for folder in args.backgrounds for b in read_backgrounds(folder, args.background_split)]
    check_output_dir(args.dest, "DEST")
    dest = Path(os.path.abspath(args.dest))
    if dest == hands or hands in dest.parents or dest in hands.parents:
        raise HandposeError(f"DEST {args.dest} and HANDS {args.hands} overlap")
    dest.mkdir(parents=True, exist_ok=True)
    log = []
    index = 0
    for folder in folders:
        split = folder.split or "train"
        for image in list_images(folder.images):
            label = label_path(Path(image))
            if not label.is_file():
                continue
            rel = os.path.relpath(image, folder.images).replace(os.sep, "/")
            with Image.open(image) as im:
                rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            alpha = hand_mask(rgb)
            for k in range(args.copies):
                rng = np.random.default_rng([args.seed, index, k])
                bg, where = draw_background(backgrounds, (rgb.shape[1], rgb.shape[0]), rng)
                name = f"{rel.rsplit('.', 1)[0]}_bg{k}"
                buf = io.BytesIO()
                Image.fromarray(composite(rgb, alpha, bg)).save(buf, format="JPEG", quality=QUALITY)
                out_image = inside(dest, dest / split / "images" / f"{name}.jpg")
                out_label = inside(dest, dest / split / "labels" / f"{name}.txt")
                out_image.parent.mkdir(parents=True, exist_ok=True)
                out_label.parent.mkdir(parents=True, exist_ok=True)
                write_bytes(out_image, buf.getvalue())
                write_bytes(out_label, label.read_bytes())
                log.append({"image": f"{split}/images/{name}.jpg", "hand": image, **where})
            index += 1
    summary = {
        "hands": str(hands),
        "backgrounds": [str(b) for b in args.backgrounds],
        "seed": args.seed,
        "photos": log,
    }
    write_json(dest / "composite.json", summary)
    yaml = ["path: .", *[f"{s}: {s}/images" for s in ("train", "val", "test") if (dest / s).is_dir()]]
    write_bytes(
        dest / "dataset.yaml", ("\n".join([*yaml, "kpt_shape: [21, 3]", "names:", "  0: hand", ""])).encode()
    )
    print(f"{len(log)} composites of {index} hand photos on {len(backgrounds)} background photos: {dest}")
    return summary


def main() -> None:
    try:
        run()
    except HandposeError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

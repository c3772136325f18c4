"""A contact sheet of random labelled hands of a YOLO-pose dataset, to look at labels by eye.

    .venv/bin/python tools/label_sheet.py DATASET OUT.png [--n 48] [--seed 0] [--pad 1.5]

Reads DATASET (a YOLO-pose root or dataset yaml) with the reader `handpose pack` uses, draws `n`
hands chosen at random (seeded): each tile is the hand's box made square, padded by --pad, with
its skeleton, box and the photo's name. Unlike `handpose inspect` (the first samples of a pack,
whole photos) it samples the whole dataset and shows the hand large enough to judge a finger.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handpose.atomic import check_output_file, write_bytes  # noqa: E402
from handpose.errors import HandposeError  # noqa: E402
from handpose.geometry import apply_affine, box_region, crop_matrix  # noqa: E402
from handpose.imageio import image_size, warp_to_input  # noqa: E402
from handpose.inspector import BOX_COLOR, CELL, draw_skeleton  # noqa: E402
from handpose.sources.yolo import read_yolo  # noqa: E402


def sheet(dataset: Path, n: int, seed: int, pad: float) -> tuple[Image.Image, int]:
    """The contact sheet and the number of hands it was drawn from."""
    records = read_yolo(dataset).records
    if not records:
        raise HandposeError(f"{dataset}: no labelled hands")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(records), size=min(n, len(records)), replace=False))
    cols = math.ceil(math.sqrt(len(pick) * 4 / 3))
    rows = math.ceil(len(pick) / cols)
    out = Image.new("RGB", (cols * CELL, rows * CELL))
    for k, i in enumerate(pick):
        r = records[i]
        data = r.path.read_bytes()
        uv, box = r.in_pixels(*image_size(data))
        M = crop_matrix(box_region(box, pad), CELL)
        tile = Image.fromarray(warp_to_input(data, M, CELL))
        draw = ImageDraw.Draw(tile)
        corners = apply_affine(M, box.reshape(2, 2)) - 0.5
        draw.rectangle([tuple(corners[0]), tuple(corners[1])], outline=BOX_COLOR, width=1)
        draw_skeleton(draw, apply_affine(M, uv), r.visibility > 0)
        draw.text(
            (3, 2),
            r.file.rsplit("/", 1)[-1][-28:],
            fill=(255, 255, 255),
            stroke_width=1,
            stroke_fill=(0, 0, 0),
        )
        out.paste(tile, ((k % cols) * CELL, (k // cols) * CELL))
    return out, len(records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pad", type=float, default=1.5, help="tile side / box side [1.5]")
    args = p.parse_args()
    try:
        check_output_file(args.png, "OUT.png")
        image, total = sheet(args.dataset, args.n, args.seed, args.pad)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        write_bytes(args.png, buf.getvalue())
    except HandposeError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    print(f"{min(args.n, total)} of {total} hands drawn: {args.png}")


if __name__ == "__main__":
    main()

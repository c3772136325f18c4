"""Generated YOLO-pose datasets for the reader and pack tests: JPEGs of several sizes (one with an
EXIF rotation), label files with several hands per image, unlabelled joints, background images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simplejpeg


def jpeg(width: int, height: int, seed: int, orientation: int | None = None) -> bytes:
    """A smooth random-colour JPEG (stored width x height); with `orientation`, an EXIF APP1
    segment that makes viewers display it rotated (5-8 swap width and height)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
    img = np.ascontiguousarray(np.repeat(np.repeat(small, 16, 0), 16, 1)[:height, :width])
    data = simplejpeg.encode_jpeg(img, quality=90, colorsubsampling="444")
    if orientation is None:
        return data
    le = "little"
    ifd = (1).to_bytes(2, le) + (0x0112).to_bytes(2, le) + (3).to_bytes(2, le) + (1).to_bytes(4, le)
    tiff = b"II*\0" + (8).to_bytes(4, le) + ifd + orientation.to_bytes(2, le) + b"\0\0" + bytes(4)
    payload = b"Exif\0\0" + tiff
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def hand_line(rng: np.random.Generator, *, dims: int = 3, cls: int = 0, hidden: tuple[int, ...] = ()) -> str:
    """One label line: a box inside the image and 21 keypoints inside the box; joints in `hidden`
    are not labelled (v = 0 and coordinates 0 with dims 3; negative coordinates with dims 2)."""
    w, h = rng.uniform(0.1, 0.5, 2)
    cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
    uv = rng.uniform([cx - w / 2, cy - h / 2], [cx + w / 2, cy + h / 2], size=(21, 2))
    fields = [str(cls), *(f"{v:.6f}" for v in (cx, cy, w, h))]
    for j, (x, y) in enumerate(uv):
        if dims == 3:
            fields += (
                ["0", "0", "0"] if j in hidden else [f"{x:.6f}", f"{y:.6f}", str(int(rng.integers(1, 3)))]
            )
        else:
            fields += ["-1", "-1"] if j in hidden else [f"{x:.6f}", f"{y:.6f}"]
    return " ".join(fields)


@dataclass
class Img:
    """One image of a generated dataset: its JPEG size, EXIF orientation and label lines
    (None: no label file at all; []: an empty one)."""

    name: str
    width: int
    height: int
    lines: list[str] | None
    orientation: int | None = None
    seed: int = 0


@dataclass
class Spec:
    splits: dict[str | None, list[Img]] = field(default_factory=dict)  # None: one folder


def default_spec(seed: int = 0, dims: int = 3) -> Spec:
    """train: 7 images (1-3 hands, unlabelled joints, an EXIF-rotated one, a background image
    without a label file, one with an empty label file); val: 3 images; several JPEG sizes."""
    rng = np.random.default_rng(seed)

    def lines(n: int, hidden: tuple[int, ...] = ()) -> list[str]:
        return [hand_line(rng, dims=dims, cls=k % 2, hidden=hidden) for k in range(n)]

    return Spec(
        {
            "train": [
                Img("a", 320, 240, lines(1), seed=1),
                Img("b", 200, 300, lines(3, hidden=(4, 20)), seed=2),
                Img("c", 640, 480, lines(2), seed=3),
                Img("d", 320, 240, lines(2, hidden=(0,)), orientation=6, seed=4),
                Img("e", 256, 256, None, seed=5),  # background: no label file
                Img("f", 256, 256, [], seed=6),  # background: an empty label file
                Img("sub/g", 300, 200, lines(1), seed=7),  # a subfolder
            ],
            "val": [
                Img("h", 224, 224, lines(2), seed=8),
                Img("i", 400, 300, lines(1, hidden=(7, 8, 9)), seed=9),
                Img("j", 180, 240, lines(3), seed=10),
            ],
        }
    )


def folders(root: Path, split: str | None, layout: str) -> tuple[Path, Path]:
    """(images folder, labels folder) of a split in a layout."""
    if split is None:
        return root / "images", root / "labels"
    if layout == "{split}/images":
        return root / split / "images", root / split / "labels"
    return root / "images" / split, root / "labels" / split


def write_dataset(root: Path, spec: Spec, layout: str = "{split}/images") -> Path:
    """Write `spec` under `root` in `layout` ('{split}/images', 'images/{split}'; one folder
    (split None) is always SRC/images + SRC/labels)."""
    for split, imgs in spec.splits.items():
        img_dir, lbl_dir = folders(root, split, layout)
        for im in imgs:
            path = img_dir / f"{im.name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(im.width, im.height, im.seed, im.orientation))
            if im.lines is not None:
                label = lbl_dir / f"{im.name}.txt"
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text("".join(line + "\n" for line in im.lines))
    return root


def displayed_size(im: Img) -> tuple[int, int]:
    return (im.height, im.width) if im.orientation in (5, 6, 7, 8) else (im.width, im.height)


def parse(line: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A label line -> (box cx, cy, w, h; uv (21, 2); visibility (21,)) as written."""
    v = np.array([float(f) for f in line.split()])
    kp = v[5:].reshape(21, -1)
    vis = kp[:, 2] if kp.shape[1] == 3 else np.where((kp[:, :2] < 0).any(1), 0, 1)
    return v[1:5], kp[:, :2], vis.astype(np.uint8)

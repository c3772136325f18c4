"""Tiny hand-made shard folders for the loader tests (dot images, planted members, corrupt JPEGs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import simplejpeg

from handpose.config import AugmentConfig
from handpose.geometry import keypoints_box
from handpose.shards import (
    BLOCK_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    ShardWriter,
    index_name,
    sample_key,
    sample_members,
    sha256_blocks,
    sha256_file,
    shard_name,
)

MEAN = (0.5, 0.45, 0.4)
STD = (0.25, 0.2, 0.3)
GEOMETRY_ONLY = AugmentConfig(
    rotate_deg=60, scale_min=0.8, scale_max=1.25, translate=0.1, flip=True,
    brightness=0.0, contrast=0.0, saturation=0.0, hue_deg=0.0,
)  # fmt: skip

# the augmentations for photos of other sources, geometry only: full circle, aspect, perspective
OTHER_GEOMETRY = AugmentConfig(
    rotate_deg=180, scale_min=0.8, scale_max=1.25, translate=0.1, flip=True, aspect=0.3, perspective_deg=40,
    brightness=0.0, contrast=0.0, saturation=0.0, hue_deg=0.0,
)  # fmt: skip

Sample = tuple[int, bytes, np.ndarray, dict[str, bytes]]  # sid, jpeg, uv (21, 2), extra members
# extra members are added after the format's own, or replace them ("vis.u8", "box.f32", ...);
# without them visibility is all 1 and the box is the keypoints' extent grown by 1 px.


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorsubsampling="444")


def dot_sample(sid: int, rng: np.random.Generator, w: int = 224, h: int = 224) -> Sample:
    """Black image with one 5x5 white dot centred on joint 0 (a pixel centre); the rest random."""
    uv = rng.uniform(0, [w, h], size=(21, 2))
    cx, cy = int(rng.integers(w // 2 - 20, w // 2 + 20)), int(rng.integers(h // 2 - 20, h // 2 + 20))
    uv[0] = (cx + 0.5, cy + 0.5)  # centre of pixel (cx, cy) in the pixel-centre convention
    img = np.zeros((h, w, 3), np.uint8)
    img[cy - 2 : cy + 3, cx - 2 : cx + 3] = 255
    return sid, jpeg(img, 100), uv, {}


def texture_sample(sid: int, rng: np.random.Generator, w: int = 224, h: int = 224) -> Sample:
    """Smooth random colours (JPEG-friendly) with random keypoints."""
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
    img = np.repeat(np.repeat(small, 16, 0), 16, 1)[:h, :w]
    return sid, jpeg(img), rng.uniform(0, [w, h], size=(21, 2)), {}


def box_dot_sample(sid: int, rng: np.random.Generator, w: int, h: int, box_side: float) -> Sample:
    """A dark image with a bright dot on joint 0 inside an off-centre hand box of about
    `box_side` px (the box member); the dot's size grows with the box so it survives shrinking."""
    r = max(2, round(box_side / 40))
    side = box_side * rng.uniform(0.8, 1.2, 2)
    x0 = rng.uniform(0, w - side[0])
    y0 = rng.uniform(0, h - side[1])
    cx = int(x0 + side[0] * rng.uniform(0.3, 0.7))
    cy = int(y0 + side[1] * rng.uniform(0.3, 0.7))
    img = np.full((h, w, 3), 20, np.uint8)
    img[cy - r : cy + r + 1, cx - r : cx + r + 1] = 255
    uv = np.column_stack([rng.uniform(x0, x0 + side[0], 21), rng.uniform(y0, y0 + side[1], 21)])
    uv[0] = (cx + 0.5, cy + 0.5)
    box = np.array([x0, y0, x0 + side[0], y0 + side[1]])
    return sid, jpeg(img, 100), uv, {"box.f32": box.astype("<f4").tobytes()}


def photo_samples(
    first_sid: int, rng: np.random.Generator, hands: int, w: int = 320, h: int = 240, side: int = 60
) -> list[Sample]:
    """One photo with `hands` non-overlapping bright (255) hand boxes on a dark (30) ground, as
    pack stores it: one sample per hand, consecutive, every one with the same image bytes."""
    img = np.full((h, w, 3), 30, np.uint8)
    boxes: list[np.ndarray] = []
    while len(boxes) < hands:
        x0, y0 = float(rng.integers(0, w - side)), float(rng.integers(0, h - side))  # whole pixels
        box = np.array([x0, y0, x0 + side, y0 + side])
        if all(
            min(box[2], b[2]) <= max(box[0], b[0]) or min(box[3], b[3]) <= max(box[1], b[1]) for b in boxes
        ):
            boxes.append(box)
    for b in boxes:
        img[int(b[1]) : int(b[3]), int(b[0]) : int(b[2])] = 255
    data = jpeg(img, 100)
    out = []
    for i, b in enumerate(boxes):
        uv = np.column_stack([rng.uniform(b[0], b[2], 21), rng.uniform(b[1], b[3], 21)])
        out.append((first_sid + i, data, uv, {"box.f32": b.astype("<f4").tobytes()}))
    return out


def write_pack(
    root: Path,
    splits: dict[str, Sequence[Sequence[Sample]]],
    *,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    block_bytes: int = BLOCK_BYTES,
) -> Path:
    """Write {split: [shard samples, ...]} with ShardWriter plus a minimal manifest.json (v3: with
    index digests and a sha256 per `block_bytes` of each tar)."""
    root.mkdir(parents=True, exist_ok=True)
    entries, counts = [], {}
    for split, shards in splits.items():
        counts[split] = sum(len(s) for s in shards)
        for i, samples in enumerate(shards):
            name = shard_name(split, i)
            writer = ShardWriter(root / name, root / index_name(name))
            for sid, jpg, uv, extra in samples:
                key = sample_key(sid)
                vis = np.ones(21, np.uint8)
                members = {
                    **sample_members(
                        jpg, {"key": key, "sid": sid}, uv, vis, keypoints_box(uv) + [-1, -1, 1, 1], sid
                    ),
                    **extra,
                }
                writer.write(key, members)
            writer.close()
            sha256, blocks = sha256_blocks(root / name, block_bytes)
            entries.append(
                {
                    "name": name,
                    "index": index_name(name),
                    "split": split,
                    "samples": len(samples),
                    "bytes": (root / name).stat().st_size,
                    "sha256": sha256,
                    "index_bytes": (root / index_name(name)).stat().st_size,
                    "index_sha256": sha256_file(root / index_name(name)),
                    "block_bytes": block_bytes,
                    "block_sha256": blocks,
                }
            )
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "shards": entries,
        "counts": counts,
        "stats": {"mean": list(mean), "std": list(std), "pixels": 1},
        "mean_pose": {"image": [[0.5, 0.5]] * 21, "box": [[0.0, 0.0]] * 21, "labelled": [1] * 21},
    }
    (root / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return root


def chunk(samples: Sequence[Sample], sizes: Sequence[int]) -> list[list[Sample]]:
    """Split samples into consecutive shards of the given sizes."""
    out, start = [], 0
    for n in sizes:
        out.append(list(samples[start : start + n]))
        start += n
    assert start == len(samples)
    return out


def dots_pack(root: Path) -> Path:
    """The dot images both loader test modules use: train 24 in 3 shards, val 13 in 3 uneven ones."""
    rng = np.random.default_rng(0)
    samples = [dot_sample(i, rng) for i in range(37)]
    return write_pack(root, {"train": chunk(samples[:24], [8, 8, 8]), "val": chunk(samples[24:], [5, 5, 3])})


def dot_centroid(image: np.ndarray, floor: float = 40.0) -> np.ndarray:
    """Intensity-weighted centroid (x, y) of a bright dot in a (3, H, W) [0, 255] image, in the
    pixel-centre convention (pixel i has centre i + 0.5); JPEG noise below `floor` is ignored."""
    w = np.clip(np.asarray(image, np.float64).mean(axis=0) - floor, 0, None)
    ys, xs = np.indices(w.shape)
    return np.array([(w * (xs + 0.5)).sum(), (w * (ys + 0.5)).sum()]) / w.sum()


def overwrite_member(root: Path, shard: str, sample: int, ext: str, at: int, data: bytes) -> bytes:
    """Overwrite bytes `at..at+len(data)` of one member of sample `sample` of `shard` in place
    (the shard keeps its size: only its sha256 can tell); returns the bytes that were there."""
    from handpose.shards import read_index

    offset, size = read_index(root / index_name(shard))[sample][1][ext]
    assert at + len(data) <= size
    with open(root / shard, "r+b") as f:
        f.seek(offset + at)
        old = f.read(len(data))
        assert old != data
        f.seek(offset + at)
        f.write(data)
    return old


def hand_dots_photo(
    sid: int, rng: np.random.Generator, n_hands: int, w: int = 160, h: int = 120, r: int = 4
) -> list[Sample]:
    """One dark photo with `n_hands` hand boxes of 44-56 px side in separate vertical strips and a
    bright (2r+1)^2 dot at each box's top-left corner and at its keypoint 0 (the box's centre),
    every dot centred on a pixel centre: one sample per hand, all with the photo's bytes."""
    img = np.full((h, w, 3), 20, np.uint8)
    hands = []
    strip = w / n_hands
    for k in range(n_hands):
        side = rng.uniform(44, 56, 2)
        cx0 = int(k * strip + rng.uniform(r + 1, strip - side[0] - r - 1))
        cy0 = int(rng.uniform(r + 1, h - side[1] - r - 1))
        box = np.array([cx0 + 0.5, cy0 + 0.5, cx0 + 0.5 + side[0], cy0 + 0.5 + side[1]])
        kx, ky = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
        uv = np.column_stack([rng.uniform(box[0], box[2], 21), rng.uniform(box[1], box[3], 21)])
        uv[0] = (kx + 0.5, ky + 0.5)
        for x, y in ((cx0, cy0), (kx, ky)):
            img[y - r : y + r + 1, x - r : x + r + 1] = 255
        hands.append((uv, box))
    data = jpeg(img, 100)
    return [
        (sid + k, data, uv, {"box.f32": box.astype("<f4").tobytes()}) for k, (uv, box) in enumerate(hands)
    ]


def hand_dots_pack(root: Path, photos: int = 24, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """Photos of 1-2 hands (`hand_dots_photo`): train 2 shards, val 3 shards cut so that some
    shard boundaries fall between photos only (as pack cuts them); returns the pack and the
    number of hands of each val photo by its key."""
    rng = np.random.default_rng(seed)
    groups, sid = [], 0
    for i in range(photos):
        n = 1 + (i % 3 == 1)
        groups.append(hand_dots_photo(sid, rng, n))
        sid += n
    half = len(groups) // 2
    train, val = groups[:half], groups[half:]
    third = len(val) // 3
    val_shards = [
        [s for g in val[a:b] for s in g] for a, b in ((0, third), (third, 2 * third), (2 * third, None))
    ]
    train_shards = [[s for g in train[: half // 2] for s in g], [s for g in train[half // 2 :] for s in g]]
    write_pack(root, {"train": train_shards, "val": val_shards})
    return root, {sample_key(g[0][0]): len(g) for g in val}

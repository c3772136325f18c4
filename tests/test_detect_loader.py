"""Detection items in both loader kinds: photos with all their hands, exactly once; mosaics and
small photos keep boxes and keypoints on their pixels (dot tests); both kinds agree."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from shardkit import dot_centroid, hand_dots_pack

from handpose.augment import AugmentParams, params_matrix
from handpose.config import AugmentConfig, LayoutConfig
from handpose.detect_data import (
    MAX_HANDS,
    MIN_VISIBLE,
    PHOTO_HANDS,
    TILES,
    empty_labels,
    item_labels,
    sample_layout,
    tile_matrices,
)
from handpose.errors import HandposeError
from handpose.geometry import canvas_region, compose, fit_matrix, place_matrix
from handpose.loader import denormalise, make_loader
from handpose.shards import read_manifest

SIZE = 160
HAVE_DALI = (
    importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
)
KINDS = [
    "wds",
    pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed")),
]
LAYOUT = LayoutConfig(
    mosaic=0.6,
    mosaic_centre=0.4,
    mosaic_scale_min=0.8,
    canvas=0.3,
    canvas_scale_min=0.5,
    canvas_scale_max=0.8,
)
NO_ROTATION = AugmentConfig(
    rotate_deg=0.0, scale_min=0.9, scale_max=1.1, translate=0.05, flip=True,
    brightness=0.0, contrast=0.0, saturation=0.0, hue_deg=0.0,
)  # fmt: skip
ROTATION = AugmentConfig(
    rotate_deg=40.0, scale_min=0.9, scale_max=1.1, translate=0.05, flip=True,
    brightness=0.0, contrast=0.0, saturation=0.0, hue_deg=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def dots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    return hand_dots_pack(tmp_path_factory.mktemp("handdots"))


def _loader(root: Path, split: str, kind: str, **kw: object):
    workers = kw.pop("workers", 1 if kind == "dali" else 0)
    return make_loader(
        root, split, kind=kind, task="detect", image_size=SIZE, batch_size=4, workers=workers, **kw
    )


def _window_centroid(image: np.ndarray, at: np.ndarray, radius: int = 4) -> np.ndarray | None:
    """The dot centroid within `radius` px of `at` (x, y) in a (3, H, W) [0, 255] image; None when
    the window leaves the frame or holds no dot."""
    x, y = int(at[0]), int(at[1])
    h, w = image.shape[1:]
    if not (radius <= x < w - radius and radius <= y < h - radius):
        return None
    crop = image[:, y - radius : y + radius + 1, x - radius : x + radius + 1]
    if (crop.mean(axis=0) - 40).clip(0).sum() < 20:
        return None
    return dot_centroid(crop) + (x - radius, y - radius)


def _hands(batch: dict, manifest) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    images = denormalise(batch["image"], manifest).numpy()
    return [
        (
            images[i],
            batch["boxes"][i].numpy(),
            batch["hands"][i].numpy(),
            batch["uv"][i].numpy(),
            batch["visible"][i].numpy(),
        )
        for i in range(len(images))
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_mosaic_dots_land_on_moved_keypoints_and_box_corners(dots, kind: str) -> None:
    """No rotation (flip, zoom, shift, mosaics, small photos): the dot drawn at each hand's
    keypoint 0 lands within 1 px of the moved keypoint, and the dot drawn at its box's top-left
    corner lands within 1 px of one corner of the moved box (top-left, or top-right when flipped)."""
    root, _ = dots
    manifest = read_manifest(root)
    loader = _loader(root, "train", kind, augment=NO_ROTATION, layout=LAYOUT, seed=4)
    keypoints = corners = mosaics = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            mosaics += sum("+" in k for k in batch["key"])
            for image, boxes, hands, uv, visible in _hands(batch, manifest):
                for k in np.flatnonzero(hands):
                    if visible[k, 0] and (c := _window_centroid(image, uv[k, 0])) is not None:
                        np.testing.assert_allclose(c, uv[k, 0], atol=1.0)
                        keypoints += 1
                    x0, y0, x1, y1 = boxes[k]
                    if min(x0, y0) < 5 or max(x1, y1) > SIZE - 5:
                        continue  # the box was cut by the frame: its corner is not a corner any more
                    found = [
                        c
                        for corner in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))
                        if (c := _window_centroid(image, np.array(corner))) is not None
                        and np.abs(c - corner).max() <= 1.0
                    ]
                    assert len(found) == 1, (boxes[k], found)
                    corners += 1
    assert keypoints >= 20 and corners >= 20 and mosaics >= 3


@pytest.mark.parametrize("kind", KINDS)
def test_rotated_mosaic_dots_land_on_moved_keypoints(dots, kind: str) -> None:
    root, _ = dots
    manifest = read_manifest(root)
    loader = _loader(root, "train", kind, augment=ROTATION, layout=LAYOUT, seed=7)
    checked = 0
    for batch in loader:
        for image, _, hands, uv, visible in _hands(batch, manifest):
            for k in np.flatnonzero(hands & visible[:, 0]):
                if (c := _window_centroid(image, uv[k, 0])) is not None:
                    np.testing.assert_allclose(c, uv[k, 0], atol=1.0)
                    checked += 1
    assert checked >= 10


@pytest.mark.parametrize("kind", KINDS)
def test_val_reads_every_photo_once_with_all_its_hands(dots, kind: str) -> None:
    """Plain letterboxed photos: the boxes are the labelled boxes moved by the letterbox."""
    root, hands_of = dots
    seen: dict[str, int] = {}
    for batch in _loader(root, "val", kind):
        assert batch["image"].shape[1:] == (3, SIZE, SIZE)
        assert batch["boxes"].shape[1:] == (MAX_HANDS, 4) and batch["uv"].shape[1:] == (MAX_HANDS, 21, 2)
        for key, hands in zip(batch["key"], batch["hands"].numpy(), strict=True):
            assert key not in seen
            seen[key] = int(hands.sum())
    assert seen == hands_of


@pytest.mark.parametrize("world", [2, 3])
def test_val_photos_exactly_once_across_ranks_and_workers(dots, world: int) -> None:
    """Runs of sample positions cut photos apart; each photo belongs to the slot of its first hand."""
    root, hands_of = dots
    seen: list[tuple[str, int]] = []
    for rank in range(world):
        loader = _loader(root, "val", "wds", rank=rank, world_size=world, workers=2 if rank == 0 else 0)
        for batch in loader:
            seen += list(zip(batch["key"], batch["hands"].sum(1).tolist(), strict=True))
    assert sorted(seen) == sorted(hands_of.items())


def test_both_kinds_agree_on_items_and_labels(dots) -> None:
    """The same seed without augmentation: the same photos laid out the same way, boxes and
    keypoints equal to 1e-3 px, pixels within the resampling filters' difference."""
    pytest.importorskip("nvidia.dali")
    root, _ = dots
    manifest = read_manifest(root)
    wds = list(_loader(root, "train", "wds", layout=LAYOUT, seed=11))
    dali = list(_loader(root, "train", "dali", layout=LAYOUT, seed=11))
    assert len(wds) == len(dali) > 0
    for a, b in zip(wds, dali, strict=True):
        assert a["key"] == b["key"]
        for k in ("hands", "visible"):
            assert torch.equal(a[k], b[k])
        for k in ("boxes", "uv"):
            np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-3)
        diff = np.abs(denormalise(a["image"], manifest).numpy() - denormalise(b["image"], manifest).numpy())
        assert diff.mean() < 1.0 and np.percentile(diff, 99) < 12.0


def test_in_graph_tile_matrix_equals_tile_matrices() -> None:
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    from handpose import dali_detect as DD

    rows = np.array(
        [
            [320, 240, 10.0, 20.0, 70.0, 25.0, 1.1, 0.05, -0.1, 1.0],
            [200, 300, 0.0, 0.0, 160.0, -30.0, 0.8, -0.02, 0.08, 0.0],
            [640, 480, 90.0, 60.0, 40.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        ],
        np.float32,
    )

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: list(rows), batch=True)
        p = {"angle": x[5], "scale": x[6], "tx": x[7], "ty": x[8], "flip": x[9]}
        return DD.tile_matrix(x[0], x[1], fn.stack(x[2], x[3], x[4]), SIZE, p)

    p = pipe()
    p.build()
    (mt,) = p.run()
    for i, (w, h, x0, y0, side, angle, scale, tx, ty, flip) in enumerate(rows.tolist()):
        params = AugmentParams(angle_deg=angle, scale=scale, shift=(tx, ty), flip=bool(flip))
        (ref,) = tile_matrices([(int(w), int(h))], [(x0, y0, side)], params, SIZE)
        np.testing.assert_allclose(np.asarray(mt[i]), ref, rtol=1e-5, atol=1e-3)


def test_tile_matrix_of_a_plain_item_is_the_letterbox_and_its_augmentation() -> None:
    p = AugmentParams(angle_deg=20.0, scale=1.1, shift=(0.1, -0.05), flip=True)
    (plain,) = tile_matrices([(300, 200)], [(0.0, 0.0, float(SIZE))], p, SIZE)
    from handpose.geometry import image_region

    np.testing.assert_allclose(plain, params_matrix(p, image_region(300, 200), SIZE), atol=1e-9)
    np.testing.assert_allclose(place_matrix(300, 200, (0.0, 0.0, 64.0)), fit_matrix(300, 200, 64), atol=1e-12)
    np.testing.assert_allclose(
        compose(params_matrix(AugmentParams(), canvas_region(SIZE), SIZE)), np.eye(3)[:2]
    )


def test_layouts_stay_on_the_canvas_and_never_overlap() -> None:
    rng = np.random.default_rng(0)
    counts = {1: 0, 4: 0}
    small = 0
    for _ in range(300):
        squares = sample_layout(LayoutConfig(mosaic=0.5, canvas=0.3), SIZE, rng)
        counts[len(squares)] += 1
        small += len(squares) == 1 and squares[0][2] < SIZE
        for x0, y0, side in squares:
            assert 0 <= x0 and 0 <= y0 and x0 + side <= SIZE + 1e-9 and y0 + side <= SIZE + 1e-9 and side > 0
        for (ax, ay, a), (bx, by, b) in itertools.combinations(squares, 2):
            assert ax + a <= bx + 1e-9 or bx + b <= ax + 1e-9 or ay + a <= by + 1e-9 or by + b <= ay + 1e-9
    assert 120 <= counts[4] <= 180 and 60 <= small <= 120  # about half mosaics, 30% small photos
    assert sample_layout(None, SIZE, rng) == [(0.0, 0.0, float(SIZE))]


def test_frame_rule_keeps_hands_mostly_inside() -> None:
    """A box half inside stays (clipped); one with a quarter inside goes; a 1 px sliver goes."""
    labels = empty_labels()
    boxes = np.array([[-50.0, 10, 50, 60], [-75.0, 10, 25, 60], [10.0, 10, 11.5, 40], [20.0, 20, 60, 60]])
    labels["boxes"][0, :4] = boxes
    labels["present"][0, :3] = True  # the fourth is padding
    labels["uv"][0, :4, 0] = [[-10.0, 20], [10.0, 20], [10.5, 20], [30.0, 30]]
    labels["labelled"][0, :4] = True
    out = item_labels(labels["boxes"], labels["uv"], labels["present"], labels["labelled"], 100)
    assert out["hands"].shape == (TILES * PHOTO_HANDS,) and MIN_VISIBLE == 0.4
    assert out["hands"][:4].tolist() == [True, False, False, False]
    np.testing.assert_allclose(out["boxes"][0], [0, 10, 50, 60])
    assert out["visible"][0, 0] == False and out["visible"][0, 1] == True  # noqa: E712 (numpy bools)
    assert not out["visible"][1:].any()


def test_detect_task_refuses_box_crops(dots) -> None:
    root, _ = dots
    with pytest.raises(HandposeError, match="crop must be 'image'"):
        make_loader(root, "val", task="detect", crop="box", batch_size=2, workers=0)
    with pytest.raises(HandposeError, match="task"):
        make_loader(root, "val", task="segment", batch_size=2, workers=0)
    for augment in (AugmentConfig(aspect=0.2), AugmentConfig(perspective_deg=10.0)):
        with pytest.raises(HandposeError, match="not for a detector"):
            make_loader(root, "train", task="detect", augment=augment, batch_size=2, workers=0)
    with pytest.raises(HandposeError, match="negatives"):
        make_loader(root, "train", task="detect", negatives=0.2, batch_size=2, workers=0)
    with pytest.raises(TypeError):
        len(make_loader(root, "val", task="detect", batch_size=2, workers=0))


def test_packed_yolo_photos_come_back_whole(tmp_path: Path) -> None:
    """`handpose pack` of a YOLO set with 2, 1 and 3 hands per val photo: one item per photo with
    all its hands, their boxes the labelled boxes letterboxed into the input."""
    import yolokit

    from handpose.geometry import move_boxes
    from handpose.pack import pack

    spec = yolokit.default_spec()
    data = yolokit.write_dataset(tmp_path / "ds", spec)
    pack(data, tmp_path / "shards", fmt="yolo", workers=1)
    items = {}
    for batch in make_loader(
        tmp_path / "shards", "val", task="detect", image_size=64, batch_size=2, workers=0
    ):
        for key, boxes, hands in zip(
            batch["key"], batch["boxes"].numpy(), batch["hands"].numpy(), strict=True
        ):
            items[key] = boxes[hands]
    assert sorted(len(b) for b in items.values()) == [1, 2, 3]
    for im in spec.splits["val"]:
        w, h = yolokit.displayed_size(im)
        want = []
        for line in im.lines or []:
            (cx, cy, bw, bh), _, _ = yolokit.parse(line)
            want.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
        want = move_boxes(fit_matrix(w, h, 64), np.array(want))
        got = next(b for b in items.values() if len(b) == len(want))
        np.testing.assert_allclose(np.sort(got, axis=0), np.sort(want, axis=0), atol=1e-3)


def test_same_photo_by_source_else_by_bytes() -> None:
    from handpose.shards import same_photo

    a = {"jpg": b"x", "json": b'{"source": "a.jpg"}'}
    assert same_photo(a, {"jpg": b"x", "json": b'{"source": "a.jpg"}'})
    assert not same_photo(a, {"jpg": b"x", "json": b'{"source": "b.jpg"}'})  # a duplicate photo
    assert same_photo({"jpg": b"x"}, {"jpg": b"x"}) and not same_photo({"jpg": b"x"}, {"jpg": b"y"})
    assert not same_photo({"json": b"{}"}, {"json": b"{}"})  # nothing to tell: never joined

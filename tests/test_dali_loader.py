"""DALI loader (CPU here): same geometry, colour and batches as the WDS kind; exactly-once sharding."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from shardkit import GEOMETRY_ONLY, OTHER_GEOMETRY, box_dot_sample, dot_centroid, dots_pack, write_pack

from handpose import augment as A
from handpose.config import AugmentConfig
from handpose.errors import HandposeError
from handpose.geometry import apply_affine, box_region, crop_matrix, invert, matrix_scale
from handpose.loader import denormalise, make_loader
from handpose.shards import decode_box, read_manifest, read_samples, sample_key

dali = pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def  # noqa: E402

from handpose import dali_loader as D  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def dots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dots_pack(tmp_path_factory.mktemp("dots"))


def _split_keys(root: Path, split: str) -> list[str]:
    keys = set()
    for shard in read_manifest(root).shards(split):
        with tarfile.open(shard) as tar:
            keys |= {name.split(".", 1)[0] for name in tar.getnames()}
    return sorted(keys)


def _by_key(loader, manifest) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = {}
    for b in loader:
        images = denormalise(b["image"], manifest).numpy()
        for k, im, uv, vis in zip(b["key"], images, b["uv"].numpy(), b["visible"].numpy(), strict=True):
            assert k not in out, f"{k} seen twice"
            out[k] = (im, uv, vis)
    return out


def test_in_graph_matrix_equals_geometry_crop_matrix() -> None:
    rows = np.array(
        [[100, 112, 224, 20.0, 1.1, 0.05, -0.1, 1.0], [150, 90, 300, -35.0, 0.8, -0.1, 0.02, 0.0]], np.float32
    )

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: list(rows), batch=True)
        p = {"angle": x[3], "scale": x[4], "tx": x[5], "ty": x[6], "flip": x[7]}
        return D.crop_matrix(x[0], x[1], x[2], 128, p)

    p = pipe()
    p.build()
    (mt,) = p.run()
    for i, (cx, cy, side, angle, scale, tx, ty, flip) in enumerate(rows):
        ref = crop_matrix(
            (float(cx), float(cy), float(side)),
            128,
            angle_deg=float(angle),
            scale=float(scale),
            shift=(float(tx), float(ty)),
            flip=bool(flip),
        )
        np.testing.assert_allclose(np.asarray(mt[i]), ref, rtol=1e-5, atol=1e-4)


def test_colour_jitter_matches_wds_colour_function() -> None:
    """DALI's fn.hsv + fn.brightness_contrast == augment.apply_colour for the same parameters."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    rows = np.array([[1.2, 0.8, 1.2, 10.0], [0.8, 1.2, 0.8, -10.0], [1.0, 1.0, 1.0, 0.0]], np.float32)

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: list(images), layout="HWC", batch=True)
        p = fn.external_source(source=lambda: list(rows), batch=True)
        return D.colour(x, (p[0], p[1], p[2], p[3]))

    p = pipe()
    p.build()
    (out,) = p.run()
    dali_out = np.stack([np.asarray(out[i]) for i in range(3)])
    ours = A.apply_colour(torch.from_numpy(images).permute(0, 3, 1, 2).double(), torch.from_numpy(rows))
    np.testing.assert_allclose(dali_out, ours.permute(0, 2, 3, 1).numpy(), atol=0.01)


def test_parity_with_wds_without_augmentation(packed: Path) -> None:
    """Same keys, uv to 1e-3 px, images within 2 grey levels (un-normalised), same visibility."""
    manifest = read_manifest(packed)
    wds_batches = _by_key(make_loader(packed, "val", batch_size=5, workers=0), manifest)
    dali_batches = _by_key(make_loader(packed, "val", kind="dali", batch_size=5, workers=1), manifest)
    assert sorted(wds_batches) == sorted(dali_batches) == _split_keys(packed, "val")
    for k, (im, uv, vis) in wds_batches.items():
        d_im, d_uv, d_vis = dali_batches[k]
        np.testing.assert_allclose(d_uv, uv, atol=1e-3)
        assert np.abs(d_im - im).max() <= 2.0 + 1e-3, k
        assert (d_vis == vis).all()


def test_dot_lands_on_transformed_keypoint(dots: Path) -> None:
    manifest = read_manifest(dots)
    loader = make_loader(dots, "train", kind="dali", batch_size=8, workers=1, augment=GEOMETRY_ONLY, seed=3)
    checked, angles = 0, set()
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            images = denormalise(batch["image"], manifest).numpy()
            for image, uv in zip(images, batch["uv"].numpy(), strict=True):
                if not ((uv[0] >= 5) & (uv[0] < 123)).all():
                    continue
                np.testing.assert_allclose(dot_centroid(image), uv[0], atol=1.0)
                angles.add(round(float(uv[1, 0]), 3))
                checked += 1
    assert checked >= 60 and len(angles) > 30  # really augmented, not the same warp each time


@pytest.mark.parametrize("batch_size", [2, 3, 4])
def test_two_shard_ids_read_every_key_exactly_once(dots: Path, batch_size: int) -> None:
    """13 val samples over num_shards=2: padded last batches are dropped, nothing duplicated."""
    keys: list[str] = []
    for rank in range(2):
        loader = make_loader(
            dots, "val", kind="dali", batch_size=batch_size, rank=rank, world_size=2, workers=1
        )
        got = [k for b in loader for k in b["key"]]
        assert len(got) == len(set(got))
        keys += got
        again = [k for b in loader for k in b["key"]]  # a second epoch is the same set again
        assert sorted(again) == sorted(got)
    assert sorted(keys) == [sample_key(i) for i in range(24, 37)]


def test_train_batches_equal_across_ranks(packed: Path) -> None:
    lengths = []
    for rank in range(2):
        loader = make_loader(
            packed,
            "train",
            kind="dali",
            batch_size=4,
            rank=rank,
            world_size=2,
            workers=1,
            augment=AugmentConfig(),
        )
        batches = list(loader)
        lengths.append((len(batches), len(loader)))
        b = batches[0]
        assert (
            b["image"].shape == (4, 3, 128, 128)
            and b["uv"].shape == (4, 21, 2)
            and b["visible"].dtype == torch.bool
        )
    assert lengths[0] == lengths[1] and lengths[0][0] == lengths[0][1] > 0


def test_samples_per_epoch_runs_across_reader_epochs(dots: Path) -> None:
    loader = make_loader(dots, "train", kind="dali", batch_size=4, workers=1, samples_per_epoch=40)
    assert len(loader) == 10 and len(list(loader)) == 10


@pytest.mark.slow
def test_torchrun_two_ranks_dali_exactly_once(packed: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(TESTS / "loader_rank_keys.py"), str(packed), "val", str(tmp_path), "dali", "1", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(ranks[0]["keys"] + ranks[1]["keys"]) == _split_keys(packed, "val")


def test_stopping_early_restarts_the_next_pass(packed: Path) -> None:
    """The trainer reads only `val_batches` batches: the next pass must start at the same batch."""
    loader = make_loader(packed, "val", kind="dali", batch_size=4, workers=1)
    first = [b["key"] for b in itertools.islice(loader, 2)]
    loader.set_epoch(1)  # epochs in order would otherwise continue the same DALI pipeline
    again = [b["key"] for b in itertools.islice(loader, 2)]
    assert first == again
    full = [k for b in loader for k in b["key"]]
    assert sorted(full) == _split_keys(packed, "val")


@pytest.mark.parametrize(
    "augment",
    [
        None,
        AugmentConfig(flip=True, blur=0.5, occlude=0.5),
        AugmentConfig(
            rotate_deg=180,
            aspect=0.2,
            perspective_deg=30,
            channel_gain=0.2,
            grayscale=0.2,
            occlude=0.5,
            occlude_patch=0.5,
        ),
    ],
    ids=["plain", "augment", "other-sources"],
)
@pytest.mark.parametrize("crop", ["image", "box"])
def test_gpu_graph_is_valid(dots: Path, augment: AugmentConfig | None, crop: str) -> None:
    """The GPU pipeline ("mixed" decode, GPU warp/colour/normalise) passes DALI's graph checks.

    Without a GPU DALI can still build the graph, then stops at the CUDA check; an invalid graph
    (e.g. a GPU node given as a named argument, which DALI refuses) fails before that. With a GPU
    the pipeline runs and yields a batch.
    """
    paths = [str(p) for p in sorted(dots.glob("train-*.tar"))]
    pipe = D.build_pipeline(
        paths, crop=crop, pad=1.25, batch_size=4, image_size=32, augment=augment, train=True, shard_id=0,
        num_shards=1, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), threads=1, seed=1, device_id=0,
    )  # fmt: skip
    if torch.cuda.is_available():
        pipe.build()
        image, uv, vis, sid = pipe.run()
        assert tuple(image.as_tensor().shape()) == (4, 3, 32, 32) and len(sid) == 4
        return
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pipe.build()


# ------------------------------------------------------------------ box crops, mixed sets


BOX_SHAPES = [(224, 224, 60), (224, 224, 150), (640, 480, 90), (320, 200, 120), (1280, 960, 350)]


@pytest.fixture(scope="module")
def box_dots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Off-centre boxes (sample k has shape k % 5); the crops shrink the photos less than 2x,
    except the last shape (3.4x)."""
    rng = np.random.default_rng(12)
    samples = [box_dot_sample(i, rng, w, h, side) for i, (w, h, side) in enumerate(BOX_SHAPES * 4)]
    return write_pack(tmp_path_factory.mktemp("boxdots"), {"train": [samples], "val": [samples]})


def test_box_crop_parity_with_wds_without_augmentation(box_dots: Path) -> None:
    """Same keys, uv to 1e-3 px and visibility. Images: where the crop shrinks the photo less
    than 2x, within 1.5 grey levels except on the photo's own edge (where a padded box reaches past
    the photo, Pillow extends the edge pixel and DALI blends it with the black fill: one line);
    where it shrinks more, the two antialiasing filters (DCT-domain decode, DALI's resize) differ
    at sharp edges but agree to 0.1 grey levels on average."""
    manifest = read_manifest(box_dots)
    wds = _by_key(make_loader(box_dots, "val", batch_size=5, workers=0, crop="box"), manifest)
    dali = _by_key(make_loader(box_dots, "val", kind="dali", batch_size=5, workers=1, crop="box"), manifest)
    assert sorted(wds) == sorted(dali)
    boxes = {
        s["__key__"]: decode_box(s["box.f32"])
        for t in manifest.shards("val")
        for s in read_samples(t, ["box.f32"])
    }
    centres = np.stack(np.meshgrid(np.arange(128) + 0.5, np.arange(128) + 0.5), -1).reshape(-1, 2)
    for k, (im, uv, vis) in wds.items():
        d_im, d_uv, d_vis = dali[k]
        np.testing.assert_allclose(d_uv, uv, atol=1e-3)
        assert (d_vis == vis).all()
        diff = np.abs(d_im - im).max(axis=0)
        w, h, _ = BOX_SHAPES[int(k) % 5]
        if int(k) % 5 == 4:
            assert diff.mean() <= 0.1, k
            continue
        src = apply_affine(invert(crop_matrix(box_region(boxes[k], 1.25), 128)), centres).reshape(128, 128, 2)
        off_edge = np.maximum(np.abs(src[..., 0] - w / 2) - w / 2, np.abs(src[..., 1] - h / 2) - h / 2)
        assert diff[np.abs(off_edge) > 1.0].max() <= 1.5, k
        assert diff.mean() <= 0.2, k


def test_box_crop_dot_lands_on_transformed_keypoint(box_dots: Path) -> None:
    manifest = read_manifest(box_dots)
    loader = make_loader(
        box_dots, "train", kind="dali", batch_size=5, workers=1, crop="box", augment=GEOMETRY_ONLY, seed=3
    )
    checked = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            images = denormalise(batch["image"], manifest).numpy()
            for image, uv in zip(images, batch["uv"].numpy(), strict=True):
                if not ((uv[0] >= 6) & (uv[0] < 122)).all():
                    continue
                np.testing.assert_allclose(dot_centroid(image), uv[0], atol=1.0)
                checked += 1
    assert checked >= 30


def test_mixed_sets_share_of_every_batch(dots: Path, box_dots: Path) -> None:
    """Two sets with weights 1:1 at batch 4: every batch is 2 + 2, each set with its own crop."""
    loader = make_loader(
        [dots, box_dots], "train", kind="dali", batch_size=4, weights=[1, 1], crop=["image", "box"], workers=1
    )
    assert len(loader) == 24 // 2
    n = 0
    for batch in loader:
        assert sorted(batch["set"].tolist()) == [0, 0, 1, 1]
        n += 1
    assert n == len(loader)


# ------------------------------------------------------------------ augmentations for other sources


def test_in_graph_homography_equals_geometry_crop_matrix() -> None:
    """Aspect and tilt: the (3, 3) node equals geometry.crop_matrix's homography (up to scale), and
    its in-graph largest local scale equals geometry.matrix_scale's."""
    rows = np.array(
        [
            [100, 112, 224, 20.0, 1.1, 0.05, -0.1, 1.0, 1.3, 25.0, 40.0],
            [150, 90, 300, -135.0, 0.8, -0.1, 0.02, 0.0, 0.7, -40.0, 170.0],
            [60, 60, 90, 179.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0],
        ],
        np.float32,
    )

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: list(rows), batch=True)
        p = {"angle": x[3], "scale": x[4], "tx": x[5], "ty": x[6], "flip": x[7], "aspect": x[8]}
        p["tilt"] = (x[9], x[10])
        h = D.crop_matrix(x[0], x[1], x[2], 128, p)
        return h, D.homography_scale(h, 128)

    p = pipe()
    p.build()
    h, scale = p.run()
    for i, (cx, cy, side, angle, zoom, tx, ty, flip, aspect, tilt, axis) in enumerate(rows.tolist()):
        ref = crop_matrix(
            (cx, cy, side), 128, angle_deg=angle, scale=zoom, shift=(tx, ty), flip=bool(flip), aspect=aspect,
            tilt=(tilt, axis),
        )  # fmt: skip
        got = np.asarray(h[i], np.float64)
        np.testing.assert_allclose(got / got[2, 2], ref, rtol=1e-4, atol=1e-5)
        assert float(np.asarray(scale[i])) == pytest.approx(matrix_scale(ref, 128), rel=1e-4)


def test_colour_with_gains_and_grayscale_matches_wds_colour_function() -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    images[0] = 250  # gains above 1 push it past 255 before the clip
    rows = np.array(
        [[1.2, 0.8, 1.2, 10.0, 1.3, 0.9, 0.7], [0.8, 1.2, 0.0, -90.0, 0.7, 1.2, 1.1], [1, 1, 1, 0, 1, 1, 1]],
        np.float32,
    )

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: list(images), layout="HWC", batch=True)
        p = fn.external_source(source=lambda: list(rows), batch=True)
        return D.colour(x, (p[0], p[1], p[2], p[3]), (p[4], p[5], p[6]))

    p = pipe()
    p.build()
    (out,) = p.run()
    dali_out = np.stack([np.asarray(out[i]) for i in range(3)])
    ours = A.apply_colour(torch.from_numpy(images).permute(0, 3, 1, 2).double(), torch.from_numpy(rows))
    np.testing.assert_allclose(dali_out, ours.permute(0, 2, 3, 1).numpy(), atol=0.01)


def test_new_augmentations_have_the_wds_distributions() -> None:
    """The in-graph draws of aspect, tilt, gains, grayscale and the patch coin: the same ranges and
    (to sampling error over 2,000 samples) the same means and spreads as augment.sample_params."""
    cfg = AugmentConfig(
        aspect=0.5, perspective_deg=30, channel_gain=0.2, grayscale=0.3, occlude=1.0, occlude_patch=0.4
    )

    @pipeline_def(batch_size=500, num_threads=1, device_id=None, seed=5)
    def pipe():
        p = D.sample_params(cfg)
        sat_zero = p["colour"][2] == 0.0
        return (
            p["aspect"],
            *p["tilt"],
            *p["gains"],
            sat_zero,
            p["patch"][0],
        )

    pl = pipe()
    pl.build()
    cols = [[] for _ in range(8)]
    for _ in range(4):
        for c, out in zip(cols, pl.run(), strict=True):
            c += [float(np.asarray(out[i])) for i in range(len(out))]
    dali = {
        k: np.array(v)
        for k, v in zip(("aspect", "tilt", "axis", "g0", "g1", "g2", "grey", "patch"), cols, strict=True)
    }
    ps = [A.sample_params(cfg, np.random.default_rng(i)) for i in range(2000)]
    wds = {
        "aspect": np.array([p.aspect for p in ps]),
        "tilt": np.array([p.tilt[0] for p in ps]),  # type: ignore[index]
        "axis": np.array([p.tilt[1] for p in ps]),  # type: ignore[index]
        "g0": np.array([p.gains[0] for p in ps]),
        "g1": np.array([p.gains[1] for p in ps]),
        "g2": np.array([p.gains[2] for p in ps]),
        "grey": np.array([p.saturation == 0 for p in ps], float),
        "patch": np.array([p.occluder_patch is not None for p in ps], float),
    }
    dali["aspect"], wds["aspect"] = np.log(dali["aspect"]), np.log(wds["aspect"])  # log-uniform
    for k, ours in wds.items():
        theirs = dali[k]
        lo, hi = ours.min(), ours.max()
        span = hi - lo
        assert theirs.min() >= lo - 0.02 * span - 1e-9 and theirs.max() <= hi + 0.02 * span + 1e-9, k
        assert abs(theirs.mean() - ours.mean()) < 0.05 * max(span, 1.0), k
        assert abs(theirs.std() - ours.std()) < 0.05 * max(span, 1.0), k


@pytest.mark.parametrize("crop", ["image", "box"])
def test_other_source_geometry_dot_lands_on_transformed_keypoint(
    dots: Path, box_dots: Path, crop: str
) -> None:
    """Full-circle rotation, aspect and perspective (fn.experimental.warp_perspective and the
    projective keypoint transform): the dot is within 1 px of its keypoint."""
    root = dots if crop == "image" else box_dots
    manifest = read_manifest(root)
    loader = make_loader(
        root, "train", kind="dali", batch_size=5, workers=1, crop=crop, augment=OTHER_GEOMETRY, seed=3
    )
    checked = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch["present"].all()
            images = denormalise(batch["image"], manifest).numpy()
            for image, uv in zip(images, batch["uv"].numpy(), strict=True):
                if not ((uv[0] >= 6) & (uv[0] < 122)).all():
                    continue
                np.testing.assert_allclose(dot_centroid(image), uv[0], atol=1.0)
                checked += 1
    assert checked >= 30


def test_colour_and_patch_augmentations_change_only_pixels(box_dots: Path) -> None:
    base = dict(rotate_deg=20, brightness=0, contrast=0, saturation=0, hue_deg=0)
    plain = AugmentConfig(**base)
    heavy = AugmentConfig(**base, channel_gain=0.3, grayscale=0.5, occlude=1.0, occlude_patch=1.0)

    def first(augment: AugmentConfig) -> dict:
        loader = make_loader(
            box_dots, "train", kind="dali", batch_size=5, workers=1, crop="box", augment=augment
        )
        return next(iter(loader))

    a, b = first(plain), first(heavy)
    assert a["key"] == b["key"] and not torch.equal(a["image"], b["image"])
    torch.testing.assert_close(a["uv"], b["uv"])


def test_negatives_are_refused_in_one_line(dots: Path) -> None:
    with pytest.raises(HandposeError, match="negatives need loader = wds") as e:
        make_loader(dots, "train", kind="dali", batch_size=4, negatives=0.3)
    assert "\n" not in str(e.value)

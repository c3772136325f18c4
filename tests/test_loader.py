"""WDS loader: batch format, keypoint-consistent augmentation, exactly-once splits, corrupt data."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from shardkit import (
    GEOMETRY_ONLY,
    MEAN,
    OTHER_GEOMETRY,
    STD,
    box_dot_sample,
    chunk,
    dot_centroid,
    dots_pack,
    jpeg,
    photo_samples,
    texture_sample,
    write_pack,
)

from handpose import augment as A
from handpose.config import AugmentConfig
from handpose.datasets import apportion
from handpose.errors import HandposeError
from handpose.geometry import apply_matrix, boxes_overlap, invert
from handpose.loader import denormalise, make_loader
from handpose.shards import read_manifest, sample_key
from handpose.wds_loader import assign_shards, finish, worker_quotas

TESTS = Path(__file__).resolve().parent
OTHER_GEOMETRY_COLOURLESS = OTHER_GEOMETRY  # geometry only: brightness checks stay exact


@pytest.fixture(scope="module")
def dots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dots_pack(tmp_path_factory.mktemp("dots"))


def _keys(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def _drop_indexes(root: Path, drop: bool) -> Path:
    """Without `.idx` files the shard reader streams the tars instead of reading by offset."""
    if drop:
        for idx in root.glob("*.idx"):
            idx.unlink()
    return root


READERS = pytest.mark.parametrize("no_index", [False, True], ids=["by-index", "tar-stream"])


# ------------------------------------------------------------------ pure pieces


@pytest.mark.parametrize("n_shards", [1, 2, 3, 4, 5, 7, 8, 9])
@pytest.mark.parametrize("slots", [1, 2, 3, 4, 6])
def test_assign_shards_covers_every_sample_exactly_once(n_shards: int, slots: int) -> None:
    counts = [7 + (3 * i) % 5 for i in range(n_shards)]
    plan = assign_shards(counts, slots)
    seen = Counter((t.index, pos) for tasks in plan for t in tasks for pos in range(t.start, t.stop))
    assert sorted(seen) == sorted((i, p) for i in range(n_shards) for p in range(counts[i]))
    assert set(seen.values()) == {1}
    per_slot = [sum(t.count for t in tasks) for tasks in plan]
    assert max(per_slot) - min(per_slot) <= 1  # balanced to one sample


def test_assign_shards_more_slots_than_samples() -> None:
    plan = assign_shards([2, 1], 5)
    assert sorted(len(p) for p in plan) == [0, 0, 1, 1, 1]


def test_worker_quotas_whole_batches() -> None:
    assert worker_quotas(12, 3) == [4, 4, 4]
    assert worker_quotas(13, 3) == [5, 4, 4]
    assert worker_quotas(2, 3) == [1, 1, 0]


def test_apportion_shares() -> None:
    assert apportion(32, [1.0]) == [32]
    assert apportion(32, [0.7, 0.3]) == [22, 10]
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(8, [100, 1]) == [7, 1]  # every set keeps at least one sample
    assert apportion(3, [100, 1, 1]) == [1, 1, 1]
    # a mix that divides the batch is taken exactly, at every batch size it divides
    assert apportion(16, [0.5625, 0.1875, 0.25]) == [9, 3, 4]
    assert apportion(32, [0.5625, 0.1875, 0.25]) == [18, 6, 8]
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = [int(c) for c in rng.integers(1, 20, size=int(rng.integers(1, 5)))]
        assert apportion(sum(counts), counts) == counts
        assert apportion(sum(counts), [c / sum(counts) for c in counts]) == counts
    with pytest.raises(HandposeError, match="cannot hold"):
        apportion(2, [1, 1, 1])


def test_sample_params_ranges_and_identity() -> None:
    cfg = AugmentConfig(flip=True)
    rng = np.random.default_rng(0)
    ps = [A.sample_params(cfg, rng) for _ in range(2000)]
    angles = np.array([p.angle_deg for p in ps])
    assert angles.min() >= -cfg.rotate_deg and angles.max() <= cfg.rotate_deg and angles.std() > 10
    assert all(cfg.scale_min <= p.scale <= cfg.scale_max for p in ps)
    assert all(abs(s) <= cfg.translate for p in ps for s in p.shift)
    assert 0.4 < np.mean([p.flip for p in ps]) < 0.6
    assert all(abs(p.hue_deg) <= cfg.hue_deg and abs(p.brightness - 1) <= cfg.brightness for p in ps)
    assert A.sample_params(AugmentConfig(enabled=False), rng) == A.IDENTITY
    assert not any(A.sample_params(AugmentConfig(flip=False), rng).flip for _ in range(50))


def test_colour_function_matches_its_definition() -> None:
    """apply_colour == clip(b * (128 + c * (YIQ-hue/sat matrix @ x - 128)))."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (2, 3, 4, 5))
    rows = np.array([[1.2, 0.8, 1.3, 10.0], [0.9, 1.1, 0.7, -7.0]])
    got = A.apply_colour(torch.tensor(x, dtype=torch.float64), torch.tensor(rows)).numpy()
    for i, (b, c, s, h) in enumerate(rows):
        th = np.radians(h)
        rot = np.array([[1, 0, 0], [0, np.cos(th), np.sin(th)], [0, -np.sin(th), np.cos(th)]])
        H = np.linalg.inv(A.RGB2YIQ) @ rot @ np.diag([1, s, s]) @ A.RGB2YIQ
        ref = np.clip(b * (128 + c * (np.einsum("ij,jhw->ihw", H, x[i]) - 128)), 0, 255)
        np.testing.assert_allclose(got[i], ref, atol=1e-9)
    same = A.apply_colour(torch.tensor(x), torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)).numpy()
    np.testing.assert_allclose(same, x, atol=1e-9)


def test_cpu_finish_equals_the_batched_device_finish() -> None:
    """A CPU device finishes sample by sample (numpy), a GPU in one batched torch op: same batch."""
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.integers(0, 256, (5, 3, 16, 12), dtype=np.uint8))
    images[0] = 250  # bright enough that brightness > 1 clips
    rows = torch.tensor(rng.uniform([1.2, 0.6, 0.6, -20], [1.4, 1.4, 1.4, 20], (5, 4)), dtype=torch.float32)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    for colour in (rows, None):
        cpu = finish(images, colour, mean, std)
        batched = A.apply_colour(images, colour, mean=mean, std=std)
        assert cpu.dtype == batched.dtype == torch.float32
        torch.testing.assert_close(cpu, batched, atol=1e-5, rtol=0)
        x = A.apply_colour(images.double(), None if colour is None else colour.double()).numpy()
        ref = (x / 255 - mean[:, None, None]) / std[:, None, None]
        np.testing.assert_allclose(cpu.numpy(), ref, atol=1e-4)
    assert (A.apply_colour(images.double(), rows.double())[0] == 255).any()  # the clip was exercised


def test_held_batches_are_never_overwritten(dots: Path) -> None:
    """Output tensors are recycled only once nothing holds them: keeping batches is safe."""
    loader = make_loader(dots, "val", batch_size=2, workers=0)
    held = list(loader)
    views = [b["image"][0] for b in held]  # a view alone also keeps its batch's storage
    del held[0]["image"]
    ptrs, again = [], []
    for b in loader:  # each batch dropped at once: its storage is reused for a later one
        ptrs.append(b["image"].data_ptr())
        again.append(b["image"].clone())
    assert torch.equal(views[0], again[0][0])
    assert all(torch.equal(h["image"], a) for h, a in zip(held[1:], again[1:], strict=True))
    assert len({b["image"].data_ptr() for b in held[1:]}) == len(held) - 1
    assert len(set(ptrs)) < len(ptrs)


# ------------------------------------------------------------------ batches


def test_batch_format_and_plain_resize(dots: Path) -> None:
    loader = make_loader(dots, "val", batch_size=4, workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 128, 128) and batch["image"].dtype == torch.float32
    assert batch["uv"].shape == (4, 21, 2) and batch["uv"].dtype == torch.float32
    assert batch["visible"].shape == (4, 21) and batch["visible"].dtype == torch.bool
    assert batch["key"] == [sample_key(i) for i in range(24, 28)]
    # val is a plain resize even when an augment config is passed
    plain = next(iter(make_loader(dots, "val", batch_size=4, workers=0, augment=GEOMETRY_ONLY)))
    assert torch.equal(plain["image"], batch["image"]) and torch.equal(plain["uv"], batch["uv"])


def test_normalisation_uses_manifest_stats(tmp_path: Path) -> None:
    grey = np.full((64, 64, 3), 200, np.uint8)
    root = write_pack(tmp_path, {"val": [[(1, jpeg(grey, 100), np.full((21, 2), 32.0), {})]]})
    batch = next(iter(make_loader(root, "val", batch_size=1, workers=0, image_size=32)))
    expected = (200 / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(batch["image"][0, :, 16, 16].numpy(), expected, atol=0.02)
    np.testing.assert_allclose(batch["uv"][0, 0].numpy(), [16.0, 16.0], atol=1e-5)  # 64 -> 32


def test_dot_lands_on_transformed_keypoint(dots: Path) -> None:
    """Rotation, scale, shift and flip: the dot's centroid is within 1 px of the moved keypoint."""
    manifest = read_manifest(dots)
    loader = make_loader(dots, "train", batch_size=8, workers=0, augment=GEOMETRY_ONLY, seed=3)
    checked = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            images = denormalise(batch["image"], manifest).numpy()
            for image, uv in zip(images, batch["uv"].numpy(), strict=True):
                if not (5 <= uv[0]).all() or not (uv[0] < 123).all():
                    continue  # dot cut by the frame edge
                np.testing.assert_allclose(dot_centroid(image), uv[0], atol=1.0)
                checked += 1
    assert checked >= 60


def test_augmentation_varies_with_epoch_and_is_reproducible(dots: Path) -> None:
    def run(epoch: int) -> dict[str, np.ndarray]:
        loader = make_loader(dots, "train", batch_size=8, workers=0, augment=AugmentConfig(flip=True), seed=5)
        loader.set_epoch(epoch)
        return {k: uv for b in loader for k, uv in zip(b["key"], b["uv"].numpy(), strict=True)}

    a, b, c = run(0), run(0), run(1)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a.keys() & c.keys())


def test_out_of_frame_keypoints_are_not_visible(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    sid, jpg, uv, _ = texture_sample(1, rng)
    uv[:4] = [(-10.0, 50.0), (50.0, 230.0), (224.0, 0.0), (223.9, 223.9)]  # out, out, out (edge), in
    root = write_pack(
        tmp_path / "a", {"val": [[(sid, jpg, uv, {})]], "train": [[texture_sample(2, rng)] * 1]}
    )
    batch = next(iter(make_loader(root, "val", batch_size=1, workers=0)))
    assert batch["visible"][0, :4].tolist() == [False, False, False, True]
    assert batch["visible"][0, 4:].all()
    # augmentation that pushes points out: visible is exactly "inside [0, 128)^2"
    train = [texture_sample(i, rng) for i in range(16)]
    root = write_pack(tmp_path / "b", {"train": [train]})
    shove = AugmentConfig(rotate_deg=0, scale_min=1.5, scale_max=1.5, translate=0.4)
    batch = next(iter(make_loader(root, "train", batch_size=16, workers=0, augment=shove)))
    uv = batch["uv"].numpy()
    inside = ((uv >= 0) & (uv < 128)).all(-1)
    assert (batch["visible"].numpy() == inside).all() and not inside.all() and inside.any()


# ------------------------------------------------------------------ exactly once, splitting


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_val_exactly_once_single_rank(dots: Path, workers: int) -> None:
    loader = make_loader(dots, "val", batch_size=4, workers=workers)
    keys = _keys(loader)
    assert sorted(keys) == [sample_key(i) for i in range(24, 37)]
    assert len(list(loader)) == len(loader)


def test_index_and_stream_readers_agree(dots: Path, tmp_path: Path) -> None:
    import shutil

    copy = _drop_indexes(Path(shutil.copytree(dots, tmp_path / "copy")), True)
    a = next(iter(make_loader(dots, "val", batch_size=13, workers=0)))
    b = next(iter(make_loader(copy, "val", batch_size=13, workers=0)))
    assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["uv"], b["uv"])


@pytest.mark.parametrize("split", ["val", "test", "eval"])
def test_packed_splits_exactly_once(packed: Path, split: str) -> None:
    """The shared generated pack (several shards per split), 2 simulated ranks x 2 workers."""
    expected = sorted(k for b in make_loader(packed, split, batch_size=64, workers=0) for k in b["key"])
    assert len(expected) == read_manifest(packed).count(split) and len(set(expected)) == len(expected)
    keys = [
        k for r in range(2) for k in _keys(make_loader(packed, split, batch_size=3, rank=r, world_size=2))
    ]
    assert sorted(keys) == expected


@pytest.mark.parametrize("world", [2, 3, 5])
def test_val_exactly_once_across_ranks_in_process(dots: Path, world: int) -> None:
    """Ranks simulated in one process (the torchrun test below is the real thing)."""
    keys: list[str] = []
    for rank in range(world):
        loader = make_loader(dots, "val", batch_size=2, rank=rank, world_size=world, workers=2)
        got = _keys(loader)
        assert len(list(loader)) == len(loader)
        keys += got
    assert sorted(keys) == [sample_key(i) for i in range(24, 37)]


def test_train_equal_batches_across_ranks_with_few_shards(dots: Path) -> None:
    """3 train shards < 2 ranks x 2 workers: sample-level split, same batch count on every rank."""
    seen: list[str] = []
    lengths = []
    for rank in range(2):
        loader = make_loader(dots, "train", batch_size=3, rank=rank, world_size=2, workers=2)
        batches = list(loader)
        lengths.append((len(batches), len(loader)))
        seen += [k for b in batches for k in b["key"]]
    assert lengths == [(4, 4), (4, 4)]
    assert sorted(seen) == [sample_key(i) for i in range(24)]  # 24 = 2 x 4 x 3: one pass, no repeats


def test_resampled_training_has_a_fixed_length(dots: Path) -> None:
    loader = make_loader(dots, "train", batch_size=4, workers=2, samples_per_epoch=40)
    assert len(loader) == 10
    batches = list(loader)
    assert len(batches) == 10 and all(len(b["key"]) == 4 for b in batches)


def test_too_small_train_split_is_a_clear_error(dots: Path) -> None:
    with pytest.raises(HandposeError, match="too few"):
        make_loader(dots, "train", batch_size=16, world_size=2)


def test_bad_arguments_are_clear_errors(dots: Path) -> None:
    with pytest.raises(HandposeError, match="kind"):
        make_loader(dots, "val", kind="tfrecord", batch_size=2)
    with pytest.raises(HandposeError, match="rank"):
        make_loader(dots, "val", batch_size=2, rank=2, world_size=2)
    with pytest.raises(HandposeError, match="no shards for split 'test'"):
        make_loader(dots, "test", batch_size=2)


@pytest.mark.slow
@pytest.mark.parametrize("val_shards", [[3, 3, 3, 2, 2], [5, 5, 3], [13]])
def test_torchrun_two_ranks_two_workers_exactly_once(tmp_path: Path, val_shards: list[int]) -> None:
    """A real 2-process gloo run: every val key once across 2 ranks x 2 workers (also < 4 shards)."""
    rng = np.random.default_rng(4)
    samples = [texture_sample(i, rng) for i in range(13)]
    root = write_pack(tmp_path / "pack", {"val": chunk(samples, val_shards)})
    out = tmp_path / "out"
    out.mkdir()
    _torchrun(root, "val", out, kind="wds", workers=2, batch=2)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    keys = ranks[0]["keys"] + ranks[1]["keys"]
    assert sorted(keys) == [sample_key(i) for i in range(13)]
    assert all(r["batches"] == r["len"] for r in ranks)


@pytest.mark.slow
def test_torchrun_packed_val_and_train(packed: Path, tmp_path: Path) -> None:
    """The shared pack: val exactly once; train gives every rank the same number of batches."""
    for split in ("val", "train"):
        out = tmp_path / split
        out.mkdir()
        _torchrun(packed, split, out, kind="wds", workers=2, batch=4)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert all(r["batches"] == r["len"] for r in ranks)
        keys = ranks[0]["keys"] + ranks[1]["keys"]
        if split == "val":
            assert len(keys) == len(set(keys)) == read_manifest(packed).count("val")
        else:
            assert ranks[0]["counts"] == [ranks[0]["batches"]] * 2 and ranks[0]["batches"] > 0


def _torchrun(root: Path, split: str, out: Path, *, kind: str, workers: int, batch: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(TESTS / "loader_rank_keys.py"), str(root), split, str(out), kind, str(workers), str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------ bad data


@READERS
def test_corrupt_jpeg_is_skipped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, no_index: bool
) -> None:
    rng = np.random.default_rng(5)
    samples = [texture_sample(i, rng) for i in range(6)]
    sid, jpg, uv, extra = samples[3]
    samples[3] = (sid, jpg[: len(jpg) // 2], uv, extra)  # truncated JPEG
    sid, jpg, uv, extra = samples[5]
    samples[5] = (sid, b"\xff\xd8garbage" * 20, uv, extra)
    root = _drop_indexes(write_pack(tmp_path, {"val": chunk(samples, [4, 2])}), no_index)
    with caplog.at_level(logging.WARNING, logger="handpose.wds_loader"):
        loader = make_loader(root, "val", batch_size=4, workers=0)
        keys = _keys(loader)
    assert sorted(keys) == [sample_key(i) for i in (0, 1, 2, 4)]
    assert loader.stats.skipped == 2
    assert {(Path(s).name, k) for s, k, _ in loader.stats.skipped_samples} == {
        ("val-000000.tar", sample_key(3)),
        ("val-000001.tar", sample_key(5)),
    }
    assert sample_key(3) in caplog.text and "val-000000.tar" in caplog.text
    # counted in the main process when the skip happens in a worker, too
    loader = make_loader(root, "val", batch_size=4, workers=2)
    assert sorted(_keys(loader)) == [sample_key(i) for i in (0, 1, 2, 4)] and loader.stats.skipped == 2


class _Trap:
    """Unpickling this creates a marker file: proof that something unpickled shard data."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@READERS
def test_planted_pickle_members_are_never_loaded(tmp_path: Path, no_index: bool) -> None:
    marker = tmp_path / "unpickled"
    trap = pickle.dumps(_Trap(str(marker)))
    rng = np.random.default_rng(6)
    samples = []
    for i in range(4):
        sid, jpg, uv, _ = texture_sample(i, rng)
        samples.append((sid, jpg, uv, {"pyd": trap, "pickle": trap, "pth": trap}))
    root = _drop_indexes(write_pack(tmp_path / "pack", {"train": [samples], "val": [samples]}), no_index)
    for split, workers in (("val", 0), ("val", 2), ("train", 0)):
        loader = make_loader(root, split, batch_size=2, workers=workers, augment=AugmentConfig())
        assert sorted(_keys(loader)) == [sample_key(i) for i in range(4)]
    assert not marker.exists()
    pickle.loads(trap)  # the trap works: loading it would have created the marker
    assert marker.exists()


def test_code_errors_are_not_swallowed(dots: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise TypeError("bug")

    monkeypatch.setattr("handpose.wds_loader.blur_and_occlude", broken)
    with pytest.raises(TypeError, match="bug"):
        list(make_loader(dots, "val", batch_size=2, workers=0))


# ------------------------------------------------------------------ box crops, visibility, mixed sets


@pytest.fixture(scope="module")
def box_dots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Off-centre hand boxes of 40-420 px in 224 px to 1280 x 960 photos, one dot per sample."""
    rng = np.random.default_rng(11)
    shapes = [
        (224, 224, 40),
        (224, 224, 150),
        (640, 480, 120),
        (640, 480, 400),
        (1280, 960, 420),
        (320, 200, 90),
    ]
    samples = [box_dot_sample(i, rng, w, h, side) for i, (w, h, side) in enumerate(shapes * 4)]
    return write_pack(
        tmp_path_factory.mktemp("boxdots"), {"train": [samples[:12], samples[12:]], "val": [samples]}
    )


def test_box_crop_dot_lands_on_transformed_keypoint(box_dots: Path) -> None:
    """crop="box" with rotation, zoom, shift and flip: the dot lands within 1 px of the keypoint."""
    manifest = read_manifest(box_dots)
    checked = 0
    for augment, split in ((GEOMETRY_ONLY, "train"), (None, "val")):
        loader = make_loader(box_dots, split, batch_size=6, workers=0, crop="box", augment=augment, seed=2)
        for epoch in range(2):
            loader.set_epoch(epoch)
            for batch in loader:
                images = denormalise(batch["image"], manifest).numpy()
                for image, uv in zip(images, batch["uv"].numpy(), strict=True):
                    if not ((6 <= uv[0]) & (uv[0] < 122)).all():
                        continue  # dot cut by the frame edge
                    np.testing.assert_allclose(dot_centroid(image), uv[0], atol=1.0)
                    checked += 1
    assert checked >= 60


def test_box_crop_fills_the_input_with_the_padded_box(box_dots: Path) -> None:
    """Without augmentation the box's centre lands on the input's centre and the padded box's
    longer side spans the input: keypoints map by exactly that similarity transform."""
    from handpose.shards import decode_box, decode_keypoints, read_samples

    labels = {
        s["__key__"]: (decode_box(s["box.f32"]), decode_keypoints(s["kp.f32"]))
        for tar in read_manifest(box_dots).shards("val")
        for s in read_samples(tar, ["box.f32", "kp.f32"])
    }
    batch = next(iter(make_loader(box_dots, "val", batch_size=24, workers=0, crop="box", box_pad=1.25)))
    for key, uv in zip(batch["key"], batch["uv"].numpy(), strict=True):
        (x0, y0, x1, y1), src = labels[key]
        scale = 128 / (1.25 * max(x1 - x0, y1 - y0))
        want = (src - [(x0 + x1) / 2, (y0 + y1) / 2]) * scale + 64
        np.testing.assert_allclose(uv, want, atol=1e-3)


def test_not_labelled_joints_are_not_visible(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    sid, jpg, uv, _ = texture_sample(1, rng)
    vis = np.ones(21, np.uint8)
    vis[[2, 5, 20]] = 0
    root = write_pack(tmp_path, {"val": [[(sid, jpg, uv, {"vis.u8": vis.tobytes()})]]})
    batch = next(iter(make_loader(root, "val", batch_size=1, workers=0)))
    assert (~batch["visible"][0]).nonzero().flatten().tolist() == [2, 5, 20]


def _mix(tmp_path: Path) -> tuple[Path, Path]:
    """Two packs with different normalisations: A of grey-100 images, B of grey-200 images."""
    grey = {name: jpeg(np.full((64, 64, 3), g, np.uint8), 100) for name, g in (("a", 100), ("b", 200))}
    rng = np.random.default_rng(8)

    def samples(name: str, base: int, n: int) -> list:
        return [(base + i, grey[name], rng.uniform(8, 56, (21, 2)), {}) for i in range(n)]

    a = write_pack(
        tmp_path / "a", {"train": chunk(samples("a", 0, 40), [20, 20]), "val": [samples("a", 100, 5)]}
    )
    b = write_pack(
        tmp_path / "b",
        {"train": [samples("b", 1000, 9)], "val": [samples("b", 1100, 3)]},
        mean=(0.2, 0.3, 0.4),
        std=(0.1, 0.2, 0.3),
    )
    return a, b


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_sets_exact_share_and_own_normalisation(tmp_path: Path, workers: int) -> None:
    """Weights 3:1 at batch 8: every batch on every rank and worker holds 6 of A and 2 of B, and
    each sample is normalised with its own set's mean/std."""
    a, b = _mix(tmp_path)
    expect = {
        0: (100 / 255 - np.array(MEAN)) / np.array(STD),
        1: (200 / 255 - np.array([0.2, 0.3, 0.4])) / np.array([0.1, 0.2, 0.3]),
    }
    batches = 0
    for rank in range(2):
        loader = make_loader(
            [a, b], "train", batch_size=8, weights=[3, 1], rank=rank, world_size=2, workers=workers
        )
        assert len(loader) == 40 // 2 // 6  # about one pass over the first set
        for epoch in range(3):
            loader.set_epoch(epoch)
            for batch in loader:
                batches += 1
                ids = batch["set"].tolist()
                assert sorted(ids) == [0] * 6 + [1] * 2
                for set_id, image in zip(ids, batch["image"].numpy(), strict=True):
                    np.testing.assert_allclose(image[:, 32, 32], expect[set_id], atol=0.05)
                assert all(int(k) >= 1000 for k, i in zip(batch["key"], ids, strict=True) if i == 1)
    assert batches == 2 * 3 * 3


def test_mixed_sets_validation_reads_each_set_once(tmp_path: Path) -> None:
    a, b = _mix(tmp_path)
    seen = []
    for rank in range(2):
        for batch in make_loader([a, b], "val", batch_size=2, rank=rank, world_size=2, workers=2):
            seen += [(s, k) for s, k in zip(batch["set"].tolist(), batch["key"], strict=True)]
    assert sorted(seen) == [(0, sample_key(100 + i)) for i in range(5)] + [
        (1, sample_key(1100 + i)) for i in range(3)
    ]


def test_blur_and_occlusion_change_only_pixels(box_dots: Path) -> None:
    """Blur and occlusion leave the geometry alone: same keypoints, different pixels."""
    plain = AugmentConfig(rotate_deg=20, brightness=0, contrast=0, saturation=0, hue_deg=0)
    heavy = AugmentConfig(
        rotate_deg=20,
        brightness=0,
        contrast=0,
        saturation=0,
        hue_deg=0,
        blur=1.0,
        occlude=1.0,
        occlude_size=0.5,
    )
    a = next(iter(make_loader(box_dots, "train", batch_size=6, workers=0, crop="box", augment=plain, seed=4)))
    b = next(iter(make_loader(box_dots, "train", batch_size=6, workers=0, crop="box", augment=heavy, seed=4)))
    assert a["key"] == b["key"]
    assert not torch.equal(a["image"], b["image"])
    # the parameters are drawn from one array per sample: the geometry draws do not move
    torch.testing.assert_close(a["uv"], b["uv"])


def test_set_names_tell_a_folder_given_twice_apart(tmp_path: Path) -> None:
    """Reports key each training set by name: a folder given twice is named by its crop, or by
    its position when the crop is the same too."""
    from handpose.datasets import set_names

    a, b = tmp_path / "hands", tmp_path / "x" / "synth"
    assert set_names([a, b], ["box", "box"]) == ["hands", "synth"]
    assert set_names([a, a, b], ["box", "image", "box"]) == ["hands-box", "hands-image", "synth"]
    assert set_names([a, a], ["box", "box"]) == ["hands-0", "hands-1"]
    assert set_names([a, tmp_path / "y" / "hands"]) == ["hands-0", "hands-1"]


# ------------------------------------------------------------------ augmentations for other sources


def test_new_augmentations_draw_nothing_while_off() -> None:
    """Recipes without the later augmentations draw exactly the 17 numbers per sample they always
    did (so they give the same batches); any one of them on draws 10 more."""
    for cfg, draws in (
        (AugmentConfig(flip=True, blur=0.5, occlude=0.5), 17),
        (AugmentConfig(aspect=0.1), 27),
    ):
        rng, ref = np.random.default_rng(4), np.random.default_rng(4)
        p = A.sample_params(cfg, rng)
        ref.uniform(size=draws)
        assert rng.uniform() == ref.uniform()
    p = A.sample_params(AugmentConfig(), np.random.default_rng(4))
    assert (p.aspect, p.tilt, p.gains, p.occluder_patch) == (1.0, None, (1.0, 1.0, 1.0), None)


def test_new_augmentation_parameter_ranges() -> None:
    cfg = AugmentConfig(
        rotate_deg=180,
        aspect=0.5,
        perspective_deg=30,
        channel_gain=0.2,
        grayscale=0.3,
        occlude=1.0,
        occlude_patch=0.5,
    )
    ps = [A.sample_params(cfg, np.random.default_rng(i)) for i in range(3000)]
    angles = np.array([p.angle_deg for p in ps])
    assert angles.min() < -170 and angles.max() > 170  # the full circle
    log_aspect = np.log([p.aspect for p in ps])
    assert np.abs(log_aspect).max() <= np.log(1.5) + 1e-12 and abs(log_aspect.mean()) < 0.02
    tilts = np.array([p.tilt for p in ps])
    assert np.abs(tilts[:, 0]).max() <= 30 and tilts[:, 0].std() > 15
    assert tilts[:, 1].min() >= 0 and tilts[:, 1].max() < 180
    gains = np.array([p.gains for p in ps])
    assert (np.abs(gains - 1) <= 0.2).all() and gains.std(axis=0).min() > 0.1
    assert 0.25 < np.mean([p.saturation == 0 for p in ps]) < 0.35
    assert 0.45 < np.mean([p.occluder_patch is not None for p in ps]) < 0.55
    for p in ps[:200]:
        x, y, w, h = p.occluder  # type: ignore[misc]
        if p.occluder_patch is not None:
            assert 0 <= p.occluder_patch[0] <= 1 - w and 0 <= p.occluder_patch[1] <= 1 - h


def test_colour_with_gains_matches_its_definition() -> None:
    """Rows of 7: the gains scale R, G, B before the hue/saturation matrix; saturation 0 is grey."""
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, (2, 3, 4, 5))
    rows = np.array([[1.1, 0.9, 1.2, 40.0, 1.3, 0.8, 0.9], [1.0, 1.0, 0.0, 0.0, 0.7, 1.1, 1.2]])
    got = A.apply_colour(torch.tensor(x), torch.tensor(rows)).numpy()
    for i, (b, c, s, h, *gains) in enumerate(rows):
        th = np.radians(h)
        rot = np.array([[1, 0, 0], [0, np.cos(th), np.sin(th)], [0, -np.sin(th), np.cos(th)]])
        H = np.linalg.inv(A.RGB2YIQ) @ rot @ np.diag([1, s, s]) @ A.RGB2YIQ @ np.diag(gains)
        ref = np.clip(b * (128 + c * (np.einsum("ij,jhw->ihw", H, x[i]) - 128)), 0, 255)
        np.testing.assert_allclose(got[i], ref, atol=1e-9)
    # grayscale: R == G == B to the 0.5% that the rounded NTSC matrix DALI uses leaves (its I and Q
    # rows do not sum to exactly 0, so its inverse's luma column is not exactly (1, 1, 1))
    np.testing.assert_allclose(got[1, 0], got[1, 1], rtol=5e-3)
    np.testing.assert_allclose(got[1, 0], got[1, 2], rtol=5e-3)
    four = A.apply_colour(torch.tensor(x), torch.tensor(rows[:, :4])).numpy()  # 4 columns: gains 1
    same = A.apply_colour(torch.tensor(x), torch.tensor(np.c_[rows[:, :4], np.ones((2, 3))])).numpy()
    np.testing.assert_array_equal(four, same)


def test_patch_occluder_copies_another_rectangle_of_the_crop() -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    p = A.AugmentParams(occluder=(0.5, 0.1, 0.25, 0.2), occluder_patch=(0.1, 0.6))
    out = A.blur_and_occlude(image.copy(), p)
    assert A.occluder_pixels(p, 64) == (32, 6, 16, 13) and A.patch_origin(p, 64) == (6, 38)
    np.testing.assert_array_equal(out[6:19, 32:48], image[38:51, 6:22])
    rest = np.ones((64, 64), bool)
    rest[6:19, 32:48] = False
    np.testing.assert_array_equal(out[rest], image[rest])


@pytest.mark.parametrize("crop", ["image", "box"])
def test_other_source_geometry_dot_lands_on_transformed_keypoint(
    dots: Path, box_dots: Path, crop: str
) -> None:
    """Full-circle rotation, aspect and perspective: the dot is within 1 px of its keypoint."""
    root = dots if crop == "image" else box_dots
    manifest = read_manifest(root)
    loader = make_loader(root, "train", batch_size=6, workers=0, crop=crop, augment=OTHER_GEOMETRY, seed=7)
    checked = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            images = denormalise(batch["image"], manifest).numpy()
            for image, uv in zip(images, batch["uv"].numpy(), strict=True):
                if not ((6 <= uv[0]) & (uv[0] < 122)).all():
                    continue
                np.testing.assert_allclose(dot_centroid(image), uv[0], atol=1.0)
                checked += 1
    assert checked >= 40


def test_colour_and_patch_augmentations_change_only_pixels(box_dots: Path) -> None:
    base = dict(rotate_deg=20, brightness=0, contrast=0, saturation=0, hue_deg=0, aspect=0.2)
    plain = AugmentConfig(**base)
    heavy = AugmentConfig(**base, channel_gain=0.3, grayscale=0.5, occlude=1.0, occlude_patch=1.0)
    a = next(iter(make_loader(box_dots, "train", batch_size=6, workers=0, crop="box", augment=plain, seed=4)))
    b = next(iter(make_loader(box_dots, "train", batch_size=6, workers=0, crop="box", augment=heavy, seed=4)))
    assert a["key"] == b["key"] and not torch.equal(a["image"], b["image"])
    torch.testing.assert_close(a["uv"], b["uv"])


# ------------------------------------------------------------------ crops without a hand (presence)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos of 1-3 hands (bright boxes on a dark ground), a photo's hands consecutive samples."""
    rng = np.random.default_rng(21)
    samples: list = []
    for photo in range(30):  # 1, 2, 3, 1, 2, 3, ... hands: 60 samples; shards end between photos
        samples += photo_samples(len(samples), rng, hands=1 + photo % 3)
    return write_pack(
        tmp_path_factory.mktemp("photos"), {"train": [samples[:30], samples[30:]], "val": [samples[:6]]}
    )


def test_negative_matrix_overlaps_no_hand_box() -> None:
    rng = np.random.default_rng(0)
    boxes = np.array([[50.0, 40.0, 110.0, 100.0], [200.0, 120.0, 260.0, 180.0]])
    p = A.sample_params(AugmentConfig(rotate_deg=180, perspective_deg=30), rng)
    found = 0
    for _ in range(200):
        M = A.negative_matrix(p, 75.0, 320, 240, boxes, 64, rng)
        if M is not None:
            found += 1
            corners = np.array([[0.0, 0.0], [64.0, 0.0], [0.0, 64.0], [64.0, 64.0]])
            quad = apply_matrix(invert(M), corners)
            assert not boxes_overlap(np.r_[quad.min(0), quad.max(0)], boxes).any()
    assert found > 150
    full = np.array([[0.0, 0.0, 320.0, 240.0]])  # a hand that fills the photo: no room
    assert all(A.negative_matrix(p, 75.0, 320, 240, full, 64, rng) is None for _ in range(20))


@pytest.mark.parametrize("workers", [0, 2])
def test_negatives_show_no_hand_and_are_marked(photos: Path, workers: int) -> None:
    """With negatives 0.5 about half the training crops show no hand box of their photo (no bright
    pixel), with `present` False and no visible joint; the rest are the usual hand crops."""
    manifest = read_manifest(photos)
    loader = make_loader(
        photos, "train", batch_size=6, workers=workers, crop="box", augment=OTHER_GEOMETRY_COLOURLESS,
        negatives=0.5, seed=1,
    )  # fmt: skip
    present, seen = [], 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            images = denormalise(batch["image"], manifest).numpy()
            for image, here, vis in zip(images, batch["present"].tolist(), batch["visible"], strict=True):
                present.append(here)
                if not here:
                    assert image.max() < 160 and not vis.any()
                else:
                    assert (image > 200).any()  # the hand's own box
                seen += 1
    assert 0.3 < 1 - np.mean(present) < 0.6 and seen >= 100
    # off (the default), for validation, and for whole photos: every crop shows its hand
    for split, crop, share in (("train", "box", 0.0), ("val", "box", 0.5), ("train", "image", 0.5)):
        loader = make_loader(photos, split, batch_size=6, workers=0, crop=crop, negatives=share)
        assert all(b["present"].all() for b in loader)


def test_photo_runs_cut_by_a_task_edge_never_give_negatives(photos: Path) -> None:
    """A slot's run of a shard can start or end inside a photo's run of hands: such a run's boxes
    are unknown (None), a whole run's are all of its photo's."""
    from handpose.wds_loader import PHOTO_BOXES, ShardTask, _photo_boxes

    url = read_manifest(photos).shards("train")[0]
    full = list(_photo_boxes([(str(url), ShardTask(0, 0, 30))], {str(url): 30}))
    runs = [len(s[PHOTO_BOXES]) for s in full]
    assert runs[:6] == [1, 2, 2, 3, 3, 3]  # photos of 1, 2, 3 hands
    counts = {str(url): 30}
    part = list(_photo_boxes([(str(url), ShardTask(0, 2, 5))], counts))  # samples 2 | 3, 4 (of 3, 4, 5)
    assert [s[PHOTO_BOXES] is None for s in part] == [True, True, True]  # a run's end, a run's start
    part = list(_photo_boxes([(str(url), ShardTask(0, 1, 7))], counts))  # photos 2, 3 and 4's first
    assert part[0][PHOTO_BOXES] is None  # the task starts mid-shard: photo 2 might have begun earlier
    assert [len(s[PHOTO_BOXES]) for s in part[2:5]] == [3, 3, 3]  # photo 3 begins and ends inside
    assert part[5][PHOTO_BOXES] is None  # the task ends mid-shard: photo 4 might go on
    np.testing.assert_array_equal(part[2][PHOTO_BOXES], full[3][PHOTO_BOXES])
    tail = list(_photo_boxes([(str(url), ShardTask(0, 24, 30))], counts))  # to the shard's end
    assert [None if s[PHOTO_BOXES] is None else len(s[PHOTO_BOXES]) for s in tail] == [None, 2, 2, 3, 3, 3]


def test_negatives_are_refused_where_they_cannot_be(photos: Path) -> None:
    with pytest.raises(HandposeError, match="negatives"):
        make_loader(photos, "train", batch_size=6, negatives=1.0)
    with pytest.raises(HandposeError, match="negatives need loader = wds"):
        make_loader(photos, "train", kind="dali", batch_size=6, negatives=0.2)

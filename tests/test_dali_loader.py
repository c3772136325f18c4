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
from shardkit import GEOMETRY_ONLY, dot_centroid, dots_pack

from handpose import augment as A
from handpose.config import AugmentConfig
from handpose.geometry import augment_matrix
from handpose.loader import denormalise, make_loader
from handpose.shards import read_manifest, sample_key

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


def test_in_graph_matrix_equals_geometry_augment_matrix() -> None:
    rows = np.array(
        [[200, 224, 20.0, 1.1, 0.05, -0.1, 1.0], [300, 180, -35.0, 0.8, -0.1, 0.02, 0.0]], np.float32
    )

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: list(rows), batch=True)
        p = {"angle": x[2], "scale": x[3], "tx": x[4], "ty": x[5], "flip": x[6]}
        return D.augment_matrix(x[0], x[1], 128, p)

    p = pipe()
    p.build()
    (mt,) = p.run()
    for i, (w, h, angle, scale, tx, ty, flip) in enumerate(rows):
        ref = augment_matrix(
            int(w),
            int(h),
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


@pytest.mark.parametrize("augment", [None, AugmentConfig(flip=True)], ids=["plain", "augment"])
def test_gpu_graph_is_valid(dots: Path, augment: AugmentConfig | None) -> None:
    """The GPU pipeline ("mixed" decode, GPU warp/colour/normalise) passes DALI's graph checks.

    Without a GPU DALI can still build the graph, then stops at the CUDA check; an invalid graph
    (e.g. a GPU node given as a named argument, which DALI refuses) fails before that. With a GPU
    the pipeline runs and yields a batch.
    """
    paths = [str(p) for p in sorted(dots.glob("train-*.tar"))]
    pipe = D.build_pipeline(
        paths, batch_size=4, image_size=32, augment=augment, train=True, shard_id=0, num_shards=1,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), threads=1, seed=1, device_id=0,
    )  # fmt: skip
    if torch.cuda.is_available():
        pipe.build()
        image, uv, sid = pipe.run()
        assert tuple(image.as_tensor().shape()) == (4, 3, 32, 32) and len(sid) == 4
        return
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pipe.build()

"""`handpose synth`: FreiHAND layout, labels, determinism, and that the hand is drawn where the labels say."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handpose.errors import HandposeError
from handpose.geometry import in_frame, project_points
from handpose.imageio import decode_jpeg
from handpose.skeleton import FINGER_JOINTS
from handpose.synth import SS, Canvas, encode_jpeg, make_sample, render_hand, sample_hand, synth


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _labels(root: Path, split: str = "training") -> tuple[np.ndarray, np.ndarray]:
    xyz = np.array(json.loads((root / f"{split}_xyz.json").read_text()))
    K = np.array(json.loads((root / f"{split}_K.json").read_text()))
    return xyz, K


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 training ids x 2 versions + 3 evaluation ids, seed 0."""
    root = tmp_path_factory.mktemp("small")
    synth(root, n=6, n_eval=3, versions=2, seed=0, size=224, workers=1)
    return root


def test_layout_and_names_exactly(small: Path) -> None:
    expected = {"training_xyz.json", "training_K.json", "evaluation_xyz.json", "evaluation_K.json"}
    expected |= {f"training/rgb/{i:08d}.jpg" for i in range(6 * 2)}
    expected |= {f"evaluation/rgb/{i:08d}.jpg" for i in range(3 * 2)}
    assert set(_digests(small)) == expected  # and no temp files left behind


def test_summary_counts(tmp_path: Path) -> None:
    summary = synth(tmp_path, n=3, n_eval=2, versions=3, seed=1, workers=1)
    assert summary["training"]["ids"] == 3 and summary["training"]["images"] == 9
    assert summary["evaluation"]["ids"] == 2 and summary["evaluation"]["images"] == 6
    assert summary["images"] == 15 and summary["versions"] == ["gs", "hom", "sample"]
    assert Path(summary["training"]["xyz"]) == tmp_path / "training_xyz.json"


def test_json_shapes_and_values(small: Path) -> None:
    for split, n in (("training", 6), ("evaluation", 3)):
        xyz, K = _labels(small, split)
        assert xyz.shape == (n, 21, 3) and K.shape == (n, 3, 3)
        assert np.isfinite(xyz).all() and np.isfinite(K).all()
        assert (xyz[..., 2] > 0.2).all()  # metres, in front of the camera
        np.testing.assert_array_equal(K[:, 2], np.tile([0.0, 0.0, 1.0], (n, 1)))
        assert (K[:, 0, 0] > 224 * 2).all() and (K[:, 0, 0] < 224 * 4).all()  # FreiHAND-like focal


def test_images_decode_at_size(small: Path) -> None:
    for p in (small / "training" / "rgb").iterdir():
        assert decode_jpeg(p.read_bytes()).shape == (224, 224, 3)


def test_same_seed_same_bytes_and_rerun_in_place(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    synth(a, n=5, n_eval=2, versions=2, seed=3, workers=1)
    synth(b, n=5, n_eval=2, versions=2, seed=3, workers=1)
    first = _digests(a)
    assert first == _digests(b)
    synth(a, n=5, n_eval=2, versions=2, seed=3, workers=1)  # overwrite in place
    assert _digests(a) == first


def test_rerun_smaller_removes_stale_images(tmp_path: Path) -> None:
    synth(tmp_path, n=6, versions=2, seed=0, workers=1)
    rgb = tmp_path / "training" / "rgb"
    (rgb / ".00000003.jpg.tmp999").write_bytes(b"half")  # a crashed write
    (rgb / "notes.txt").write_text("not ours")
    synth(tmp_path, n=3, versions=2, seed=0, workers=1)
    names = sorted(p.name for p in (tmp_path / "training" / "rgb").iterdir())
    assert names == [f"{i:08d}.jpg" for i in range(6)] + ["notes.txt"]
    assert len(_labels(tmp_path)[0]) == 3


@pytest.mark.slow
def test_worker_count_does_not_change_bytes(tmp_path: Path) -> None:
    synth(tmp_path / "one", n=9, n_eval=3, versions=2, seed=5, workers=1)
    synth(tmp_path / "two", n=9, n_eval=3, versions=2, seed=5, workers=2)
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")


def test_different_seeds_differ(tmp_path: Path) -> None:
    synth(tmp_path / "a", n=4, seed=0, workers=1)
    synth(tmp_path / "b", n=4, seed=1, workers=1)
    assert not np.allclose(_labels(tmp_path / "a")[0], _labels(tmp_path / "b")[0])
    da, db = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert all(da[f"training/rgb/{i:08d}.jpg"] != db[f"training/rgb/{i:08d}.jpg"] for i in range(4))


def test_training_and_evaluation_hands_differ(small: Path) -> None:
    assert not np.allclose(_labels(small, "training")[0][:3], _labels(small, "evaluation")[0])


def test_versions_same_hand_different_background() -> None:
    hand, images = make_sample(0, "training", 7, 224, 4)
    _, mask = render_hand(hand, 224)
    full = np.asarray(mask.reduce(SS)) == 255
    assert full.mean() > 0.05
    for v in range(1, 4):
        diff = np.abs(images[0].astype(int) - images[v].astype(int)).mean(-1)
        assert diff[full].mean() < 10  # same hand: only sensor noise differs
        assert diff[~full].mean() > 30  # different clutter


def test_written_files_are_the_rendered_images(small: Path) -> None:
    hand, images = make_sample(0, "training", 4, 224, 2)
    xyz, K = _labels(small)
    np.testing.assert_array_equal(xyz[4], hand.xyz_m)
    np.testing.assert_array_equal(K[4], hand.K)
    for v in range(2):  # image number = id + N * v
        assert (small / "training" / "rgb" / f"{4 + 6 * v:08d}.jpg").read_bytes() == encode_jpeg(images[v])


def test_keypoints_mostly_inside_and_hand_fills_frame() -> None:
    uv = np.array([project_points(h.xyz_m, h.K) for h in _hands(60)])
    inside = in_frame(uv, 224)
    assert inside.mean() > 0.97 and inside.mean(1).min() >= 0.8
    span = (uv.max(1) - uv.min(1)).max(1) / 224
    assert 0.25 < span.min() and span.max() < 0.95 and 0.45 < np.median(span) < 0.75


def test_hand_drawn_where_labels_say() -> None:
    """Every in-frame joint lies on the drawn hand, in the written image too (not on clutter)."""
    for i, hand in enumerate(_hands(30)):
        rgb, mask = render_hand(hand, 224)
        cover = np.asarray(mask.reduce(SS))
        uv = project_points(hand.xyz_m, hand.K)
        ok = in_frame(uv, 224)
        cols, rows = np.floor(uv[ok]).astype(int).T
        assert (cover[rows, cols] > 200).all()
        if i < 5:
            layer = np.asarray(rgb.reduce(SS)).astype(int)[rows, cols]
            _, images = make_sample(0, "training", i, 224, 1)
            assert np.abs(images[0].astype(int)[rows, cols] - layer).max() < 30  # noise only


def test_drawing_convention_disc_centroid() -> None:
    """A disc drawn at continuous point u has its coverage centroid at u (pixel centres at i + 0.5)."""
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(100):
        u = rng.uniform(10, 54, 2)
        canvas = Canvas(64)
        canvas.disc(u, rng.uniform(2, 6), (255, 255, 255))
        a = np.asarray(canvas.mask.reduce(SS), np.float64)
        ys, xs = np.mgrid[:64, :64] + 0.5
        errors.append(np.array([(a * xs).sum(), (a * ys).sum()]) / a.sum() - u)
    errors = np.array(errors)
    assert np.abs(errors.mean(0)).max() < 0.05  # no half-pixel bias
    assert np.abs(errors).max() < 0.3  # integer canvas vertices cost at most 1/(2 SS) px


def test_right_hand() -> None:
    """(little -> index knuckles, wrist -> middle knuckle, palm normal) is right-handed for every hand."""
    for hand in _hands(40):
        x = hand.xyz_m
        across = x[FINGER_JOINTS["index"][0]] - x[FINGER_JOINTS["little"][0]]
        along = x[FINGER_JOINTS["middle"][0]] - x[0]
        assert np.linalg.det(np.array([across, along, hand.palmar[0]])) > 0


def test_both_sides_and_full_rotation_occur() -> None:
    hands = _hands(80)
    palm_to_camera = np.array([h.palmar[0, 2] < 0 for h in hands])
    assert 0.25 < palm_to_camera.mean() < 0.75
    along = np.array([h.xyz_m[9, :2] - h.xyz_m[0, :2] for h in hands])  # wrist -> middle knuckle
    angles = np.degrees(np.arctan2(along[:, 1], along[:, 0])) % 360
    assert np.histogram(angles, bins=4, range=(0, 360))[0].min() > 5


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"n": 0}, "--n"),
        ({"n": 2, "versions": 5}, "--versions"),
        ({"n": 2, "versions": 0}, "--versions"),
        ({"n": 2, "n_eval": -1}, "--eval"),
        ({"n": 2, "seed": -1}, "--seed"),
        ({"n": 2, "size": 8}, "--size"),
        ({"n": 2, "workers": 0}, "--workers"),
    ],
)
def test_bad_options_name_the_option(tmp_path: Path, kwargs: dict, option: str) -> None:
    with pytest.raises(HandposeError, match=option):
        synth(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(HandposeError, match="not a folder"):
        synth(tmp_path / "f", n=1)


def test_real_freihand_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "training_mano.json").write_text("[]")
    with pytest.raises(HandposeError, match="training_mano.json"):
        synth(tmp_path, n=1)
    assert not (tmp_path / "training").exists()


def test_images_are_not_blank(small: Path) -> None:
    img = np.asarray(Image.open(small / "training" / "rgb" / "00000000.jpg"))
    assert img.std() > 20


def _hands(count: int, size: int = 224) -> list:
    return [sample_hand(np.random.default_rng([0, 0, i]), size) for i in range(count)]

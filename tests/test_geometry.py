"""Geometry: projection, matrices, and the image/keypoint agreement of one affine."""

from __future__ import annotations

import numpy as np
import pytest

from handpose import geometry as g
from handpose.imageio import warp_affine


def test_project_points_matches_freihand_rule() -> None:
    rng = np.random.default_rng(0)
    xyz = rng.uniform([-0.1, -0.1, 0.4], [0.1, 0.1, 0.7], size=(21, 3))
    K = np.array([[600.0, 0, 112.0], [0, 610.0, 110.0], [0, 0, 1]])
    uv = (K @ xyz.T).T
    np.testing.assert_allclose(g.project_points(xyz, K), uv[:, :2] / uv[:, 2:], atol=1e-12)


def test_identity_crop_of_the_image_is_letterbox_fit() -> None:
    np.testing.assert_allclose(
        g.crop_matrix(g.image_region(300, 200), 128), g.fit_matrix(300, 200, 128), atol=1e-12
    )
    # a square source is a plain resize: corners map to corners
    M = g.fit_matrix(224, 224, 128)
    np.testing.assert_allclose(
        g.apply_affine(M, np.array([[0.0, 0.0], [224.0, 224.0]])), [[0, 0], [128, 128]]
    )


def test_fit_centres_non_square() -> None:
    M = g.fit_matrix(400, 200, 100)  # scale 0.25, 50 px tall, centred vertically
    np.testing.assert_allclose(
        g.apply_affine(M, np.array([[0.0, 0.0], [400.0, 200.0]])), [[0, 25], [100, 75]]
    )


def test_invert_and_compose_round_trip() -> None:
    M = g.crop_matrix(g.image_region(224, 224), 128, angle_deg=33, scale=1.2, shift=(0.1, -0.2), flip=True)
    pts = np.random.default_rng(1).uniform(0, 224, (21, 2))
    np.testing.assert_allclose(g.apply_affine(g.invert(M), g.apply_affine(M, pts)), pts, atol=1e-9)
    np.testing.assert_allclose(g.compose(g.invert(M), M), g.translation(0, 0), atol=1e-12)


def test_batched_apply_equals_single() -> None:
    Ms = np.stack([g.crop_matrix(g.image_region(224, 224), 64, angle_deg=a) for a in (0, 45, 90)])
    pts = np.random.default_rng(2).uniform(0, 224, (3, 21, 2))
    batched = g.apply_affine(Ms, pts)
    for i in range(3):
        np.testing.assert_allclose(batched[i], g.apply_affine(Ms[i], pts[i]))


def test_flip_mirrors_about_centre() -> None:
    M = g.crop_matrix(g.image_region(100, 100), 100, flip=True)
    np.testing.assert_allclose(g.apply_affine(M, np.array([[10.0, 30.0]])), [[90.0, 30.0]])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"angle_deg": 40, "scale": 1.3, "shift": (0.1, -0.05)},
        {"angle_deg": -70, "scale": 0.8, "flip": True},
    ],
)
def test_dot_lands_on_transformed_keypoint(kw: dict) -> None:
    """The image warp and the keypoint transform agree (pixel-centre convention) within 0.5 px."""
    img = np.zeros((224, 200, 3), np.uint8)
    img[99:102, 59:62] = 255  # 3x3 dot whose centre is the continuous point (60.5, 100.5)
    M = g.crop_matrix(g.image_region(200, 224), 128, **kw)
    out = warp_affine(img, M, 128)[..., 0].astype(np.float64)
    ys, xs = np.mgrid[0:128, 0:128] + 0.5
    centroid = np.array([(xs * out).sum(), (ys * out).sum()]) / out.sum()
    expected = g.apply_affine(M, np.array([[60.5, 100.5]]))[0]
    assert np.linalg.norm(centroid - expected) < 0.5


def test_in_frame() -> None:
    uv = np.array([[0.0, 0.0], [127.9, 5], [128.0, 5], [-0.1, 3], [np.nan, 2]])
    assert g.in_frame(uv, 128).tolist() == [True, True, False, False, False]


def test_box_region_square_padded_and_centred() -> None:
    cx, cy, side = g.box_region(np.array([10.0, 20.0, 50.0, 100.0]), 1.25)
    assert (cx, cy, side) == (30.0, 60.0, 100.0)  # longer side 80 x 1.25
    M = g.crop_matrix((cx, cy, side), 64)
    # the box centre lands on the input centre; the padded square's corners on the input's corners
    np.testing.assert_allclose(g.apply_affine(M, np.array([[30.0, 60.0], [-20.0, 10.0], [80.0, 110.0]])),
                               [[32, 32], [0, 0], [64, 64]], atol=1e-9)  # fmt: skip
    assert g.matrix_scale(M) == pytest.approx(0.64)


def test_keypoints_box_uses_labelled_joints_only() -> None:
    uv = np.array([[5.0, 6.0], [1.0, 50.0], [30.0, 2.0], [99.0, 99.0]])
    np.testing.assert_array_equal(g.keypoints_box(uv, np.array([1, 1, 1, 0], bool)), [1, 2, 30, 50])
    assert np.isnan(g.keypoints_box(uv, np.zeros(4, bool))).all()

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


# ----------------------------------------------------------------------------- upright crops


def _hand(rng: np.random.Generator, angle_deg: float, centre: tuple[float, float]) -> np.ndarray:
    """21 keypoints of an upright-ish hand (wrist below, middle MCP straight above it) turned by
    angle_deg about `centre` (clockwise on screen)."""
    uv = rng.uniform(-40, 40, (21, 2))
    uv[0], uv[9] = (0.0, 45.0), (0.0, -5.0)  # wrist, middle-finger MCP
    return g.apply_affine(g.compose(g.translation(*centre), g.rotation(angle_deg)), uv)


def test_steady_region_is_a_grid_near_the_region() -> None:
    """A crop placed from a model's answer is snapped: regions a float rounding apart (1e-5 px)
    give the same crop, nearly always; the snap moves it by at most a quarter input pixel, 0.27%
    of its side and half the angle step; snapping again changes nothing."""
    rng = np.random.default_rng(0)
    size, same, n = 96, 0, 2000
    for _ in range(n):
        region = (float(rng.uniform(0, 640)), float(rng.uniform(0, 480)), float(rng.uniform(20, 400)))
        angle = float(rng.uniform(-180, 180))
        (cx, cy, side), turn = g.steady_region(region, size, angle)
        assert abs(side / region[2] - 1) <= 2 ** (0.5 / g.SIDE_STEPS) - 1 + 1e-12
        assert max(abs(cx - region[0]), abs(cy - region[1])) <= side / size / 4 + 1e-9
        assert abs(turn - angle) <= g.ANGLE_STEP_DEG / 2 + 1e-9
        assert g.steady_region((cx, cy, side), size, turn) == ((cx, cy, side), turn)
        nudged = (region[0] + 1e-5, region[1] - 1e-5, region[2] * (1 + 1e-7))
        same += g.steady_region(nudged, size, angle + 1e-6) == ((cx, cy, side), turn)
    assert same >= n - 3  # a nudge crosses a grid line with probability about 3e-4


@pytest.mark.parametrize("angle", [0.0, 37.0, 90.0, 179.0, -120.0])
def test_upright_region_turns_the_hand_up_and_fills_the_input(angle: float) -> None:
    uv = _hand(np.random.default_rng(int(angle) % 7), angle, (150.0, 110.0))
    region, turn = g.upright_region(uv, pad=1.5)
    M = g.crop_matrix(region, 128, angle_deg=turn)
    moved = g.apply_matrix(M, uv)
    up = moved[9] - moved[0]
    assert abs(up[0]) < 1e-9 and up[1] < 0  # the MCP straight above the wrist
    lo, hi = moved.min(axis=0), moved.max(axis=0)
    assert max(hi - lo) == pytest.approx(128 / 1.5)  # the longer side, padded by 1.5
    np.testing.assert_allclose((lo + hi) / 2, [64.0, 64.0], atol=1e-9)  # centred
    np.testing.assert_allclose(g.apply_matrix(g.invert(M), moved), uv, atol=1e-9)  # and back exactly


def test_upright_region_without_a_wrist_is_an_unturned_box() -> None:
    uv = _hand(np.random.default_rng(3), 60.0, (100.0, 100.0))
    labelled = np.ones(21, bool)
    labelled[0] = False
    region, turn = g.upright_region(uv, labelled, pad=1.25)
    assert turn == 0.0
    assert region == pytest.approx(g.box_region(g.keypoints_box(uv, labelled), 1.25))
    with pytest.raises(ValueError, match="labelled"):
        g.upright_region(uv, np.zeros(21, bool))


@pytest.mark.parametrize("angle", [25.0, 135.0, -80.0])
def test_upright_crop_dot_test(angle: float) -> None:
    """A red dot on the wrist and a green one on the middle MCP of a photo: in the upright crop the
    green dot is straight above the red, and each dot found in the crop maps back through the
    inverse matrix onto its keypoint in the photo (within 0.5 px: the dots' own rendering)."""
    uv = _hand(np.random.default_rng(9), angle, (160.0, 120.0))
    photo = np.zeros((240, 320, 3), np.uint8)
    ys, xs = np.mgrid[0:240, 0:320] + 0.5
    for joint, channel in ((0, 0), (9, 1)):
        blob = np.exp(-((xs - uv[joint, 0]) ** 2 + (ys - uv[joint, 1]) ** 2) / (2 * 2.5**2))
        photo[..., channel] = np.maximum(photo[..., channel], np.round(255 * blob).astype(np.uint8))
    region, turn = g.upright_region(uv, pad=1.25)
    M = g.crop_matrix(region, 128, angle_deg=turn)
    crop = warp_affine(photo, M, 128).astype(np.float64)
    cy, cx = np.mgrid[0:128, 0:128] + 0.5
    found = {}
    for joint, channel in ((0, 0), (9, 1)):
        w = crop[..., channel]
        found[joint] = np.array([(cx * w).sum(), (cy * w).sum()]) / w.sum()
        np.testing.assert_allclose(g.apply_matrix(g.invert(M), found[joint][None])[0], uv[joint], atol=0.5)
    up = found[9] - found[0]
    assert abs(up[0]) < 0.5 and up[1] < -20


# ----------------------------------------------------------------------------- homographies


def test_tilt_matrix_is_a_pinhole_view_of_the_turned_plane() -> None:
    """tilt_matrix == projecting the plane turned in depth (rotated in 3D, `focal` px away)."""
    tilt, axis, f = 35.0, 70.0, 128.0
    H = g.tilt_matrix(tilt, axis, f)
    a, t = np.radians(axis), np.radians(tilt)
    k = np.array([np.cos(a), np.sin(a), 0.0])
    pts = np.random.default_rng(0).uniform(-50, 50, (10, 2))
    q = np.c_[pts, np.zeros(10)]
    turned = q * np.cos(t) + np.cross(k, q) * np.sin(t) + np.outer(q @ k, k) * (1 - np.cos(t))  # Rodrigues
    seen = f * turned[:, :2] / (turned[:, 2:] + f)
    np.testing.assert_allclose(g.apply_matrix(H, pts), seen, atol=1e-9)
    np.testing.assert_allclose(g.apply_matrix(H, np.zeros((1, 2))), [[0.0, 0.0]], atol=1e-12)  # centre stays
    along = np.array([[np.cos(a), np.sin(a)]]) * 1e-3  # tiny steps: along the axis 1:1, across cos(tilt)
    across = np.array([[-np.sin(a), np.cos(a)]]) * 1e-3
    assert np.linalg.norm(g.apply_matrix(H, along)) == pytest.approx(1e-3, rel=1e-6)
    assert np.linalg.norm(g.apply_matrix(H, across)) == pytest.approx(1e-3 * np.cos(t), rel=1e-3)


def test_homography_compose_invert_and_batched_points() -> None:
    kw = {"angle_deg": 33, "scale": 1.2, "shift": (0.1, -0.2), "flip": True, "aspect": 1.3}
    M = g.crop_matrix(g.image_region(224, 200), 128, **kw)
    H = g.crop_matrix(g.image_region(224, 200), 128, **kw, tilt=(30.0, 110.0))
    assert M.shape == (2, 3) and H.shape == (3, 3) and g.is_homography(H) and not g.is_homography(M)
    pts = np.random.default_rng(1).uniform(0, 224, (7, 2))
    np.testing.assert_allclose(g.apply_matrix(g.invert(H), g.apply_matrix(H, pts)), pts, atol=1e-9)
    np.testing.assert_allclose(g.compose(g.invert(H), H), np.eye(3), atol=1e-12)
    np.testing.assert_allclose(g.apply_matrix(g.to3x3(M), pts), g.apply_affine(M, pts), atol=1e-9)
    batched = g.apply_matrix(np.stack([H, g.to3x3(M)]), np.stack([pts, pts]))
    np.testing.assert_allclose(batched[0], g.apply_matrix(H, pts), atol=1e-9)
    np.testing.assert_allclose(batched[1], g.apply_matrix(M, pts), atol=1e-9)
    # aspect: x and y of the source stretched apart, the area kept
    assert g.matrix_scale(M) == pytest.approx(
        g.matrix_scale(g.crop_matrix(g.image_region(224, 200), 128, scale=1.2))
    )


def test_matrix_scale_of_a_homography_is_its_largest_local_scale() -> None:
    H = g.crop_matrix(g.image_region(400, 300), 64, tilt=(40.0, 30.0))
    G = g.invert(H)
    eps, local = 1e-4, []
    for y in ((0.0, 0.0), (64.0, 0.0), (0.0, 64.0), (64.0, 64.0), (32.0, 32.0)):
        p = np.array([y, (y[0] + eps, y[1]), (y[0], y[1] + eps)])
        s = g.apply_matrix(G, p)
        area = abs(np.cross(s[1] - s[0], s[2] - s[0])) / eps**2  # source px^2 per destination px^2
        local.append(1 / np.sqrt(area))
    assert g.matrix_scale(H, 64) == pytest.approx(max(local[:4]), rel=1e-3)
    assert g.matrix_scale(H, 64) > local[4] > 0  # the centre is less magnified than the near corner
    with pytest.raises(TypeError, match="size"):
        g.matrix_scale(H)


@pytest.mark.parametrize("tilt", [(30.0, 20.0), (45.0, 100.0), (-40.0, 250.0)])
def test_dot_lands_on_the_keypoint_through_a_homography(tilt: tuple[float, float]) -> None:
    """warp_perspective and apply_matrix agree (pixel-centre convention) within 0.5 px."""
    from handpose.imageio import warp_perspective

    img = np.zeros((224, 200, 3), np.uint8)
    img[99:102, 59:62] = 255
    H = g.crop_matrix(g.image_region(200, 224), 128, angle_deg=40, scale=1.3, aspect=0.8, tilt=tilt)
    out = warp_perspective(img, H, 128)[..., 0].astype(np.float64)
    ys, xs = np.mgrid[0:128, 0:128] + 0.5
    centroid = np.array([(xs * out).sum(), (ys * out).sum()]) / out.sum()
    assert np.linalg.norm(centroid - g.apply_matrix(H, np.array([[60.5, 100.5]]))[0]) < 0.5
    # a 3x3 that is affine warps exactly as the affine warp does
    M = g.crop_matrix(g.image_region(200, 224), 128, angle_deg=40, scale=1.3)
    np.testing.assert_array_equal(warp_perspective(img, g.to3x3(M), 128), warp_affine(img, M, 128))


def test_footprint_and_overlap() -> None:
    M = g.crop_matrix((100.0, 50.0, 40.0), 64, angle_deg=45)
    half = 20 * np.sqrt(2)
    np.testing.assert_allclose(g.footprint(M, 64), [100 - half, 50 - half, 100 + half, 50 + half], atol=1e-9)
    boxes = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [5, 5, 15, 15]], float)
    assert g.boxes_overlap(np.array([10.0, 0.0, 12.0, 6.0]), boxes).tolist() == [False, True, True]


@pytest.mark.parametrize(
    "shape, shift",
    [
        ((224, 224), (0, 0)),
        ((168, 224), (0, 28)),
        ((100, 150), (-20, 37)),
        ((90, 60), (200, -95)),
        ((50, 40), (3, 3)),
    ],
)
def test_a_whole_pixel_shift_is_the_bilinear_warp(shape: tuple[int, int], shift: tuple[int, int]) -> None:
    """warp_to_input's copy for a matrix that moves every pixel by whole pixels (a photo already at
    the input size, letterboxed) equals Pillow's bilinear warp byte for byte, also off the edges;
    a fractional shift still warps."""
    from PIL import Image

    from handpose.imageio import warp_image_to_input

    img = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    M = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]])
    pillow = np.asarray(
        Image.fromarray(img).transform(
            (128, 128),
            Image.Transform.AFFINE,
            (1.0, 0.0, -shift[0], 0.0, 1.0, -shift[1]),
            resample=Image.Resampling.BILINEAR,
            fillcolor=(0, 0, 0),
        )
    )
    np.testing.assert_array_equal(warp_image_to_input(img, M, 128), pillow)
    half = M + [[0, 0, 0.5], [0, 0, 0]]
    np.testing.assert_array_equal(warp_image_to_input(img, half, 128), warp_affine(img, half, 128))


def test_affine_fast_paths_equal_the_homogeneous_products() -> None:
    """compose, invert and crop_matrix compute 2x3 affines in Python floats: the same matrices as
    3x3 homogeneous products (numpy), the same shape out, a singular matrix still an error."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        mats = [np.hstack([rng.normal(size=(2, 2)), rng.uniform(-300, 300, (2, 1))]) for _ in range(3)]
        product = np.eye(3)
        for m in mats:
            product = product @ np.vstack([m, [0.0, 0.0, 1.0]])
        got = g.compose(*mats)
        assert got.shape == (2, 3)
        np.testing.assert_allclose(got, product[:2], rtol=1e-12, atol=1e-9)
        inv = g.invert(mats[0])
        assert inv.shape == (2, 3)
        np.testing.assert_allclose(inv, np.linalg.inv(np.vstack([mats[0], [0.0, 0.0, 1.0]]))[:2], atol=1e-9)
        region = tuple(rng.uniform([0.0, 0.0, 20.0], [500.0, 500.0, 400.0]))
        kw = dict(
            angle_deg=rng.uniform(-180, 180),
            scale=rng.uniform(0.5, 2.0),
            shift=tuple(rng.uniform(-0.2, 0.2, 2)),
            flip=bool(rng.integers(2)),
            aspect=rng.uniform(0.7, 1.4),
        )
        s = 96 / region[2] * kw["scale"]
        r = np.sqrt(kw["aspect"])
        parts = g.compose(
            g.translation(48 + kw["shift"][0] * 96, 48 + kw["shift"][1] * 96),
            g.rotation(kw["angle_deg"]),
            g.scaling(s * r, s / r),
            g.scaling(-1.0 if kw["flip"] else 1.0, 1.0),
            g.translation(-region[0], -region[1]),
        )
        np.testing.assert_allclose(g.crop_matrix(region, 96, **kw), parts, atol=1e-9)
        area = abs(np.linalg.det(mats[0][:, :2]))
        assert g.matrix_scale(mats[0]) == pytest.approx(np.sqrt(area), rel=1e-12)
    assert g.compose().tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(np.linalg.LinAlgError):
        g.invert(np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0]]))

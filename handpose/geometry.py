"""The one home of 2D geometry: projection, the affine matrices that move images AND keypoints.

Pixel convention (used everywhere in handpose): continuous pixel coordinates, x to the right,
y down, origin at the top-left CORNER of the top-left pixel. Pixel (col i, row j) covers
[i, i+1) x [j, j+1) and its centre is (i + 0.5, j + 0.5). Pillow's `transform`/`resize` and
DALI's `warp_affine` sample with this convention, so one 2x3 matrix applied to an image and to
its keypoints keeps them aligned exactly. Heatmap cell i therefore sits at coordinate i + 0.5
(model input pixels). FreiHAND's projected `uv` are taken as coordinates in this convention.

A matrix `M` (2x3, float64) maps SOURCE pixel coordinates to DESTINATION ones: p' = M[:, :2] p + M[:, 2].
A homography (3x3: a hand turned in depth, `tilt_matrix`) maps them projectively: (x, y, w) =
H (p, 1), p' = (x, y) / w. Every function here takes either; `apply_matrix` moves points by both,
with the projective division, so the matrix that moves an image moves its keypoints in either case.
"""

from __future__ import annotations

import math

import numpy as np


def project_points(xyz_m: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Project camera-space joints (N, 3) in metres with intrinsics K (3, 3) to pixels (N, 2).

    The FreiHAND rule: `uv = (K @ xyz.T).T; uv = uv[:, :2] / uv[:, 2:]`.
    """
    uvw = (np.asarray(K, np.float64) @ np.asarray(xyz_m, np.float64).T).T
    return uvw[:, :2] / uvw[:, 2:]


def to3x3(M: np.ndarray) -> np.ndarray:
    """A 2x3 affine as a 3x3 homogeneous matrix (a 3x3 is returned as a copy)."""
    M = np.asarray(M, np.float64)
    if M.shape == (3, 3):
        return M.copy()
    out = np.eye(3)
    out[:2] = M
    return out


def is_homography(M: np.ndarray) -> bool:
    """True for a 3x3 matrix (a homography, possibly affine); False for a 2x3 affine."""
    return np.shape(M) == (3, 3)


def compose(*matrices: np.ndarray) -> np.ndarray:
    """compose(A, B, C) applies C first, then B, then A (like A @ B @ C). 2x3 when every matrix
    is 2x3, else 3x3 (scaled so that its [2, 2] is 1 when that is not 0)."""
    if not any(is_homography(m) for m in matrices):
        # Affines in Python floats: predict composes a few per crop, and numpy's per-call cost on
        # 3x3 arrays was most of the crop's geometry time.
        a, b, c, d, e, f = 1.0, 0.0, 0.0, 0.0, 1.0, 0.0  # the product so far, row by row
        for m in matrices:
            (m00, m01, m02), (m10, m11, m12) = np.asarray(m, np.float64).tolist()
            a, b, c, d, e, f = (
                a * m00 + b * m10,
                a * m01 + b * m11,
                a * m02 + b * m12 + c,
                d * m00 + e * m10,
                d * m01 + e * m11,
                d * m02 + e * m12 + f,
            )
        return np.array([[a, b, c], [d, e, f]])
    out = np.eye(3)
    for m in matrices:
        out = out @ to3x3(m)
    return out / out[2, 2] if out[2, 2] != 0 else out


def invert(M: np.ndarray) -> np.ndarray:
    """Inverse (destination -> source) of a 2x3 affine or a 3x3 homography, in the same shape."""
    if not is_homography(M):  # closed form, in Python floats (see `compose`)
        (a, b, c), (d, e, f) = np.asarray(M, np.float64).tolist()
        det = a * e - b * d
        if det == 0.0:
            raise np.linalg.LinAlgError("Singular matrix")
        ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
        return np.array([[ia, ib, -(ia * c + ib * f)], [id_, ie, -(id_ * c + ie * f)]])
    inv = np.linalg.inv(to3x3(M))
    return inv / inv[2, 2] if inv[2, 2] != 0 else inv


def translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty]])


def scaling(sx: float, sy: float | None = None) -> np.ndarray:
    return np.array([[sx, 0.0, 0.0], [0.0, sx if sy is None else sy, 0.0]])


def rotation(angle_deg: float) -> np.ndarray:
    """Rotation about the origin; positive angles turn clockwise on screen (y points down)."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0]])


def tilt_matrix(tilt_deg: float, axis_deg: float, focal: float) -> np.ndarray:
    """The 3x3 homography of a plane turned in depth by `tilt_deg` about the in-plane axis at
    `axis_deg` (clockwise on screen from +x) through the origin, seen by a pinhole camera of focal
    length `focal` px looking at it from `focal` px away (so the untilted plane maps 1:1).

    A point q = (x, y, 0) of the plane goes to R q + (0, 0, focal) and projects to
    focal * (R q)_xy / ((R q)_z + focal): H = [[R00, R01, 0], [R10, R11, 0], [R20 / f, R21 / f, 1]].
    The origin stays put; lengths across the axis shrink by cos(tilt) there, and the half of the
    plane turned towards the camera grows (perspective).
    """
    t, a = math.radians(tilt_deg), math.radians(axis_deg)
    k = np.array([math.cos(a), math.sin(a), 0.0])  # the unit axis
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    R = np.eye(3) + math.sin(t) * K + (1.0 - math.cos(t)) * (K @ K)  # Rodrigues
    return np.array(
        [[R[0, 0], R[0, 1], 0.0], [R[1, 0], R[1, 1], 0.0], [R[2, 0] / focal, R[2, 1] / focal, 1.0]]
    )


def apply_matrix(M: np.ndarray, points: np.ndarray) -> np.ndarray:
    """THE point mover: points (..., 2) by a 2x3 affine or a 3x3 homography (with the projective
    division); or a batch: M (B, 2, 3) / (B, 3, 3) with points (B, N, 2)."""
    M = np.asarray(M, np.float64)
    if M.shape[-2] == 2:
        return apply_affine(M, points)
    moved = apply_affine(M[..., :2, :], points)
    points = np.asarray(points, np.float64)
    if M.ndim == 3:
        w = np.einsum("bj,bnj->bn", M[:, 2, :2], points) + M[:, None, 2, 2]
    else:
        w = points @ M[2, :2] + M[2, 2]
    return moved / w[..., None]


def apply_affine(M: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Move points (..., 2) by M (2, 3); or a batch: M (B, 2, 3) with points (B, N, 2)."""
    M = np.asarray(M, np.float64)
    points = np.asarray(points, np.float64)
    if M.ndim == 3:
        return np.einsum("bij,bnj->bni", M[:, :, :2], points) + M[:, None, :, 2]
    return points @ M[:, :2].T + M[:, 2]


Region = tuple[float, float, float]  # (cx, cy, side): the square of source pixels that fills the input
BOX_PAD = 1.25  # a box crop's side x this fills the input: about what top-down pose estimators use


def image_region(src_w: float, src_h: float) -> Region:
    """The whole image, letterboxed: centred, the longer side fills the input (`crop = "image"`)."""
    return (src_w / 2, src_h / 2, float(max(src_w, src_h)))


def box_region(box: np.ndarray, pad: float) -> Region:
    """A hand box (x0, y0, x1, y1), made square on its longer side and padded by `pad`
    (`crop = "box"`; the default pad is BOX_PAD)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return ((x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0, 1e-6) * pad)


def source_region(width: float, height: float, box: np.ndarray | None, pad: float) -> Region:
    """THE crop of a source image: the whole image letterboxed (`box` None) or the hand `box`
    squared and padded (`box_region`). The loaders (by their crop mode) and predict's inference
    path take their regions here."""
    return image_region(width, height) if box is None else box_region(box, pad)


def keypoints_box(uv: np.ndarray, labelled: np.ndarray | None = None) -> np.ndarray:
    """(x0, y0, x1, y1): the extent of the (labelled) keypoints (21, 2); NaN when none is."""
    uv = np.asarray(uv, np.float64)
    keep = np.isfinite(uv).all(axis=-1) if labelled is None else np.asarray(labelled, bool)
    if not keep.any():
        return np.full(4, np.nan)
    pts = uv[keep]
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)])


WRIST, MIDDLE_MCP = 0, 9  # skeleton.JOINT_NAMES: "wrist", "middle1"


def upright_region(
    uv: np.ndarray, labelled: np.ndarray | None = None, pad: float = BOX_PAD
) -> tuple[Region, float]:
    """The crop that stands a hand upright, from its keypoints (21, 2) in source px (e.g. a first
    pass's): (region, angle_deg) for `crop_matrix(region, size, angle_deg=angle_deg)`, which turns
    the wrist -> middle-finger MCP direction to point straight up (-y) and fills the input with the
    keypoints' extent in that turned frame, made square on its longer side and padded by `pad`
    (as `box_region` pads a box). MediaPipe crops its second pass this way. Without a labelled,
    finite wrist and middle MCP (or with the two on one point) the angle is 0: an unturned box.
    """
    uv = np.asarray(uv, np.float64)
    keep = (
        np.isfinite(uv).all(axis=-1)
        if labelled is None
        else np.asarray(labelled, bool) & np.isfinite(uv).all(-1)
    )
    if not keep.any():
        raise ValueError("upright_region needs at least one labelled keypoint")
    angle = 0.0
    if keep[WRIST] and keep[MIDDLE_MCP]:
        dx, dy = uv[MIDDLE_MCP] - uv[WRIST]
        if dx * dx + dy * dy > 1e-12:
            # crop_matrix's rotation adds angle_deg to a direction's angle (y down): -90 is up
            angle = (-90.0 - math.degrees(math.atan2(dy, dx)) + 180.0) % 360.0 - 180.0
    R = rotation(angle)[:, :2]
    turned = uv[keep] @ R.T  # the keypoints in the turned frame (about the origin)
    lo, hi = turned.min(axis=0), turned.max(axis=0)
    centre = R.T @ ((lo + hi) / 2)  # back to source px (R is orthonormal)
    return (float(centre[0]), float(centre[1]), float(max(*(hi - lo), 1e-6) * pad)), angle


SIDE_STEPS = 128  # steady_region: side steps per doubling (0.54% apart)
ANGLE_STEP_DEG = 0.25  # steady_region: angle grid


def steady_region(region: Region, size: int, angle_deg: float = 0.0) -> tuple[Region, float]:
    """A crop placed from a model's answer (a found box, a last pass's keypoints), snapped to a
    grid: its side to 2^(1/SIDE_STEPS) steps, its centre to half an input pixel of that side
    (side / size / 2 source px), its angle to ANGLE_STEP_DEG.

    Why: such a crop is cut to uint8, so an answer that moved by float rounding alone (another
    batch size or runtime: about 3e-5 input px) flips a few of its grey levels, and the model
    answers that crop up to 0.06 input px differently (docs/export.md). On the grid the crop is
    the same unless the answer sits within that rounding of a grid line. The snap moves the crop
    by at most a quarter of an input pixel and 0.27% of its side, far inside the training crops'
    own jitter (augment translate and scale); keypoints go back through the snapped crop's matrix.
    """
    cx, cy, side = region
    side = float(2.0 ** (round(math.log2(max(side, 1e-6)) * SIDE_STEPS) / SIDE_STEPS))
    half_px = side / size / 2
    cx, cy = (float(round(v / half_px) * half_px) for v in (cx, cy))
    return (cx, cy, side), float(round(angle_deg / ANGLE_STEP_DEG) * ANGLE_STEP_DEG)


def crop_matrix(
    region: Region,
    size: int,
    *,
    angle_deg: float = 0.0,
    scale: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
    flip: bool = False,
    aspect: float = 1.0,
    tilt: tuple[float, float] | None = None,
) -> np.ndarray:
    """THE source -> model-input matrix: the square `region` (centre, side) fills size x size,
    then flip, zoom (x by sqrt(aspect), y by 1 / sqrt(aspect) on top: an anisotropic stretch of
    the source's axes that keeps the area), rotation about the input's centre, then a shift by a
    fraction of `size`. 2x3; with `tilt` = (tilt_deg, axis_deg) a 3x3 homography that also turns
    the crop in depth about its centre (`tilt_matrix`, focal length = `size`) before the shift.

    Every crop mode and every augmentation is this one matrix; the DALI graph builds its twin
    (`dali_loader.crop_matrix`) and the tests hold the two equal.
    """
    cx, cy, side = region
    s = size / side * scale
    r = math.sqrt(aspect)
    if tilt is None:  # the composition below, written out (predict builds several per crop)
        co, si = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        sx, sy = s * r * (-1.0 if flip else 1.0), s / r
        mx, my = size / 2 + shift[0] * size, size / 2 + shift[1] * size
        a, b, d, e = co * sx, -si * sy, si * sx, co * sy
        return np.array([[a, b, mx - (a * cx + b * cy)], [d, e, my - (d * cx + e * cy)]])
    centred = (
        rotation(angle_deg),
        scaling(s * r, s / r),
        scaling(-1.0 if flip else 1.0, 1.0),
        translation(-cx, -cy),
    )
    move = translation(size / 2 + shift[0] * size, size / 2 + shift[1] * size)
    return compose(move, tilt_matrix(tilt[0], tilt[1], float(size)), *centred)


def fit_matrix(src_w: int, src_h: int, size: int) -> np.ndarray:
    """Letterbox: scale the whole source into a size x size square, centred, aspect kept.

    A square source is a plain resize; `predict` maps its outputs back with `invert` of this.
    """
    return crop_matrix(image_region(src_w, src_h), size)


def matrix_scale(M: np.ndarray, size: int | None = None) -> float:
    """Destination pixels per source pixel of M (the geometric mean of its two axes).

    A homography's scale varies over the image: it is the LARGEST over the size x size
    destination (at one of its corners), so that a decode at this scale resolves every part of
    the warp. For a destination point y and G = invert(M), the source area per destination pixel
    is |det G| / w(y)^3 with w(y) = G[2] . (y, 1).
    """
    M = np.asarray(M, np.float64)
    if not is_homography(M):
        (a, b, _), (d, e, _) = M.tolist()
        return math.sqrt(abs(a * e - b * d))
    if size is None:
        raise TypeError("matrix_scale of a homography needs the destination size")
    G = np.linalg.inv(M)
    corners = np.array([[0.0, 0.0, 1.0], [size, 0.0, 1.0], [0.0, size, 1.0], [size, size, 1.0]])
    w = np.abs(corners @ G[2])
    return float(np.sqrt(w**3 / abs(np.linalg.det(G))).max())


def footprint(M: np.ndarray, size: int) -> np.ndarray:
    """(x0, y0, x1, y1): the source box around what the size x size destination of M shows (its
    corners mapped back; a homography maps the square's edges to straight lines, so the box holds
    the whole view)."""
    corners = np.array([[0.0, 0.0], [size, 0.0], [0.0, size], [size, size]])
    src = apply_matrix(invert(M), corners)
    return np.concatenate([src.min(axis=0), src.max(axis=0)])


def boxes_overlap(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N,) True where box (x0, y0, x1, y1) and boxes (N, 4) share an area (touching edges do not)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return (np.minimum(box[2], b[:, 2]) > np.maximum(box[0], b[:, 0])) & (
        np.minimum(box[3], b[:, 3]) > np.maximum(box[1], b[:, 1])
    )


def in_frame(uv: np.ndarray, size: int) -> np.ndarray:
    """True where a keypoint (..., 2) lies inside the size x size frame [0, size)^2."""
    uv = np.asarray(uv)
    return np.all((uv >= 0) & (uv < size), axis=-1) & np.all(np.isfinite(uv), axis=-1)


# ---------------------------------------------------------------------------------------------
# Several photos on one canvas (detection items), and boxes moved by a matrix


Square = tuple[float, float, float]  # (x0, y0, side): a square of canvas pixels, top-left corner and side


def canvas_region(size: int) -> Region:
    """The whole size x size canvas as a region: crop_matrix(canvas_region(s), s) is the identity,
    so the per-sample augmentation of a canvas is `crop_matrix(canvas_region(s), s, angle_deg=...)`."""
    return (size / 2, size / 2, float(size))


def place_matrix(src_w: float, src_h: float, square: Square) -> np.ndarray:
    """Source -> canvas: the whole source image letterboxed into `square` of a canvas (its longer
    side fills the square's side, centred). place_matrix(w, h, (0, 0, s)) == fit_matrix(w, h, s)."""
    x0, y0, side = square
    return compose(translation(x0, y0), crop_matrix(image_region(src_w, src_h), side))  # type: ignore[arg-type]


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """Boxes (..., 4) x0, y0, x1, y1 -> their corners (..., 4, 2): (x0, y0), (x1, y0), (x0, y1), (x1, y1)."""
    b = np.asarray(boxes, np.float64)
    x0, y0, x1, y1 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return np.stack(
        [np.stack([x0, y0], -1), np.stack([x1, y0], -1), np.stack([x0, y1], -1), np.stack([x1, y1], -1)], -2
    )


def corners_box(corners: np.ndarray) -> np.ndarray:
    """Points (..., n, 2) -> their axis-aligned extent (..., 4) x0, y0, x1, y1."""
    c = np.asarray(corners, np.float64)
    return np.concatenate([c.min(axis=-2), c.max(axis=-2)], axis=-1)


def move_boxes(M: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Boxes (..., 4) moved by M: the extent of their moved corners (exact for scale, shift and
    flip; under a rotation the box of the rotated box, as YOLO training moves boxes without
    segments)."""
    return corners_box(
        apply_affine(M, box_corners(boxes).reshape(-1, 2)).reshape(*np.shape(boxes)[:-1], 4, 2)
    )

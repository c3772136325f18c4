"""The one home of 2D geometry: projection, the affine matrices that move images AND keypoints.

Pixel convention (used everywhere in handpose): continuous pixel coordinates, x to the right,
y down, origin at the top-left CORNER of the top-left pixel. Pixel (col i, row j) covers
[i, i+1) x [j, j+1) and its centre is (i + 0.5, j + 0.5). Pillow's `transform`/`resize` and
DALI's `warp_affine` sample with this convention, so one 2x3 matrix applied to an image and to
its keypoints keeps them aligned exactly. Heatmap cell i therefore sits at coordinate i + 0.5
(model input pixels). FreiHAND's projected `uv` are taken as coordinates in this convention.

A matrix `M` (2x3, float64) maps SOURCE pixel coordinates to DESTINATION ones: p' = M[:, :2] p + M[:, 2].
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
    """A 2x3 affine as a 3x3 homogeneous matrix."""
    out = np.eye(3)
    out[:2] = M
    return out


def compose(*matrices: np.ndarray) -> np.ndarray:
    """compose(A, B, C) applies C first, then B, then A (like A @ B @ C)."""
    out = np.eye(3)
    for m in matrices:
        out = out @ to3x3(m)
    return out[:2].copy()


def invert(M: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine (destination -> source)."""
    return np.linalg.inv(to3x3(M))[:2].copy()


def translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty]])


def scaling(sx: float, sy: float | None = None) -> np.ndarray:
    return np.array([[sx, 0.0, 0.0], [0.0, sx if sy is None else sy, 0.0]])


def rotation(angle_deg: float) -> np.ndarray:
    """Rotation about the origin; positive angles turn clockwise on screen (y points down)."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0]])


def apply_affine(M: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Move points (..., 2) by M (2, 3); or a batch: M (B, 2, 3) with points (B, N, 2)."""
    M = np.asarray(M, np.float64)
    points = np.asarray(points, np.float64)
    if M.ndim == 3:
        return np.einsum("bij,bnj->bni", M[:, :, :2], points) + M[:, None, :, 2]
    return points @ M[:, :2].T + M[:, 2]


Region = tuple[float, float, float]  # (cx, cy, side): the square of source pixels that fills the input


def image_region(src_w: float, src_h: float) -> Region:
    """The whole image, letterboxed: centred, the longer side fills the input (`crop = "image"`)."""
    return (src_w / 2, src_h / 2, float(max(src_w, src_h)))


def box_region(box: np.ndarray, pad: float) -> Region:
    """A hand box (x0, y0, x1, y1), made square on its longer side and padded by `pad`
    (`crop = "box"`; top-down pose estimators use about 1.25)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return ((x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0, 1e-6) * pad)


def keypoints_box(uv: np.ndarray, labelled: np.ndarray | None = None) -> np.ndarray:
    """(x0, y0, x1, y1): the extent of the (labelled) keypoints (21, 2); NaN when none is."""
    uv = np.asarray(uv, np.float64)
    keep = np.isfinite(uv).all(axis=-1) if labelled is None else np.asarray(labelled, bool)
    if not keep.any():
        return np.full(4, np.nan)
    pts = uv[keep]
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)])


def crop_matrix(
    region: Region,
    size: int,
    *,
    angle_deg: float = 0.0,
    scale: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
    flip: bool = False,
) -> np.ndarray:
    """THE source -> model-input matrix: the square `region` (centre, side) fills size x size,
    then flip, rotation and zoom about the input's centre, then a shift by a fraction of `size`.

    Every crop mode and every augmentation is this one matrix; the DALI graph builds its twin
    (`dali_loader.crop_matrix`) and the tests hold the two equal.
    """
    cx, cy, side = region
    return compose(
        translation(size / 2 + shift[0] * size, size / 2 + shift[1] * size),
        rotation(angle_deg),
        scaling(size / side * scale),
        scaling(-1.0 if flip else 1.0, 1.0),
        translation(-cx, -cy),
    )


def fit_matrix(src_w: int, src_h: int, size: int) -> np.ndarray:
    """Letterbox: scale the whole source into a size x size square, centred, aspect kept.

    A square source is a plain resize; `predict` maps its outputs back with `invert` of this.
    """
    return crop_matrix(image_region(src_w, src_h), size)


def matrix_scale(M: np.ndarray) -> float:
    """Destination pixels per source pixel of M (the geometric mean of its two axes)."""
    return float(math.sqrt(abs(np.linalg.det(np.asarray(M, np.float64)[:, :2]))))


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

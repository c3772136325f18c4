"""`handpose synth`: a FreiHAND-format folder of generated right hands on cluttered backgrounds.

Layout written (exactly FreiHAND's): `OUT/training/rgb/%08d.jpg`, `OUT/training_xyz.json` (n lists
of 21 [x, y, z] in metres, camera space), `OUT/training_K.json` (n 3x3 lists); the same with
`evaluation` when n_eval > 0. Image number = id + N * v (N ids in the split, v = 0 gs, 1 hom,
2 sample, 3 auto); every version of an id shows the same hand on a different background.

The hand is a 21-joint kinematic chain in a local frame (x towards the thumb, y along the fingers,
z out of the palm), posed with random bone lengths, spread and flexion, turned by a random
rotation (full in-plane, limited out-of-plane), placed so it fills 45-80% of the frame and
projected with a random pinhole K. What is drawn is computed from the SAME rounded xyz and K that
go into the json, so the labels a reader projects sit exactly on the drawn joints.

Determinism: every id has its own RNG, `default_rng([seed, split_code, id])` for the hand and
`default_rng([seed, split_code, id, 1 + v])` for version v's background, so the bytes written do
not depend on worker count or order.
"""

from __future__ import annotations

import functools
import io
import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from handpose.atomic import tmp_target, write_bytes, write_text
from handpose.console import make_console
from handpose.cpu import collect_before_fork, cores
from handpose.errors import HandposeError
from handpose.geometry import project_points
from handpose.skeleton import FINGER_JOINTS, FINGERS, NUM_JOINTS

SPLIT_CODES = {"training": 0, "evaluation": 1}
VERSION_NAMES = ("gs", "hom", "sample", "auto")
# Draw at 2x and box-downsample: anti-aliased edges, and Pillow's integer vertex positions
# then cost at most 0.25 output px.
SS = 2
# Fixed encoder settings (see encode_jpeg), so the same pixels always give the same bytes.
JPEG_QUALITY = 90
XYZ_DECIMALS = 7  # 0.1 um: well below 1e-3 px after projection
K_DECIMALS = 4

# ---------------------------------------------------------------- hand model (local frame, metres)
# Local frame of a RIGHT hand: x towards the thumb side, y from the wrist along the fingers, z out
# of the palm (palmar side). This frame is right-handed, so a proper rotation keeps it a right hand.
MCP_XY = {
    "index": (0.024, 0.086),
    "middle": (0.004, 0.090),
    "ring": (-0.015, 0.085),
    "little": (-0.032, 0.076),
}
THUMB_CMC = (0.022, 0.026, 0.006)
# (proximal, middle, distal) bone lengths; the thumb's are (metacarpal, proximal, distal).
BONE_LENGTHS = {
    "thumb": (0.042, 0.032, 0.028),
    "index": (0.040, 0.024, 0.021),
    "middle": (0.045, 0.028, 0.023),
    "ring": (0.042, 0.027, 0.022),
    "little": (0.033, 0.020, 0.019),
}
# Half thickness at the finger's first joint; strong width differences are a joint-identity cue:
# the thumb is clearly the thickest, the little finger the thinnest.
BASE_RADIUS = {"thumb": 0.0125, "index": 0.0090, "middle": 0.0088, "ring": 0.0082, "little": 0.0070}
TAPER = 0.88  # radius ratio from one joint to the next
# Finger direction in the palm plane (radians from +y towards the thumb) and how spread moves it.
SPREAD_BASE = {"index": 0.08, "middle": 0.0, "ring": -0.08, "little": -0.17}
SPREAD_GAIN = {"index": 0.9, "middle": 0.1, "ring": -0.7, "little": -1.3}
PALM_OUTLINE = (
    (-0.027, -0.004), (0.025, -0.004), (0.036, 0.030), (0.033, 0.066), (0.032, 0.088), (0.024, 0.095),
    (0.004, 0.099), (-0.015, 0.094), (-0.032, 0.085), (-0.041, 0.076), (-0.037, 0.040),
)  # fmt: skip
# Palm creases (heart, head, life lines), drawn only when the palm faces the camera.
CREASES = (
    ((0.033, 0.060), (0.010, 0.068), (-0.015, 0.071), (-0.038, 0.066)),
    ((0.034, 0.046), (0.012, 0.051), (-0.012, 0.050)),
    ((0.026, 0.055), (0.018, 0.032), (0.012, 0.008)),
)
FOREARM_LENGTH = 0.26
FOREARM_RADIUS = (0.027, 0.032)  # at the wrist, at the far end
# Skin tones from light to dark; a hand's colour is a random blend of two neighbours.
SKIN_TONES = np.array(
    [(255, 219, 190), (241, 194, 167), (224, 172, 135), (198, 134, 96), (160, 100, 66), (112, 70, 46)],
    np.float64,
)
PALM_TINT = np.array((255, 205, 195), np.float64)  # palms are lighter and pinker than backs
NAIL_TINT = np.array((255, 228, 225), np.float64)


@dataclass(frozen=True)
class SynthHand:
    """One generated hand in camera space (metres), ready to draw; `xyz_m`/`K` are the labels."""

    xyz_m: np.ndarray  # (21, 3), rounded as written to json
    K: np.ndarray  # (3, 3), rounded as written to json
    radius_m: np.ndarray  # (21,) half thickness of the finger at each joint (wrist: unused)
    palmar: np.ndarray  # (21, 3) palmar normal of the bone ending at each joint (wrist: the palm's)
    palm_m: np.ndarray  # (P, 3) palm outline
    creases_m: tuple[np.ndarray, ...]
    forearm_m: np.ndarray  # (2, 3) wrist end, far end
    sleeve: tuple[float, tuple[int, int, int]] | None  # (start fraction along the forearm, colour)
    skin: np.ndarray  # (3,) RGB of the back of the hand
    light: np.ndarray  # (2,) unit image direction the highlights are shifted to


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _chain(
    start: np.ndarray, d0: np.ndarray, n0: np.ndarray, lengths: np.ndarray, flex: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Joints after `start` along a planar chain that curls towards its palmar normal `n0`.

    Returns (3, 3) joint positions and (3, 3) palmar normals of the bones ending there.
    """
    joints, normals, p, total = [], [], start, 0.0
    for length, angle in zip(lengths, flex, strict=True):
        total += angle
        d = math.cos(total) * d0 + math.sin(total) * n0
        normals.append(-math.sin(total) * d0 + math.cos(total) * n0)
        p = p + length * d
        joints.append(p)
    return np.array(joints), np.array(normals)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def hand_pose_local(rng: np.random.Generator) -> dict[str, Any]:
    """A random right-hand pose in the local frame: joints, radii, palmar normals, outline points."""
    scale = rng.uniform(0.88, 1.12)  # hand size
    xyz = np.zeros((NUM_JOINTS, 3))
    palmar = np.zeros((NUM_JOINTS, 3))
    palmar[0] = (0.0, 0.0, 1.0)
    radius = np.zeros(NUM_JOINTS)
    z_axis = np.array([0.0, 0.0, 1.0])

    # Fingers: shared curl for some hands (fists, flat hands), independent for others (pointing...).
    shared = rng.random() < 0.35
    curl_all = rng.random()
    spread = rng.uniform(0.0, 0.28)
    for f in FINGERS[1:]:
        j = FINGER_JOINTS[f]
        curl = np.clip(curl_all + rng.normal(0, 0.1), 0, 1) if shared else rng.random() ** 0.8
        mcp = np.clip(curl * 90 * rng.uniform(0.6, 1.1) + rng.normal(0, 8), 0, 90)
        pip = np.clip(curl * 95 * rng.uniform(0.8, 1.1) + rng.normal(0, 8), 0, 90)
        dip = np.clip(pip * rng.uniform(0.5, 0.9), 0, 90)
        alpha = SPREAD_BASE[f] + spread * SPREAD_GAIN[f] + rng.normal(0, 0.04)
        d0 = np.array([math.sin(alpha), math.cos(alpha), 0.0])
        lengths = np.array(BONE_LENGTHS[f]) * scale * rng.uniform(0.95, 1.05, 3)
        start = np.array([*MCP_XY[f], 0.0]) * scale
        xyz[j[0]] = start
        palmar[j[0]] = z_axis
        xyz[list(j[1:])], palmar[list(j[1:])] = _chain(
            start, d0, z_axis, lengths, np.radians([mcp, pip, dip])
        )
        radius[list(j)] = BASE_RADIUS[f] * scale * TAPER ** np.arange(4)

    # Thumb: the metacarpal leaves the palm abducted and turned towards the palm (opposition),
    # and the thumb curls across the palm.
    j = FINGER_JOINTS["thumb"]
    abduct, oppose = rng.uniform(0.35, 1.0), rng.uniform(0.2, 0.9)
    d0 = np.array(
        [math.sin(abduct) * math.cos(oppose), math.cos(abduct) * math.cos(oppose), math.sin(oppose)]
    )
    across = np.array([-0.7, 0.1, 0.7])
    n0 = _unit(across - across @ d0 * d0)
    curl = rng.random()
    flex = np.radians([rng.uniform(0, 15), curl * rng.uniform(0, 50), curl * rng.uniform(10, 80)])
    lengths = np.array(BONE_LENGTHS["thumb"]) * scale * rng.uniform(0.95, 1.05, 3)
    start = np.array(THUMB_CMC) * scale
    xyz[j[0]], palmar[j[0]] = start, n0
    xyz[list(j[1:])], palmar[list(j[1:])] = _chain(start, d0, n0, lengths, flex)
    radius[list(j)] = BASE_RADIUS["thumb"] * scale * TAPER ** np.arange(4)

    # Forearm: bent at the wrist by a random flexion and deviation.
    arm = _rot_z(rng.uniform(-0.25, 0.25)) @ _rot_x(rng.uniform(-0.5, 0.5)) @ np.array([0.0, -1.0, 0.0])
    return {
        "xyz": xyz,
        "radius": radius,
        "palmar": palmar,
        "palm": np.array([(x, y, 0.0) for x, y in PALM_OUTLINE]) * scale,
        "creases": tuple(np.array([(x, y, 0.002) for x, y in c]) * scale for c in CREASES),
        "forearm": np.array([np.zeros(3), arm * FOREARM_LENGTH * scale]),
    }


def random_K(rng: np.random.Generator, size: int) -> np.ndarray:
    """A FreiHAND-like pinhole: f ~ 515-785 px at 224 px, principal point near the centre."""
    f = size * rng.uniform(2.3, 3.5)
    cx, cy = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    return np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Palm or back towards the camera, tilted at most 40 deg out of plane, any in-plane angle."""
    # diag(1, -1, -1): fingers up, thumb right, palm to the camera (a right hand seen palm-on);
    # turning that 180 deg about the finger axis shows the back.
    side = np.diag([1.0, -1.0, -1.0]) if rng.random() < 0.5 else np.diag([-1.0, -1.0, 1.0])
    tilt = rng.uniform(-0.7, 0.7, 2)
    return _rot_z(rng.uniform(0, 2 * math.pi)) @ _rot_x(tilt[0]) @ _rot_y(tilt[1]) @ side


def place(rng: np.random.Generator, joints: np.ndarray, K: np.ndarray, size: int) -> np.ndarray:
    """Translation (3,) that puts rotated joints in front of the camera, spanning 45-80% of the frame."""
    f = K[0, 0]
    lo, hi = joints.min(0), joints.max(0)
    # A fist has a small joint box; a floor keeps it from filling the frame.
    extent = max(hi[0] - lo[0], hi[1] - lo[1], 0.12)
    frac = rng.uniform(0.45, 0.8)
    depth = f * extent / (frac * size)
    # Box centre anywhere that keeps the box (nearly) inside the frame.
    target = size / 2 + rng.uniform(-1, 1, 2) * ((1 - frac) / 2 + 0.02) * size
    t = np.array([0.0, 0.0, depth]) - np.array(
        [(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, joints[:, 2].mean()]
    )
    # Perspective moves the projected box a little: correct it in the image plane.
    for _ in range(2):
        uv = project_points(joints + t, K)
        centre = (uv.min(0) + uv.max(0)) / 2
        t[:2] += (target - centre) * depth / f
    return t


def skin_colour(rng: np.random.Generator) -> np.ndarray:
    """A skin tone: a blend of two neighbouring anchors, jittered a little per channel."""
    i = rng.integers(0, len(SKIN_TONES) - 1)
    c = SKIN_TONES[i] + rng.random() * (SKIN_TONES[i + 1] - SKIN_TONES[i])
    return np.clip(c * rng.uniform(0.93, 1.07, 3), 0, 255)


def sample_hand(rng: np.random.Generator, size: int) -> SynthHand:
    """A posed, placed and coloured hand with its camera K (all random draws come from `rng`)."""
    local = hand_pose_local(rng)
    K = np.round(random_K(rng, size), K_DECIMALS)
    R = random_rotation(rng)
    t = place(rng, local["xyz"] @ R.T, K, size)

    def cam(p: np.ndarray) -> np.ndarray:
        return p @ R.T + t

    sleeve = None
    if rng.random() < 0.5:
        sleeve = (float(rng.uniform(0.35, 0.8)), _random_colour(rng))
    angle = rng.uniform(0, 2 * math.pi)
    return SynthHand(
        xyz_m=np.round(cam(local["xyz"]), XYZ_DECIMALS),
        K=K,
        radius_m=local["radius"],
        palmar=local["palmar"] @ R.T,
        palm_m=cam(local["palm"]),
        creases_m=tuple(cam(c) for c in local["creases"]),
        forearm_m=cam(local["forearm"]),
        sleeve=sleeve,
        skin=skin_colour(rng),
        light=np.array([math.cos(angle), math.sin(angle)]),
    )


# ---------------------------------------------------------------- drawing
def ss_xy(uv: np.ndarray) -> np.ndarray:
    """Continuous output pixels -> integer ImageDraw coordinates on the SS-times canvas.

    ImageDraw fills pixel c for integer coordinate c, and that pixel's centre is c + 0.5, so a
    continuous point x lands on SS * x - 0.5. We round ourselves: Pillow truncates floats, which
    would shift everything by half a canvas pixel.
    """
    return np.round(SS * np.asarray(uv, np.float64) - 0.5)


class Canvas:
    """An SS-times RGB canvas plus its coverage mask; every shape is drawn on both."""

    def __init__(self, size: int) -> None:
        # Black where nothing is drawn, so the reduced RGB is the premultiplied hand layer.
        self.rgb = Image.new("RGB", (SS * size, SS * size))
        self.mask = Image.new("L", self.rgb.size, 0)
        self._rgb, self._mask = ImageDraw.Draw(self.rgb), ImageDraw.Draw(self.mask)

    def polygon(self, uv: np.ndarray, fill: tuple[int, int, int]) -> None:
        xy = [tuple(p) for p in ss_xy(uv).tolist()]
        self._rgb.polygon(xy, fill=fill)
        self._mask.polygon(xy, fill=255)

    def disc(self, uv: np.ndarray, r_px: float, fill: tuple[int, int, int]) -> None:
        """A filled disc centred at continuous point `uv` with radius `r_px` output pixels."""
        c = ss_xy(uv)
        r = max(1.0, round(SS * r_px))
        box = [c[0] - r, c[1] - r, c[0] + r, c[1] + r]
        self._rgb.ellipse(box, fill=fill)
        self._mask.ellipse(box, fill=255)

    def line(self, uv: np.ndarray, width_px: float, fill: tuple[int, int, int]) -> None:
        xy = [tuple(p) for p in ss_xy(uv).tolist()]
        w = max(1, round(SS * width_px))
        self._rgb.line(xy, fill=fill, width=w, joint="curve")
        self._mask.line(xy, fill=255, width=w, joint="curve")

    def capsule(self, a: np.ndarray, b: np.ndarray, ra: float, rb: float, fill: tuple[int, int, int]) -> None:
        """A tapered finger segment: discs at both ends joined by a quad."""
        d = b - a
        length = float(np.hypot(*d))
        if length > 1e-6:
            n = np.array([-d[1], d[0]]) / length
            self.polygon(np.array([a + n * ra, b + n * rb, b - n * rb, a - n * ra]), fill)
        self.disc(a, ra, fill)
        self.disc(b, rb, fill)


def _rgb(c: np.ndarray) -> tuple[int, int, int]:
    r, g, b = np.clip(np.round(c), 0, 255).astype(int).tolist()
    return (r, g, b)


def _mix(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return a + (b - a) * t


def render_hand(hand: SynthHand, size: int) -> tuple[Image.Image, Image.Image]:
    """Draw the hand alone: (RGB, coverage mask) at SS * size, painter's order far to near."""
    K = hand.K
    uv = project_points(hand.xyz_m, K)
    r_px = K[0, 0] * hand.radius_m / hand.xyz_m[:, 2]  # perspective: nearer joints are thicker
    outline = 0.9  # px of darker edge: separates overlapping fingers
    z = hand.xyz_m[:, 2]
    z_lo, z_hi = z.min(), z.max()
    palm_colour = _mix(hand.skin, PALM_TINT, 0.3)

    def shade(depth: float, palmar_z: float) -> np.ndarray:
        # Palmar side lighter; nearer parts a little brighter (a cheap depth cue).
        towards = float(np.clip((1.0 - palmar_z) / 2, 0, 1)) ** 2
        base = _mix(hand.skin, palm_colour, towards)
        return base * (1.06 - 0.22 * (depth - z_lo) / max(z_hi - z_lo, 1e-6))

    canvas = Canvas(size)
    parts: list[tuple[float, int, Callable[[], None]]] = []

    def forearm() -> None:
        a, b = project_points(hand.forearm_m, K)
        ra, rb = (K[0, 0] * np.array(FOREARM_RADIUS) / hand.forearm_m[:, 2]).tolist()
        colour = shade(float(hand.forearm_m[0, 2]), 0.0)
        canvas.capsule(a, b, ra + outline, rb + outline, _rgb(colour * 0.6))
        canvas.capsule(a, b, ra, rb, _rgb(colour))
        if hand.sleeve is not None:
            s, cloth = hand.sleeve
            m = a + s * (b - a)
            canvas.capsule(m, b, ra * 1.25, rb * 1.25, cloth)

    def palm() -> None:
        poly = project_points(hand.palm_m, K)
        palm_z = float(hand.palmar[0, 2])
        colour = shade(float(hand.palm_m[:, 2].mean()), palm_z)
        canvas.polygon(poly, _rgb(colour * 0.6))
        # Shrink towards the centroid by the outline width so the dark edge stays visible.
        centre = poly.mean(0)
        span = np.linalg.norm(poly - centre, axis=1, keepdims=True)
        canvas.polygon(centre + (poly - centre) * (1 - outline / np.maximum(span, 1)), _rgb(colour))
        if palm_z < -0.2:  # palm towards the camera: its creases show
            for crease in hand.creases_m:
                canvas.line(project_points(crease, K), 0.8, _rgb(colour * 0.78))

    def segment(i: int, j: int, tip: bool) -> None:
        colour = shade(float(z[i] + z[j]) / 2, float(hand.palmar[j, 2]))
        a, b = uv[i], uv[j]
        canvas.capsule(a, b, r_px[i] + outline, r_px[j] + outline, _rgb(colour * 0.6))
        canvas.capsule(a, b, r_px[i], r_px[j], _rgb(colour))
        # A highlight stripe on the lit side gives the finger a rounded look.
        d = b - a
        length = float(np.hypot(*d))
        if length > 2:
            n = np.array([-d[1], d[0]]) / length
            n = n if n @ hand.light > 0 else -n
            off = n * 0.35 * (r_px[i] + r_px[j]) / 2
            stripe = np.array([a + off + 0.15 * d, b + off - 0.15 * d])
            canvas.line(stripe, 0.3 * r_px[j], _rgb(_mix(colour, np.full(3, 255.0), 0.15)))
        # Nails on the back of the fingertips (only when that side faces the camera).
        if tip and hand.palmar[j, 2] > 0.35:
            canvas.disc(a + 0.68 * (b - a), 0.55 * r_px[j], _rgb(_mix(colour, NAIL_TINT, 0.5)))

    parts.append((-math.inf, 0, forearm))  # the arm is always behind: keeps the hand readable
    parts.append((-float(hand.palm_m[:, 2].mean()), 1, palm))
    for f in FINGERS:
        j = FINGER_JOINTS[f]
        for k in range(3):
            a, b = j[k], j[k + 1]
            parts.append((-float(z[a] + z[b]) / 2, len(parts), functools.partial(segment, a, b, k == 2)))
    # Far to near: sort by -depth (the forearm first); ties keep insertion order.
    for _, _, draw in sorted(parts, key=lambda p: (p[0], p[1])):
        draw()
    return canvas.rgb, canvas.mask


# ---------------------------------------------------------------- backgrounds
def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = rng.integers(0, 256, 3).tolist()
    return (r, g, b)


def render_background(rng: np.random.Generator, size: int) -> Image.Image:
    """Clutter at SS * size: a smooth colour field, random shapes and lines, skin-like distractors."""
    S = SS * size
    k = int(rng.integers(2, 6))
    field = Image.fromarray(rng.integers(0, 256, (k, k, 3), dtype=np.uint8))
    # Smooth at the output size, then a pixel-exact 2x: reduce() undoes it, at half the cost of
    # a bilinear resize straight to S.
    img = field.resize((size, size), Image.Resampling.BILINEAR).resize((S, S), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 22))):
        kind = rng.integers(0, 4)
        centre = rng.uniform(-0.1, 1.1, 2) * S
        half = rng.uniform(0.03, 0.3, 2) * S
        box = [*(centre - half).tolist(), *(centre + half).tolist()]
        colour = _random_colour(rng)
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        elif kind == 2:
            pts = rng.uniform(-0.1, 1.1, (int(rng.integers(2, 5)), 2)) * S
            draw.line([tuple(p) for p in pts.tolist()], fill=colour, width=int(rng.integers(1, 8 * SS)))
        else:
            pts = centre + rng.uniform(-1, 1, (int(rng.integers(3, 7)), 2)) * half
            draw.polygon([tuple(p) for p in pts.tolist()], fill=colour)
    if rng.random() < 0.3:  # stripes: a texture with many parallel edges
        colour, step = _random_colour(rng), int(rng.integers(6, 20)) * SS
        for x in range(-S, 2 * S, step):
            draw.line([(x, 0), (x + S * rng.uniform(-0.5, 0.5), S)], fill=colour, width=SS * 2)
    # Skin-coloured distractors: a few finger-like blobs with no hand attached.
    for _ in range(int(rng.integers(0, 3))):
        a = rng.uniform(0, 1, 2) * S
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.2) * S
        b = a + length * np.array([math.cos(angle), math.sin(angle)])
        r = rng.uniform(0.02, 0.05) * S
        colour = _rgb(skin_colour(rng))
        draw.line([tuple(a), tuple(b)], fill=colour, width=int(2 * r))
        for p in (a, b):
            draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=colour)
    return img


def compose(
    hand_rgb: Image.Image,
    hand_mask: Image.Image,
    background: Image.Image,
    noise: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Hand pasted over `background` (modified in place), box-downsampled to the output size, plus
    sensor noise: uniform integers in [-noise, noise] (several times cheaper than Gaussian noise)."""
    background.paste(hand_rgb, (0, 0), hand_mask)
    out = np.asarray(background.reduce(SS), np.int16)
    if noise > 0:
        out = out + rng.integers(-noise, noise + 1, out.shape, dtype=np.int16)
    return out.clip(0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """JPEG bytes with fixed settings (quality 90), so equal pixels give equal bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(
        buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling="4:2:0"
    )
    return buf.getvalue()


def make_sample(
    seed: int, split: str, idx: int, size: int, versions: int
) -> tuple[SynthHand, list[np.ndarray]]:
    """The hand of one id and its `versions` images (uint8, size x size x 3), fully determined by the ids."""
    code = SPLIT_CODES[split]
    hand = sample_hand(np.random.default_rng([seed, code, idx]), size)
    rgb, mask = render_hand(hand, size)
    images = []
    for v in range(versions):
        rng = np.random.default_rng([seed, code, idx, 1 + v])
        background = render_background(rng, size)
        images.append(compose(rgb, mask, background, int(rng.integers(0, 10)), rng))
    return hand, images


# ---------------------------------------------------------------- the command
Task = tuple[Path, str, int, int, int, int, int, int]  # rgb dir, split, start, stop, N, seed, size, versions


def _write_chunk(task: Task) -> list[tuple[int, list, list]]:
    """Worker: render and write ids [start, stop) of one split; returns their labels."""
    rgb_dir, split, start, stop, n_split, seed, size, versions = task
    out = []
    for idx in range(start, stop):
        hand, images = make_sample(seed, split, idx, size, versions)
        for v, pixels in enumerate(images):
            write_bytes(rgb_dir / f"{idx + n_split * v:08d}.jpg", encode_jpeg(pixels))
        out.append((idx, hand.xyz_m.tolist(), hand.K.tolist()))
    return out


# Ours: numbered images (and the temp names handpose.atomic gives them while they are written).
_IMAGE_NAME = re.compile(r"^(\d{8})\.jpg$")
# Files a real FreiHAND download has and synth never writes: their presence means "not ours".
_FREIHAND_ONLY = ("training_mano.json", "training_verts.json", "training_scale.json", "evaluation_mano.json")


def _remove_stale(rgb_dir: Path, keep: int) -> None:
    """Delete numbered images (and crashed temp files) an earlier, larger run left behind."""
    for entry in os.scandir(rgb_dir):
        m = _IMAGE_NAME.match(entry.name)
        temp = _IMAGE_NAME.match(tmp_target(entry.name) or "")
        if (m and int(m.group(1)) >= keep) or temp:
            os.unlink(entry.path)


def _validate(n: int, n_eval: int, versions: int, seed: int, size: int, workers: int | None) -> None:
    if n < 1:
        raise HandposeError(f"--n must be at least 1, got {n}")
    if n_eval < 0:
        raise HandposeError(f"--eval must be 0 or more, got {n_eval}")
    if not 1 <= versions <= len(VERSION_NAMES):
        raise HandposeError(f"--versions must be 1-4 ({', '.join(VERSION_NAMES)}), got {versions}")
    if seed < 0:
        raise HandposeError(f"--seed must be 0 or more, got {seed}")
    if size < 32:
        raise HandposeError(f"--size must be at least 32 px, got {size}")
    if workers is not None and workers < 1:
        raise HandposeError(f"--workers must be at least 1, got {workers}")


def _chunks(
    splits: dict[str, int], dirs: dict[str, Path], seed: int, size: int, versions: int, workers: int
) -> Iterator[Task]:
    """Tasks of a few ids each: small enough to balance and show progress, big enough to be cheap."""
    total = sum(splits.values())
    step = max(1, min(32, total // (workers * 8) or 1))
    for split, count in splits.items():
        for start in range(0, count, step):
            yield (dirs[split], split, start, min(count, start + step), count, seed, size, versions)


def _ordered(tasks: list[Task], workers: int) -> Iterator[list[tuple[int, list, list]]]:
    """Results in task order (workers may finish out of order; labels are keyed by id anyway)."""
    if workers == 1:
        yield from map(_write_chunk, tasks)
        return
    collect_before_fork()
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(_write_chunk, tasks)


def synth(
    out: Path,
    *,
    n: int,
    n_eval: int = 0,
    versions: int = 1,
    seed: int = 0,
    size: int = 224,
    workers: int | None = None,
) -> dict:
    """Write a FreiHAND-format folder of generated hands to `out`; returns counts and paths.

    Images are written first (atomically), the json lists last, so a folder with json is complete.
    Re-running into the same folder rewrites it to the same bytes.
    """
    _validate(n, n_eval, versions, seed, size, workers)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HandposeError(f"output {out} exists and is not a folder")
    # synth deletes and overwrites images in OUT: never do that to a real dataset.
    for name in _FREIHAND_ONLY:
        if (out / name).exists():
            raise HandposeError(
                f"output {out} holds {name}: it looks like real FreiHAND data, refusing to overwrite"
            )
    splits = {"training": n} | ({"evaluation": n_eval} if n_eval else {})
    dirs = {s: out / s / "rgb" for s in splits}
    for split, rgb_dir in dirs.items():
        rgb_dir.mkdir(parents=True, exist_ok=True)
        # Drop the old labels first: an interrupted re-run must not look complete.
        for suffix in ("xyz", "K"):
            (out / f"{split}_{suffix}.json").unlink(missing_ok=True)
        _remove_stale(rgb_dir, splits[split] * versions)

    workers = max(1, min(workers or cores(), sum(splits.values())))
    tasks = list(_chunks(splits, dirs, seed, size, versions, workers))
    labels: dict[str, list] = {s: [None] * c for s, c in splits.items()}
    total = sum(splits.values()) * versions
    console = make_console(stderr=True)
    t0 = time.perf_counter()
    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("images", total=total)
        for (_, split, start, stop, *_), results in zip(tasks, _ordered(tasks, workers), strict=True):
            for idx, xyz, K in results:
                labels[split][idx] = (xyz, K)
            progress.advance(bar, (stop - start) * versions)
    seconds = time.perf_counter() - t0

    summary: dict = {"out": str(out), "seed": seed, "size": size, "versions": list(VERSION_NAMES[:versions])}
    for split, items in labels.items():
        xyz_path, k_path = out / f"{split}_xyz.json", out / f"{split}_K.json"
        write_text(xyz_path, json.dumps([xyz for xyz, _ in items]))
        write_text(k_path, json.dumps([K for _, K in items]))
        summary[split] = {"ids": len(items), "images": len(items) * versions, "rgb": str(dirs[split])}
        summary[split] |= {"xyz": str(xyz_path), "K": str(k_path)}
    summary["images"] = total
    console.print(f"synth: wrote {total} images to {out} in {seconds:.1f} s ({total / seconds:.0f} images/s)")
    return summary

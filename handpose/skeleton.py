"""The 21-joint hand: FreiHAND joint order, bones, fingers, and how a hand is drawn (one home
for all stages: inspect's contact sheet, predict's overlays and report gallery)."""

from __future__ import annotations

from typing import Any

import numpy as np

NUM_JOINTS = 21

FINGERS = ("thumb", "index", "middle", "ring", "little")

# wrist; then each finger from the palm outwards (1 = MCP/CMC ... 4 = tip).
JOINT_NAMES: tuple[str, ...] = ("wrist",) + tuple(f"{f}{i}" for f in FINGERS for i in range(1, 5))

# Joint indices of each finger, palm to tip.
FINGER_JOINTS: dict[str, tuple[int, ...]] = {
    f: tuple(range(1 + 4 * k, 5 + 4 * k)) for k, f in enumerate(FINGERS)
}

# (parent, child) pairs: wrist to each finger base, then along each finger.
BONES: tuple[tuple[int, int], ...] = tuple(
    pair for f in FINGERS for pair in zip((0,) + FINGER_JOINTS[f][:-1], FINGER_JOINTS[f], strict=True)
)

# One RGB colour per finger, for overlays.
FINGER_COLORS: dict[str, tuple[int, int, int]] = {
    "thumb": (255, 64, 64),
    "index": (255, 200, 0),
    "middle": (64, 220, 64),
    "ring": (0, 180, 255),
    "little": (200, 80, 255),
}


WRIST_COLOR = (255, 255, 255)  # the wrist's dot: it belongs to no finger


def joint_finger(joint: int) -> str:
    """Finger name of a joint index (the wrist is reported as 'wrist')."""
    return "wrist" if joint == 0 else FINGERS[(joint - 1) // 4]


def draw_skeleton(
    draw: Any,
    uv: np.ndarray,
    labelled: np.ndarray | None = None,
    *,
    radius: int = 3,
    width: int = 2,
    colour: tuple[int, int, int] | None = None,
) -> None:
    """Draw one hand's bones and joints on a Pillow `ImageDraw`; joints not `labelled` (and
    their bones) are left out. `colour` None: bones and filled, black-edged dots in finger
    colours, the wrist WRIST_COLOR (a hand's keypoints); a colour: bones and rings in it (the
    ground truth under a prediction).

    A keypoint is drawn on the pixel that holds it: pixel i covers [i, i + 1) in geometry.py's
    convention, so that is floor(uv), given to Pillow as whole coordinates (Pillow truncates some
    float coordinates, lines, and rounds others, dots). Dots are centred on that pixel."""
    p = np.floor(np.asarray(uv, np.float64).reshape(NUM_JOINTS, 2)).astype(int)
    show = np.ones(NUM_JOINTS, bool) if labelled is None else np.asarray(labelled, bool)
    for a, b in BONES:
        if show[a] and show[b]:
            fill = colour or FINGER_COLORS[joint_finger(b)]
            draw.line([tuple(p[a].tolist()), tuple(p[b].tolist())], fill=fill, width=width)
    for j in np.flatnonzero(show):
        x, y = p[j].tolist()
        dot = [x - radius, y - radius, x + radius, y + radius]
        if colour is not None:
            draw.ellipse(dot, outline=colour)
        else:
            fill = WRIST_COLOR if j == 0 else FINGER_COLORS[joint_finger(int(j))]
            draw.ellipse(dot, fill=fill, outline=(0, 0, 0))

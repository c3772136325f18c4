"""The 21-joint hand: FreiHAND joint order, bones and fingers (one home for all stages)."""

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


def joint_finger(joint: int) -> str:
    """Finger name of a joint index (the wrist is reported as 'wrist')."""
    return "wrist" if joint == 0 else FINGERS[(joint - 1) // 4]

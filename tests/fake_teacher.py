"""A stand-in for MediaPipe in tools/teacher_label.py, for tests of `make hands` (tools/hands.py
runs it through HANDPOSE_TEST_TEACHER="PYTHON tests/fake_teacher.py").

    FAKE_TEACHER_ANSWERS=answers.json python tests/fake_teacher.py SRC DEST [teacher_label options]

answers.json maps `photo_key(rgb)` of a photo as the teacher sees it (decoded, EXIF applied) to
its hands, each 21 [x, y] fractions of the image. The fake answers them about the photo and their
mirror image about the mirrored photo (as MediaPipe would, so the mirror check keeps them), and
nothing about a photo it does not know. Everything else is teacher_label.py's own code.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import teacher_label  # noqa: E402

from handpose.teacher import Answer, mirror_answer  # noqa: E402


def photo_key(rgb: np.ndarray) -> str:
    """The key of an RGB uint8 image: its shape and pixels."""
    return hashlib.sha256(repr(rgb.shape).encode() + np.ascontiguousarray(rgb).tobytes()).hexdigest()


def factory(args: Any) -> tuple[dict[str, Any], teacher_label.Answerer]:
    table = json.loads(Path(os.environ["FAKE_TEACHER_ANSWERS"]).read_text())

    def answer(rgb: np.ndarray) -> list[Answer]:
        hands = [
            Answer(np.asarray(uv, np.float64), "Left", 0.95, 0.9) for uv in table.get(photo_key(rgb), [])
        ]
        if hands:
            return hands
        mirrored = table.get(photo_key(np.ascontiguousarray(rgb[:, ::-1])), [])
        return [mirror_answer(Answer(np.asarray(uv, np.float64), "Left", 0.95, 0.9)) for uv in mirrored]

    return {"teacher": "fake"}, answer


if __name__ == "__main__":
    try:
        teacher_label.run(sys.argv[1:], teacher=factory)
    except teacher_label.HandposeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

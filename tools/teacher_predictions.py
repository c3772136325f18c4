#!/usr/bin/env python3
"""The MediaPipe teacher's answers as predictions `tools/peer_score.py` scores: the teacher judged
by the same code as `handpose predict` and the Ultralytics peer (on the photos it labelled, that
is MediaPipe against its own labels).

    .venv-teacher/bin/python tools/teacher_label.py IMAGES LABELLED [--max-hands 4]
    .venv/bin/python tools/teacher_predictions.py LABELLED IMAGES --out teacher.jsonl
    .venv/bin/python tools/peer_score.py teacher.jsonl IMAGES --min-score 0.5

Reads LABELLED/.teacher-cache (the raw answers teacher_label.py keeps for every photo, before
its filters) for every image under IMAGES (searched recursively, as teacher_label.py walks it)
and writes one line per image, {"path", "hands": [{"box", "score", "keypoints"}]} in its pixels:
every hand MediaPipe answered on the photo itself (not on its mirror), its box the label box
teacher_label.py would write (`teacher.hand_box`), its score the palm detection's, each keypoint's
score 1 (MediaPipe gives none). An image without a cache entry is refused in one line: run
teacher_label.py over IMAGES first. Written to a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handpose.atomic import check_output_file, write_text  # noqa: E402
from handpose.errors import HandposeError  # noqa: E402
from handpose.sources.files import is_image, walk  # noqa: E402
from handpose.teacher import Answer, hand_box, to_pixels  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
from teacher_label import CACHE  # noqa: E402  (imports without MediaPipe: only its Teacher needs it)


def image_line(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """One image's line: the teacher's answers on the photo, in its pixels."""
    width, height = (int(v) for v in entry["size"])
    hands = []
    for raw in entry["photo"]:
        answer = Answer.from_json(raw)
        uv = to_pixels(answer.uv, width, height)
        hands.append(
            {
                "box": [round(float(v), 3) for v in hand_box(uv, width, height)],
                "score": answer.detection_score,
                "keypoints": [[round(float(x), 3), round(float(y), 3), 1.0] for x, y in uv],
            }
        )
    return {"path": str(path), "hands": hands}


def predictions(labelled: Path, images: Path) -> list[dict[str, Any]]:
    """Every image's line, in walk order; one HandposeError line for an image the cache lacks or
    an entry that cannot be read."""
    if not images.is_dir():
        raise HandposeError(f"{images}: not a folder of images")
    lines = []
    for path in (Path(p) for p in walk(images, is_image)):
        rel = path.relative_to(images).as_posix()
        cached = labelled / CACHE / (rel + ".json")
        if not cached.is_file():
            hint = f"run teacher_label.py over {images}"
            raise HandposeError(f"{cached}: no teacher answer for {path} ({hint})")
        try:
            lines.append(image_line(path, json.loads(cached.read_text())))
        except (ValueError, KeyError, TypeError) as e:
            raise HandposeError(f"{cached}: not a teacher answer ({e})") from None
    if not lines:
        raise HandposeError(f"{images}: no images")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labelled", type=Path, help="teacher_label.py's output folder (its .teacher-cache)")
    p.add_argument("images", type=Path, help="the image folder teacher_label.py read")
    p.add_argument("--out", type=Path, required=True, help="predictions file (JSON lines)")
    args = p.parse_args(argv)
    try:
        out = check_output_file(args.out, "--out")
        lines = predictions(args.labelled, args.images)
    except HandposeError as e:
        sys.exit(f"error: {e}")
    write_text(out, "".join(json.dumps(line) + "\n" for line in lines))
    print(f"{len(lines)} images, {sum(len(x['hands']) for x in lines)} hands -> {out}")


if __name__ == "__main__":
    main()

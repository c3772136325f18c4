#!/usr/bin/env python3
"""The Ultralytics YOLO-pose peer's predictions, written for `tools/peer_score.py`.

Runs in the peer's own environment (`make peer-env`: Ultralytics is AGPL and brings its own
torch, so it is never a handpose dependency), not in handpose's:

    .venv-peer/bin/python tools/peer_predict.py WEIGHTS IMAGES_DIR --out peer.jsonl [--imgsz 224]

Writes one JSON line per image: {"path", "hands": [{"box": [x0, y0, x1, y1], "score",
"keypoints": [[x, y, score] x 21]}]} in the image's pixels, every prediction down to `--conf`
(0.001, as Ultralytics' own val, so that average precision sees the whole ranking). Written to a
temporary name, then renamed. Imports nothing from handpose.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("images", type=Path, help="a folder of images (searched recursively)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--imgsz", type=int, default=224)
    ap.add_argument("--conf", type=float, default=0.001)
    ap.add_argument("--max-det", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    try:
        from ultralytics import YOLO
    except ImportError:
        sys.exit(
            "peer_predict: ultralytics is not installed here; run it with the peer's python (make peer-env)"
        )
    if not args.images.is_dir():
        sys.exit(f"peer_predict: {args.images}: not a folder")
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in SUFFIXES)
    if not paths:
        sys.exit(f"peer_predict: {args.images}: no images")
    model = YOLO(args.weights)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "w") as f:
        for k in range(0, len(paths), args.batch):
            batch = [str(p) for p in paths[k : k + args.batch]]
            results = model.predict(
                batch, imgsz=args.imgsz, conf=args.conf, max_det=args.max_det, device="cpu", verbose=False
            )
            for path, r in zip(batch, results, strict=True):
                boxes = r.boxes.xyxy.tolist()
                scores = r.boxes.conf.tolist()
                xy = r.keypoints.xy.tolist() if r.keypoints is not None else [[] for _ in boxes]
                kc = (
                    r.keypoints.conf.tolist()
                    if r.keypoints is not None and r.keypoints.conf is not None
                    else None
                )
                hands = [
                    {
                        "box": [round(v, 3) for v in box],
                        "score": round(score, 5),
                        "keypoints": [
                            [round(x, 3), round(y, 3), round(kc[n][j], 4) if kc else 1.0]
                            for j, (x, y) in enumerate(xy[n])
                        ],
                    }
                    for n, (box, score) in enumerate(zip(boxes, scores, strict=True))
                ]
                f.write(json.dumps({"path": str(Path(path).resolve()), "hands": hands}) + "\n")
            print(f"{min(k + args.batch, len(paths))}/{len(paths)}", file=sys.stderr, flush=True)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()

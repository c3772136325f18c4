#!/usr/bin/env python3
"""ONNX parity on real photos: `predict MODEL` and `predict MODEL.onnx` (exported here) on the same
inputs, the keypoints compared in original pixels (refinement passes included).

    tools/onnx_parity.py MODEL INPUT... [--out DIR] [--boxes gt --split val] [--refine N] [--no-detector]

Both runs use the same detector: a bundled model's own (PyTorch), unless --no-detector.

Prints one JSON line: images, predictions, mean and max |difference| in px (x and y of every
keypoint), the max score difference, and both runs' images/s (one after the other on this
machine: a timing, not a benchmark; `handpose bench predict --onnx` interleaves them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from handpose.export import export  # noqa: E402
from handpose.models import detector_path  # noqa: E402
from handpose.predict import predict  # noqa: E402


def keypoints(out: Path) -> np.ndarray:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return np.array([r["keypoints"] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", type=Path, help="keep the two runs here (default: a temp folder)")
    ap.add_argument("--split")
    ap.add_argument("--boxes")
    ap.add_argument("--refine", type=int, help="refinement passes on whole photos [predict's default]")
    ap.add_argument("--no-detector", action="store_true", help="whole photos, not a bundled model's detector")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnx-parity-") as tmp:
        out = args.out or Path(tmp)
        onnx = out / "model.onnx"
        export(args.model, onnx, overwrite=True, quiet=True)
        # the exported graph is the keypoint model alone: give both runs the checkpoint's detector
        detector = False if args.no_detector else (detector_path(args.model) or False)
        runs = {}
        for kind, model in (("pytorch", args.model), ("onnxruntime", onnx)):
            runs[kind] = predict(
                model,
                args.inputs,
                out / kind,
                split=args.split,
                boxes=args.boxes,
                refine=args.refine,
                detector=detector,
                device="cpu",
                quiet=True,
            )
        a, b = keypoints(out / "pytorch"), keypoints(out / "onnxruntime")
        d = np.abs(a[..., :2] - b[..., :2])
        print(
            json.dumps(
                {
                    "images": runs["pytorch"]["images"],
                    "predictions": len(a),
                    "mean_px": float(d.mean()),
                    "max_px": float(d.max()),
                    "score_max_diff": float(np.abs(a[..., 2] - b[..., 2]).max()),
                    "pytorch_images_per_s": runs["pytorch"]["images_per_s"],
                    "onnxruntime_images_per_s": runs["onnxruntime"]["images_per_s"],
                }
            )
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""JPEG decode rate, one core, of every decoder importable in THIS interpreter.

Why we decode with simplejpeg rather than Pillow / pillow-simd: run this in the project venv
and in a venv with pillow-simd (`pip install pillow-simd simplejpeg numpy`), on the same files:

    .venv/bin/python tools/bench_decoders.py IMAGES_DIR
    /tmp/simd/bin/python tools/bench_decoders.py IMAGES_DIR

Standalone on purpose (no handpose import), so it runs in a bare venv. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path


def _rate(fn, blobs: list[bytes], seconds: float) -> float:
    fn(blobs[0])  # warm-up (imports, tables)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in blobs:
            fn(b)
        n += len(blobs)
    return n / (time.perf_counter() - t0)


def decoders() -> dict:
    out = {}
    try:
        import numpy as np
        import PIL
        from PIL import Image

        def pil(b: bytes):
            with Image.open(io.BytesIO(b)) as im:
                return np.asarray(im.convert("RGB"))

        out[f"pillow {PIL.__version__}"] = pil
    except ImportError:
        pass
    try:
        import simplejpeg

        out[f"simplejpeg {simplejpeg.__version__}"] = lambda b: simplejpeg.decode_jpeg(b, "RGB")
    except ImportError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", type=Path)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[: args.limit]
    if not files:
        raise SystemExit(f"no JPEG files under {args.images}")
    blobs = [p.read_bytes() for p in files]
    rates = {name: _rate(fn, blobs, args.seconds) for name, fn in decoders().items()}
    base = next((v for k, v in rates.items() if k.startswith("pillow")), None)
    print(f"{len(blobs)} JPEGs, one core")
    for name, r in rates.items():
        rel = f"{r / base:5.2f}x pillow" if base else ""
        print(f"  {name:28s} {r:9.0f} images/s  {rel}")
    print(json.dumps({"images": len(blobs), "images_per_s": {k: round(v, 1) for k, v in rates.items()}}))


if __name__ == "__main__":
    main()

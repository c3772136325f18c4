#!/usr/bin/env python3
"""Parameters, forward FLOPs per sample and CPU train-step samples/s of model configurations.

    .venv/bin/python tools/model_table.py unet-w8-d3@64 unet-w8-d3@96 strided-w8-d1@128

A configuration is ARCH-wWIDTH-dDEPTH@SIZE, optionally followed by ,key=value pairs for the other
model keys (sigma, loss, reg, simcc_k, presence, stride), e.g. strided-w12-d1@128,reg=0,
simcc-w16-d1@96,simcc_k=3,presence=1 or centernet-w8-d1@224,stride=4. Defaults: unet iou loss,
sigma 3; strided l1 loss, sigma 4, reg 1; simcc kl loss, sigma 2, simcc_k 2; centernet (the hand
detector) focal loss, stride 8. Inference rates (forward + decode) are measured beside the train
step. All are timed in one process, interleaved (handpose/bench/model.py); the first is the
baseline of the "x first" columns. Run it on an otherwise idle machine for figures
worth recording.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from handpose.bench.model import bench_models
from handpose.model import DETECTOR_STRIDE, SIMCC_K, STRIDED_REG

DEFAULTS = {
    "unet": {"sigma": 3.0, "loss": "iou", "index_offset": 0.5},
    "strided": {"sigma": 4.0, "loss": "l1", "index_offset": 0.5, "reg": STRIDED_REG},
    "simcc": {"sigma": 2.0, "loss": "kl", "index_offset": 0.5, "simcc_k": SIMCC_K},
    "centernet": {"sigma": 3.0, "loss": "focal", "index_offset": 0.5, "stride": DETECTOR_STRIDE},
}
FIRST = ["unet-w8-d3@64", "unet-w8-d3@96", "unet-w16-d3@64"]


def parse(spec: str) -> dict[str, Any]:
    """'strided-w12-d1@128,reg=0' -> a model config dict."""
    head, *extra = spec.split(",")
    m = re.fullmatch(r"(\w+)-w(\d+)-d(\d+)@(\d+)", head)
    if not m or m.group(1) not in DEFAULTS:
        raise SystemExit(
            f"bad configuration {spec!r}: expected ARCH-wWIDTH-dDEPTH@SIZE, ARCH in {list(DEFAULTS)}"
        )
    arch, width, depth, size = m.groups()
    cfg: dict[str, Any] = {
        "arch": arch,
        "width": int(width),
        "depth": int(depth),
        "image_size": int(size),
        **DEFAULTS[arch],
    }
    for pair in extra:
        key, _, value = pair.partition("=")
        if key == "loss":
            cfg[key] = value
        elif key == "presence":
            cfg[key] = bool(float(value))
        elif key == "stride":
            cfg[key] = int(value)
        else:
            cfg[key] = float(value)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", default=FIRST, help=f"default: {' '.join(FIRST)}")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--steps", type=int, default=5, help="steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-train", action="store_true", help="time inference only (forward + decode)")
    args = ap.parse_args()
    bench_models(
        [parse(s) for s in args.configs],
        batch_size=args.batch_size,
        threads=args.threads,
        steps=args.steps,
        rounds=args.rounds,
        train=not args.no_train,
    )


if __name__ == "__main__":
    main()

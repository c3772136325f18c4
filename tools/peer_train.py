#!/usr/bin/env python3
"""`yolo ARGS...` (Ultralytics' own command line) with torch on every core.

Ultralytics sets torch to cores - 1 threads when it trains on a CPU (1 on a 2-core machine); the
peer comparison in BENCHMARKS.md gives it the same cores as handpose's recipes. Runs in the
peer's environment (`make peer-env`), e.g.:

    .venv-peer/bin/python tools/peer_train.py pose train model=yolo11n-pose.yaml data=DATA.yaml \\
        imgsz=224 pretrained=False device=cpu time=1.95 project=OUT name=equal-cpu seed=0 plots=False
"""

from __future__ import annotations

import os
import sys

try:
    import ultralytics.utils as utils
    import ultralytics.utils.torch_utils as torch_utils
    from ultralytics.cfg import entrypoint
except ImportError:
    sys.exit("peer_train: ultralytics is not installed here; run it with the peer's python (make peer-env)")

utils.NUM_THREADS = torch_utils.NUM_THREADS = os.cpu_count() or 1
sys.argv = ["yolo", *sys.argv[1:]]
entrypoint()

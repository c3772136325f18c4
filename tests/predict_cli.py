"""`handpose predict` run as a user runs it (`python tests/predict_cli.py predict ...`, or under
torchrun), with `model.build_model` stood in by predictkit until it lands."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predictkit import ensure_build_model  # noqa: E402

ensure_build_model()

from handpose.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = ["handpose", *sys.argv[1:]]
    main()

#!/usr/bin/env python3
"""Write docs/train.md's table of every `handpose train` key from TrainConfig's declarations.

    .venv/bin/python tools/config_table.py          # rewrite the table in place
    .venv/bin/python tools/config_table.py --check  # exit 1 if the docs differ (what the tests check)

The table sits between the BEGIN and END markers below; everything else in the file is left as
it is. Each row is one field's `config.setting` declaration: default, meaning, bounds, and what a
resumed run does with a change (`config.markdown_table`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from handpose.config import markdown_table
from handpose.train import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "train.md"
BEGIN = "<!-- keys: written by tools/config_table.py from TrainConfig's declarations; do not edit -->\n"
END = "<!-- end of keys -->\n"


def with_table(text: str) -> str:
    """`text` (docs/train.md) with the current table between the markers."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{DOC}: the markers {BEGIN.strip()} ... {END.strip()} are missing")
    return head + BEGIN + markdown_table(TrainConfig) + END + tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that the docs are up to date")
    args = ap.parse_args()
    text = DOC.read_text(encoding="utf-8")
    new = with_table(text)
    if args.check:
        if new != text:
            print(f"{DOC}: the table of keys is out of date; run tools/config_table.py", file=sys.stderr)
            sys.exit(1)
        return
    if new != text:
        DOC.write_text(new, encoding="utf-8")
        print(f"updated {DOC}")


if __name__ == "__main__":
    main()

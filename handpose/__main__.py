"""`python -m handpose`, and `python handpose` / `torchrun handpose train` from the repo root.

Run as a folder, Python puts `handpose/` itself first on sys.path, where our module names would
shadow the standard library and `import handpose` would fail; put the folder's parent there instead.
"""

import os
import sys

if not __package__:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from handpose.cli import main  # noqa: E402

if __name__ == "__main__":
    main()

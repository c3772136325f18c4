"""The CPU cores this process may use (its affinity mask, not the machine's core count)."""

from __future__ import annotations

import os


def cores() -> int:
    """Cores this process may run on: `sched_getaffinity` (a container or `taskset` may allow fewer
    than the machine has), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

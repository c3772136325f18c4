"""The CPU cores this process may use (its affinity mask, not the machine's core count), and what
to do before forking worker processes."""

from __future__ import annotations

import gc
import os


def cores() -> int:
    """Cores this process may run on: `sched_getaffinity` (a container or `taskset` may allow fewer
    than the machine has), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def collect_before_fork() -> None:
    """Collect this process's garbage before it forks workers (loader, pack, synth, bench).

    Why: a forked child inherits this process's uncollected garbage and may collect it itself.
    A DALI pipeline left as garbage (an earlier loader's, held in a reference cycle) then runs
    its `__del__` in the child, which waits forever for pipeline threads that exist only in this
    process: the child hangs and so does whoever waits for it (tests/test_fork.py)."""
    gc.collect()

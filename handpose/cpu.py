"""The CPU cores this process may use (its affinity mask, not the machine's core count), and what
to do before forking worker processes."""

from __future__ import annotations

import gc
import os
import sys


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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep and reuse the buffers of freed tensors instead of handing them back
    to the kernel (True if set; a no-op elsewhere than Linux glibc).

    Why: glibc serves blocks over 128 KiB-32 MiB with fresh mmaps and returns freed heap tops to
    the kernel, so each batch's input, normalised copy and activations (a detector batch of four
    224 px photos is 2.4 MB of float) are page-faulted in again on every call. On predict's
    detector path those faults and the detector's normalisation were a fifth of the time outside
    the forward passes (BENCHMARKS.md, "Normalising in place, freed buffers kept"). The process
    holds its high-water mark instead."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    set_mmap = mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
    set_trim = mallopt(_M_TRIM_THRESHOLD, 8 * KEEP_FREED_BYTES)
    return bool(set_mmap and set_trim)

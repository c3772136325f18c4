"""What the process does with the CPU's resources: its cores, and its freed memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

# glibc's mallinfo2: `hblkhd` counts the bytes of blocks malloc serves from their own mmap. Before
# keep_freed_memory a 4 MiB tensor is such a block, page-faulted in anew each time; after it the
# block comes from the heap and stays there for the next tensor of that size.
SCENARIO = """
import ctypes, sys
import torch
from handpose.cpu import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_while_held() -> int:
    t = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB
    held = libc.mallinfo2().hblkhd
    del t
    return held

before = mmapped_while_held()
assert keep_freed_memory() is True
after = mmapped_while_held()
heap = libc.mallinfo2().arena
print(before, after, heap)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)")
def test_keep_freed_memory_serves_batch_sized_tensors_from_the_reused_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018  # glibc >= 2.33
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33")
    done = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    before, after, heap = (int(v) for v in done.stdout.split())
    assert before >= 4 << 20  # its own mmap: fresh pages on every call
    assert after < 4 << 20  # from the heap
    assert heap >= 4 << 20  # which holds it, to be reused

"""Forked workers after a DALI pipeline: its garbage is collected in this process, not in them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from shardkit import photo_samples, write_pack

pytest.importorskip("nvidia.dali")

# A DALI pipeline left as cyclic garbage, then a wds loader with one worker. Every forked child
# collects its inherited garbage at once (`register_at_fork`), which CPython's allocator may do at
# any moment in a real child: without `cpu.collect_before_fork` the pipeline's __del__ runs in the
# worker, waits for threads that exist only in the parent, and the loader never yields.
SCENARIO = """
import gc, os, sys
from nvidia.dali import fn, pipeline_def
from handpose.loader import make_loader

@pipeline_def(batch_size=2, num_threads=2, device_id=None)
def noise():
    return fn.random.uniform(range=[0.0, 1.0], shape=[4])

pipe = noise()
pipe.build()
pipe.run()
cycle = {"pipe": pipe}
cycle["self"] = cycle
del pipe, cycle
gc.disable()  # the garbage stays until a collection: in this process, or in a child
os.register_at_fork(after_in_child=gc.collect)
loader = make_loader(sys.argv[1], "train", batch_size=2, workers=1, image_size=32)
print(sum(len(b["image"]) for b in loader))
"""


def test_a_loader_worker_forked_after_a_dali_pipeline_does_not_hang(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_pack(tmp_path / "p", {"train": [[s for i in range(4) for s in photo_samples(i, rng, 1)]]})
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SCENARIO, str(tmp_path / "p")],
            capture_output=True,
            text=True,
            timeout=120,  # a hang, not a speed: the run takes a few seconds
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the loader's forked worker hung on the DALI pipeline it inherited")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "4"

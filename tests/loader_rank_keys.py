"""torchrun helper for the exactly-once tests: each rank reads a split and writes what it saw.

    torchrun --standalone --nproc_per_node 2 tests/loader_rank_keys.py ROOT SPLIT OUT KIND WORKERS BATCH [C]

ROOT may be a URL; C, a folder the ranks cache its shards in.

Writes OUT/rank{R}.json = {"keys": [...], "batches": n, "len": len(loader), "counts": [batches per rank]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from handpose.loader import make_loader
from handpose.remote import make_cache


def main() -> None:
    root, split, out, kind, workers, batch = sys.argv[1:7]
    cache = make_cache(sys.argv[7] if len(sys.argv) > 7 else None)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()  # the GLOBAL rank picks the data
    loader = make_loader(
        root,
        split,
        kind=kind,
        batch_size=int(batch),
        rank=rank,
        world_size=world,
        workers=int(workers),
        cache=cache,
    )
    loader.set_epoch(0)
    keys, batches = [], 0
    for b in loader:
        keys += b["key"]
        batches += 1
    # a collective after the epoch: a rank that hung or crashed makes this fail instead of passing
    counts: list = [None] * world
    dist.all_gather_object(counts, batches)
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"keys": keys, "batches": batches, "len": len(loader), "counts": counts})
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

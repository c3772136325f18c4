"""torchrun helper for the NCCL test: join a nccl process group, run collectives, write what came back.

    torchrun --standalone --nproc_per_node N tests/nccl_probe.py OUT

One process per GPU. With N >= 2, `handpose.distributed.setup_world` joins the group exactly as
`handpose train` does. With N = 1 it joins none (one process needs no group), so the probe
initialises nccl itself with the same arguments: two ranks on one GPU are no substitute, since
NCCL refuses them ("Duplicate GPU detected", NCCL >= 2.5).

Writes OUT/rank{R}.json = {"backend", "rank", "world_size", "device", "sum", "gathered",
"broadcast", "nccl"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from handpose.distributed import setup_world


def _nccl_version() -> str:
    v = torch.cuda.nccl.version()  # (major, minor, patch); an int in older torch
    return ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


def main() -> None:
    out = Path(sys.argv[1])
    world = setup_world("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=world.device, rank=world.rank, world_size=world.world_size)
    t = torch.tensor([world.rank + 1.0], device=world.device)
    dist.all_reduce(t)  # sum of 1..N: every rank's value arrived
    gathered: list = [None] * world.world_size
    dist.all_gather_object(gathered, {"rank": world.rank})  # what checkpoints use for RNG states
    box = [{"from": "rank 0"} if world.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # what resume uses to share a checkpoint
    result = {
        "backend": dist.get_backend(),
        "rank": world.rank,
        "world_size": world.world_size,
        "device": str(world.device),
        "sum": t.item(),
        "gathered": gathered,
        "broadcast": box[0],
        "nccl": _nccl_version(),
    }
    Path(out, f"rank{world.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

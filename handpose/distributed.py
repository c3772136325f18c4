"""One place that knows about processes: device, global/local rank, world size, and reductions.

`setup_world()` reads the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)
and joins the process group: nccl on CUDA, gloo on CPU. Without them it returns a one-process
World and every helper below degrades to a no-op, so the training code has no `if distributed:`.
The GLOBAL rank picks data shards; the LOCAL rank only picks the GPU on this node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from handpose.errors import HandposeError


@dataclass(frozen=True)
class World:
    """Where this process sits: global rank, rank on its node, process count, and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the global rank 0 prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def setup_world(device: str | None = None) -> World:
    """Join the process group if launched by torchrun (or any launcher setting RANK/WORLD_SIZE).

    device: "cpu" | "cuda" | None (cuda when available). One process per GPU: cuda:LOCAL_RANK.
    """
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise HandposeError(f"device {device!r}: CUDA is not available on this machine")
    if use_cuda:
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        # device_id binds NCCL's communicator to this GPU eagerly (no guessing from the rank).
        dist.init_process_group(
            backend,
            device_id=dev if use_cuda else None,
            store=_restart_safe_store(rank, world_size),
            rank=rank,
            world_size=world_size,
        )
    return World(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def _restart_safe_store(rank: int, world_size: int) -> dist.Store | None:
    """A per-restart namespace in torchrun's store, or None (then the usual env:// init).

    torchrun (`--max-restarts`) hands restarted workers the SAME TCPStore as the failed ones,
    without a per-attempt prefix (pytorch/pytorch#135712), so a restarted rank can read a dead
    rank's address and fail or hang in gloo/nccl init. Every worker of every attempt increments
    one counter on start; with a fixed world size, attempt g's workers draw g*W+1 .. (g+1)*W, so
    they agree on g with no other communication. (Elastic jobs whose world size changes between
    attempts should launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead; then this is unused.)
    """
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        or _env_int("TORCHELASTIC_MAX_RESTARTS", 0) == 0
    ):
        return None
    from datetime import timedelta

    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timedelta(minutes=10),
    )
    attempt = (base.add("handpose/workers_started", 1) - 1) // world_size
    return dist.PrefixStore(f"handpose/attempt{attempt}", base)


def teardown(world: World) -> None:
    """Leave the process group cleanly. The barrier first: gloo aborts at exit on these machines
    when one rank destroys its group while another is still talking to it."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a tensor over all ranks (in place on a copy); identity on one process."""
    out = values.detach().clone()
    if world.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def reduce_sums(sums: dict[str, float | torch.Tensor], world: World) -> dict[str, float]:
    """Sum named scalars over all ranks in ONE collective (float64: counts stay exact)."""
    names = sorted(sums)
    vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64).to(world.device) for k in names])
    # .tolist() is a host sync point; called once per epoch for metrics, not per step.
    return dict(zip(names, all_reduce_sum(vec, world).tolist(), strict=True))


def all_gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj` (picklable, small: e.g. RNG states), in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, world: World, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (e.g. the checkpoint rank 0 read: nodes need no shared disk)."""
    if not world.distributed:
        return obj
    box = [obj if world.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(world: World) -> None:
    """Wait for every rank (no-op on one process)."""
    if world.distributed:
        dist.barrier()

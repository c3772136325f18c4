"""Training checkpoints: one dict, written atomically, read with `torch.load(weights_only=True)`.

RUN/checkpoints/
  last.pt   end of the latest epoch (the resume point)
  prev.pt   the last.pt before it: the fallback when last.pt is truncated or corrupt
  best.pt   the epoch with the best validation metric (what `predict` should use)

A checkpoint (format "handpose-checkpoint" v1) holds:
  model       state_dict of the bare ShallowUNet (no DDP/compile prefixes)
  config      the resolved TrainConfig as a plain dict (width, depth, image_size, index_offset, ...)
  norm        {"mean": [r, g, b], "std": [r, g, b]}: the shards' normalisation, so `predict`
              needs nothing but this file
  epoch, step completed epochs and optimizer steps
  optimizer, scheduler, scaler   their state_dicts
  rng         one entry per rank (rank order): that rank's torch/cuda/numpy/python RNG states
  state       loop state (best metric, epochs without improvement, mean pose, ...)
  sha256      digest of everything above: torch.load does not checksum tensor bytes, so a flipped
              byte inside a tensor would otherwise load silently.
Everything is tensors and plain types, so `weights_only=True` loads it (never unpickle code).
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handpose.atomic import atomic_open

FORMAT = "handpose-checkpoint"
VERSION = 1
LAST, PREV, BEST = "last.pt", "prev.pt", "best.pt"
REQUIRED = ("format", "version", "model", "config", "norm", "epoch", "step", "sha256")


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read back intact (truncated, bit-flipped, not ours)."""


def _feed(h: Any, obj: Any) -> None:
    """Hash `obj` deterministically: tensors by dtype, shape and bytes; containers in order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def digest(state: dict[str, Any]) -> str:
    """sha256 over every entry except "sha256" itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as tensors and plain types (weights_only-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    np_keys = np.asarray(np_keys)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


def save(path: str | os.PathLike, state: dict[str, Any], *, keep_previous: bool = False) -> None:
    """Write `state` (plus its digest) atomically. keep_previous: move the old file to prev.pt
    first, so a crash or a corrupt write still leaves one good checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    state["sha256"] = digest(state)
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        if keep_previous and path.exists():
            os.replace(path, path.with_name(PREV))


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint on the CPU; CorruptCheckpoint if it is not intact."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # a damaged zip fails in many ways (EOFError, ValueError, RuntimeError, ...)
        raise CorruptCheckpoint(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{path}: not a {FORMAT} file")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CorruptCheckpoint(f"{path}: missing {', '.join(missing)}")
    if digest(state) != state["sha256"]:
        raise CorruptCheckpoint(f"{path}: checksum mismatch (damaged on disk)")
    return state


def exists(folder: str | os.PathLike, *, best: bool = False) -> bool:
    """Whether `folder` holds last.pt or prev.pt (with `best`, or best.pt), intact or not."""
    names = (LAST, PREV, BEST) if best else (LAST, PREV)
    return any((Path(folder) / name).exists() for name in names)


def load_latest(folder: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The newest intact checkpoint in `folder`: last.pt, else prev.pt (with a warning), else None."""
    folder = Path(folder)
    for name in (LAST, PREV):
        path = folder / name
        if not path.exists():
            continue
        try:
            return load(path), path
        except CorruptCheckpoint as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
    return None

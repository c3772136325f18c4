"""Checkpoints: the one dict a training run writes and resume and predict read, owned here both
ways (written by `training_state` + `save`, read by `load`, `load_latest`, `model_and_spec` and
`load_model`), written atomically, read with `torch.load(weights_only=True)`.

RUN/checkpoints/
  last.pt   end of the latest epoch (the resume point)
  prev.pt   the last.pt before it: the fallback when last.pt is truncated or corrupt
  best.pt   the epoch with the best validation metric (what `predict` should use)

A checkpoint (format "handpose-checkpoint" v1) holds:
  model       state_dict of the bare model (no DDP/compile prefixes); its config names the arch
  config      the resolved TrainConfig as a plain dict (the model's hyper-parameters, crop, box_pad, ...)
  norm        {"mean": [r, g, b], "std": [r, g, b]}: the FIRST training folder's pixel statistics,
              which predict normalises with
  sets        every training folder: {"name", "crop", "pad", "mean", "std"}; sets[0].crop is what
              predict crops (whole images or hand boxes)
  boxes       {"box_to_keypoints": the first folder's box side / keypoint-extent side (or None)}:
              predict's refinement grows the predicted keypoints' extent by it
  epoch, step completed epochs and optimizer steps
  optimizer, scheduler, scaler   their state_dicts
  rng         one entry per rank (rank order): that rank's torch/cuda/numpy/python RNG states
  world_size  how many ranks wrote `rng`
  state       the training loop's state (train.LoopState: best metric, epochs without improvement)
  sha256      digest of everything above: torch.load does not checksum tensor bytes, so a flipped
              byte inside a tensor would otherwise load silently.
Everything is tensors and plain types, so `weights_only=True` loads it (never unpickle code).
REQUIRED keys are in every checkpoint; TRAINING keys are what a resume reads. Files written
before a key existed read it as OLD_FILES says (the value those versions meant); a file without
`sets` was trained on its config's first crop, one without `boxes` grows by BOX_TO_KEYPOINTS.

A model file for `predict` (`load_model`) is such a checkpoint, or the tutorial's bare
ShallowUNet state_dict (`model.tutorial_model`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from handpose.atomic import atomic_open
from handpose.errors import HandposeError
from handpose.model import (
    BOX_TO_KEYPOINTS,
    DETECTORS,
    ModelSpec,
    PoseModel,
    fold_batchnorm,
    load_weights,
    model_from_config,
    tutorial_model,
)

FORMAT = "handpose-checkpoint"
VERSION = 1
LAST, PREV, BEST = "last.pt", "prev.pt", "best.pt"
REQUIRED = ("format", "version", "model", "config", "norm", "epoch", "step", "sha256")
TRAINING = ("optimizer", "scheduler", "scaler", "rng", "world_size", "state")
# Config keys added since the first checkpoints: the value handpose used before each existed. Fixed
# history, not today's defaults (a default may change; what an old file meant does not).
OLD_FILES = {"arch": "unet", "index_offset": 0.5, "reg": 1.0, "box_pad": 1.25}


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


def training_state(
    *,
    model: nn.Module,
    config: dict[str, Any],
    sets: Sequence[Any],
    epoch: int,
    step: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    rng: list[dict[str, Any]],
    world_size: int,
    loop: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint dict of a training run (see the module docstring), from the bare model, the
    resolved config as a dict, the training folders (`datasets.ShardSet`s, the first one the
    target domain) and the optimizer, scheduler, scaler, every rank's RNG states and loop state."""
    first = sets[0]
    return {
        "model": model.state_dict(),
        "config": config,
        "norm": {"mean": list(first.mean), "std": list(first.std)},
        "sets": [
            {"name": s.name, "crop": s.crop, "pad": s.pad, "mean": list(s.mean), "std": list(s.std)}
            for s in sets
        ],
        "boxes": {"box_to_keypoints": first.manifest.data.get("boxes", {}).get("box_to_keypoints")},
        "epoch": epoch,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        "world_size": world_size,
        "state": loop,
    }


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
    return verify(state, path)


def verify(state: Any, path: str | os.PathLike) -> dict[str, Any]:
    """`state` if it is an intact checkpoint (ours, every REQUIRED key, its digest), else
    CorruptCheckpoint naming `path`."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{path}: not a {FORMAT} file")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CorruptCheckpoint(f"{path}: missing {', '.join(missing)}")
    if digest(state) != state["sha256"]:
        raise CorruptCheckpoint(f"{path}: checksum mismatch (damaged on disk)")
    return state


def weights_only(state: dict[str, Any]) -> dict[str, Any]:
    """A verified checkpoint without what only a resume reads (TRAINING: optimizer, scheduler,
    scaler, RNG states, loop state): the file to ship (`handpose export MODEL --out model.pt`,
    the bundled models). It is still a checkpoint: `load`, `load_model` and
    `detector.load_detector` read it; `train --resume` cannot continue from it. Pass it to `save`,
    which writes its new digest."""
    return {k: v for k, v in state.items() if k not in (*TRAINING, "sha256")}


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


# ---------------------------------------------------------------------------------------------
# What predict reads: the network and how to feed it


def model_and_spec(state: dict[str, Any], where: str | os.PathLike) -> tuple[PoseModel, ModelSpec]:
    """A verified checkpoint's network (its config builds the architecture, its weights loaded
    strictly) and how to feed it: input size, normalisation, crop, box_pad, box_to_keypoints
    (OLD_FILES' values where the file predates a key). HandposeError names `where`."""
    config = {**OLD_FILES, **state["config"]}
    if config.get("arch") in DETECTORS:
        raise HandposeError(
            f"{where}: is a hand detector (arch {config['arch']!r}), not a keypoint model "
            "(predict takes a detector with --detector)"
        )
    try:
        net = model_from_config(config)
    except HandposeError as e:
        raise HandposeError(f"{where}: its config cannot build a model: {e}") from None
    try:
        load_weights(net, state["model"], f"arch {config['arch']!r} (the checkpoint's config)")
    except ValueError as e:
        raise HandposeError(f"{where}: {e}") from None
    sets = state.get("sets") or [{"crop": list(config.get("crop") or ["image"])[0]}]
    ratio = (state.get("boxes") or {}).get("box_to_keypoints")
    norm = state["norm"]
    spec = ModelSpec(
        size=int(config["image_size"]),
        mean=tuple(float(v) for v in norm["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in norm["std"]),  # type: ignore[arg-type]
        kind="handpose checkpoint",
        preprocess="warp",
        crop=str(sets[0]["crop"]),
        pad=float(config["box_pad"]),
        box_to_keypoints=float(ratio) if ratio else BOX_TO_KEYPOINTS,
        digest=str(state["sha256"]),
    )
    return net, spec


def load_model(
    path: str | os.PathLike, device: torch.device, *, channels_last: bool = True
) -> tuple[PoseModel, ModelSpec]:
    """A model file: a handpose checkpoint (`model_and_spec`) or a bare state_dict (the
    tutorial's `model_final`: `model.tutorial_model`), strictly loaded, in eval mode on `device`.
    Every failure is one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise HandposeError(f"{path}: model file not found")
    if not path.is_file():
        raise HandposeError(f"{path}: is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file fails in many ways; the message says which
        raise HandposeError(f"{path}: {_unloadable(path, e)}") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        try:
            net, spec = model_and_spec(verify(obj, path), path)
        except CorruptCheckpoint as e:
            raise HandposeError(str(e)) from None
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        try:
            net, spec = tutorial_model(obj)
        except ValueError as e:
            raise HandposeError(f"{path}: {e}") from None
        spec = replace(spec, digest=digest(obj))
    else:
        raise HandposeError(
            f"{path}: not a handpose checkpoint or tutorial state_dict (a {type(obj).__name__})"
        )
    # Module.to accepts memory_format at run time; the stubs do not list it.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = fold_batchnorm(net.eval())  # inference only: one conv where a conv and its BN were
    return net.to(device).to(memory_format=fmt), spec  # type: ignore[call-overload]


def _unloadable(path: Path, error: Exception) -> str:
    """Why torch.load refused `path`, in words (torch's own message is many lines about
    weights_only): a PyTorch file cut short or damaged, pickled objects we refuse to load, or not
    a PyTorch file at all."""
    with open(path, "rb") as f:
        head = f.read(4)
    pytorch = head == b"PK\x03\x04" or head[:1] == b"\x80"  # zip format, or the legacy pickle format
    if isinstance(error, pickle.UnpicklingError) and pytorch and zipfile.is_zipfile(path):
        return "not a handpose checkpoint or tutorial state_dict (it holds pickled objects, never loaded)"
    if pytorch:
        return "truncated or damaged (a PyTorch file that cannot be read back; copy or save it again)"
    return "not a handpose checkpoint or tutorial state_dict (not a PyTorch file)"

"""Continuing a training run: which recipe it is built from, what may change, and making the
changes hold after the checkpoint's state is loaded.

What a resumed run may change is each TrainConfig field's own declaration (`config.setting`:
`resume=` how a change takes effect, `fixed=` why it is refused, `fixed_values=` values it may
not change to or from); a key of a table (`augment.flip`) follows its table's declaration.
docs/train.md's table of keys says the same, generated from the same declarations.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handpose import checkpoint
from handpose.config import to_dict
from handpose.distributed import World, broadcast_object
from handpose.errors import HandposeError


def run_recipe(
    recipe: str | Path | None, overrides: dict[str, str] | None, *, resume: bool
) -> str | Path | None:
    """The recipe a run is built from: `--config` when given (a resumed run's differences from
    its checkpoint then count as overrides); else, when continuing a run (--resume, or RUN holds a
    checkpoint), the run's own RUN/config.toml; else none (the defaults)."""
    out = (overrides or {}).get("out")
    if recipe is not None or not out:
        return recipe
    run = Path(out)
    saved = run / "config.toml"
    if saved.is_file() and (resume or checkpoint.exists(run / "checkpoints")):
        return saved
    if resume and not checkpoint.exists(run / "checkpoints"):
        raise HandposeError(f"--resume: no checkpoint in {run / 'checkpoints'}")
    if resume:
        raise HandposeError(f"--resume: {saved} not found; pass --config with the run's recipe")
    return None


def resume(
    cfg: Any,
    world: World,
    run: Path,
    raw: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    scaler: Any,
    *,
    required: bool,
) -> dict[str, Any] | None:
    """Continue from RUN/checkpoints/last.pt (or prev.pt if last.pt is damaged) when it exists:
    load the model, optimizer, scheduler, scaler and this rank's RNG states, apply the config's
    changes, and return the saved loop state (None: nothing to resume, start fresh).

    Rank 0 reads the file and broadcasts it, so nodes need no shared disk. A config (`cfg`, a
    TrainConfig) that differs from the checkpoint's may change only what its fields allow
    (`may_change`), which then takes effect; anything else, or checkpoints that are all damaged,
    stops every rank with the same one-line error.
    """
    folder = run / "checkpoints"
    found, refusal = None, None
    if world.is_main:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = checkpoint.load_latest(folder)
        for w in caught:
            print(f"warning: {w.message}", flush=True)
        if found is None and checkpoint.exists(folder, best=True):
            refusal = no_resume_point(folder)
        elif found is not None and (missing := [k for k in checkpoint.TRAINING if k not in found[0]]):
            refusal = (
                f"{found[1]}: not a training checkpoint (no {', '.join(missing)}); train into a new --out"
            )
    found, refusal = broadcast_object((found, refusal), world)
    if refusal is not None:
        raise HandposeError(refusal)
    if found is None:
        if required:
            raise HandposeError(f"--resume: no checkpoint in {folder}")
        return None
    ck, path = found
    changes = config_changes(ck["config"], cfg)
    refused = [k for k, (old, new) in changes.items() if not may_change(type(cfg), k, old, new)]
    if refused:
        raise HandposeError(
            f"{path}: cannot resume with a different "
            + ", ".join(f"{k} ({changes[k][0]} -> {changes[k][1]})" for k in refused)
            + ": it would not fit the saved model, data or optimizer state; train into a new --out instead"
        )
    raw.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    scaler.load_state_dict(ck["scaler"])
    apply_changes(cfg, opt, sched, changes)
    if ck["world_size"] == world.world_size:
        checkpoint.set_rng_state(ck["rng"][world.rank], world.device)
    elif world.is_main:
        print(
            f"note: resuming {ck['world_size']} processes' run on {world.world_size}: "
            "the data order changes from here on",
            flush=True,
        )
    if world.is_main:
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
        print(
            f"resumed from {path} at epoch {ck['epoch']}, step {ck['step']}"
            + (f" (changed: {changed})" if changes else ""),
            flush=True,
        )
    return ck["state"]


def no_resume_point(folder: Path) -> str:
    """Why a run whose checkpoints are all damaged (or only best.pt is left) is not started over."""
    names = [n for n in (checkpoint.LAST, checkpoint.PREV) if (folder / n).exists()]
    what = (
        f"{' and '.join(names)} {'are' if len(names) > 1 else 'is'} damaged"
        if names
        else "no last.pt or prev.pt"
    )
    return (
        f"{folder}: {what}, so there is nothing to resume from; refusing to start over and overwrite "
        f"{checkpoint.BEST} (to start over on purpose, move {folder} away or train into a new --out)"
    )


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config dict with dotted keys (augment.flip) and tuples as lists (as a checkpoint has them)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(saved: dict[str, Any], cfg: Any) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (checkpoint's value, this run's)} where they differ. Keys the checkpoint does
    not have (added to handpose since) are not compared."""
    old, new = _flat(saved), _flat(to_dict(cfg))
    return {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}


def may_change(cls: type, key: str, old: Any, new: Any) -> bool:
    """Whether a resumed run of config class `cls` may change the dotted `key` from `old` to
    `new`, as the key's field (or its table's, for `augment.flip`) declares."""
    top = key.split(".", 1)[0]
    field = next((f for f in dataclasses.fields(cls) if f.name == top), None)
    if field is None or field.metadata.get("fixed") or not field.metadata.get("resume"):
        return False
    return not any(v in field.metadata.get("fixed_values", ()) for v in (old, new))


def apply_changes(
    cfg: Any, opt: torch.optim.Optimizer, sched: Any, changes: dict[str, tuple[Any, Any]]
) -> None:
    """Make this run's settings hold after `load_state_dict` brought back the checkpoint's.

    Optimizer settings go into every param group. plateau: its factor and patience; a new lr
    becomes the current rate. cosine/constant: lr is the curve's peak, so the scheduler's base
    rate and each group's initial_lr become the new lr and the rate is set to the curve (which
    also follows a new epochs, warmup_epochs or min_lr) at the saved step: it still ends at min_lr.
    Everything else that may change is read from the config where it is used (grad_clip,
    patience, min_delta, augment, ...), so it holds from the next step or epoch on.
    """
    for group in opt.param_groups:
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:  # SGD
            group["momentum"] = cfg.momentum
    if cfg.schedule == "plateau":
        sched.factor, sched.patience = cfg.plateau_factor, cfg.plateau_patience
        if "lr" in changes:
            for group in opt.param_groups:
                group["lr"] = cfg.lr
    elif {"lr", "min_lr", "epochs", "warmup_epochs"} & set(changes):
        sched.base_lrs = [cfg.lr] * len(opt.param_groups)
        for group, factor in zip(opt.param_groups, sched.lr_lambdas, strict=True):
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * factor(sched.last_epoch)

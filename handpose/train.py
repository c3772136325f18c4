"""`handpose train`: the trainer, one process or many under torchrun (DDP).

Read `fit` top to bottom: build everything, maybe resume, then the epoch loop. The model
(`model.build_model`, chosen by `arch`) owns its loss and its decoder, which `predict` uses too.
Training reads one packed folder or a weighted mix of several (`shards`, `weights`, `crop`);
validation reports every folder's val split apart, and the FIRST folder's numbers choose best.pt.
Only the global rank 0 prints and writes.

RUN/config.toml       the resolved config (recipe + overrides)
RUN/metrics.jsonl     one JSON line per epoch
RUN/summary.json      final numbers (best validation error, mean-pose baseline, time)
RUN/checkpoints/      last.pt (every epoch), prev.pt, best.pt (see checkpoint.py)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from handpose import checkpoint
from handpose.atomic import check_output_dir, write_json, write_text
from handpose.config import AugmentConfig, Sources, read_config, to_dict, to_toml
from handpose.datasets import ShardSet, apportion, verify_sets
from handpose.distributed import (
    World,
    all_gather_objects,
    all_reduce_sum,
    broadcast_object,
    reduce_sums,
    setup_world,
    teardown,
)
from handpose.errors import ConfigError, HandposeError
from handpose.model import ARCH_LOSSES, PoseModel, input_multiple, model_from_config
from handpose.remote import make_cache, parse_size
from handpose.shards import read_manifest


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; written to RUN/config.toml and into every checkpoint.

    Defaults are the tutorial's recipe (pipelines/freihand_tutorial.toml) except the pixel
    convention (index_offset 0.5) and bf16 on CUDA. Batch sizes are PER PROCESS: under torchrun
    one optimizer step consumes batch_size x world_size samples.
    """

    shards: tuple[str, ...] = ()  # packed folder(s) or URL(s) (handpose pack); several = a weighted mix
    weights: tuple[float, ...] = ()  # share of each folder in every training batch [default: equal]
    crop: tuple[Literal["image", "box"], ...] = ("image",)  # per folder, or one for all
    box_pad: float = 1.25  # crop = "box": the square box's side x this fills the input
    out: str = ""  # run folder
    loader: Literal["wds", "dali"] = "wds"
    workers: int = 2  # loader worker processes per rank
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int = 128  # model input side, px
    augment: AugmentConfig = AugmentConfig(enabled=False)
    arch: Literal["unet", "strided"] = "unet"  # model.ARCHS; unet 16/3 is the tutorial's model
    width: int = 16  # channels of the first stage
    depth: int = 3  # unet: down/up levels; strided: blocks per stage
    sigma: float = 3.0  # target Gaussian, px at model size (the tutorial blurred with sigma 3)
    loss: Literal["iou", "mse", "l1"] = "iou"  # unet: iou | mse heatmap loss; strided: l1
    index_offset: float = 0.5  # unet decoder: heatmap cell i sits at i + 0.5 (see heatmaps.py)
    reg: float = 1.0  # strided: weight of the Jensen-Shannon heatmap regulariser (DSNT)
    epochs: int = 1000  # epochs to train (a resumed run continues up to this many)
    batch_size: int = 48  # samples per step PER PROCESS
    batches_per_epoch: int = 50  # the tutorial's "epoch"; 0 = one full pass over the train split
    val_batches: int = 20  # per rank; 0 = the whole validation split
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0  # L2 (SGD) or decoupled (AdamW) weight decay
    schedule: Literal["plateau", "cosine", "constant"] = "plateau"
    plateau_factor: float = 0.5  # plateau: multiply the rate by this when the loss stalls
    plateau_patience: int = 20  # epochs
    plateau_on: Literal["train_loss", "val_loss"] = "train_loss"  # the tutorial stepped on train loss
    warmup_epochs: float = 0.0  # cosine: linear warm-up from 0 over this many epochs
    min_lr: float = 0.0  # cosine: final learning rate
    grad_clip: float = 0.0  # max gradient L2 norm; 0 = off
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast dtype on CUDA; the CPU runs fp32
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile the model
    monitor: Literal["val_loss", "val_error_px"] = "val_loss"  # best.pt and early stopping
    patience: int = 0  # early stopping: epochs without improvement; 0 = off
    min_delta: float = 0.0  # an improvement must beat the best by more than this
    seed: int = 0  # process seed = seed + rank; the loader derives its order from (seed, epoch, rank)
    log_every: int = 10  # progress-bar refresh, in steps (each refresh is a host sync)
    verify: bool = True  # check the shards' sha256s at start (--no-verify); sizes are always checked
    cache_dir: str = ""  # shards URLs: keep each verified tar here, on local disk ("": stream each epoch)
    cache_limit: str = ""  # bound on cache_dir, e.g. 50G or 200GiB; least recently used out ("": none)

    def __post_init__(self) -> None:
        for name in ("width", "depth", "image_size", "sigma", "epochs", "batch_size", "log_every"):
            if not getattr(self, name) > 0:  # `not >` also refuses NaN
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in (
            *("workers", "batches_per_epoch", "val_batches", "patience", "plateau_patience"),
            *("warmup_epochs", "grad_clip", "lr", "momentum", "weight_decay", "min_lr", "min_delta"),
        ):
            if not getattr(self, name) >= 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError("plateau_factor", f"must be in (0, 1), got {self.plateau_factor}")
        if self.image_size % input_multiple(self.arch, self.depth):
            raise ConfigError(
                ("image_size", "depth"),
                f"image_size {self.image_size} must be a multiple of {input_multiple(self.arch, self.depth)} "
                f"for arch {self.arch!r}" + (" (2**depth)" if self.arch == "unet" else ""),
            )
        if self.loss not in ARCH_LOSSES[self.arch]:
            raise ConfigError(
                ("loss", "arch"), f"arch {self.arch!r} trains with loss {' | '.join(ARCH_LOSSES[self.arch])}"
            )
        if self.weights and len(self.weights) != len(self.shards):
            raise ConfigError(
                ("weights", "shards"), f"{len(self.weights)} given for {len(self.shards)} shards folders"
            )
        if len(self.crop) not in (1, len(self.shards)):
            raise ConfigError("crop", f"give one mode, or one per shards folder ({len(self.shards)})")
        if not self.box_pad >= 1:
            raise ConfigError("box_pad", f"must be >= 1, got {self.box_pad}")
        if self.cache_limit and not self.cache_dir:
            raise ConfigError(("cache_limit", "cache_dir"), "bounds cache_dir: give cache_dir too")
        if self.cache_limit:
            try:
                parse_size(self.cache_limit)
            except ValueError as e:
                raise ConfigError("cache_limit", str(e)) from None


# What a resumed run may change (docs/train.md has the table); `maybe_resume` makes each change
# take effect. Everything else is refused: it would change the model (arch, width, depth,
# image_size, sigma, loss, index_offset), the data (shards, weights, crop, box_pad, batch_size,
# batches_per_epoch, seed), or what the saved optimizer, scheduler and loop state mean (optimizer,
# schedule, plateau_on, monitor; precision to or from fp16, whose grad scaler has state).
RESUMABLE = frozenset(
    {
        *("epochs", "lr", "min_lr", "warmup_epochs"),  # the schedule's curve, from the saved step on
        *("weight_decay", "momentum", "grad_clip", "plateau_factor", "plateau_patience"),
        *("patience", "min_delta"),  # early stopping
        *("out", "workers", "loader", "device", "val_batches", "log_every", "verify"),  # how, not what
        *("cache_dir", "cache_limit"),
        *("precision", "channels_last", "compile"),
    }
)


def train(
    recipe: str | Path | None, overrides: dict[str, str] | None = None, *, resume: bool = False
) -> dict[str, Any]:
    """Train from a recipe plus `--key value` overrides; returns the run summary (rank 0's numbers).

    Resumes from RUN/checkpoints/last.pt when it exists; `resume=True` requires it to. When
    continuing a run without a recipe, RUN/config.toml is the recipe (`run_recipe`).
    """
    cfg, sources = read_config(TrainConfig, run_recipe(recipe, overrides, resume=resume), overrides)
    check_inputs(cfg, sources)
    world = setup_world(None if cfg.device == "auto" else cfg.device)
    # No barrier on the error path: the other ranks may never reach it; exiting lets torchrun stop them.
    summary = fit(cfg, world, resume=resume)
    teardown(world)
    return summary


def check_inputs(cfg: TrainConfig, sources: Sources) -> None:
    """Everything a user can get wrong, checked before any process group or loader exists, so
    every rank stops at once with the same one-line error naming the flag or recipe key."""
    if not cfg.shards or not cfg.out:
        raise HandposeError("train needs --shards DIR and --out RUN (or shards/out in the recipe)")
    check_output_dir(cfg.out, sources.name("out"))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise HandposeError(
            f"{sources.name('device')}: CUDA is not available on this machine (use cpu or auto)"
        )
    for folder in cfg.shards:
        try:
            read_manifest(folder)
        except HandposeError as e:
            raise HandposeError(f"{sources.name('shards')}: {e}") from None


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


def fit(cfg: TrainConfig, world: World, *, resume: bool) -> dict[str, Any]:
    """Build, maybe resume, run the epochs. The loop below is the whole training procedure."""
    run = Path(cfg.out)
    seed_everything(cfg.seed + world.rank)
    raw, model, opt, scaler = build(cfg, world)
    train_loader = make_loader(cfg, world, "train")
    val_loaders = [make_loader(cfg, world, "val", only=i) for i in range(len(cfg.shards))]
    steps = agree_steps(cfg.batches_per_epoch or len(train_loader), world)
    sched = make_scheduler(cfg, opt, steps)
    st = maybe_resume(cfg, world, run, raw, opt, sched, scaler, LoopState(), required=resume)
    if cfg.verify:  # the shards' sha256s, each rank hashing its share (sizes: on opening)
        verify_sets(
            [*train_loader.sets, *(s for v in val_loaders for s in v.sets)],
            rank=world.rank,
            world_size=world.world_size,
            gather=lambda problems: all_gather_objects(problems, world),
        )
    log = RunLog(cfg, world, run, st, train_loader.sets)
    for epoch in range(st.epoch, cfg.epochs):
        if st.stopped:
            break
        train_loader.set_epoch(epoch)
        model.train()
        t0, loss_sum, n = time.perf_counter(), torch.zeros((), device=world.device), 0
        log.start_epoch(epoch, steps)
        for n, batch in enumerate(islice(train_loader, steps), 1):
            loss = train_step(model, raw, batch, opt, scaler, cfg, world)
            if cfg.schedule == "cosine":
                sched.step()  # per-step schedule: warm-up and decay in optimizer steps
            loss_sum += loss
            st.step += 1
            _test_hooks(world, epoch, st.step, batch)
            if n % cfg.log_every == 0:
                log.advance(n, loss, opt.param_groups[0]["lr"])  # .item() inside: a host sync point
        seconds = time.perf_counter() - t0
        val = validate(raw, val_loaders, cfg, world, [s.name for s in train_loader.sets])
        skipped = float(train_loader.stats.skipped + sum(v.stats.skipped for v in val_loaders))
        sums = reduce_sums({"loss": loss_sum, "batches": float(n), "skipped": skipped}, world)
        metrics = {
            "epoch": epoch + 1,
            "step": st.step,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": sums["loss"] / max(sums["batches"], 1),
            **val,
            "skipped_samples": int(sums["skipped"]),
            "samples_per_s": n * cfg.batch_size * world.world_size / seconds,
            "seconds": seconds,
        }
        if cfg.schedule == "plateau":
            sched.step(metrics[cfg.plateau_on])
        improved = st.update(epoch + 1, metrics[cfg.monitor], cfg)
        save_checkpoints(cfg, world, run, train_loader.sets, raw, opt, sched, scaler, st, best=improved)
        log.end_epoch(metrics, improved)
    _record_params(raw, world)
    return log.finish(st)


# ----------------------------------------------------------------------------- building blocks


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random (each rank passes base seed + rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype(cfg: TrainConfig, world: World) -> torch.dtype | None:
    """Autocast dtype: bf16/fp16 on CUDA only (the CPU path is identical code, fp32)."""
    if world.device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)


def build(cfg: TrainConfig, world: World) -> tuple[PoseModel, nn.Module, torch.optim.Optimizer, Any]:
    """Model (bare and wrapped for training: channels_last, DDP, compile), optimizer, grad scaler."""
    raw = model_from_config(to_dict(cfg)).to(world.device)
    cuda = world.device.type == "cuda"
    if cuda and cfg.channels_last:
        raw = raw.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model: nn.Module = raw
    if world.distributed:
        # DDP broadcasts rank 0's initial weights, so every rank starts identical.
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[world.device.index] if cuda else None)
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    params = [p for p in raw.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Only fp16 needs loss scaling; a disabled scaler is a no-op with an (empty) state_dict.
    scaler = torch.amp.GradScaler(world.device.type, enabled=amp_dtype(cfg, world) is torch.float16)
    return raw, model, opt, scaler


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """plateau: halve (factor) when the monitored loss stalls, stepped per epoch.
    cosine: linear warm-up then cosine to min_lr, stepped per optimizer step. constant: no-op."""
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=cfg.plateau_factor, patience=cfg.plateau_patience, threshold=1e-5
        )
    total = max(cfg.epochs * steps_per_epoch, 1)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        t = min((step - warm) / max(total - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_loader(cfg: TrainConfig, world: World, split: str, *, only: int | None = None) -> Any:
    """The real loader for `split` of every shards folder (or only folder `only`); the GLOBAL
    rank picks its shard of the data."""
    from handpose.loader import make_loader as _make

    train = split == "train"
    crops = cfg.crop * len(cfg.shards) if len(cfg.crop) == 1 else cfg.crop
    pick = range(len(cfg.shards)) if only is None else [only]
    return _make(
        [cfg.shards[i] for i in pick],
        split,
        kind=cfg.loader,
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        augment=cfg.augment if (train and cfg.augment.enabled) else None,
        crop=[crops[i] for i in pick],
        box_pad=cfg.box_pad,
        weights=[cfg.weights[i] for i in pick] if cfg.weights else None,
        rank=world.rank,
        world_size=world.world_size,
        workers=cfg.workers,
        seed=cfg.seed,
        device=world.device,
        # batches_per_epoch > 0: each rank draws random shards (the tutorial's random batches);
        # 0: full passes over the first folder, the ranks' samples partition it exactly.
        samples_per_epoch=(
            cfg.batches_per_epoch * cfg.batch_size * world.world_size
            if train and cfg.batches_per_epoch
            else None
        ),
        cache=make_cache(cfg.cache_dir, cfg.cache_limit),
    )


def train_step(
    model: nn.Module,
    raw: PoseModel,
    batch: dict[str, Any],
    opt: torch.optim.Optimizer,
    scaler: Any,
    cfg: TrainConfig,
    world: World,
) -> torch.Tensor:
    """One optimizer step; returns the detached loss (no host sync). `model` is the wrapped
    module (DDP/compile) that runs the forward, `raw` the bare one that owns the loss."""
    images = batch["image"]
    if world.device.type == "cuda" and cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = amp_dtype(cfg, world)
    with torch.autocast(world.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(images)
    loss = raw.loss(out, batch["uv"], batch["visible"])  # losses compute in fp32, visible joints only
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss.detach()


@torch.no_grad()
def validate(
    raw: PoseModel, loaders: list[Any], cfg: TrainConfig, world: World, names: list[str]
) -> dict[str, Any]:
    """Every folder's val split apart, keyed `NAME/val_*` (`names`: the training sets' names);
    the first folder's figures are also the plain `val_*` keys (the ones `monitor`, best.pt and
    early stopping use)."""
    sync_buffers(raw, world)  # every rank evaluates (and rank 0 saves) the same BN statistics
    raw.eval()
    out: dict[str, Any] = {}
    for i, (loader, name) in enumerate(zip(loaders, names, strict=True)):
        s = loader.sets[0]
        figures = evaluate(raw, loader, cfg, world, s.manifest.mean_pose(s.crop, cfg.image_size, s.pad))
        if i == 0:
            out.update(figures)
        if len(loaders) > 1:
            out.update({f"{name}/{k}": v for k, v in figures.items()})
    return out


def evaluate(raw: PoseModel, loader: Any, cfg: TrainConfig, world: World, mean_uv: Any) -> dict[str, float]:
    """Validation loss and mean keypoint error over visible joints (px at model size, % of the
    input side and, for box crops, % of the box's longer side), PCK@0.2 of the box, and the same
    error for always predicting the mean training pose; summed over ranks."""
    dtype = amp_dtype(cfg, world)
    crop, pad = loader.sets[0].crop, loader.sets[0].pad
    mean_uv = torch.as_tensor(mean_uv, dtype=torch.float32, device=world.device)
    box_px = cfg.image_size / pad if crop == "box" else cfg.image_size  # the box's longer side, input px
    sums = torch.zeros(6, dtype=torch.float64, device=world.device)
    for batch in islice(loader, cfg.val_batches or None):
        uv, vis = batch["uv"], batch["visible"]
        with torch.autocast(world.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            pred = raw(batch["image"])
        loss = raw.loss(pred, uv, vis)
        pred_uv, _ = raw.decode(pred)
        err = (pred_uv.float() - uv).norm(dim=-1)[vis]
        base = (mean_uv - uv).norm(dim=-1)[vis]
        sums += torch.stack(
            [
                loss.double() * len(uv),
                torch.tensor(len(uv), dtype=torch.float64, device=world.device),
                err.sum().double(),
                vis.sum().double(),
                base.sum().double(),
                (err <= 0.2 * box_px).sum().double(),
            ]
        )
    loss_sum, n, err_sum, n_vis, base_sum, pck = all_reduce_sum(sums, world).tolist()
    if n == 0 or n_vis == 0:
        raise HandposeError(
            f"{loader.sets[0].manifest.root}: the validation split gave no samples with visible joints"
        )
    err_px = err_sum / n_vis
    figures = {
        "val_loss": loss_sum / n,
        "val_error_px": err_px,
        "val_error_pct": 100 * err_px / cfg.image_size,
        "mean_pose_error_px": base_sum / n_vis,
        "val_samples": int(n),
    }
    if crop == "box":
        figures.update(val_error_pct_box=100 * err_px / box_px, val_pck_box=pck / n_vis)
    return figures


def agree_steps(steps: int, world: World) -> int:
    """The smallest step count of any rank: DDP needs every rank to take the same steps."""
    if not world.distributed:
        return steps
    t = torch.tensor([steps], device=world.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def sync_buffers(module: nn.Module, world: World) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank."""
    if world.distributed:
        for b in module.buffers():
            torch.distributed.broadcast(b, src=0)


# ----------------------------------------------------------------------------- loop state, checkpoints


@dataclass
class LoopState:
    """What the loop carries between epochs (saved in every checkpoint)."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps
    best: float = math.inf  # best monitored metric
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the last improvement
    stopped: bool = False  # early stopping fired

    def update(self, epoch: int, value: float, cfg: TrainConfig) -> bool:
        """Record a finished epoch; True when `value` improved the best (-> best.pt)."""
        self.epoch = epoch
        improved = value < self.best - cfg.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        self.stopped = bool(cfg.patience) and self.bad_epochs >= cfg.patience
        return improved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def save_checkpoints(
    cfg: TrainConfig,
    world: World,
    run: Path,
    sets: list[ShardSet],
    raw: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    scaler: Any,
    st: LoopState,
    *,
    best: bool,
) -> None:
    """last.pt every epoch (old one kept as prev.pt), best.pt on improvement; rank 0 writes.

    Every rank takes part: each contributes its own RNG state, restored to it on resume.
    """
    rngs = all_gather_objects(checkpoint.rng_state(world.device), world)
    if not world.is_main:
        return
    state = {
        "model": raw.state_dict(),
        "config": to_dict(cfg),
        # predict normalises with the FIRST folder's statistics: list the target domain first
        "norm": {"mean": list(sets[0].mean), "std": list(sets[0].std)},
        "sets": [
            {"name": s.name, "crop": s.crop, "pad": s.pad, "mean": list(s.mean), "std": list(s.std)}
            for s in sets
        ],
        "boxes": {"box_to_keypoints": sets[0].manifest.data.get("boxes", {}).get("box_to_keypoints")},
        "epoch": st.epoch,
        "step": st.step,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rngs,
        "world_size": world.world_size,
        "state": st.to_dict(),
    }
    folder = run / "checkpoints"
    checkpoint.save(folder / checkpoint.LAST, state, keep_previous=True)
    if best:
        checkpoint.save(folder / checkpoint.BEST, state)


def maybe_resume(
    cfg: TrainConfig,
    world: World,
    run: Path,
    raw: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    scaler: Any,
    st: LoopState,
    *,
    required: bool,
) -> LoopState:
    """Continue from RUN/checkpoints/last.pt (or prev.pt if last.pt is damaged) when it exists.

    Rank 0 reads the file and broadcasts it, so nodes need no shared disk. A config that differs
    from the checkpoint's may change only RESUMABLE keys, which then take effect; anything else,
    or checkpoints that are all damaged, stops every rank with the same one-line error.
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
    found, refusal = broadcast_object((found, refusal), world)
    if refusal is not None:
        raise HandposeError(refusal)
    if found is None:
        if required:
            raise HandposeError(f"--resume: no checkpoint in {folder}")
        return st
    ck, path = found
    changes = config_changes(ck["config"], cfg)
    refused = [k for k, (old, new) in changes.items() if not may_change(k, old, new)]
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
        print(
            f"resumed from {path} at epoch {ck['epoch']}, step {ck['step']}"
            + (
                f" (changed: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changes.items())})"
                if changes
                else ""
            ),
            flush=True,
        )
    known = {f.name for f in dataclasses.fields(LoopState)}
    st = LoopState(**{k: v for k, v in ck["state"].items() if k in known})
    st.stopped = bool(cfg.patience) and st.bad_epochs >= cfg.patience  # under this run's patience
    return st


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


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (checkpoint's value, this run's)} where they differ. Keys the checkpoint does
    not have (added to handpose since) are not compared."""
    old, new = _flat(saved), _flat(to_dict(cfg))
    return {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}


def may_change(key: str, old: Any, new: Any) -> bool:
    """Whether a resumed run may change `key` from `old` to `new` (see RESUMABLE)."""
    if key == "precision" and "fp16" in (old, new):
        return False  # only fp16 has a grad scaler, and its state
    return key in RESUMABLE or key.startswith("augment.")


def apply_changes(
    cfg: TrainConfig, opt: torch.optim.Optimizer, sched: Any, changes: dict[str, tuple[Any, Any]]
) -> None:
    """Make this run's settings hold after `load_state_dict` brought back the checkpoint's.

    Optimizer settings go into every param group. plateau: its factor and patience; a new lr
    becomes the current rate. cosine/constant: lr is the curve's peak, so the scheduler's base
    rate and each group's initial_lr become the new lr and the rate is set to the curve (which
    also follows a new epochs, warmup_epochs or min_lr) at the saved step: it still ends at min_lr.
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


# ----------------------------------------------------------------------------- logging


class RunLog:
    """Rank 0's outputs: progress bar, one printed line and one metrics.jsonl line per epoch,
    TensorBoard scalars when tensorboard is installed, summary.json. Other ranks: no-ops."""

    def __init__(self, cfg: TrainConfig, world: World, run: Path, st: LoopState, sets: list[ShardSet]):
        self.cfg, self.main, self.run = cfg, world.is_main, run
        self.samples_per_step = cfg.batch_size * world.world_size
        self.history: list[dict[str, Any]] = []
        self.progress: Any = None
        self.tb: Any = None
        self.t_start = time.perf_counter()
        if not self.main:
            return
        run.mkdir(parents=True, exist_ok=True)
        write_text(run / "config.toml", to_toml(self.cfg))
        path = run / "metrics.jsonl"
        if path.exists():  # keep only epochs the resumed checkpoint covers
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            self.history = [m for m in lines if m["epoch"] <= st.epoch]
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tensorboard"))
        except ImportError:
            print(
                "note: TensorBoard logging is off (the tensorboard package is not installed; "
                "pip install 'handpose[tensorboard]' turns it on)",
                flush=True,
            )
        from rich.console import Console

        self.console = Console()
        folders = "; ".join(
            f"{s.name}: train {s.manifest.count('train')}, val {s.manifest.count('val')}, crop {s.crop}"
            + (f", {share} per batch" if len(sets) > 1 else "")
            for s, share in zip(sets, apportion(cfg.batch_size, [s.weight for s in sets]), strict=True)
        )
        print(f"{folders}; {world.world_size} process(es) on {world.device}", flush=True)

    def start_epoch(self, epoch: int, steps: int) -> None:
        self.t_epoch, self.epoch = time.perf_counter(), epoch
        if not self.main or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{self.cfg.epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("train", total=steps, info="")
        self.progress.start()

    def advance(self, done: int, loss: torch.Tensor, lr: float) -> None:
        if self.progress is None:
            return
        rate = done * self.samples_per_step / (time.perf_counter() - self.t_epoch)
        self.progress.update(
            self.task, completed=done, info=f"{rate:6.1f} samples/s  loss {loss.item():.4f}  lr {lr:.2e}"
        )

    def end_epoch(self, metrics: dict[str, Any], improved: bool) -> None:
        if not self.main:
            return
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.history.append(metrics)
        write_text(
            self.run / "metrics.jsonl", "".join(json.dumps(m, sort_keys=True) + "\n" for m in self.history)
        )
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "epoch":
                    self.tb.add_scalar(k, v, metrics["epoch"])
        m = metrics
        box = (
            f", {m['val_error_pct_box']:.2f}% of box, PCK@0.2 {m['val_pck_box']:.3f}"
            if "val_pck_box" in m
            else ""
        )
        others = "".join(
            f"  [{k[: -len('/val_error_px')]} {v:.2f} px]"
            for k, v in m.items()
            if k.endswith("/val_error_px")
        )
        print(
            f"epoch {m['epoch']:4d}  train {m['train_loss']:.4f}  val {m['val_loss']:.4f}  "
            f"error {m['val_error_px']:.2f} px ({m['val_error_pct']:.2f}%{box})  "
            f"mean pose {m['mean_pose_error_px']:.2f} px{others}"
            f"  lr {m['lr']:.2e}  {m['samples_per_s']:.0f} samples/s  {m['seconds']:.0f} s"
            + (f"  {m['skipped_samples']} corrupt samples skipped" if m["skipped_samples"] else "")
            + ("  *" if improved else ""),
            flush=True,
        )

    def finish(self, st: LoopState) -> dict[str, Any]:
        """Write summary.json (rank 0) and return it."""
        last = self.history[-1] if self.history else {}
        best = next((m for m in self.history if m["epoch"] == st.best_epoch), last)
        summary = {
            "epochs": st.epoch,
            "steps": st.step,
            "early_stopped": st.stopped,
            "best_epoch": st.best_epoch,
            "best_val_error_px": best.get("val_error_px"),
            "best_val_error_pct": best.get("val_error_pct"),
            "best_val_loss": best.get("val_loss"),
            "best_val_error_pct_box": best.get("val_error_pct_box"),
            "best_val_pck_box": best.get("val_pck_box"),
            "final": last,
            "mean_pose_error_px": last.get("mean_pose_error_px"),
            "image_size": self.cfg.image_size,
            "train_seconds": sum(m["seconds"] for m in self.history),
            "wall_seconds": time.perf_counter() - self.t_start,
        }
        if self.main:
            write_json(self.run / "summary.json", summary)
            if self.tb is not None:
                self.tb.close()
            if st.stopped:
                print(f"early stopping: no improvement in {self.cfg.patience} epochs", flush=True)
            if last:
                print(
                    f"best epoch {st.best_epoch}: validation error {summary['best_val_error_px']:.2f} px vs "
                    f"{summary['mean_pose_error_px']:.2f} px for the mean pose",
                    flush=True,
                )
        return summary


def _test_hooks(world: World, epoch: int, step: int, batch: dict[str, Any]) -> None:
    """Test-only instrumentation, driven by environment variables (inert when unset).

    HANDPOSE_TEST_RECORD=DIR        each rank appends the keys it trained on to DIR/keys-rank{R}.jsonl
    HANDPOSE_TEST_KILL=R:STEP:FILE  rank R SIGKILLs itself at STEP unless FILE exists (it creates
                                    FILE first, so the restarted job runs through)
    """
    record = os.environ.get("HANDPOSE_TEST_RECORD")
    if record:
        with open(Path(record) / f"keys-rank{world.rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "keys": list(batch["key"])}) + "\n")
    kill = os.environ.get("HANDPOSE_TEST_KILL")
    if kill:
        rank, at, marker = kill.split(":", 2)
        if world.rank == int(rank) and step == int(at) and not Path(marker).exists():
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)


def _record_params(raw: nn.Module, world: World) -> None:
    """Test-only: with HANDPOSE_TEST_RECORD set, each rank writes a digest of its parameters."""
    record = os.environ.get("HANDPOSE_TEST_RECORD")
    if record:
        params = {k: v for k, v in raw.named_parameters()}
        write_text(Path(record) / f"params-rank{world.rank}.txt", checkpoint.digest(params) + "\n")

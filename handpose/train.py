"""`handpose train`: the trainer, one process or many under torchrun (DDP).

Read `fit` top to bottom: build everything, maybe resume (resume.py), then the epoch loop. The
model (`model.build_model`, chosen by `arch`) owns its loss and its decoder, which `predict` uses
too; checkpoint.py owns what a checkpoint holds.
A detector (`arch = "centernet"`) trains the same way on detection batches (whole photos with all
their hands, `[layout]` mosaics; detect_data.py) and validates by recall, precision and AP.
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
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from handpose import checkpoint
from handpose.atomic import check_output_dir, write_json, write_text
from handpose.config import (
    DATA,
    STATE,
    AugmentConfig,
    LayoutConfig,
    Sources,
    read_config,
    setting,
    to_dict,
    to_toml,
)
from handpose.datasets import ShardSet, apportion, set_names, verify_sets
from handpose.distributed import (
    World,
    all_gather_objects,
    all_reduce_sum,
    reduce_sums,
    setup_world,
    teardown,
)
from handpose.errors import ConfigError, HandposeError
from handpose.geometry import BOX_PAD
from handpose.loader import NO_DALI_NEGATIVES, make_loader
from handpose.model import DETECTORS, ModelConfig, PoseModel, model_from_config
from handpose.remote import make_cache
from handpose.resume import resume as resume_run
from handpose.resume import run_recipe
from handpose.shards import read_manifest

HOW = "at once (how the run is executed)"
MONITORED = ("val_loss", "val_error_px", "val_ap50")  # the figures `monitor` may name


@dataclass(frozen=True)
class TrainConfig(ModelConfig):
    """Everything a run depends on; written to RUN/config.toml and into every checkpoint.

    The model's hyper-parameters are ModelConfig's (inherited: declared once). Defaults are the
    tutorial's recipe (pipelines/freihand_tutorial.toml) except the pixel convention
    (index_offset 0.5) and bf16 on CUDA. Batch sizes are PER PROCESS: under torchrun one
    optimizer step consumes batch_size x world_size samples. Each field's declaration says what
    a resumed run may do with a change (resume.py; docs/train.md's table of keys).
    """

    shards: tuple[str, ...] = setting(
        (),
        "packed folder(s) or URL(s) (handpose pack); several = a weighted mix; one for several crops",
        fixed=DATA,
    )
    weights: tuple[float, ...] = setting(
        (), "share of each folder in every training batch [default: equal]", fixed=DATA
    )
    crop: tuple[Literal["image", "box"], ...] = setting(("image",), "per folder, or one for all", fixed=DATA)
    box_pad: float = setting(
        BOX_PAD, 'crop = "box": the square box\'s side x this fills the input', fixed=DATA, ge=1
    )
    val_shards: tuple[str, ...] = setting(
        (),
        "packed folders never trained on: their val split is scored at every validation, in each "
        "val_crop mode, under NAME/val_* keys (NAME: the folder's name, -CROP with several modes)",
        resume="the coming validations score the new folders",
    )
    val_crop: tuple[Literal["image", "box"], ...] = setting(
        (),
        "the crops every val_shards folder is scored in [default: each mode of crop]",
        resume="the coming validations use them",
    )
    negatives: float = setting(
        0.0,
        "share of box crops moved off every hand of the photo (needs presence, loader wds)",
        fixed=DATA,
        ge=0,
        lt=1,
    )
    out: str = setting("", "run folder", resume="a run folder may be moved")
    loader: Literal["wds", "dali"] = setting("wds", "the loader kind (loader.py)", resume=HOW)
    workers: int = setting(2, "loader worker processes per rank", resume=HOW, ge=0)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to train", resume=HOW)
    augment: AugmentConfig = setting(
        AugmentConfig(enabled=False), "training augmentation", resume="the coming epochs use the new values"
    )
    layout: LayoutConfig = setting(
        LayoutConfig(),
        "centernet: training items as mosaics / small photos",
        resume="the coming epochs use the new values",
    )
    min_score: float = setting(
        0.3,
        "centernet: score threshold of val recall/precision; the boxes predict crops",
        resume="the coming validations and the checkpoints written from then on use it",
        ge=0,
        le=1,
    )
    epochs: int = setting(
        1000,
        "epochs to train (a resumed run continues up to this many)",
        resume="extends a finished run or shortens one; cosine spans the new length",
        gt=0,
    )
    batch_size: int = setting(48, "samples per step PER PROCESS", fixed=DATA, gt=0)
    batches_per_epoch: int = setting(
        50, 'the tutorial\'s "epoch"; 0 = one full pass over the train split', fixed=DATA, ge=0
    )
    val_batches: int = setting(20, "per rank; 0 = the whole validation split", resume=HOW, ge=0)
    val_every: int = setting(
        1,
        "validate after every Nth epoch and after the last; best.pt and early stopping judge the "
        "validated epochs",
        resume=HOW,
        ge=1,
    )
    optimizer: Literal["sgd", "adamw"] = setting("sgd", "the optimizer", fixed=STATE)
    lr: float = setting(
        0.1,
        "peak learning rate",
        resume="cosine/constant: the curve's new peak from the saved step on (it still ends at "
        "min_lr); plateau: the current rate",
        ge=0,
    )
    momentum: float = setting(0.0, "SGD only", resume="set in the optimizer's param groups", ge=0)
    weight_decay: float = setting(
        0.0, "L2 (SGD) or decoupled (AdamW) weight decay", resume="set in the optimizer's param groups", ge=0
    )
    schedule: Literal["plateau", "cosine", "constant"] = setting(
        "plateau", "the learning-rate schedule", fixed=STATE
    )
    plateau_factor: float = setting(
        0.5,
        "plateau: multiply the rate by this when the loss stalls",
        resume="set on the restored scheduler",
        gt=0,
        lt=1,
    )
    plateau_patience: int = setting(20, "epochs", resume="set on the restored scheduler", ge=0)
    plateau_on: Literal["train_loss", "val_loss"] = setting(
        "train_loss", "the tutorial stepped on train loss", fixed=STATE
    )
    warmup_epochs: float = setting(
        0.0,
        "cosine: linear warm-up from 0 over this many epochs",
        resume="the curve from the saved step on",
        ge=0,
    )
    min_lr: float = setting(
        0.0, "cosine: final learning rate", resume="the curve from the saved step on", ge=0
    )
    grad_clip: float = setting(0.0, "max gradient L2 norm; 0 = off", resume="from the next step", ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "bf16",
        "autocast dtype on CUDA; the CPU runs fp32",
        resume=HOW,
        fixed_values=("fp16",),  # only fp16 has a grad scaler, and its state
    )
    channels_last: bool = setting(
        True, "NHWC memory for the model and its batches (CPU and CUDA)", resume=HOW
    )
    compile: bool = setting(False, "torch.compile the model", resume=HOW)
    monitor: str = setting(
        "val_loss",
        "best.pt and early stopping: val_loss, val_error_px or val_ap50 (the first folder's; val_ap50, "
        "a detector's, is maximised), or NAME/KEY: that figure of a val_shards set (or, with several "
        "shards folders, of a training folder), e.g. digits-box/val_error_px",
        fixed=STATE,
    )
    patience: int = setting(
        0,
        "early stopping: validated epochs without improvement; 0 = off",
        resume="a run stopped early continues if the new patience allows",
        ge=0,
    )
    min_delta: float = setting(
        0.0, "an improvement must beat the best by more than this", resume="from the next epoch", ge=0
    )
    seed: int = setting(
        0, "process seed = seed + rank; the loader derives its order from (seed, epoch, rank)", fixed=DATA
    )
    log_every: int = setting(
        10, "progress-bar refresh, in steps (each refresh is a host sync)", resume=HOW, gt=0
    )
    verify: bool = setting(
        True, "check the shards' sha256s at start (--no-verify); sizes are always checked", resume=HOW
    )
    cache_dir: str = setting(
        "", 'shards URLs: keep each verified tar here, on local disk ("": stream each epoch)', resume=HOW
    )
    cache_limit: str = setting(
        "", 'bound on cache_dir, e.g. 50G or 200GiB; least recently used out ("": none)', resume=HOW
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # every field's bounds, and the model's rules
        if len(self.shards) == 1 and len(self.crop) > 1:  # one folder in several crops: given once
            object.__setattr__(self, "shards", self.shards * len(self.crop))
        if self.weights and len(self.weights) != len(self.shards):
            raise ConfigError(
                ("weights", "shards"), f"{len(self.weights)} given for {len(self.shards)} shards folders"
            )
        if len(self.crop) not in (1, len(self.shards)):
            raise ConfigError("crop", f"give one mode, or one per shards folder ({len(self.shards)})")
        if self.negatives > 0 and not self.presence:
            raise ConfigError(
                ("negatives", "presence"),
                "crops without a hand train the presence logit: set presence = true",
            )
        if self.negatives > 0 and self.loader == "dali":
            raise ConfigError(("negatives", "loader"), NO_DALI_NEGATIVES)
        detector = self.arch in DETECTORS
        if detector and any(c != "image" for c in self.crop):
            raise ConfigError(("crop", "arch"), "a detector trains on whole photos: crop must be 'image'")
        if self.val_shards:
            self._check_val_shards(detector)
        metric = self._check_monitor()
        if not detector and (self.layout.enabled or metric == "val_ap50"):
            raise ConfigError(
                ("layout.mosaic", "layout.canvas", "monitor", "arch"),
                f"layouts and val_ap50 are for a detector (arch centernet), not arch {self.arch!r}",
            )
        if detector and metric == "val_error_px":
            raise ConfigError(
                ("monitor", "arch"), "a detector has no val_error_px: monitor val_ap50 or val_loss"
            )
        if detector and (self.augment.aspect > 0 or self.augment.perspective_deg > 0):
            raise ConfigError(
                ("augment.aspect", "augment.perspective_deg", "arch"),
                "a detector's canvas augmentation has no aspect or perspective: set them to 0",
            )
        if self.val_every > 1 and self.schedule == "plateau" and self.plateau_on == "val_loss":
            raise ConfigError(
                ("val_every", "plateau_on"),
                "the plateau schedule steps on val_loss every epoch: set val_every = 1",
            )
        make_cache(self.cache_dir, self.cache_limit, keys=("cache_dir", "cache_limit"))  # checks both

    def _check_val_shards(self, detector: bool) -> None:
        """val_crop resolved (each mode of crop by default); no val_shards folder is a training
        folder, and no val set's name is a training folder's (their keys would mix)."""
        if not self.val_crop:
            object.__setattr__(self, "val_crop", tuple(dict.fromkeys(self.crop)))
        if detector and any(c != "image" for c in self.val_crop):
            raise ConfigError(
                ("val_crop", "arch"), "a detector validates on whole photos: val_crop must be 'image'"
            )
        trained = {Path(s).resolve() for s in self.shards}
        for folder in self.val_shards:
            if Path(folder).resolve() in trained:
                raise ConfigError(
                    ("val_shards", "shards"),
                    f"{folder} is also a training folder (val_shards are folders training never reads)",
                )
        clash = sorted({name for _, _, name in self.val_sets} & set(self.train_names))
        if clash:
            raise ConfigError(
                ("val_shards", "shards"),
                f"a val_shards set and a training folder are both named {clash[0]!r}: "
                "their keys would mix; give the folders different names",
            )

    def _check_monitor(self) -> str:
        """The figure `monitor` names (val_loss, val_error_px or val_ap50), its set checked."""
        name, _, metric = self.monitor.rpartition("/")
        if metric not in MONITORED:
            raise ConfigError(
                "monitor", f"{self.monitor!r}: the figure must be one of {', '.join(MONITORED)}"
            )
        sets = [n for _, _, n in self.val_sets] + (self.train_names if len(self.shards) > 1 else [])
        if name and name not in sets:
            raise ConfigError(
                "monitor",
                f"{self.monitor!r}: no set named {name!r} "
                f"(named sets: {', '.join(sets) or 'none; the first folder is the plain key'})",
            )
        return metric

    @property
    def train_names(self) -> list[str]:
        """The training folders' names (`datasets.set_names`: their NAME/val_* keys)."""
        return set_names(self.shards, self.crop * len(self.shards) if len(self.crop) == 1 else self.crop)

    @property
    def val_sets(self) -> list[tuple[str, str, str]]:
        """(folder, crop, name) of every val_shards set: each folder in each val_crop mode."""
        pairs = [(f, c) for f in self.val_shards for c in self.val_crop]
        names = set_names([f for f, _ in pairs], [c for _, c in pairs])
        return [(f, c, n) for (f, c), n in zip(pairs, names, strict=True)]


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
    for folder in cfg.val_shards:
        try:
            manifest = read_manifest(folder)
        except HandposeError as e:
            raise HandposeError(f"{sources.name('val_shards')}: {e}") from None
        if not manifest.count("val"):
            raise HandposeError(
                f"{sources.name('val_shards')}: {folder} has no val split "
                "(pack a validation-only set with --split 0,1,0)"
            )


def fit(cfg: TrainConfig, world: World, *, resume: bool) -> dict[str, Any]:
    """Build, maybe resume, run the epochs. The loop below is the whole training procedure."""
    run = Path(cfg.out)
    seed_everything(cfg.seed + world.rank)
    raw, model, opt, scaler = build(cfg, world)
    train_loader = loader_for(cfg, world, "train")
    val_loaders = [loader_for(cfg, world, "val", only=i) for i in range(len(cfg.shards))]
    others = other_loaders(cfg, world, train_loader.sets[0])
    steps = agree_steps(cfg.batches_per_epoch or len(train_loader), world)
    sched = make_scheduler(cfg, opt, steps)
    st = LoopState.restored(resume_run(cfg, world, run, raw, opt, sched, scaler, required=resume), cfg)
    if cfg.verify:  # the shards' sha256s, each rank hashing its share (sizes: on opening)
        verify_sets(
            [*train_loader.sets, *(s for v in [*val_loaders, *others.values()] for s in v.sets)],
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
        validating = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        names = [s.name for s in train_loader.sets]
        val = validate(raw, val_loaders, cfg, world, names, others) if validating else {}
        skipped = float(
            train_loader.stats.skipped + sum(v.stats.skipped for v in [*val_loaders, *others.values()])
        )
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
        improved = st.update(epoch + 1, monitored(metrics, cfg.monitor) if validating else None, cfg)
        save_checkpoints(cfg, world, run, train_loader.sets, raw, opt, sched, scaler, st, best=improved)
        log.end_epoch(metrics, improved)
    _record_params(raw, world)
    return log.finish(st)


# ----------------------------------------------------------------------------- building blocks


def monitored(metrics: dict[str, Any], key: str) -> float:
    """The value best.pt and early stopping minimise: the metric, negated where higher is better."""
    return -metrics[key] if key.rpartition("/")[2] in HIGHER_IS_BETTER else metrics[key]


HIGHER_IS_BETTER = frozenset({"val_ap50"})


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
    if cfg.channels_last:  # faster convolutions on CPUs too (oneDNN), not only on CUDA
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


def loader_for(
    cfg: TrainConfig,
    world: World,
    split: str,
    *,
    only: int | None = None,
    other: tuple[str, str, ShardSet] | None = None,
) -> Any:
    """The real loader (`loader.make_loader`) for `split` of every shards folder (or only folder
    `only`, or `other`: a val_shards folder, its crop, and the first training set, whose pixel
    statistics feed it as predict does); the GLOBAL rank picks its shard of the data."""
    train = split == "train"
    crops = cfg.crop * len(cfg.shards) if len(cfg.crop) == 1 else cfg.crop
    pick = range(len(cfg.shards)) if only is None else [only]
    roots, modes = [cfg.shards[i] for i in pick], [str(crops[i]) for i in pick]
    if other is not None:
        roots, modes = [other[0]], [other[1]]
    return make_loader(
        roots,
        split,
        kind=cfg.loader,
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        augment=cfg.augment if (train and cfg.augment.enabled) else None,
        crop=modes,
        box_pad=cfg.box_pad,
        weights=[cfg.weights[i] for i in pick] if cfg.weights and other is None else None,
        norm=(other[2].mean, other[2].std) if other is not None else None,
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
        negatives=cfg.negatives if train else 0.0,
        task="detect" if cfg.arch in DETECTORS else "pose",
        layout=cfg.layout if train else None,
        cache=make_cache(cfg.cache_dir, cfg.cache_limit),
    )


def other_loaders(cfg: TrainConfig, world: World, first: ShardSet) -> dict[str, Any]:
    """{name: val loader} of every val_shards set (val_sets), fed with the first training set's
    pixel statistics: the model sees them as predict shows it a photo."""
    return {
        name: loader_for(cfg, world, "val", other=(folder, crop, first))
        for folder, crop, name in cfg.val_sets
    }


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
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = amp_dtype(cfg, world)
    with torch.autocast(world.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(images)
    # the model's own targets from the batch (PoseModel.targets); losses compute in fp32
    loss = raw.loss(out, *(batch[k] for k in raw.targets))
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
    raw: PoseModel,
    loaders: list[Any],
    cfg: TrainConfig,
    world: World,
    names: list[str],
    others: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every folder's val split apart, keyed `NAME/val_*` (`names`: the training sets' names);
    the first folder's figures are also the plain `val_*` keys (the ones `monitor`, best.pt and
    early stopping use by default). `others` ({name: loader}, the val_shards sets) are scored the
    same way under their own keys only, against the first folder's mean training pose."""
    sync_buffers(raw, world)  # every rank evaluates (and rank 0 saves) the same BN statistics
    raw.eval()
    out: dict[str, Any] = {}
    first = loaders[0].sets[0].manifest
    scored = [(loader, name, loader.sets[0].manifest) for loader, name in zip(loaders, names, strict=True)]
    scored += [(loader, name, first) for name, loader in (others or {}).items()]
    for i, (loader, name, poses) in enumerate(scored):
        s = loader.sets[0]
        if cfg.arch in DETECTORS:
            figures = evaluate_detection(raw, loader, cfg, world)
        else:
            figures = evaluate(raw, loader, cfg, world, poses.mean_pose(s.crop, cfg.image_size, s.pad))
        if i == 0:
            out.update(figures)
        if len(loaders) > 1 or i >= len(loaders):
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
        loss = raw.loss(pred, *(batch[k] for k in raw.targets))
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


def evaluate_detection(raw: PoseModel, loader: Any, cfg: TrainConfig, world: World) -> dict[str, float]:
    """A detector's validation: loss, and over all ranks' photos recall and precision at IoU 0.5
    for boxes scoring >= min_score, AP50 and AP50-95 (metrics.hand_figures, COCO's 101 points)
    of every decoded peak scoring >= AP_MIN_SCORE."""
    from handpose.detector import TOP_K
    from handpose.metrics import Hands, hand_figures

    dtype = amp_dtype(cfg, world)
    loss_sum, n = 0.0, 0
    preds: list[Hands] = []
    labels: list[Hands] = []
    for batch in islice(loader, cfg.val_batches or None):
        with torch.autocast(world.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = raw(batch["image"])
        loss_sum += float(raw.loss(out, *(batch[k] for k in raw.targets))) * len(out)
        n += len(out)
        boxes, scores = (t.cpu().numpy() for t in raw.decode(out, TOP_K))  # type: ignore[call-arg]
        for b, s, lb, hands in zip(
            boxes, scores, batch["boxes"].cpu().numpy(), batch["hands"].cpu().numpy(), strict=True
        ):
            keep = s >= AP_MIN_SCORE
            preds.append(Hands(b[keep], s[keep]))
            labels.append(Hands(lb[hands]))
    everyone = all_gather_objects((loss_sum, n, preds, labels), world)
    loss_sum, n = sum(e[0] for e in everyone), sum(e[1] for e in everyone)
    if n == 0:
        raise HandposeError(f"{loader.sets[0].manifest.root}: the validation split gave no photos")
    f = hand_figures(
        [p for e in everyone for p in e[2]],
        [lab for e in everyone for lab in e[3]],
        min_score=cfg.min_score,
        pose=False,
    )
    return {
        "val_loss": loss_sum / n,
        "val_recall": f["box_recall"],
        "val_precision": f["box_precision"],
        "val_ap50": f["box_ap50"],
        "val_ap50_95": f["box_ap50_95"],
        "val_hands": int(f["labels"]),
        "val_samples": int(n),
    }


AP_MIN_SCORE = 0.001  # detections below this score do not enter AP (Ultralytics validates at conf 0.001)


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

    def update(self, epoch: int, value: float | None, cfg: TrainConfig) -> bool:
        """Record a finished epoch; True when `value` improved the best (-> best.pt). None: the
        epoch was not validated (`val_every`), and counts for neither best.pt nor patience."""
        self.epoch = epoch
        if value is None:
            return False
        improved = value < self.best - cfg.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        self.stopped = bool(cfg.patience) and self.bad_epochs >= cfg.patience
        return improved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def restored(cls, saved: dict[str, Any] | None, cfg: TrainConfig) -> LoopState:
        """The loop state a checkpoint saved (None: a fresh run), early stopping judged under this
        run's patience (a resumed run may raise it)."""
        if saved is None:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        st = cls(**{k: v for k, v in saved.items() if k in known})
        st.stopped = bool(cfg.patience) and st.bad_epochs >= cfg.patience
        return st


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
    state = checkpoint.training_state(
        model=raw,
        config=to_dict(cfg),
        sets=sets,  # predict normalises with the FIRST folder's statistics: list the target domain first
        epoch=st.epoch,
        step=st.step,
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        rng=rngs,
        world_size=world.world_size,
        loop=st.to_dict(),
    )
    folder = run / "checkpoints"
    checkpoint.save(folder / checkpoint.LAST, state, keep_previous=True)
    if best:
        checkpoint.save(folder / checkpoint.BEST, state)


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
        if cfg.val_sets:
            print(
                "scored, never trained on: "
                + "; ".join(f"{name} (val of {folder}, crop {crop})" for folder, crop, name in cfg.val_sets),
                flush=True,
            )

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
        if "val_loss" not in m:  # not validated (val_every)
            print(
                f"epoch {m['epoch']:4d}  train {m['train_loss']:.4f}  (validated every "
                f"{self.cfg.val_every} epochs)  lr {m['lr']:.2e}  {m['samples_per_s']:.0f} samples/s  "
                f"{m['seconds']:.0f} s",
                flush=True,
            )
            return
        if "val_ap50" in m:
            print(self._detection_line(m, improved), flush=True)
            return
        box = (
            f", {m['val_error_pct_box']:.2f}% of box, PCK@0.2 {m['val_pck_box']:.3f}"
            if "val_pck_box" in m
            else ""
        )
        others = "".join(
            f"  [{self._set_figures(m, k[: -len('/val_error_px')])}]"
            for k in m
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

    @staticmethod
    def _set_figures(m: dict[str, Any], name: str) -> str:
        """One set's figures in the epoch line: error px, and for box crops % of box and PCK."""
        text = f"{name} {m[f'{name}/val_error_px']:.2f} px"
        if f"{name}/val_pck_box" in m:
            text += f", {m[f'{name}/val_error_pct_box']:.2f}% of box, PCK {m[f'{name}/val_pck_box']:.3f}"
        return text

    def _detection_line(self, m: dict[str, Any], improved: bool) -> str:
        others = "".join(
            f"  [{k[: -len('/val_ap50')]} AP50 {v:.3f}]" for k, v in m.items() if k.endswith("/val_ap50")
        )
        return (
            f"epoch {m['epoch']:4d}  train {m['train_loss']:.4f}  val {m['val_loss']:.4f}  "
            f"recall {m['val_recall']:.3f} precision {m['val_precision']:.3f} "
            f"(score >= {self.cfg.min_score})  "
            f"AP50 {m['val_ap50']:.3f} AP50-95 {m['val_ap50_95']:.3f}{others}"
            f"  lr {m['lr']:.2e}  {m['samples_per_s']:.0f} samples/s  {m['seconds']:.0f} s"
            + (f"  {m['skipped_samples']} corrupt samples skipped" if m["skipped_samples"] else "")
            + ("  *" if improved else "")
        )

    def finish(self, st: LoopState) -> dict[str, Any]:
        """Write summary.json (rank 0) and return it."""
        validated = [m for m in self.history if "val_loss" in m]  # not every epoch is (val_every)
        last: dict[str, Any] = validated[-1] if validated else {}
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
            "best_val_ap50": best.get("val_ap50"),
            "best_val_recall": best.get("val_recall"),
            "best_val_precision": best.get("val_precision"),
            "monitor": self.cfg.monitor,
            "best_monitored": best.get(self.cfg.monitor),
            # the val_shards sets' figures at the best epoch (the other-source validation)
            "val_sets": {
                name: {k[len(name) + 1 :]: v for k, v in best.items() if k.startswith(f"{name}/")}
                for _, _, name in self.cfg.val_sets
            },
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
            if last and "val_ap50" in last:
                print(
                    f"best epoch {st.best_epoch}: AP50 {summary['best_val_ap50']:.3f}, recall "
                    f"{summary['best_val_recall']:.3f} at precision {summary['best_val_precision']:.3f}",
                    flush=True,
                )
            elif last:
                others = "".join(f"; {self._set_figures(best, name)}" for _, _, name in self.cfg.val_sets)
                print(
                    f"best epoch {st.best_epoch} (by {self.cfg.monitor}): validation error "
                    f"{summary['best_val_error_px']:.2f} px vs {summary['mean_pose_error_px']:.2f} px for "
                    f"the mean pose{others}",
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

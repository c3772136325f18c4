"""Shard sets as the loaders see them: what both loader kinds share (and nothing kind-specific).

A loader reads one or more packed folders (`ShardSet`s). Each keeps its own manifest, its own
normalisation (its train split's pixel mean/std) and its own crop mode:

- `crop = "image"`: the whole image letterboxed into the model input (FreiHAND's hand-centred crops);
- `crop = "box"`: the sample's hand box, made square on its longer side and padded by `pad`.

Training on several sets draws a FIXED mix: every batch holds `apportion(batch_size, weights)`
samples of each set, on every rank and worker, so the mix is exact rather than random and the
ranks stay in step. Validation, test and eval read every sample of every set exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handpose.errors import HandposeError
from handpose.geometry import BOX_PAD
from handpose.remote import Cache, location_name

if TYPE_CHECKING:
    import torch

    from handpose.config import AugmentConfig
from handpose.shards import (
    Manifest,
    hash_problems,
    hash_progress,
    hashed_files,
    problems_error,
    split_shards,
)

CROPS = ("image", "box")
Norm = tuple[tuple[float, float, float], tuple[float, float, float]]  # pixel (mean, std), RGB in [0, 1]


@dataclass(frozen=True)
class ShardSet:
    """One packed folder's split, with how its samples are cropped and how much of a batch it gets."""

    manifest: Manifest
    shards: tuple[str, ...]  # the split's tar paths, in manifest order
    counts: tuple[int, ...]  # samples per shard
    crop: str = "image"
    pad: float = BOX_PAD
    weight: float = 1.0
    name: str = ""
    norm: Norm | None = None  # (mean, std) to normalise with instead of the manifest's own

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.norm[0] if self.norm is not None else self.manifest.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.norm[1] if self.norm is not None else self.manifest.std

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The manifest entries of this set's shards (name, bytes, sha256, ...), in order."""
        mine = set(self.shards)
        return [e for e in self.manifest.entries() if str(self.manifest.root / e["name"]) in mine]


def open_sets(
    roots: Sequence[str | Path],
    split: str,
    *,
    crops: Sequence[str],
    pad: float,
    weights: Sequence[float] | None = None,
    cache: Cache | None = None,
    norm: Norm | None = None,
) -> list[ShardSet]:
    """The sets of `roots` (folders or URLs) for `split`; `crops` has one mode per root or one for
    all; `cache`: where the shards of URLs are kept (remote.Cache; None: streamed). `norm` replaces
    every set's own pixel statistics (a folder the model never trained on is fed as the model's
    first training folder is: predict's normalisation)."""
    if not roots:
        raise HandposeError("no shards folder given")
    weights = list(weights) if weights else [1.0] * len(roots)
    crops = list(crops) if len(crops) != 1 else list(crops) * len(roots)
    if len(weights) != len(roots) or len(crops) != len(roots):
        raise HandposeError(
            f"{len(roots)} shards folders need as many weights and crops (or one crop for all), "
            f"got {len(weights)} weights and {len(crops)} crops"
        )
    if any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise HandposeError(f"weights must be positive numbers, got {weights}")
    if not pad >= 1.0:
        raise HandposeError(f"box_pad must be >= 1 (the box fills the input at 1), got {pad}")
    sets = []
    names = set_names(roots, crops)
    for root, crop, weight, name in zip(roots, crops, weights, names, strict=True):
        if crop not in CROPS:
            raise HandposeError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        manifest, shards = split_shards(root, split, cache=cache)
        counts = tuple(manifest.shard_samples(split))
        sets.append(
            ShardSet(manifest, tuple(str(p) for p in shards), counts, crop, pad, float(weight), name, norm)
        )
    return sets


def verify_sets(
    sets: Sequence[ShardSet],
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list[str]], list[list[str]]] | None = None,
) -> None:
    """Check every shard (and index) of `sets` against the sha256 its manifest records, the files
    spread over the ranks by size (`share_by_size`); `gather` collects every rank's problems
    (e.g. `distributed.all_gather_objects`), so every rank raises the same error, one line per
    damaged file. Rank 0 shows a progress bar for long work."""
    files = {f[0]: f for s in sets for f in hashed_files(s.manifest.root, s.entries)}  # once each
    work = sorted(files.values())
    owner = share_by_size([size or 0 for _, _, size in work], world_size)
    mine = [f for f, r in zip(work, owner, strict=True) if r == rank]
    with hash_progress(sum(size or 0 for _, _, size in mine), show=rank == 0) as advance:
        problems = hash_problems(mine, advance)
    everyone = gather(problems) if gather is not None else [problems]
    found = sorted(p for rank_problems in everyone for p in rank_problems)
    if found:
        raise problems_error(found)


def share_by_size(sizes: Sequence[int], world_size: int) -> list[int]:
    """The rank that handles each item: largest first, each to the least loaded rank (ties to the
    lower rank), so every rank hashes about the same number of bytes; the same on every rank."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + sizes[i]
    return owner


def set_names(roots: Iterable[str | Path], crops: Sequence[str] = ()) -> list[str]:
    """Short unique names for reports: the folder names; a folder given twice is told apart by
    its crop mode (`hands-box`, `hands-image`), else by its position."""
    base = [location_name(r) or "shards" for r in roots]
    modes = list(crops) or [""] * len(base)
    pairs = list(zip(base, modes, strict=True))
    return [
        b if base.count(b) == 1 else f"{b}-{m}" if m and pairs.count((b, m)) == 1 else f"{b}-{i}"
        for i, (b, m) in enumerate(pairs)
    ]


def apportion(batch_size: int, weights: Sequence[float]) -> list[int]:
    """Samples of each set in every batch: `batch_size` split in proportion to `weights` by
    largest remainders (ties to the earlier set), so a mix that divides the batch exactly is
    taken exactly; then a set left without a sample takes one from the largest (ties: earlier)."""
    n = len(weights)
    if batch_size < n:
        raise HandposeError(f"batch size {batch_size} cannot hold one sample of each of {n} shard sets")
    total = float(sum(weights))
    want = [w / total * batch_size for w in weights]
    share = [math.floor(x) for x in want]
    order = sorted(range(n), key=lambda i: (-(want[i] - share[i]), i))
    for i in order[: batch_size - sum(share)]:
        share[i] += 1
    for i in range(n):  # no set with a positive weight is ever left out
        if share[i] == 0:
            share[max(range(n), key=lambda j: (share[j], -j))] -= 1
            share[i] = 1
    return share


def train_batches_per_rank(
    sets: Sequence[ShardSet], batch_size: int, world_size: int, samples_per_epoch: int | None
) -> int:
    """Batches every rank yields per training epoch: `samples_per_epoch` worth, else about one
    pass over the FIRST set at its share of each batch. HandposeError when that is none (both
    loader kinds refuse to train on it)."""
    share = apportion(batch_size, [s.weight for s in sets])[0]
    if samples_per_epoch:
        batches = samples_per_epoch // world_size // batch_size
    else:
        batches = sets[0].samples // world_size // share
    if batches == 0:
        raise HandposeError(
            f"{sets[0].manifest.root}: split 'train' has {sets[0].samples} samples, too few for "
            f"{world_size} rank(s) x {share} of each batch of {batch_size}"
        )
    return batches


def n_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader reads its sets: what both kinds take (`loader.make_loader` checks the values
    and passes augmentation and samples_per_epoch for the train split only)."""

    batch_size: int
    image_size: int
    augment: AugmentConfig | None  # None: the plain crop
    rank: int  # the GLOBAL rank
    world_size: int
    workers: int
    seed: int
    epoch: int
    device: torch.device
    samples_per_epoch: int | None  # train: draw this many per epoch (None: one pass)
    drop_last: bool  # val/test/eval: drop a partial last batch


@dataclass
class LoaderStats:
    """Corrupt samples skipped so far (all epochs): their count, and each as (shard, key, reason)."""

    skipped: int = 0
    skipped_samples: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, records: Iterable[tuple[str, str, str]]) -> None:
        for rec in records:
            self.skipped += 1
            self.skipped_samples.append(tuple(rec))  # type: ignore[arg-type]

"""Streaming batches from packed shards: the WebDataset kind (CPU workers) and the one entry point.

`make_loader(root, split, ...)` returns a loader for either kind; both yield the same batch:

    {"image": float (B, 3, H, W), normalised with the manifest's mean/std, on `device`,
     "uv": float (B, 21, 2) model-input pixels (pixel-centre convention, see geometry.py),
     "visible": bool (B, 21) keypoint inside the H x W frame,
     "key": list[str] sample keys}

WDS kind, per DataLoader worker: plan this worker's samples -> read them from the shards (only
the `.jpg` and `.kp.f32` members, by offset via the `.idx`; nothing is unpickled) -> shuffle
buffer (train) -> decode with simplejpeg -> one affine per sample (`geometry.augment_matrix`)
warps the image and moves the keypoints -> colour jitter + normalisation (one folded affine per
sample, `augment.folded_affine`) on the device, after the uint8 batch (a quarter of float32's
bytes) has crossed from the worker: one batched op on a GPU, sample by sample into recycled
output tensors on a CPU (`finish`).

Who reads what (`assign_shards`): the split's samples, shard after shard, are dealt out as
ranks x workers contiguous runs of equal length (+-1 sample). So val/test/eval read every sample
exactly once per epoch with ANY number of shards, ranks and workers (fewer shards than slots
included: webdataset's own split_by_node/split_by_worker would leave slots empty, raise "No samples
found" and hang the other ranks), and all slots get the same work. Training streams its slot's run
over and over (a fresh shard order, shared by all ranks, each pass; the shuffle buffer drains at
the end of each pass) and stops at a fixed quota, so every rank yields the same number of batches
and one epoch is about one pass over the data.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from handpose.augment import (
    IDENTITY,
    apply_colour,
    colour_normalise,
    folded_affine,
    params_matrix,
    sample_params,
)
from handpose.config import AugmentConfig
from handpose.errors import HandposeError
from handpose.geometry import apply_affine, in_frame
from handpose.imageio import decode_jpeg, warp_affine
from handpose.shards import (
    SPLITS,
    IndexEntry,
    Manifest,
    decode_keypoints,
    index_name,
    read_index,
    split_shards,
)

log = logging.getLogger(__name__)

KINDS = ("wds", "dali")
READ_MEMBERS = ("jpg", "kp.f32")  # the only members the WDS kind reads; others are never loaded
TAR_BUFFER = 1 << 20


def _reraise(exn: Exception) -> bool:
    raise exn


Handler = Callable[[Exception], bool]


# ---------------------------------------------------------------------------- bookkeeping


@dataclass
class LoaderStats:
    """Corrupt samples skipped so far (all epochs), each as (shard, key, reason)."""

    skipped: int = 0
    samples: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, records: Iterable[tuple[str, str, str]]) -> None:
        for rec in records:
            self.skipped += 1
            self.samples.append(tuple(rec))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ShardTask:
    """Read samples [start, stop) (positions in the shard) of shard `index`."""

    index: int
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


def assign_shards(counts: Sequence[int], slots: int) -> list[list[ShardTask]]:
    """Tasks per slot (slot = rank * workers + worker) that cover every sample exactly once.

    The shards' samples, in order, are dealt out as `slots` contiguous runs of equal length (+-1),
    so any number of shards works (fewer shards than slots too), every slot gets the same amount
    of work, and a slot touches at most two shards more than its share of whole shards.
    """
    total = sum(counts)
    bounds = [total * s // slots for s in range(slots + 1)]
    starts = list(itertools.accumulate(counts, initial=0))
    plan: list[list[ShardTask]] = []
    for lo, hi in itertools.pairwise(bounds):
        plan.append(
            [
                ShardTask(i, max(lo, starts[i]) - starts[i], min(hi, starts[i + 1]) - starts[i])
                for i in range(len(counts))
                if max(lo, starts[i]) < min(hi, starts[i + 1])
            ]
        )
    return plan


def worker_quotas(samples_per_rank: int, batch_size: int, workers: int, drop_last: bool) -> list[int]:
    """Training: samples each worker of a rank yields per epoch (whole batches when drop_last)."""
    if drop_last:
        n = samples_per_rank // batch_size
        return [(n // workers + (w < n % workers)) * batch_size for w in range(workers)]
    return [samples_per_rank // workers + (w < samples_per_rank % workers) for w in range(workers)]


def _n_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


# ---------------------------------------------------------------------------- worker stages


@dataclass(frozen=True)
class _Spec:
    """Everything a worker needs (picklable); the epoch is set per epoch by the Loader."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    train: bool
    augment: AugmentConfig | None
    image_size: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    drop_last: bool
    shuffle_buffer: int
    samples_per_epoch: int | None  # resampled training when set
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _read_shards(tasks: Iterable[tuple[str, ShardTask]], handler: Handler = _reraise) -> Iterator[dict]:
    """Samples {"__key__", "__url__", "jpg", "kp.f32"} at positions [start, stop) of each task's shard.

    With the shard's `.idx` (every handpose pack has one) the two members are read by offset, one
    `pread` each; without it, webdataset's tar iterator streams the shard. Both read only
    READ_MEMBERS; other members' bytes are never loaded.
    """
    for url, task in tasks:
        index = _read_index(index_name(url))
        if index is None:
            yield from itertools.islice(_stream_tar(url, handler), task.start, task.stop)
        else:
            yield from _read_by_index(url, index[task.start : task.stop])


def _stream_tar(url: str, handler: Handler) -> Iterator[dict]:
    opened = wds.tariterators.url_opener([{"url": url}], handler=handler, bufsize=TAR_BUFFER)
    files = wds.tariterators.tar_file_expander(opened, handler=handler, select_files=_is_read_member)
    return wds.tariterators.group_by_keys(files, handler=handler)


@functools.lru_cache(maxsize=64)
def _read_index(path: str) -> list[IndexEntry] | None:
    """A shard's index (cached: read once per worker, not once per epoch), or None if there is none.

    The webdataset stream and the index list samples in the same order: a sample's position is
    the same for both readers.
    """
    try:
        return read_index(path)
    except FileNotFoundError:
        return None


def _read_by_index(url: str, entries: list[IndexEntry]) -> Iterator[dict]:
    fd = os.open(url, os.O_RDONLY)
    try:
        for key, members in entries:
            sample: dict[str, Any] = {"__key__": key, "__url__": url}
            for ext in READ_MEMBERS:  # a missing member is skipped and counted by _decode_warp
                if ext in members:
                    offset, size = members[ext]
                    sample[ext] = os.pread(fd, size, offset)
            yield sample
    finally:
        os.close(fd)


def _is_read_member(fname: str) -> bool:
    # Members are KEY.ext with a dot-free key; anything else (.json, .pyd, .pickle...) is not read.
    return fname.partition(".")[2] in READ_MEMBERS


def _decode_warp(
    samples: Iterable[dict],
    *,
    size: int,
    augment: AugmentConfig | None,
    rng: np.random.Generator,
    skipped: list[tuple[str, str, str]],
    handler: Handler = _reraise,
) -> Iterator[tuple[str, np.ndarray, np.ndarray, tuple[float, float, float, float]]]:
    """(key, uint8 image (size, size, 3), uv (21, 2), colour row) per sample.

    A data error (ValueError: corrupt JPEG, wrong keypoint length, missing member) skips the sample
    and records it in `skipped`; anything else goes to `handler` (default: re-raise).
    """
    for sample in samples:
        key, url = sample["__key__"], sample["__url__"]
        try:
            jpg, kp = sample.get("jpg"), sample.get("kp.f32")
            if jpg is None or kp is None:
                raise ValueError(f"missing member {'jpg' if jpg is None else 'kp.f32'}")
            image = decode_jpeg(jpg)
            uv_src = decode_keypoints(kp)
        except ValueError as e:
            log.warning("skipping corrupt sample %s in %s: %s", key, url, e)
            skipped.append((url, key, str(e)))
            continue
        try:
            p = sample_params(augment, rng) if augment is not None else IDENTITY
            M = params_matrix(p, image.shape[1], image.shape[0], size)
            yield key, warp_affine(image, M, size), apply_affine(M, uv_src), p.colour()
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11: say where it happened
                e.add_note(f"sample {key} in {url}")
            if handler(e):
                continue
            break


def _batches(
    items: Iterable[tuple[str, np.ndarray, np.ndarray, tuple[float, float, float, float]]],
    *,
    batch_size: int,
    size: int,
    colour: bool,
    skipped: list[tuple[str, str, str]],
    drop_last: bool = False,
    shared: bool = False,
) -> Iterator[dict[str, Any]]:
    """Collate in the worker: uint8 images (B, 3, H, W), uv, visible, keys, colour rows (B, 4).

    Images stay uint8 (a quarter of float32's bytes) until `finish` on the device; with `shared`
    (a DataLoader worker) they are collated straight into shared memory, which the DataLoader
    would otherwise copy them into.
    """
    it = iter(items)
    while True:
        chunk = list(itertools.islice(it, batch_size))
        if not chunk or (drop_last and len(chunk) < batch_size):
            break
        shape = (len(chunk), 3, size, size)
        images = _shared_empty(shape, torch.uint8) if shared else torch.empty(shape, dtype=torch.uint8)
        out = images.numpy()
        for i, item in enumerate(chunk):
            out[i] = item[1].transpose(2, 0, 1)  # HWC -> CHW here: 4x cheaper than on floats
        uv = np.stack([item[2] for item in chunk]).astype(np.float32)
        batch: dict[str, Any] = {
            "image": images,
            "uv": torch.from_numpy(uv),
            "visible": torch.from_numpy(in_frame(uv, size)),
            "key": [item[0] for item in chunk],
            "skipped": _take(skipped),
        }
        if colour:
            batch["colour"] = torch.tensor([item[3] for item in chunk], dtype=torch.float32)
        yield batch
    if skipped:  # records from the tail of the stream travel alone
        yield {"skipped": _take(skipped)}


def finish(
    images: torch.Tensor,
    colour: torch.Tensor | None,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, colour-jittered (rows (B, 4) or None), (x / 255 - mean) / std.

    Runs where `images` live: one batched op on a GPU (`augment.apply_colour`), sample by sample
    on a CPU (`augment.colour_normalise`, cache-resident, into `out` when given).
    """
    if images.device.type != "cpu":
        return apply_colour(images, colour, mean=mean, std=std)
    B, _, H, W = images.shape
    rows = None if colour is None else colour.numpy()
    A, t, lo, hi = (a.astype(np.float32) for a in folded_affine(rows, B, mean, std))
    if out is None:
        out = torch.empty((B, 3, H, W))
    src, dst, scratch = images.numpy(), out.numpy(), np.empty((3, H, W), np.float32)
    for i in range(B):
        colour_normalise(src[i], A[i], t[i], lo, hi, dst[i], scratch)
    return out


class _Recycler:
    """Output tensors reused once nothing else holds them.

    A fresh 10 MB batch takes ~2,400 page faults as it is first written (profiled on the 2-core VM,
    that made the finish several times slower than on recycled memory); a recycled one takes none. A tensor is
    free when its storage has no other user: no batch, view, numpy array or autograd graph that
    still refers to it (torch's storage use count). Without that count it never reuses.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.tensors: list[torch.Tensor] = []

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised float tensor; a view, so that every holder counts as a storage user."""
        for t in self.tensors:
            if t.shape == shape and _sole_user(t):
                return t.view(shape)
        t = torch.empty(shape)
        self.tensors = [*self.tensors[-(self.keep - 1) :], t] if self.keep > 0 else []
        return t.view(shape)


def _sole_user(t: torch.Tensor) -> bool:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    return use_count(t.untyped_storage()._cdata) <= 2  # `t` itself + the storage object just made


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor in shared memory: a worker fills it and the DataLoader hands it to
    the main process without the extra copy into shared memory (as torch's default_collate does
    in workers)."""
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def _take(records: list) -> list:
    out = list(records)
    records.clear()
    return out


class _ShardStream(IterableDataset):
    """The per-worker pipeline; the DataLoader re-forks workers each epoch with the current epoch."""

    def __init__(self, spec: _Spec):
        super().__init__()
        self.spec = spec
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec, epoch = self.spec, self.epoch
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = spec.rank * workers + worker, spec.world_size * workers
        # seeds: base + rank, then worker and epoch (shard order alone is shared by all ranks)
        rng = np.random.default_rng([spec.seed + spec.rank, worker, epoch])
        skipped: list[tuple[str, str, str]] = []
        if not spec.train:
            plan = assign_shards(spec.counts, slots)[slot]
            samples: Iterable[dict] = _read_shards((spec.urls[t.index], t) for t in plan)
        elif spec.samples_per_epoch:
            samples = self._shuffled(_read_shards(self._resampled(rng)), rng)
        else:
            # shuffle within each pass so that one epoch is (about) one pass, without repeats
            passes = self._passes(slot, slots, epoch)
            samples = itertools.chain.from_iterable(self._shuffled(_read_shards(p), rng) for p in passes)
        items: Iterable = _decode_warp(
            samples, size=spec.image_size, augment=spec.augment, rng=rng, skipped=skipped
        )
        if spec.train:
            per_rank = (spec.samples_per_epoch or sum(spec.counts)) // spec.world_size
            quota = worker_quotas(per_rank, spec.batch_size, workers, spec.drop_last)[worker]
            items = itertools.islice(items, quota)
        yield from _batches(
            items,
            batch_size=spec.batch_size,
            size=spec.image_size,
            colour=spec.augment is not None,
            skipped=skipped,
            drop_last=spec.drop_last,
            shared=info is not None,
        )

    def _shuffled(self, samples: Iterable[dict], rng: np.random.Generator) -> Iterator[dict]:
        n = self.spec.shuffle_buffer
        r = random.Random(int(rng.integers(2**62)))
        return wds.shuffle(n, initial=min(n, 100), rng=r)(iter(samples))

    def _passes(self, slot: int, slots: int, epoch: int) -> Iterator[list[tuple[str, ShardTask]]]:
        """Training without resampling: this slot's shards, pass after pass, each in a new order."""
        spec = self.spec
        for p in itertools.count():
            # the same permutation on every rank, so the ranks' slots still partition the data
            order = np.random.default_rng([spec.seed, epoch, p]).permutation(len(spec.urls))
            plan = assign_shards([spec.counts[i] for i in order], slots)[slot]
            if not plan:
                return  # fewer samples than slots and none for this one: stop rather than spin
            yield [(spec.urls[order[t.index]], t) for t in plan]

    def _resampled(self, rng: np.random.Generator) -> Iterator[tuple[str, ShardTask]]:
        """Resampled training: whole shards drawn with replacement, forever."""
        urls = self.spec.urls
        while True:
            i = int(rng.integers(len(urls)))
            yield urls[i], ShardTask(i, 0, self.spec.counts[i])


# ---------------------------------------------------------------------------- the loader


class WdsLoader:
    """Iterable of batch dicts; call `set_epoch(epoch)` before each epoch. `len()` = batches per epoch."""

    def __init__(
        self,
        manifest: Manifest,
        shards: list[Path],
        split: str,
        *,
        batch_size: int,
        image_size: int,
        augment: AugmentConfig | None,
        rank: int,
        world_size: int,
        workers: int,
        seed: int,
        epoch: int,
        device: torch.device,
        samples_per_epoch: int | None,
        drop_last: bool,
        shuffle_buffer: int,
    ):
        train = split == "train"
        self.spec = _Spec(
            urls=tuple(str(p) for p in shards),
            counts=tuple(manifest.shard_samples(split)),
            train=train,
            augment=augment,
            image_size=image_size,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            drop_last=drop_last,
            shuffle_buffer=shuffle_buffer,
            samples_per_epoch=samples_per_epoch if train else None,
            mean=manifest.mean,
            std=manifest.std,
        )
        self.workers, self.device, self.epoch = workers, device, epoch
        self.stats = LoaderStats()
        self._outputs = _Recycler()
        self._dataset = _ShardStream(self.spec)
        if train and len(self) == 0:
            n = self.spec.samples_per_epoch or sum(self.spec.counts)
            raise HandposeError(
                f"{manifest.root}: split {split!r} has {n} samples per epoch, too few for "
                f"{world_size} rank(s) x batch size {batch_size}"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shard order, shuffle and augmentation seeds depend on it."""
        self.epoch = epoch

    def __len__(self) -> int:
        spec, workers = self.spec, max(self.workers, 1)
        if spec.train:
            per_rank = (spec.samples_per_epoch or sum(spec.counts)) // spec.world_size
            quotas = worker_quotas(per_rank, spec.batch_size, workers, spec.drop_last)
            return sum(_n_batches(q, spec.batch_size, spec.drop_last) for q in quotas)
        plan = assign_shards(spec.counts, spec.world_size * workers)
        per_worker = [sum(t.count for t in plan[spec.rank * workers + w]) for w in range(workers)]
        return sum(_n_batches(n, spec.batch_size, spec.drop_last) for n in per_worker)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._dataset.epoch = self.epoch
        loader = DataLoader(
            self._dataset,
            batch_size=None,  # workers batch themselves
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
        )
        for batch in loader:
            if batch["skipped"]:
                self.stats.add(batch["skipped"])
            if "image" in batch:
                yield self._finish(batch)

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move to the device and finish the images there (see `finish`)."""
        image = batch["image"].to(self.device, non_blocking=True)
        out = self._outputs.empty((image.shape[0], 3, *image.shape[2:])) if image.is_cpu else None
        return {
            "image": finish(image, batch.get("colour"), self.spec.mean, self.spec.std, out=out),
            "uv": batch["uv"].to(self.device, non_blocking=True),
            "visible": batch["visible"].to(self.device, non_blocking=True),
            "key": batch["key"],
        }


def denormalise(image: torch.Tensor, manifest: Manifest) -> torch.Tensor:
    """Inverse of the loaders' normalisation: float (B, 3, H, W) back to [0, 255]."""
    mean = torch.tensor(manifest.mean, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(manifest.std, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image * std + mean) * 255.0


def make_loader(
    root: str | Path,
    split: str,
    *,
    kind: str = "wds",
    batch_size: int,
    image_size: int = 128,
    augment: AugmentConfig | None = None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    device: str | torch.device = "cpu",
    samples_per_epoch: int | None = None,
    drop_last: bool | None = None,
    shuffle_buffer: int = 1000,
) -> Any:
    """A loader over `split` of the packed shards in `root` (see the module docstring).

    Augmentation applies to the train split only (None or enabled=False: plain letterbox resize).
    `rank`/`world_size` are the GLOBAL rank and world size. Train: shuffled, `len()` batches per
    rank (equal on all ranks), `samples_per_epoch` switches the WDS kind to resampled shards.
    Val/test/eval: every sample exactly once per epoch across ranks and workers (ranks may get
    batch counts differing by one). `drop_last` defaults to True for train, False otherwise.
    The returned loader has `set_epoch(epoch)`, `len()` and `stats` (skipped corrupt samples).
    """
    if kind not in KINDS:
        raise HandposeError(f"loader kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if split not in SPLITS:
        raise HandposeError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if batch_size < 1 or image_size < 1 or workers < 0:
        raise HandposeError(
            f"batch_size/image_size must be >= 1 and workers >= 0, got {batch_size}/{image_size}/{workers}"
        )
    if not 0 <= rank < world_size:
        raise HandposeError(f"rank {rank} is outside world size {world_size}")
    manifest, shards = split_shards(root, split)
    train = split == "train"
    aug = augment if train and augment is not None and augment.enabled else None
    common: dict[str, Any] = dict(
        batch_size=batch_size,
        image_size=image_size,
        augment=aug,
        rank=rank,
        world_size=world_size,
        workers=workers,
        seed=seed,
        epoch=epoch,
        device=torch.device(device),
        samples_per_epoch=samples_per_epoch,
        drop_last=train if drop_last is None else drop_last,
    )
    if kind == "dali":
        from handpose.dali_loader import DaliLoader

        return DaliLoader(manifest, shards, split, **common)
    return WdsLoader(manifest, shards, split, shuffle_buffer=shuffle_buffer, **common)

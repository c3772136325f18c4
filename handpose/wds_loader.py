"""The WebDataset kind of `make_loader` (loader.py): CPU worker processes stream the shards.

Per DataLoader worker: plan this worker's samples of each shard set -> read them
(`shards.read_samples`: only the `.jpg` and label members, by offset via the `.idx`; nothing is
unpickled) -> shuffle buffer (train) -> one affine per sample (`geometry.crop_matrix`, the set's
crop mode plus augmentation) -> `imageio.warp_to_input` decodes and warps (the preprocessing
predict shares) and the same matrix moves the keypoints -> blur/occlusion (train) -> uint8 batch.
With `negatives` > 0 a share of the training samples of box-crop sets become crops WITHOUT a hand
("present" False): a square elsewhere in the same photo that overlaps none of its hand boxes. A
photo's hands are consecutive samples of one shard (pack writes them so) that `shards.same_photo`
joins (by their identical image bytes: this kind does not read KEY.json), so `_photo_boxes`
groups them before the shuffle; a group cut by the edge of a slot's run of a shard
may lack hands, and never gives a negative.
Colour jitter + normalisation (one folded affine per sample, each set's own mean/std) run on the
device after the uint8 batch (a quarter of float32's bytes) has crossed from the worker: one
batched op on a GPU, sample by sample into recycled output tensors on a CPU (`finish`).

Who reads what (`assign_shards`): a split's samples, shard after shard, are dealt out as
ranks x workers contiguous runs of equal length (+-1 sample). So val/test/eval read every sample
exactly once per epoch with ANY number of shards, ranks and workers (fewer shards than slots
included: webdataset's own split_by_node/split_by_worker would leave slots empty, raise "No samples
found" and hang the other ranks), and all slots get the same work; several sets are read one after
the other. Training streams each set's run of its slot over and over (a fresh shard order, shared
by all ranks, each pass; the shuffle buffer drains at the end of each pass) and every batch takes
its fixed share of each set (`datasets.apportion`); a worker stops at a fixed quota of batches, so
every rank yields the same number of batches. One epoch is about one pass over the FIRST set.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from numpy.typing import ArrayLike
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from handpose.augment import (
    IDENTITY,
    apply_colour,
    blur_and_occlude,
    colour_normalise,
    folded_affine,
    negative_matrix,
    params_matrix,
    sample_params,
)
from handpose.config import AugmentConfig
from handpose.cpu import collect_before_fork
from handpose.datasets import (
    LoaderOptions,
    LoaderStats,
    ShardSet,
    apportion,
    n_batches,
    train_batches_per_rank,
)
from handpose.errors import HandposeError
from handpose.geometry import apply_matrix, in_frame, source_region
from handpose.imageio import image_size, warp_to_input
from handpose.remote import Store
from handpose.shards import READ_LABELS, decode_annotation, decode_box, read_samples, same_photo

log = logging.getLogger(__name__)

READ_MEMBERS = ("jpg", *READ_LABELS)  # the only members this kind reads

Item = tuple[str, np.ndarray, np.ndarray, np.ndarray, tuple[float, ...], int, bool]
# (key, uint8 image (S, S, 3), uv (21, 2) model px, labelled (21,), colour row, set index, a hand shown)
PHOTO_BOXES = "__photo_boxes__"  # a sample's key for every hand box of its photo (None: not known)


# ---------------------------------------------------------------------------- who reads what


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


def worker_quotas(batches_per_rank: int, workers: int) -> list[int]:
    """Training: whole batches each worker of a rank yields per epoch."""
    return [batches_per_rank // workers + (w < batches_per_rank % workers) for w in range(workers)]


# ---------------------------------------------------------------------------- worker stages


@dataclass(frozen=True)
class _SetSpec:
    """A ShardSet without its manifest (what a worker needs, cheap to pickle)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    crop: str
    pad: float
    store: Store | None = None  # a remote pack's reader (its manifest's), None for a folder


@dataclass(frozen=True)
class _Spec:
    """Everything a worker needs (picklable); the epoch is set per epoch by the loader."""

    sets: tuple[_SetSpec, ...]
    shares: tuple[int, ...]  # samples of each set per training batch
    train: bool
    augment: AugmentConfig | None
    image_size: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    drop_last: bool
    shuffle_buffer: int
    resample: bool  # training draws whole shards with replacement (samples_per_epoch)
    batches_per_rank: int  # training only
    negatives: float = 0.0  # training: share of samples turned into crops without a hand

    @classmethod
    def of(
        cls,
        sets: Sequence[ShardSet],
        split: str,
        o: LoaderOptions,
        *,
        shuffle_buffer: int,
        negatives: float = 0.0,
    ) -> _Spec:
        """The spec of a loader over `sets` (this kind's, and the detection kinds', whose photos
        come from the same streams): training batches per rank, each set's share of a batch."""
        train = split == "train"
        return cls(
            sets=tuple(_SetSpec(s.shards, s.counts, s.crop, s.pad, s.manifest.store) for s in sets),
            shares=tuple(apportion(o.batch_size, [s.weight for s in sets])),
            train=train,
            augment=o.augment,
            image_size=o.image_size,
            batch_size=o.batch_size,
            rank=o.rank,
            world_size=o.world_size,
            seed=o.seed,
            drop_last=o.drop_last,
            shuffle_buffer=shuffle_buffer,
            resample=bool(o.samples_per_epoch) and train,
            batches_per_rank=(
                train_batches_per_rank(sets, o.batch_size, o.world_size, o.samples_per_epoch) if train else 0
            ),
            negatives=negatives if train else 0.0,
        )


def _read(tasks: Iterable[tuple[str, ShardTask]], store: Store | None = None) -> Iterator[dict]:
    """Samples {"__key__", "__url__", "jpg", "kp.f32", "vis.u8", "box.f32"} of each task."""
    for url, task in tasks:
        yield from read_samples(url, READ_MEMBERS, task.start, task.stop, store=store)


def _reported(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A worker's batches; a HandposeError (a shard that cannot be read, or whose bytes do not
    match its manifest) travels to the main process as a last item, which `WdsLoader` raises
    there as the one line it is (torch would re-raise it wrapped in the worker's traceback).
    Nothing of the bad bytes is in any batch before it: readers check before they yield."""
    try:
        yield from batches
    except HandposeError as e:
        yield {"error": str(e), "skipped": []}


def _photo_boxes(
    tasks: Iterable[tuple[str, ShardTask]], counts: dict[str, int], store: Store | None = None
) -> Iterator[dict]:
    """`_read`, each sample with PHOTO_BOXES: the boxes (N, 4) of every hand of its photo (the run
    of consecutive samples `shards.same_photo` joins), or None where the run may go on beyond
    this task (it starts the task and the task does not start the shard, or it ends the task
    and the task does not end the shard) or a box member is unreadable."""
    for url, task in tasks:
        run: list[dict] = []
        first = True
        samples = read_samples(url, READ_MEMBERS, task.start, task.stop, store=store)
        for sample in itertools.chain(samples, [None]):
            if run and (sample is None or not same_photo(run[-1], sample)):
                cut = (first and task.start > 0) or (sample is None and task.stop < counts[url])
                yield from _with_boxes(run, known=not cut)
                run, first = [], False
            if sample is not None:
                run.append(sample)


def _with_boxes(run: list[dict], *, known: bool) -> Iterator[dict]:
    boxes = None
    if known:
        try:
            boxes = np.stack([decode_box(s["box.f32"]) for s in run])
        except (KeyError, ValueError):  # the sample itself is skipped later, with its reason
            boxes = None
    for s in run:
        s[PHOTO_BOXES] = boxes
        yield s


def _decode_warp(
    samples: Iterable[dict],
    *,
    crop: str,
    pad: float,
    set_index: int,
    size: int,
    augment: AugmentConfig | None,
    rng: np.random.Generator,
    skipped: list[tuple[str, str, str]],
    negatives: float = 0.0,
) -> Iterator[Item]:
    """One Item per sample. A data error (ValueError: corrupt JPEG, bad label member, missing
    member) skips the sample and records it in `skipped`; anything else is a bug and raises.
    With `negatives`, that share of samples (drawn per sample; only those whose photo's boxes are
    known and leave room) is cropped where the photo shows no hand: no joint visible."""
    for sample in samples:
        key, url = sample["__key__"], sample["__url__"]
        try:
            jpg = sample.get("jpg")
            if jpg is None:
                raise ValueError("missing member jpg")
            ann = decode_annotation(sample)
            p = sample_params(augment, rng) if augment is not None else IDENTITY
            width, height = image_size(jpg)
            M = None
            boxes = sample.get(PHOTO_BOXES)
            if negatives > 0 and rng.uniform() < negatives and boxes is not None:
                side = source_region(width, height, ann.box, pad)[2]  # the size of a hand crop of this photo
                M = negative_matrix(p, side, width, height, boxes, size, rng)
            present = M is None
            if M is None:
                region = source_region(width, height, ann.box if crop == "box" else None, pad)
                M = params_matrix(p, region, size)
            image = warp_to_input(jpg, M, size)
        except ValueError as e:
            log.warning("skipping corrupt sample %s in %s: %s", key, url, e)
            skipped.append((url, key, str(e)))
            continue
        try:
            yield (
                key,
                blur_and_occlude(image, p),
                apply_matrix(M, ann.uv),
                ann.labelled if present else np.zeros_like(ann.labelled),
                p.colour(),
                set_index,
                present,
            )
        except Exception as e:
            e.add_note(f"sample {key} in {url}")
            raise


def _collate(
    chunk: list[Item], *, size: int, colour: bool, skipped: list[tuple[str, str, str]], shared: bool
) -> dict[str, Any]:
    """A worker's batch: uint8 images (B, 3, H, W), uv, visible, keys, set ids, present (B,) bool,
    colour rows (B, 7).

    Images stay uint8 (a quarter of float32's bytes) until `finish` on the device; with `shared`
    (a DataLoader worker) they are collated straight into shared memory, which the DataLoader
    would otherwise copy them into.
    """
    shape = (len(chunk), 3, size, size)
    images = _shared_empty(shape, torch.uint8) if shared else torch.empty(shape, dtype=torch.uint8)
    out = images.numpy()
    for i, item in enumerate(chunk):
        out[i] = item[1].transpose(2, 0, 1)  # HWC -> CHW here: 4x cheaper than on floats
    uv = np.stack([item[2] for item in chunk]).astype(np.float32)
    labelled = np.stack([item[3] for item in chunk])
    batch: dict[str, Any] = {
        "image": images,
        "uv": torch.from_numpy(uv),
        "visible": torch.from_numpy(labelled & in_frame(uv, size)),
        "key": [item[0] for item in chunk],
        "set": torch.tensor([item[5] for item in chunk], dtype=torch.int64),
        "present": torch.tensor([item[6] for item in chunk], dtype=torch.bool),
        "skipped": _take(skipped),
    }
    if colour:
        batch["colour"] = torch.tensor([item[4] for item in chunk], dtype=torch.float32)
    return batch


def finish(
    images: torch.Tensor,
    colour: torch.Tensor | None,
    mean: ArrayLike,
    std: ArrayLike,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, colour-jittered (rows (B, 7) or None), (x / 255 - mean) / std
    with mean/std (3,) or per sample (B, 3).

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
        colour_normalise(src[i], A[i], t[i], lo[i], hi[i], dst[i], scratch)
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

    def _slot(self) -> tuple[int, int, int, int, np.random.Generator, bool]:
        """(worker, workers, slot, slots, rng, shared) of the process iterating this stream: its
        slot among ranks x workers, its seeds (base + rank, then worker and epoch; shard order
        alone is shared by all ranks), and whether it is a DataLoader worker (shared memory)."""
        spec, info = self.spec, get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([spec.seed + spec.rank, worker, self.epoch])
        return worker, workers, spec.rank * workers + worker, spec.world_size * workers, rng, info is not None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return _reported(self._batches())

    def _batches(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        worker, workers, slot, slots, rng, shared = self._slot()
        skipped: list[tuple[str, str, str]] = []
        colour = spec.augment is not None
        if spec.train:
            streams = [self._train_items(i, slot, slots, rng, skipped) for i in range(len(spec.sets))]
            for _ in range(worker_quotas(spec.batches_per_rank, workers)[worker]):
                chunk = [
                    it for s, n in zip(streams, spec.shares, strict=True) for it in itertools.islice(s, n)
                ]
                if len(chunk) < spec.batch_size:
                    raise RuntimeError(f"a training stream of worker {worker} ran dry")  # invariant
                yield _collate(chunk, size=spec.image_size, colour=colour, skipped=skipped, shared=shared)
        else:
            items = itertools.chain.from_iterable(
                self._items(i, _read(tasks, spec.sets[i].store), rng, skipped)
                for i, tasks in self._eval_plan(slot, slots)
            )
            while chunk := list(itertools.islice(items, spec.batch_size)):
                if spec.drop_last and len(chunk) < spec.batch_size:
                    break
                yield _collate(chunk, size=spec.image_size, colour=colour, skipped=skipped, shared=shared)
        if skipped:  # records from the tail of the stream travel alone
            yield {"skipped": _take(skipped)}

    def _items(
        self, i: int, samples: Iterable[dict], rng: np.random.Generator, skipped: list
    ) -> Iterator[Item]:
        s = self.spec.sets[i]
        return _decode_warp(
            samples,
            crop=s.crop,
            pad=s.pad,
            set_index=i,
            size=self.spec.image_size,
            augment=self.spec.augment,
            rng=rng,
            skipped=skipped,
            negatives=self._negatives(s),
        )

    def _negatives(self, s: _SetSpec) -> float:
        """The share of crops without a hand for set `s`: box-crop sets in training only (a hand
        crop says whether ITS box holds a hand; a whole photo of these shards always does)."""
        return self.spec.negatives if self.spec.train and s.crop == "box" else 0.0

    def _read_train(self, s: _SetSpec, tasks: Iterable[tuple[str, ShardTask]]) -> Iterator[dict]:
        """Training reads; with negatives, each sample knows its photo's hand boxes."""
        if self._negatives(s) > 0:
            return _photo_boxes(tasks, dict(zip(s.urls, s.counts, strict=True)), s.store)
        return _read(tasks, s.store)

    def _eval_plan(self, slot: int, slots: int) -> Iterator[tuple[int, list[tuple[str, ShardTask]]]]:
        """val/test/eval: the sets' shards back to back, dealt out exactly once over all slots."""
        flat = [(i, url) for i, s in enumerate(self.spec.sets) for url in s.urls]
        counts = [c for s in self.spec.sets for c in s.counts]
        tasks = [(flat[t.index][0], (flat[t.index][1], t)) for t in assign_shards(counts, slots)[slot]]
        for i, group in itertools.groupby(tasks, key=lambda x: x[0]):
            yield i, [task for _, task in group]

    def _train_items(
        self, i: int, slot: int, slots: int, rng: np.random.Generator, skipped: list
    ) -> Iterator[Item]:
        """Set i's training items for this slot, endless: passes over its run of the set (a new
        shard order each pass), or whole shards drawn with replacement when resampling or when
        the set is too small to give every slot a run."""
        s, spec = self.spec.sets[i], self.spec
        set_rng = np.random.default_rng([spec.seed + spec.rank, slot, self.epoch, i])
        if spec.resample or sum(s.counts) < slots:
            samples = self._shuffled(self._read_train(s, self._resampled(s, set_rng)), set_rng)
        else:
            passes = self._passes(s, i, slot, slots)
            samples = itertools.chain.from_iterable(
                self._shuffled(self._read_train(s, p), set_rng) for p in passes
            )
        return self._items(i, samples, rng, skipped)

    def _shuffled(self, samples: Iterable[dict], rng: np.random.Generator) -> Iterator[dict]:
        n = self.spec.shuffle_buffer
        r = random.Random(int(rng.integers(2**62)))
        return wds.shuffle(n, initial=min(n, 100), rng=r)(iter(samples))

    def _passes(self, s: _SetSpec, i: int, slot: int, slots: int) -> Iterator[list[tuple[str, ShardTask]]]:
        """This slot's run of set `s`, pass after pass, each in a new shard order."""
        for p in itertools.count():
            # the same permutation on every rank, so the ranks' slots still partition the set
            order = np.random.default_rng([self.spec.seed, self.epoch, p, i]).permutation(len(s.urls))
            plan = assign_shards([s.counts[k] for k in order], slots)[slot]
            yield [(s.urls[order[t.index]], t) for t in plan]

    @staticmethod
    def _resampled(s: _SetSpec, rng: np.random.Generator) -> Iterator[tuple[str, ShardTask]]:
        """Whole shards of set `s` drawn with replacement, forever."""
        while True:
            k = int(rng.integers(len(s.urls)))
            yield s.urls[k], ShardTask(k, 0, s.counts[k])


# ---------------------------------------------------------------------------- the loader


class WdsLoader:
    """Iterable of batch dicts; call `set_epoch(epoch)` before each epoch. `len()` = batches per epoch."""

    def __init__(
        self,
        sets: list[ShardSet],
        split: str,
        options: LoaderOptions,
        *,
        shuffle_buffer: int,
        negatives: float = 0.0,
    ):
        o = options
        self.sets = sets
        self.spec = _Spec.of(sets, split, o, shuffle_buffer=shuffle_buffer, negatives=negatives)
        self.workers, self.device, self.epoch = o.workers, o.device, o.epoch
        self.stats = LoaderStats()
        self._mean = np.array([s.mean for s in sets], np.float64)
        self._std = np.array([s.std for s in sets], np.float64)
        self._outputs = _Recycler()
        self._dataset = _ShardStream(self.spec)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shard order, shuffle and augmentation seeds depend on it."""
        self.epoch = epoch

    def __len__(self) -> int:
        spec, workers = self.spec, max(self.workers, 1)
        if spec.train:
            return spec.batches_per_rank
        counts = [c for s in spec.sets for c in s.counts]
        plan = assign_shards(counts, spec.world_size * workers)
        per_worker = [sum(t.count for t in plan[spec.rank * workers + w]) for w in range(workers)]
        return sum(n_batches(n, spec.batch_size, spec.drop_last) for n in per_worker)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._dataset.epoch = self.epoch
        if self.workers:
            collect_before_fork()
        loader = DataLoader(
            self._dataset,
            batch_size=None,  # workers batch themselves
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
        )
        for batch in loader:
            if "error" in batch:
                raise HandposeError(batch["error"])
            if batch["skipped"]:
                self.stats.add(batch["skipped"])
            if "image" in batch:
                yield self._finish(batch)

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move to the device and finish the images there (see `finish`), each set with its own
        normalisation."""
        image = batch["image"].to(self.device, non_blocking=True)
        out = self._outputs.empty((image.shape[0], 3, *image.shape[2:])) if image.is_cpu else None
        ids = batch["set"].numpy()
        return {
            "image": finish(image, batch.get("colour"), self._mean[ids], self._std[ids], out=out),
            "uv": batch["uv"].to(self.device, non_blocking=True),
            "visible": batch["visible"].to(self.device, non_blocking=True),
            "key": batch["key"],
            "set": batch["set"].to(self.device, non_blocking=True),
            "present": batch["present"].to(self.device, non_blocking=True),
        }

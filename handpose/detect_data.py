"""Detection items from the same shards: a photo with ALL its hands, laid out on the model input.

A shard sample is one hand; `handpose pack` stores the photo's bytes with each of its hands and
keeps a photo's hands consecutive in one shard (sorted by image path, then hand). So a PHOTO is a
run of consecutive samples of a shard that `shards.same_photo` joins (KEY.json's "source", else
identical image bytes) (`read_photos`); its key is its first hand's key. Photos are dealt out to
ranks and workers by the same runs of sample positions as the keypoint loaders
(`wds_loader.assign_shards`): a slot owns the photos whose FIRST hand lies in its run, so every
photo is read exactly once per val epoch whatever the slot count.

An item (`sample_layout`): one photo letterboxed into the input; or, in training, a 2x2 mosaic of
four photos (each in its cell around a random centre, at a random scale), or one photo placed
small at a random position (`config.LayoutConfig`). Each photo i goes through ONE matrix
M_i = augment matrix of the canvas o place_matrix(photo i, its square) (`tile_matrices`, built
from geometry.py), which moves its pixels (the tiles never overlap, so they add up to the
canvas), its hand boxes (`geometry.move_boxes`) and its keypoints. Then one rule for both loader
kinds (`item_labels`): boxes are clipped to the frame, and a hand stays a hand while at least
MIN_VISIBLE of its box's area and MIN_BOX_PX of each side are inside; every other pixel is a
negative for the detector.

Batch (both kinds): {"image": float (B, 3, S, S) normalised with the set's mean/std,
"boxes": float (B, K, 4) x0, y0, x1, y1 input px, "hands": bool (B, K) real boxes,
"uv": float (B, K, 21, 2) input px, "visible": bool (B, K, 21) labelled and in frame,
"key": list[str] ("+"-joined photo keys for a mosaic), "set": int64 (B,)}, K = MAX_HANDS.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from handpose.augment import IDENTITY, AugmentParams, blur_and_occlude, params_matrix, sample_params
from handpose.config import AugmentConfig, LayoutConfig
from handpose.datasets import LoaderOptions, ShardSet
from handpose.errors import HandposeError
from handpose.geometry import Square, apply_affine, canvas_region, compose, in_frame, move_boxes, place_matrix
from handpose.imageio import image_size, warp_to_input
from handpose.remote import Store
from handpose.shards import READ_LABELS, decode_annotation, read_samples, same_photo
from handpose.skeleton import NUM_JOINTS
from handpose.wds_loader import (
    ShardTask,
    WdsLoader,
    _ShardStream,
    _shared_empty,
    _Spec,
    _take,
    finish,
    worker_quotas,
)

log = logging.getLogger(__name__)

TILES = 4  # photos of a mosaic, the most an item holds
PHOTO_HANDS = 8  # hands read per photo (a photo with more keeps its first 8; the rest are not boxes)
MAX_HANDS = TILES * PHOTO_HANDS  # K: box slots of every item
MIN_VISIBLE = 0.4  # a hand cut by the frame stays a hand while this share of its box is inside
MIN_BOX_PX = 2.0  # ... and each side of its clipped box is at least this many input px

PHOTO_MEMBERS = ("jpg", "json", *READ_LABELS)  # the members read_photos reads


@dataclass(frozen=True)
class TrainPhoto:
    """One photo with all its hands (source pixels of the photo as displayed)."""

    key: str  # its first hand's sample key
    url: str  # the shard it came from
    jpg: bytes
    boxes: np.ndarray  # (n, 4) float64 x0, y0, x1, y1
    uv: np.ndarray  # (n, 21, 2) float64
    labelled: np.ndarray  # (n, 21) bool


Item = tuple[int, list[TrainPhoto], list[Square]]  # (set index, photos, their squares on the canvas)


def read_photos(
    tasks: Iterable[tuple[str, ShardTask]], skipped: list[tuple[str, str, str]], store: Store | None = None
) -> Iterator[TrainPhoto]:
    """The photos each task owns: those whose first hand's position lies in [start, stop). Reads
    from the sample before `start` (to tell whether `start` continues a photo) until the first
    photo that starts at or after `stop`. A sample with a data error (missing member, bad label)
    is skipped and recorded in `skipped`; the rest of its photo stays. (`store`: a remote pack's
    reader, as in `wds_loader._read`.)"""
    for url, task in tasks:
        first = max(task.start - 1, 0)
        run: list[tuple[int, dict]] = []
        for pos, sample in enumerate(read_samples(url, PHOTO_MEMBERS, first, store=store), first):
            if run and same_photo(run[-1][1], sample):
                run.append((pos, sample))
                continue
            if run and run[0][0] >= task.start:
                photo = _photo(run, skipped)
                if photo is not None:
                    yield photo
            if pos >= task.stop:
                run = []
                break
            run = [(pos, sample)]
        if run and task.start <= run[0][0] < task.stop:
            photo = _photo(run, skipped)
            if photo is not None:
                yield photo


def _photo(run: list[tuple[int, dict]], skipped: list[tuple[str, str, str]]) -> TrainPhoto | None:
    """The hands of one run of samples as one photo (None when none of them can be read)."""
    boxes, uvs, labelled, keys = [], [], [], []
    for _, sample in run:
        key, url = sample["__key__"], sample["__url__"]
        try:
            if sample.get("jpg") is None:
                raise ValueError("missing member jpg")
            ann = decode_annotation(sample)
        except ValueError as e:
            log.warning("skipping corrupt sample %s in %s: %s", key, url, e)
            skipped.append((url, key, str(e)))
            continue
        boxes.append(ann.box.astype(np.float64))
        uvs.append(ann.uv.astype(np.float64))
        labelled.append(ann.labelled)
        keys.append(key)
    if not keys:
        return None
    return TrainPhoto(
        keys[0], run[0][1]["__url__"], run[0][1]["jpg"], np.stack(boxes), np.stack(uvs), np.stack(labelled)
    )


# ---------------------------------------------------------------------------------------------
# Layouts, matrices, labels


def plain_layout(size: int) -> list[Square]:
    """One photo letterboxed into the whole input."""
    return [(0.0, 0.0, float(size))]


def sample_layout(cfg: LayoutConfig | None, size: int, rng: np.random.Generator) -> list[Square]:
    """Draw an item's layout: the squares (x0, y0, side) of its photos on the size x size canvas
    (4 for a mosaic, else 1). See config.LayoutConfig for the distributions."""
    if cfg is None or not cfg.enabled:
        return plain_layout(size)
    u = rng.uniform(0.0, 1.0, size=15)  # one call: per-item Python overhead matters in workers
    if u[0] < cfg.mosaic:
        c = cfg.mosaic_centre
        xc, yc = (c + (1 - 2 * c) * u[1]) * size, (c + (1 - 2 * c) * u[2]) * size
        cells = [
            (0.0, 0.0, xc, yc),
            (xc, 0.0, size - xc, yc),
            (0.0, yc, xc, size - yc),
            (xc, yc, size - xc, size - yc),
        ]
        squares = []
        for k, (x, y, w, h) in enumerate(cells):
            side = min(w, h) * (cfg.mosaic_scale_min + (1 - cfg.mosaic_scale_min) * u[3 + 3 * k])
            squares.append((x + (w - side) * u[4 + 3 * k], y + (h - side) * u[5 + 3 * k], side))
        return squares
    if u[0] < cfg.mosaic + cfg.canvas:
        side = (cfg.canvas_scale_min + (cfg.canvas_scale_max - cfg.canvas_scale_min) * u[1]) * size
        return [((size - side) * u[2], (size - side) * u[3], side)]
    return plain_layout(size)


def tile_matrices(
    sizes: Sequence[tuple[int, int]], squares: Sequence[Square], p: AugmentParams, size: int
) -> list[np.ndarray]:
    """Source -> model-input matrix of each photo (width, height as displayed) placed in its
    square, then the item's augmentation `p` of the whole canvas about its centre."""
    canvas = params_matrix(p, canvas_region(size), size)
    return [compose(canvas, place_matrix(w, h, sq)) for (w, h), sq in zip(sizes, squares, strict=True)]


def empty_labels(lead: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Per-tile label arrays of an item (or of `lead` items): TILES x PHOTO_HANDS slots, none used."""
    shape = (*lead, TILES, PHOTO_HANDS)
    return {
        "boxes": np.zeros((*shape, 4)),
        "uv": np.zeros((*shape, NUM_JOINTS, 2)),
        "present": np.zeros(shape, bool),
        "labelled": np.zeros((*shape, NUM_JOINTS), bool),
    }


def item_labels(
    boxes: np.ndarray, uv: np.ndarray, present: np.ndarray, labelled: np.ndarray, size: int
) -> dict[str, np.ndarray]:
    """THE frame rule of both loader kinds, on moved labels (..., TILES, PHOTO_HANDS, ...) in
    input px -> {"boxes" (..., K, 4) clipped to the frame, "hands" (..., K), "uv" (..., K, 21, 2),
    "visible" (..., K, 21)}: a hand stays while MIN_VISIBLE of its box's area and MIN_BOX_PX of
    each clipped side are inside; a joint is visible when labelled, of a kept hand and in frame."""
    lead = boxes.shape[:-3]
    boxes = np.asarray(boxes, np.float64).reshape(*lead, MAX_HANDS, 4)
    uv = np.asarray(uv, np.float64).reshape(*lead, MAX_HANDS, NUM_JOINTS, 2)
    present = np.asarray(present, bool).reshape(*lead, MAX_HANDS)
    labelled = np.asarray(labelled, bool).reshape(*lead, MAX_HANDS, NUM_JOINTS)
    clipped = np.clip(boxes, 0.0, float(size))
    sides = clipped[..., 2:] - clipped[..., :2]
    area = np.prod(np.clip(boxes[..., 2:] - boxes[..., :2], 0, None), axis=-1)
    hands = present & (sides.prod(-1) >= MIN_VISIBLE * area) & (sides >= MIN_BOX_PX).all(-1) & (area > 0)
    return {
        "boxes": np.where(hands[..., None], clipped, 0.0).astype(np.float32),
        "hands": hands,
        "uv": np.where(hands[..., None, None], uv, 0.0).astype(np.float32),
        "visible": labelled & hands[..., None] & in_frame(uv, size),
    }


def compose_item(
    photos: Sequence[TrainPhoto], squares: Sequence[Square], p: AugmentParams, size: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The WDS kind's item: uint8 (size, size, 3) canvas (each photo decoded and warped by its
    matrix, `imageio.warp_to_input`, the tiles added up), then blur/occlusion of `p`; and the
    moved per-tile labels (`empty_labels` layout) for `item_labels`. ValueError: a photo cannot
    be decoded."""
    sizes = [image_size(ph.jpg) for ph in photos]
    matrices = tile_matrices(sizes, squares, p, size)
    labels = empty_labels()
    canvas: np.ndarray | None = None
    for t, (photo, M) in enumerate(zip(photos, matrices, strict=True)):
        tile = warp_to_input(photo.jpg, M, size)
        # the squares never overlap: a tile is black outside its photo, so the sum is the canvas
        # (pixels on a shared edge hold the two tiles' bilinear shares)
        canvas = tile if canvas is None else (canvas.astype(np.uint16) + tile)
        n = min(len(photo.boxes), PHOTO_HANDS)
        labels["boxes"][t, :n] = move_boxes(M, photo.boxes[:n])
        labels["uv"][t, :n] = apply_affine(M, photo.uv[:n].reshape(-1, 2)).reshape(n, NUM_JOINTS, 2)
        labels["present"][t, :n] = True
        labels["labelled"][t, :n] = photo.labelled[:n]
    assert canvas is not None  # invariant: an item holds at least one photo
    image = np.minimum(canvas, 255).astype(np.uint8) if canvas.dtype != np.uint8 else canvas
    return blur_and_occlude(image, p), labels


def item_key(photos: Sequence[TrainPhoto]) -> str:
    """An item's key: its photo's key, or the mosaic's photo keys joined by '+'."""
    return "+".join(ph.key for ph in photos)


# ---------------------------------------------------------------------------------------------
# The photo stream of one slot (both kinds) and the WDS kind's worker pipeline


class PhotoStream(_ShardStream):
    """Detection items of one slot (rank x worker): photos read by ownership, shuffled per photo in
    training and laid out (`sample_layout`); the WDS kind iterates it in DataLoader workers, the
    DALI kind calls `train_items` / `eval_items` in the main process (one slot per rank)."""

    def __init__(self, spec: _Spec, layout: LayoutConfig | None):
        super().__init__(spec)
        self.layout = layout if spec.train else None

    def train_batches(
        self, slot: int, slots: int, rng: np.random.Generator, skipped: list
    ) -> Iterator[list[Item]]:
        """Endless training batches of raw items: every batch `spec.shares[i]` items of set i."""
        streams = [self._train_photos(i, slot, slots, rng, skipped) for i in range(len(self.spec.sets))]
        while True:
            batch: list[Item] = []
            for i, (stream, n) in enumerate(zip(streams, self.spec.shares, strict=True)):
                for _ in range(n):
                    squares = sample_layout(self.layout, self.spec.image_size, rng)
                    photos = list(itertools.islice(stream, len(squares)))
                    if len(photos) < len(squares):
                        raise RuntimeError(f"the training photos of set {i} ran dry")  # invariant
                    batch.append((i, photos, squares))
            yield batch

    def eval_items(self, slot: int, slots: int, skipped: list) -> Iterator[Item]:
        """Every photo this slot owns, once, letterboxed."""
        square = plain_layout(self.spec.image_size)
        for i, tasks in self._eval_plan(slot, slots):
            for photo in read_photos(tasks, skipped, self.spec.sets[i].store):
                yield (i, [photo], square)

    def _train_photos(
        self, i: int, slot: int, slots: int, rng: np.random.Generator, skipped: list
    ) -> Iterator[TrainPhoto]:
        """Set i's photos for this slot, endless, shuffled photo by photo: passes over its run (a
        new shard order each pass), or whole shards drawn with replacement when resampling, when
        the set is too small to give every slot a run, or when a run owns no photo."""
        s, spec = self.spec.sets[i], self.spec
        set_rng = np.random.default_rng([spec.seed + spec.rank, slot, self.epoch, i])
        if not (spec.resample or sum(s.counts) < slots):
            for tasks in self._passes(s, i, slot, slots):
                n = 0
                for photo in self._shuffle(read_photos(tasks, skipped, s.store), set_rng):
                    n += 1
                    yield photo
                if n == 0:
                    break  # a run inside one photo owns nothing: draw whole shards instead
        yield from self._shuffle(read_photos(self._resampled(s, set_rng), skipped, s.store), set_rng)

    def _shuffle(self, photos: Iterator[TrainPhoto], rng: np.random.Generator) -> Iterator[TrainPhoto]:
        """The keypoint loader's shuffle buffer (`_ShardStream._shuffled`), over photos."""
        return self._shuffled(photos, rng)  # type: ignore[arg-type, return-value]

    def _batches(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        worker, workers, slot, slots, rng, shared = self._slot()
        skipped: list[tuple[str, str, str]] = []
        if spec.train:
            batches = self.train_batches(slot, slots, rng, skipped)
            for items in itertools.islice(batches, worker_quotas(spec.batches_per_rank, workers)[worker]):
                yield self._collate([self._build(it, rng, skipped) for it in items], skipped, shared)
        else:
            built = (self._build(it, rng, skipped) for it in self.eval_items(slot, slots, skipped))
            ready = (b for b in built if b is not None)
            while chunk := list(itertools.islice(ready, spec.batch_size)):
                if spec.drop_last and len(chunk) < spec.batch_size:
                    break
                yield self._collate(chunk, skipped, shared)
        if skipped:
            yield {"skipped": _take(skipped)}

    def _build(self, item: Item, rng: np.random.Generator, skipped: list) -> tuple | None:
        """(key, uint8 image, labels, colour row, set index); None when a photo cannot be decoded
        (a data error, recorded in `skipped`; a training item takes the mosaic without it)."""
        i, photos, squares = item
        p = sample_params(self.spec.augment, rng) if self.spec.augment is not None else IDENTITY
        try:
            image, labels = compose_item(photos, squares, p, self.spec.image_size)
        except ValueError as e:
            for ph in photos:
                skipped.append((ph.url, ph.key, f"photo cannot be decoded: {e}"))
            if not self.spec.train:
                return None
            image, labels = np.zeros((self.spec.image_size,) * 2 + (3,), np.uint8), empty_labels()
        return (item_key(photos), image, labels, p.colour(), i)

    def _collate(self, chunk: list, skipped: list, shared: bool) -> dict[str, Any]:
        chunk = [c for c in chunk if c is not None]
        size = self.spec.image_size
        shape = (len(chunk), 3, size, size)
        images = _shared_empty(shape, torch.uint8) if shared else torch.empty(shape, dtype=torch.uint8)
        out = images.numpy()
        for k, c in enumerate(chunk):
            out[k] = c[1].transpose(2, 0, 1)
        stacked = {name: np.stack([c[2][name] for c in chunk]) for name in chunk[0][2]}
        labels = item_labels(stacked["boxes"], stacked["uv"], stacked["present"], stacked["labelled"], size)
        batch: dict[str, Any] = {
            "image": images,
            **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in labels.items()},
            "key": [c[0] for c in chunk],
            "set": torch.tensor([c[4] for c in chunk], dtype=torch.int64),
            "skipped": _take(skipped),
        }
        if self.spec.augment is not None:
            batch["colour"] = torch.tensor([c[3] for c in chunk], dtype=torch.float32)
        return batch


LABEL_KEYS = ("boxes", "hands", "uv", "visible")


class DetectWdsLoader(WdsLoader):
    """The WDS kind for detection: `WdsLoader`'s workers, epochs, shard plans and device finish,
    with detection items (`PhotoStream`) instead of one sample per hand."""

    def __init__(
        self,
        sets: list[ShardSet],
        split: str,
        options: LoaderOptions,
        *,
        layout: LayoutConfig | None,
        shuffle_buffer: int,
    ):
        super().__init__(sets, split, options, shuffle_buffer=shuffle_buffer)
        self._dataset = PhotoStream(self.spec, layout)

    def __len__(self) -> int:
        if self.spec.train:
            return self.spec.batches_per_rank
        raise TypeError("a detection val/test loader does not know its batch count before reading its photos")

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        image = batch["image"].to(self.device, non_blocking=True)
        out = self._outputs.empty((image.shape[0], 3, *image.shape[2:])) if image.is_cpu else None
        ids = batch["set"].numpy()
        return {
            "image": finish(image, batch.get("colour"), self._mean[ids], self._std[ids], out=out),
            **{k: batch[k].to(self.device, non_blocking=True) for k in LABEL_KEYS},
            "key": batch["key"],
            "set": batch["set"].to(self.device, non_blocking=True),
        }


def check_detect_options(crop: Sequence[str], augment: AugmentConfig | None, negatives: float) -> None:
    """What detection items cannot take, each a user error of one line: box crops (it reads whole
    photos), crops without a hand (`negatives`: every pixel off a hand box is already a negative),
    and the augmentations that are not an affine of the canvas in both kinds (`aspect`,
    `perspective_deg`: `dali_detect.tile_matrix` builds flip, zoom, rotation and shift only)."""
    if any(c != "image" for c in crop):
        raise HandposeError("a detector trains on whole photos: crop must be 'image' for every shards folder")
    if negatives > 0:
        raise HandposeError("negatives are crops without a hand for a keypoint model; a detector has none")
    if augment is not None and (augment.aspect > 0 or augment.perspective_deg > 0):
        raise HandposeError(
            "augment.aspect and augment.perspective_deg are not for a detector's canvas: set them to 0"
        )

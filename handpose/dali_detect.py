"""The DALI kind of the detection loader (`make_loader(task="detect", kind="dali")`).

DALI's webdataset reader yields one sample (one hand) at a time and cannot group a photo's hands,
so the photos come from the same Python stream as the WDS kind's (`detect_data.PhotoStream`: the
one shard reader, ownership by runs, photo shuffling and `sample_layout`), one slot per rank, fed
to the graph by `fn.external_source`. Everything that touches pixels or moves labels runs in the
graph, per item of up to TILES photos (unused tiles: a tiny black JPEG placed far off the canvas):

- decode (`fn.decoders.image`, "mixed" on a GPU, libjpeg-turbo's chroma upsampling);
- ONE matrix per tile (`tile_matrix`, the in-graph twin of `detect_data.tile_matrices`): the
  photo letterboxed into its square, then the item's augmentation of the whole canvas, drawn in
  the graph with `dali_loader.sample_params` (the same distributions as the WDS kind);
- the antialiasing shrink of `dali_loader`, then `fn.warp_affine` of every tile into the canvas and
  their sum (the squares never overlap, so a sum is the composition), clamped to [0, 255];
- `fn.coord_transform` moves each hand's box corners and keypoints with its tile's matrix;
- blur/occlusion and colour as `dali_loader` does them, `fn.crop_mirror_normalize` with the
  item's set's mean/std.
On the host, the moved corners become boxes (`geometry.corners_box`) and `detect_data.item_labels`
applies the frame rule, exactly as the WDS kind does. One pipeline per epoch: the Python stream is
seeded by (seed, rank, epoch) like the WDS kind with `workers=0`, so with augmentation off both
kinds give the same items, labels and (up to resampling filters) pixels.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from handpose.config import AugmentConfig, LayoutConfig
from handpose.dali_loader import _antialias, _blur_occlude, _dali, colour, sample_params
from handpose.datasets import LoaderOptions, LoaderStats, ShardSet
from handpose.detect_data import LABEL_KEYS, PHOTO_HANDS, TILES, Item, PhotoStream, item_key, item_labels
from handpose.errors import HandposeError
from handpose.geometry import box_corners, corners_box
from handpose.skeleton import NUM_JOINTS
from handpose.wds_loader import _Spec

POINTS = 4 + NUM_JOINTS  # per hand slot: its box's 4 corners, then its keypoints
OFF_CANVAS = -1e4  # where unused tiles go: far enough that no rotation or zoom brings them back


def _placeholder_jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="JPEG")
    return out.getvalue()


PLACEHOLDER = np.frombuffer(_placeholder_jpeg(), np.uint8)


def _pair(a: Any, b: Any) -> Any:
    """Two scalars as a transform argument: a plain list of constants, or a stacked DataNode pair
    (a constant beside a DataNode becomes one: node * 0 + constant)."""
    fn, _, _, _ = _dali()
    const_a, const_b = isinstance(a, (int, float)), isinstance(b, (int, float))
    if const_a and const_b:
        return [float(a), float(b)]
    if const_a:
        a = b * 0.0 + float(a)
    if const_b:
        b = a * 0.0 + float(b)
    return fn.stack(a, b)


def tile_matrix(width: Any, height: Any, square: Any, size: int, p: dict[str, Any]) -> Any:
    """In-graph twin of `detect_data.tile_matrices` for one photo (width, height as displayed)
    placed in `square` (x0, y0, side): letterbox into the square, then the canvas augmentation
    `p` about the canvas centre (flip + zoom, rotation, shift). Source -> destination."""
    fn, _, dmath, _ = _dali()
    x0, y0, side = square[0], square[1], square[2]
    fit = side / dmath.max(width, height)
    mt = fn.transforms.translation(offset=fn.stack(-0.5 * width, -0.5 * height))
    mt = fn.transforms.scale(mt, scale=fn.stack(fit, fit))
    mt = fn.transforms.translation(mt, offset=fn.stack(x0 + 0.5 * side, y0 + 0.5 * side))
    mt = fn.transforms.translation(mt, offset=[-0.5 * size, -0.5 * size])
    sy = p["scale"]
    mt = fn.transforms.scale(mt, scale=_pair(sy * (1.0 - 2.0 * p["flip"]), sy))
    mt = fn.transforms.rotation(mt, angle=p["angle"]) if not isinstance(p["angle"], float) else mt
    return fn.transforms.translation(mt, offset=_pair(size * (0.5 + p["tx"]), size * (0.5 + p["ty"])))


def build_pipeline(
    source: Iterator[tuple[list[np.ndarray], ...]],
    *,
    batch_size: int,
    image_size: int,
    augment: AugmentConfig | None,
    threads: int,
    seed: int,
    device_id: int | None,
) -> Any:
    """One epoch's pipeline over `source` (batches from `DaliDetectLoader._feed`): image (3, S, S)
    normalised, moved points (TILES * PHOTO_HANDS * POINTS, 2), serial (1,)."""
    fn, types, dmath, pipeline_def = _dali()
    gpu = device_id is not None
    S = image_size

    @pipeline_def(batch_size=batch_size, num_threads=max(threads, 1), device_id=device_id, seed=seed)
    def pipe() -> tuple[Any, Any, Any]:
        inputs = fn.external_source(source=source, num_outputs=3 * TILES + 3, batch=True)
        jpgs, squares, points = inputs[:TILES], inputs[TILES : 2 * TILES], inputs[2 * TILES : 3 * TILES]
        mean, std, serial = inputs[3 * TILES :]
        p = sample_params(augment)
        canvas, moved = None, []
        for jpg, square, pts in zip(jpgs, squares, points, strict=True):
            shape = fn.peek_image_shape(jpg, dtype=types.FLOAT)  # (H, W, C) as displayed
            image = fn.decoders.image(
                jpg, device="mixed" if gpu else "cpu", output_type=types.RGB, jpeg_fancy_upsampling=True
            )
            mt = tile_matrix(shape[1], shape[0], square, S, p)
            scale = square[2] / dmath.max(shape[0], shape[1]) * p["scale"]
            image, fx, fy = _antialias(image, shape, scale)
            mt_image = fn.transforms.scale(mt, scale=fn.stack(1.0 / fx, 1.0 / fy), reverse_order=True)
            tile = fn.warp_affine(
                image,
                matrix=mt_image,
                size=[S, S],
                inverse_map=False,
                fill_value=0.0,
                interp_type=types.INTERP_LINEAR,
                dtype=types.FLOAT,
            )
            canvas = tile if canvas is None else canvas + tile
            moved.append(fn.coord_transform(pts, MT=mt))
        image = dmath.clamp(canvas, 0.0, 255.0)
        if augment is not None:
            image = _blur_occlude(image, p, S)
            image = colour(image, p["colour"], p.get("gains"))
        image = fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
        return image, fn.cat(*moved, axis=0), serial

    return pipe()


class DaliDetectLoader:
    """Iterable of detection batch dicts; `set_epoch`, `len()` (train), `stats`, `sets` like the others."""

    def __init__(
        self,
        sets: list[ShardSet],
        split: str,
        options: LoaderOptions,
        *,
        layout: LayoutConfig | None,
        shuffle_buffer: int,
    ):
        self.sets, self.split, self.layout = sets, split, layout
        self.device, self.epoch, self.workers = options.device, options.epoch, options.workers
        self.spec = _Spec.of(sets, split, options, shuffle_buffer=shuffle_buffer)
        self.stats = LoaderStats()
        self._meta: dict[int, tuple[str, int, np.ndarray, np.ndarray]] = {}
        self._serial = itertools.count()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise HandposeError(f"device {self.device} requested but CUDA is not available")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: photo order, layouts and augmentation seeds depend on it."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.spec.train:
            return self.spec.batches_per_rank
        raise TypeError("a detection val/test loader does not know its batch count before reading its photos")

    def _batches(self, skipped: list) -> Iterator[list[Item]]:
        """This rank's raw items of the epoch, batch by batch (the WDS kind's slot `rank` of
        `world_size` with one worker: the same seeds, photos and layouts)."""
        spec = self.spec
        stream = PhotoStream(spec, self.layout)
        stream.epoch = self.epoch
        rng = np.random.default_rng([spec.seed + spec.rank, 0, self.epoch])
        if spec.train:
            yield from itertools.islice(
                stream.train_batches(spec.rank, spec.world_size, rng, skipped), spec.batches_per_rank
            )
            return
        items = stream.eval_items(spec.rank, spec.world_size, skipped)
        while chunk := list(itertools.islice(items, spec.batch_size)):
            if spec.drop_last and len(chunk) < spec.batch_size:
                return
            yield chunk

    def _feed(self, skipped: list) -> Iterator[tuple[list[np.ndarray], ...]]:
        """External-source batches: per tile jpg bytes, square, points (corners + keypoints of
        every hand slot, source px); then mean and std (x 255) of the item's set and its serial.
        What does not need the graph (keys, sets, which slots hold hands) waits in `_meta`."""
        for items in self._batches(skipped):
            cols: list[list[np.ndarray]] = [[] for _ in range(3 * TILES + 3)]
            for i, photos, squares in items:
                present = np.zeros((TILES, PHOTO_HANDS), bool)
                labelled = np.zeros((TILES, PHOTO_HANDS, NUM_JOINTS), bool)
                for t in range(TILES):
                    pts = np.zeros((PHOTO_HANDS, POINTS, 2), np.float32)
                    if t < len(photos):
                        ph, n = photos[t], min(len(photos[t].boxes), PHOTO_HANDS)
                        pts[:n, :4] = box_corners(ph.boxes[:n])
                        pts[:n, 4:] = np.where(ph.labelled[:n, :, None], ph.uv[:n], 0.0)  # NaN-free
                        present[t, :n], labelled[t, :n] = True, ph.labelled[:n]
                        cols[t].append(np.frombuffer(ph.jpg, np.uint8))
                        cols[TILES + t].append(np.asarray(squares[t], np.float32))
                    else:
                        cols[t].append(PLACEHOLDER)
                        cols[TILES + t].append(np.array([OFF_CANVAS, OFF_CANVAS, 8.0], np.float32))
                    cols[2 * TILES + t].append(pts.reshape(-1, 2))
                s = self.sets[i]
                serial = next(self._serial)
                cols[3 * TILES].append(np.asarray(s.mean, np.float32) * 255.0)
                cols[3 * TILES + 1].append(np.asarray(s.std, np.float32) * 255.0)
                cols[3 * TILES + 2].append(np.array([serial], np.int64))
                self._meta[serial] = (item_key(photos), i, present, labelled)
            yield tuple(cols)

    def _device_id(self) -> int | None:
        # device_id=None on CPU: DALI's CPU_ONLY_DEVICE_ID still probes the driver and fails.
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        skipped: list[tuple[str, str, str]] = []
        pipe = build_pipeline(
            self._feed(skipped),
            batch_size=self.spec.batch_size,
            image_size=self.spec.image_size,
            augment=self.spec.augment,
            threads=self.workers,
            seed=((self.spec.seed + self.spec.rank) * 1_000_003 + self.epoch * 101) % (2**31),  # base + rank
            device_id=self._device_id(),
        )
        pipe.build()
        try:
            for out in DALIGenericIterator([pipe], ["image", "points", "serial"]):
                yield self._finish(out[0])
                self.stats.add(skipped)
                skipped.clear()
        finally:
            self._meta.clear()
        self.stats.add(skipped)

    def _finish(self, out: dict[str, Any]) -> dict[str, Any]:
        serials = out["serial"].reshape(-1).tolist()
        meta = [self._meta.pop(int(k)) for k in serials]
        points = out["points"].float().cpu().numpy().reshape(len(meta), TILES, PHOTO_HANDS, POINTS, 2)
        labels = item_labels(
            corners_box(points[..., :4, :]),
            points[..., 4:, :],
            np.stack([m[2] for m in meta]),
            np.stack([m[3] for m in meta]),
            self.spec.image_size,
        )
        return {
            "image": out["image"].to(self.device, non_blocking=True),
            **{k: torch.from_numpy(np.ascontiguousarray(labels[k])).to(self.device) for k in LABEL_KEYS},
            "key": [m[0] for m in meta],
            "set": torch.tensor([m[1] for m in meta], dtype=torch.int64, device=self.device),
        }

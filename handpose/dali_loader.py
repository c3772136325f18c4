"""The DALI kind of `make_loader` (loader.py): decode, warp and colour in a DALI graph (GPU when present).

Same batch dict, shard sets, crop modes and augmentation distributions as the WDS kind:
- one pipeline per shard set (its own crop mode and normalisation); a training batch is the
  concatenation of each set's share (`datasets.apportion`), val/test/eval run the sets in turn;
- reader: `fn.readers.webdataset` over the pack's `.tar` + `.idx`, members jpg / kp.f32 / vis.u8
  / box.f32 / sid.i64 (keys come from `sid.i64`: DALI cannot carry strings), `shard_id` = GLOBAL
  rank, `num_shards` = world size, `pad_last_batch=True`, shuffled for train;
- decode: `fn.decoders.image`, "mixed" (nvJPEG) on a GPU, with `jpeg_fancy_upsampling` so that its
  chroma upsampling is libjpeg-turbo's, like the CPU decoder's (tests/test_gpu.py compares them);
- geometry: ONE source -> destination matrix per sample built in-graph from `fn.transforms.*`,
  composed exactly like `geometry.crop_matrix` (crop region from the image shape or the box,
  flip, scale, rotate, shift); `fn.warp_affine(inverse_map=False)` moves the image and
  `fn.coord_transform` moves the keypoints with that same matrix;
- antialiasing: where the crop shrinks the image 2x or more, the decoded image is first resized
  (antialiased) by the power of two `imageio.dct_factor` picks, as the WDS kind's DCT-domain
  decode does; the two then agree to a few grey levels, not exactly (different filters);
- blur (`fn.gaussian_blur`) and one occluding rectangle (`fn.erase` as a mask) after the warp;
- colour: `fn.hsv` then `fn.brightness_contrast(contrast_center=128)` in float, clipped to
  [0, 255]: the function `augment.apply_colour` computes (checked by the tests);
- `fn.crop_mirror_normalize` to CHW float with the set's mean/std;
- `DALIGenericIterator(reader_name="Reader")` with LastBatchPolicy.PARTIAL for val/test/eval, so
  the padded duplicates of the last batch are dropped and every sample is seen exactly once.

A corrupt JPEG stops the DALI pipeline with an error (DALI cannot skip a sample); `handpose pack`
verifies every image, so packed shards do not hold one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch

from handpose.config import AugmentConfig
from handpose.datasets import LoaderStats, ShardSet, apportion, train_batches_per_rank
from handpose.errors import HandposeError
from handpose.geometry import in_frame
from handpose.shards import index_name, sample_key
from handpose.skeleton import NUM_JOINTS


def _dali() -> tuple[Any, Any, Any, Any]:
    try:
        import nvidia.dali.math as dmath
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        raise HandposeError("loader kind 'dali' needs NVIDIA DALI: pip install 'handpose[dali]'") from None
    return fn, types, dmath, pipeline_def


def sample_params(augment: AugmentConfig | None) -> dict[str, Any]:
    """Per-sample DataNodes with the distributions of `augment.sample_params` (constants if None)."""
    fn, types, _, _ = _dali()
    if augment is None:
        return {"angle": 0.0, "scale": 1.0, "tx": 0.0, "ty": 0.0, "flip": 0.0, "colour": None}

    def uniform(lo: float, hi: float) -> Any:
        return fn.random.uniform(range=[lo, hi]) if hi > lo else lo

    def coin(p: float) -> Any:
        return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)

    a = augment
    return {
        "angle": uniform(-a.rotate_deg, a.rotate_deg),
        "scale": uniform(a.scale_min, a.scale_max),
        "tx": uniform(-a.translate, a.translate),
        "ty": uniform(-a.translate, a.translate),
        "flip": coin(0.5) if a.flip else 0.0,
        "colour": (
            uniform(1 - a.brightness, 1 + a.brightness),
            uniform(1 - a.contrast, 1 + a.contrast),
            uniform(1 - a.saturation, 1 + a.saturation),
            uniform(-a.hue_deg, a.hue_deg),
        ),
        "blur": (coin(a.blur), uniform(0.3, a.blur_sigma)) if a.blur > 0 else None,
        "occlude": (
            (coin(a.occlude), uniform(0.1, a.occlude_size), uniform(0.1, a.occlude_size))
            + (uniform(0.0, 1.0), uniform(0.0, 1.0), uniform(0.0, 255.0))
            if a.occlude > 0
            else None
        ),
    }


def crop_matrix(cx: Any, cy: Any, side: Any, size: int, p: dict[str, Any]) -> Any:
    """In-graph twin of `geometry.crop_matrix`: the square (cx, cy, side) fills the input, then
    flip + zoom, rotation (clockwise on screen for positive angles), shift. Source -> destination.
    """
    fn, _, _, _ = _dali()
    sy = size / side * p["scale"]
    sx = sy * (1.0 - 2.0 * p["flip"])
    mt = fn.transforms.translation(offset=fn.stack(-1.0 * cx, -1.0 * cy))
    mt = fn.transforms.scale(mt, scale=fn.stack(sx, sy))
    mt = fn.transforms.rotation(mt, angle=p["angle"])
    return fn.transforms.translation(mt, offset=fn.stack(size * (0.5 + p["tx"]), size * (0.5 + p["ty"])))


def colour(image: Any, colour_params: tuple[Any, Any, Any, Any]) -> Any:
    """Colour jitter of RGB images -> float in [0, 255] (same function as augment.apply_colour)."""
    fn, types, dmath, _ = _dali()
    brightness, contrast, saturation, hue_deg = colour_params
    x = fn.hsv(image, hue=hue_deg, saturation=saturation, dtype=types.FLOAT)
    x = fn.brightness_contrast(x, brightness=brightness, contrast=contrast, contrast_center=128.0)
    return dmath.clamp(x, 0.0, 255.0)


def _antialias(image: Any, shape: Any, scale: Any) -> tuple[Any, Any, Any]:
    """Shrink the decoded image by `imageio.dct_factor(scale)` (antialiased); returns the image
    and the factors (x, y) from the original pixels to the shrunk image's."""
    fn, types, dmath, _ = _dali()
    f = 1.0 - 0.5 * (scale <= 0.5) - 0.25 * (scale <= 0.25) - 0.125 * (scale <= 0.125)
    h, w = shape[0], shape[1]
    out_h, out_w = dmath.ceil(h * f), dmath.ceil(w * f)
    image = fn.resize(
        image, size=fn.stack(out_h, out_w), antialias=True, interp_type=types.INTERP_LINEAR, dtype=types.FLOAT
    )
    return image, out_w / w, out_h / h


def _blur_occlude(image: Any, p: dict[str, Any], size: int) -> Any:
    """augment.blur_and_occlude in the graph (float images)."""
    fn, types, _, _ = _dali()
    if p.get("blur") is not None:
        on, sigma = p["blur"]
        blurred = fn.gaussian_blur(image, sigma=sigma, dtype=types.FLOAT)
        image = blurred * on + image * (1.0 - on)
    if p.get("occlude") is not None:
        on, w, h, x, y, grey = p["occlude"]
        anchor = fn.stack(y * (1.0 - h) * size, x * (1.0 - w) * size)
        shape = fn.stack(h * size * on, w * size * on)  # zero extent: no occluder
        keep = fn.erase(image * 0.0 + 1.0, anchor=anchor, shape=shape, axis_names="HW", fill_value=0.0)
        image = image * keep + grey * (1.0 - keep)
    return image


def build_pipeline(
    paths: list[str],
    *,
    crop: str,
    pad: float,
    batch_size: int,
    image_size: int,
    augment: AugmentConfig | None,
    train: bool,
    shard_id: int,
    num_shards: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    threads: int,
    seed: int,
    device_id: int | None,
) -> Any:
    """One set's DALI pipeline: image (3, H, W) float normalised, uv (21, 2), vis (21,), sid (1,)."""
    fn, types, dmath, pipeline_def = _dali()
    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=max(threads, 1), device_id=device_id, seed=seed)
    def pipe() -> tuple[Any, Any, Any, Any]:
        jpg, kp, vis, box, sid = fn.readers.webdataset(
            paths=paths,
            index_paths=[index_name(p) for p in paths],
            ext=["jpg", "kp.f32", "vis.u8", "box.f32", "sid.i64"],
            dtypes=[types.UINT8, types.FLOAT, types.UINT8, types.FLOAT, types.INT64],
            missing_component_behavior="error",
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            random_shuffle=train,
            initial_fill=1024,
            name="Reader",
        )
        shape = fn.peek_image_shape(jpg, dtype=types.FLOAT)  # (H, W, C) as displayed (EXIF applied)
        # jpeg_fancy_upsampling: nvJPEG (mixed) interpolates the half-resolution chroma as
        # libjpeg-turbo does (the CPU decoder here and simplejpeg in the WDS kind); by default it
        # replicates it, which differs by many grey levels at colour edges.
        image = fn.decoders.image(
            jpg, device="mixed" if gpu else "cpu", output_type=types.RGB, jpeg_fancy_upsampling=True
        )
        p = sample_params(augment)
        if crop == "box":
            cx, cy = (box[0] + box[2]) * 0.5, (box[1] + box[3]) * 0.5
            side = dmath.max(box[2] - box[0], box[3] - box[1]) * pad
        else:
            cx, cy, side = shape[1] * 0.5, shape[0] * 0.5, dmath.max(shape[0], shape[1])
        image, fx, fy = _antialias(image, shape, image_size / side * p["scale"])
        # the matrix from the shrunk image: crop_matrix after scaling by 1 / (fx, fy)
        mt = crop_matrix(cx, cy, side, image_size, p)
        mt_image = fn.transforms.scale(mt, scale=fn.stack(1.0 / fx, 1.0 / fy), reverse_order=True)
        image = fn.warp_affine(
            image,
            matrix=mt_image,  # named arguments must be CPU nodes, also for the GPU operator
            size=[image_size, image_size],
            inverse_map=False,  # source -> destination, like geometry.py
            fill_value=0.0,
            interp_type=types.INTERP_LINEAR,
            dtype=types.FLOAT,  # what colour/normalisation take; on a CPU cheaper than rounding to uint8
        )
        uv = fn.coord_transform(fn.reshape(kp, shape=[NUM_JOINTS, 2]), MT=mt)
        if augment is not None:
            image = _blur_occlude(image, p, image_size)
            image = colour(image, p["colour"])
        image = fn.crop_mirror_normalize(
            image,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in mean],
            std=[255.0 * s for s in std],
        )
        return image, uv, vis, sid

    return pipe()


class DaliLoader:
    """Iterable of batch dicts from DALI pipelines; `set_epoch`, `len()`, `stats`, `sets` like WdsLoader."""

    def __init__(
        self,
        sets: list[ShardSet],
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
    ):
        self.sets, self.split, self.train = sets, split, split == "train"
        self.batch_size, self.image_size, self.augment = batch_size, image_size, augment
        self.rank, self.world_size, self.workers, self.seed = rank, world_size, workers, seed
        self.device, self.drop_last = device, drop_last
        self.shares = apportion(batch_size, [s.weight for s in sets]) if self.train else []
        self.batches = (
            train_batches_per_rank(sets, batch_size, world_size, samples_per_epoch) if self.train else 0
        )
        self.epoch = epoch
        self.stats = LoaderStats()  # DALI cannot skip samples: stays at zero
        self._iterators: list[Any] | None = None
        self._next_epoch = epoch  # the epoch the live iterators are positioned at
        # DALI reads local files: a remote pack's shards are fetched into the cache first (every
        # block checked); without a cache that is one line saying so
        self._paths = [
            list(s.shards)
            if s.manifest.store is None
            else s.manifest.store.local_files([p.rsplit("/", 1)[-1] for p in s.shards])
            for s in sets
        ]
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise HandposeError(f"device {self.device} requested but CUDA is not available")
        if self.train and self.batches == 0:
            raise HandposeError(
                f"{sets[0].manifest.root}: split {split!r} has {sets[0].samples} samples, too few for "
                f"{world_size} rank(s) x {self.shares[0]} of each batch of {batch_size}"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch. Epochs run in order continue the pipelines; a jump (resume) reseeds them."""
        self.epoch = epoch

    def _make_iterator(self, i: int) -> Any:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        gpu = self.device.type == "cuda"
        # device_id=None on CPU: DALI's CPU_ONLY_DEVICE_ID still probes the driver and fails.
        device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device())
            if gpu
            else None
        )
        s = self.sets[i]
        pipe = build_pipeline(
            self._paths[i],
            crop=s.crop,
            pad=s.pad,
            batch_size=self.shares[i] if self.train else self.batch_size,
            image_size=self.image_size,
            augment=self.augment,
            train=self.train,
            shard_id=self.rank,
            num_shards=self.world_size,
            mean=s.mean,
            std=s.std,
            threads=self.workers,
            seed=((self.seed + self.rank) * 1_000_003 + self.epoch * 101 + i) % (2**31),  # base + rank
            device_id=device_id,
        )
        pipe.build()
        policy = LastBatchPolicy.DROP if self.drop_last or self.train else LastBatchPolicy.PARTIAL
        return DALIGenericIterator(
            [pipe],
            ["image", "uv", "vis", "sid"],
            reader_name="Reader",
            last_batch_policy=policy,
            auto_reset=True,
        )

    def _get(self) -> list[Any]:
        """The DALI iterators at the start of `self.epoch`; epochs run in order continue the
        pipelines, anything else (a resume, the same epoch again) rebuilds them seeded for it."""
        if self._iterators is None or self.epoch != self._next_epoch:
            self._iterators = [self._make_iterator(i) for i in range(len(self.sets))]
            self._next_epoch = self.epoch
        return self._iterators

    def __len__(self) -> int:
        if self.train:
            return self.batches
        return sum(len(it) for it in self._get())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        its = self._get()
        n = len(self)
        self._next_epoch = self.epoch + 1
        if self.train:  # each batch: every set's share, concatenated
            batches: Iterator[tuple[Any, ...]] = itertools.islice(
                zip(*(_forever(it) for it in its), strict=False), n
            )
            outs: Iterator[list[tuple[int, Any]]] = (list(enumerate(b)) for b in batches)
        else:
            outs = ([(i, out)] for i, it in enumerate(its) for out in it)
        done = 0
        try:
            for parts in outs:
                yield self._finish(parts)
                done += 1
        finally:
            if done < n:  # stopped early (e.g. val_batches): DALI cannot reset mid-epoch, so the
                self._iterators = None  # next pass rebuilds them instead of resuming where this one stopped

    def _finish(self, parts: list[tuple[int, Any]]) -> dict[str, Any]:
        outs = [out[0] for _, out in parts]
        uv = torch.cat([o["uv"].float() for o in outs])
        vis = torch.cat([o["vis"].reshape(-1, NUM_JOINTS) for o in outs]).cpu().numpy() > 0
        visible = torch.from_numpy(vis & in_frame(uv.cpu().numpy(), self.image_size))
        sids = torch.cat([o["sid"].reshape(-1) for o in outs]).tolist()
        ids = torch.cat(
            [
                torch.full((len(o["sid"]),), i, dtype=torch.int64)
                for (i, _), o in zip(parts, outs, strict=True)
            ]
        )
        return {
            "image": torch.cat([o["image"] for o in outs]).to(self.device, non_blocking=True),
            "uv": uv.to(self.device, non_blocking=True),
            "visible": visible.to(self.device, non_blocking=True),
            "key": [sample_key(int(s)) for s in sids],
            "set": ids.to(self.device, non_blocking=True),
        }


def _forever(it: Any) -> Iterator[Any]:
    """Batches across DALI epochs (auto_reset restarts the reader after StopIteration)."""
    while True:
        got = False
        for out in it:
            got = True
            yield out
        if not got:
            return

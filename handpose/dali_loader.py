"""The DALI kind of `make_loader`: decode, warp and colour in a DALI graph (GPU when present).

Same batch dict and same augmentation distributions as the WDS kind (`loader.py`):
- reader: `fn.readers.webdataset` over the pack's `.tar` + `.idx`, members jpg / kp.f32 / sid.i64
  only (keys come from `sid.i64`: DALI cannot carry strings), `shard_id` = GLOBAL rank,
  `num_shards` = world size, `pad_last_batch=True`, shuffled for train;
- geometry: ONE source -> destination matrix per sample built in-graph from `fn.transforms.*`,
  composed exactly like `geometry.augment_matrix` (letterbox fit, flip, scale, rotate, shift);
  `fn.warp_affine(inverse_map=False)` moves the image and `fn.coord_transform` moves the keypoints
  with that same matrix;
- colour: `fn.hsv` then `fn.brightness_contrast(contrast_center=128)` in float, clipped to
  [0, 255]: the function `augment.apply_colour` computes (checked by the tests);
- `fn.crop_mirror_normalize` to CHW float with the manifest's mean/std;
- `DALIGenericIterator(reader_name="Reader")` with LastBatchPolicy.PARTIAL for val/test/eval, so
  the padded duplicates of the last batch are dropped and every sample is seen exactly once.

A corrupt JPEG stops the DALI pipeline with an error (DALI cannot skip a sample); `handpose pack`
verifies every image, so packed shards do not hold one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from handpose.config import AugmentConfig
from handpose.errors import HandposeError
from handpose.geometry import in_frame
from handpose.loader import LoaderStats
from handpose.shards import Manifest, index_name, sample_key
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

    a = augment
    return {
        "angle": uniform(-a.rotate_deg, a.rotate_deg),
        "scale": uniform(a.scale_min, a.scale_max),
        "tx": uniform(-a.translate, a.translate),
        "ty": uniform(-a.translate, a.translate),
        "flip": fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT) if a.flip else 0.0,
        "colour": (
            uniform(1 - a.brightness, 1 + a.brightness),
            uniform(1 - a.contrast, 1 + a.contrast),
            uniform(1 - a.saturation, 1 + a.saturation),
            uniform(-a.hue_deg, a.hue_deg),
        ),
    }


def augment_matrix(src_w: Any, src_h: Any, size: int, p: dict[str, Any]) -> Any:
    """In-graph twin of `geometry.augment_matrix`: translate to the centre, flip + scale (with the
    letterbox fit), rotate (clockwise on screen for positive angles), shift. Source -> destination.
    """
    fn, _, dmath, _ = _dali()
    fit = size / dmath.max(src_w, src_h)
    sy = fit * p["scale"]
    sx = sy * (1.0 - 2.0 * p["flip"])
    mt = fn.transforms.translation(offset=fn.stack(-0.5 * src_w, -0.5 * src_h))
    mt = fn.transforms.scale(mt, scale=fn.stack(sx, sy))
    mt = fn.transforms.rotation(mt, angle=p["angle"])
    return fn.transforms.translation(mt, offset=fn.stack(size * (0.5 + p["tx"]), size * (0.5 + p["ty"])))


def colour(image: Any, colour_params: tuple[Any, Any, Any, Any]) -> Any:
    """Colour jitter of uint8 RGB images -> float in [0, 255] (same function as augment.apply_colour)."""
    fn, types, dmath, _ = _dali()
    brightness, contrast, saturation, hue_deg = colour_params
    x = fn.hsv(image, hue=hue_deg, saturation=saturation, dtype=types.FLOAT)
    x = fn.brightness_contrast(x, brightness=brightness, contrast=contrast, contrast_center=128.0)
    return dmath.clamp(x, 0.0, 255.0)


def build_pipeline(
    paths: list[str],
    *,
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
    """The DALI pipeline: outputs image (3, H, W) float normalised, uv (21, 2), sid (1,)."""
    fn, types, _, pipeline_def = _dali()
    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=max(threads, 1), device_id=device_id, seed=seed)
    def pipe() -> tuple[Any, Any, Any]:
        jpg, kp, sid = fn.readers.webdataset(
            paths=paths,
            index_paths=[index_name(p) for p in paths],
            ext=["jpg", "kp.f32", "sid.i64"],
            dtypes=[types.UINT8, types.FLOAT, types.INT64],
            missing_component_behavior="error",
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            random_shuffle=train,
            initial_fill=1024,
            name="Reader",
        )
        shape = fn.peek_image_shape(jpg, dtype=types.FLOAT)  # (H, W, C) from the header
        image = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
        p = sample_params(augment)
        mt = augment_matrix(shape[1], shape[0], image_size, p)
        image = fn.warp_affine(
            image,
            matrix=mt,  # named arguments must be CPU nodes, also for the GPU operator
            size=[image_size, image_size],
            inverse_map=False,  # mt is source -> destination, like geometry.py
            fill_value=0.0,
            interp_type=types.INTERP_LINEAR,
            dtype=types.FLOAT,  # what colour/normalisation take; on a CPU cheaper than rounding to uint8
        )
        uv = fn.coord_transform(fn.reshape(kp, shape=[NUM_JOINTS, 2]), MT=mt)
        if p["colour"] is not None:
            image = colour(image, p["colour"])
        image = fn.crop_mirror_normalize(
            image,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in mean],
            std=[255.0 * s for s in std],
        )
        return image, uv, sid

    return pipe()


class DaliLoader:
    """Iterable of batch dicts from a DALI pipeline; `set_epoch`, `len()` and `stats` like WdsLoader."""

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
    ):
        self.manifest, self.split, self.train = manifest, split, split == "train"
        self.paths = [str(p) for p in shards]
        self.batch_size, self.image_size, self.augment = batch_size, image_size, augment
        self.rank, self.world_size, self.workers, self.seed = rank, world_size, workers, seed
        self.device, self.drop_last = device, drop_last
        self.samples_per_epoch = samples_per_epoch if self.train else None
        self.epoch = epoch
        self.stats = LoaderStats()  # DALI cannot skip samples: stays at zero
        self._iterator: Any = None
        self._next_epoch = epoch  # the epoch the live iterator is positioned at
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise HandposeError(f"device {self.device} requested but CUDA is not available")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch. Epochs run in order continue the pipeline; a jump (resume) reseeds it."""
        self.epoch = epoch

    def _make_iterator(self) -> Any:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        gpu = self.device.type == "cuda"
        # device_id=None on CPU: DALI's CPU_ONLY_DEVICE_ID still probes the driver and fails.
        device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device())
            if gpu
            else None
        )
        pipe = build_pipeline(
            self.paths,
            batch_size=self.batch_size,
            image_size=self.image_size,
            augment=self.augment,
            train=self.train,
            shard_id=self.rank,
            num_shards=self.world_size,
            mean=self.manifest.mean,
            std=self.manifest.std,
            threads=self.workers,
            seed=((self.seed + self.rank) * 1_000_003 + self.epoch) % (2**31),  # base + rank
            device_id=device_id,
        )
        pipe.build()
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        return DALIGenericIterator(
            [pipe], ["image", "uv", "sid"], reader_name="Reader", last_batch_policy=policy, auto_reset=True
        )

    def _get(self) -> Any:
        """The DALI iterator at the start of `self.epoch`; epochs run in order continue one pipeline,
        anything else (a resume, the same epoch again) rebuilds it seeded for that epoch."""
        if self._iterator is None or self.epoch != self._next_epoch:
            self._iterator = self._make_iterator()
            self._next_epoch = self.epoch
        return self._iterator

    def __len__(self) -> int:
        if self.samples_per_epoch:
            return _n_batches(self.samples_per_epoch // self.world_size, self.batch_size, self.drop_last)
        return len(self._get())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = self._get()
        n = len(self)
        self._next_epoch = self.epoch + 1
        batches = itertools.islice(_forever(it), n) if self.samples_per_epoch else iter(it)
        done = 0
        try:
            for out in batches:
                yield self._finish(out[0])
                done += 1
        finally:
            if done < n:  # stopped early (e.g. val_batches): DALI cannot reset mid-epoch, so the
                self._iterator = None  # next pass rebuilds it instead of resuming where this one stopped

    def _finish(self, out: dict[str, torch.Tensor]) -> dict[str, Any]:
        uv = out["uv"].float()
        visible = torch.from_numpy(in_frame(uv.cpu().numpy(), self.image_size))
        return {
            "image": out["image"].to(self.device, non_blocking=True),
            "uv": uv.to(self.device, non_blocking=True),
            "visible": visible.to(self.device, non_blocking=True),
            "key": [sample_key(int(s)) for s in out["sid"].reshape(-1).tolist()],
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


def _n_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)

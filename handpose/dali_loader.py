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
  flip, scale and aspect, rotate, shift); `fn.warp_affine(inverse_map=False)` moves the image and
  `fn.coord_transform` moves the keypoints with that same matrix. With `perspective_deg` the
  matrix is `geometry.tilt_matrix`'s 3x3 homography composed element by element: then
  `fn.experimental.warp_perspective(pixel_origin="corner")` moves the image and the keypoints
  go through `fn.coord_transform` in homogeneous coordinates and the projective division;
- antialiasing: where the crop shrinks the image 2x or more, the decoded image is first resized
  (antialiased) by the power of two `imageio.dct_factor` picks, as the WDS kind's DCT-domain
  decode does (for a homography from its largest local scale, `geometry.matrix_scale`); the two
  then agree to a few grey levels, not exactly (different filters);
- blur (`fn.gaussian_blur`) and one occluding rectangle (`fn.erase` as a mask) after the warp,
  filled with a grey or (`occlude_patch`) with the same image shifted by whole pixels;
- colour: per-channel gains, `fn.hsv` (grayscale = saturation 0), then
  `fn.brightness_contrast(contrast_center=128)` in float, clipped to [0, 255]: the function
  `augment.apply_colour` computes (checked by the tests);
- no `negatives` (crops without a hand): they need every hand box of a photo, and the reader
  hands the graph one shuffled sample at a time (`loader.make_loader` refuses them in one line);
- `fn.crop_mirror_normalize` to CHW float with the set's mean/std;
- `DALIGenericIterator(reader_name="Reader")` with LastBatchPolicy.PARTIAL for val/test/eval, so
  the padded duplicates of the last batch are dropped and every sample is seen exactly once.

A corrupt JPEG stops the DALI pipeline with an error (DALI cannot skip a sample); `handpose pack`
verifies every image, so packed shards do not hold one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch

from handpose.config import AugmentConfig
from handpose.datasets import LoaderOptions, LoaderStats, ShardSet, apportion, train_batches_per_rank
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
    p = {
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
    # The later augmentations add operators only when on: the graph (and the seeds DALI gives its
    # operators in order) of a recipe without them stays what it was.
    if a.aspect > 0:
        dmath = _dali()[2]
        p["aspect"] = dmath.exp(uniform(-math.log1p(a.aspect), math.log1p(a.aspect)))
    if a.perspective_deg > 0:
        p["tilt"] = (uniform(-a.perspective_deg, a.perspective_deg), uniform(0.0, 180.0))
    if a.channel_gain > 0:
        p["gains"] = tuple(uniform(1 - a.channel_gain, 1 + a.channel_gain) for _ in range(3))
    if a.grayscale > 0:
        b, c, sat, hue = p["colour"]
        p["colour"] = (b, c, sat * (1.0 - coin(a.grayscale)), hue)
    if a.occlude > 0 and a.occlude_patch > 0:
        p["patch"] = (coin(a.occlude_patch), uniform(0.0, 1.0), uniform(0.0, 1.0))
    return p


def crop_matrix(cx: Any, cy: Any, side: Any, size: int, p: dict[str, Any]) -> Any:
    """In-graph twin of `geometry.crop_matrix`: the square (cx, cy, side) fills the input, then
    flip + zoom (+ aspect), rotation (clockwise on screen for positive angles), (+ tilt), shift.
    Source -> destination: a (2, 3) node, or with p["tilt"] a (3, 3) homography node.
    """
    fn, _, dmath, _ = _dali()
    sy = size / side * p["scale"]
    sx = sy * (1.0 - 2.0 * p["flip"])
    if p.get("aspect") is not None:
        r = dmath.sqrt(p["aspect"])
        sx, sy = sx * r, sy / r
    mt = fn.transforms.translation(offset=fn.stack(-1.0 * cx, -1.0 * cy))
    mt = fn.transforms.scale(mt, scale=fn.stack(sx, sy))
    mt = fn.transforms.rotation(mt, angle=p["angle"])
    tx, ty = size * (0.5 + p["tx"]), size * (0.5 + p["ty"])
    if p.get("tilt") is None:
        return fn.transforms.translation(mt, offset=fn.stack(tx, ty))
    # move @ tilt @ [[mt], [0, 0, 1]], element by element (DALI has no per-sample 3x3 product)
    t = _tilt(p["tilt"][0], p["tilt"][1], float(size))
    a = [[mt[i, j] for j in range(3)] for i in range(2)]
    h = [
        [t[i][0] * a[0][j] + t[i][1] * a[1][j] + (t[i][2] if j == 2 else 0.0) for j in range(3)]
        for i in range(3)
    ]
    h[0] = [h[0][j] + tx * h[2][j] for j in range(3)]
    h[1] = [h[1][j] + ty * h[2][j] for j in range(3)]
    return _matrix3(h)


def _tilt(tilt_deg: Any, axis_deg: Any, focal: float) -> list[list[Any]]:
    """`geometry.tilt_matrix` in closed form: Rodrigues' rotation about (cos a, sin a, 0)."""
    _, _, dmath, _ = _dali()
    t, a = tilt_deg * (math.pi / 180.0), axis_deg * (math.pi / 180.0)
    c, s, ct, st = dmath.cos(a), dmath.sin(a), dmath.cos(t), dmath.sin(t)
    v = 1.0 - ct
    return [
        [1.0 - v * s * s, v * c * s, 0.0],
        [v * c * s, 1.0 - v * c * c, 0.0],
        [-1.0 * st * s / focal, st * c / focal, 1.0],
    ]


def _matrix3(rows: list[list[Any]]) -> Any:
    """A (3, 3) float node from nine scalar nodes."""
    fn, types, _, _ = _dali()
    return fn.reshape(fn.cast(fn.stack(*(v for row in rows for v in row)), dtype=types.FLOAT), shape=[3, 3])


def homography_scale(h: Any, size: int) -> Any:
    """In-graph twin of `geometry.matrix_scale(H, size)`: the largest local scale of H over the
    size x size destination, |w|^1.5 / |det H| with w = adj(H)[2] . (y, 1) at the corners y."""
    _, _, dmath, _ = _dali()
    e = [[h[i, j] for j in range(3)] for i in range(3)]
    g0 = e[1][0] * e[2][1] - e[1][1] * e[2][0]
    g1 = e[0][1] * e[2][0] - e[0][0] * e[2][1]
    g2 = e[0][0] * e[1][1] - e[0][1] * e[1][0]
    det = e[0][2] * g0 + e[1][2] * g1 + e[2][2] * g2  # expansion along the last column
    w = [dmath.abs(g2 + g0 * x + g1 * y) for x, y in ((0, 0), (size, 0), (0, size), (size, size))]
    most = dmath.max(dmath.max(w[0], w[1]), dmath.max(w[2], w[3]))
    return dmath.pow(most, 1.5) / dmath.abs(det)


def colour(
    image: Any, colour_params: tuple[Any, Any, Any, Any], gains: tuple[Any, Any, Any] | None = None
) -> Any:
    """Colour jitter of RGB images -> float in [0, 255] (same function as augment.apply_colour)."""
    fn, types, dmath, _ = _dali()
    brightness, contrast, saturation, hue_deg = colour_params
    if gains is not None:
        g = fn.stack(*gains)  # (3,): one gain per channel, broadcast over (H, W, 3)
        # per-sample scalars may mix with a GPU image; a (3,) tensor goes to the GPU first
        image = image * (g.gpu() if image.device == "gpu" else g)
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
        fill = grey
        if p.get("patch") is not None:
            fill = _patch_fill(image, p, size)
        image = image * keep + fill * (1.0 - keep)
    return image


def _patch_fill(image: Any, p: dict[str, Any], size: int) -> Any:
    """The occluder's fill as an image: the grey, or (patch coin) the image shifted by whole
    pixels so that the rectangle at the patch's place lands on the occluder's (as
    `augment.blur_and_occlude` copies it)."""
    fn, types, dmath, _ = _dali()
    _, w, h, x, y, grey = p["occlude"]
    on, px, py = p["patch"]
    dx = dmath.floor(x * (1.0 - w) * size) - dmath.floor(px * (1.0 - w) * size)
    dy = dmath.floor(y * (1.0 - h) * size) - dmath.floor(py * (1.0 - h) * size)
    shifted = fn.warp_affine(
        image,
        matrix=fn.transforms.translation(offset=fn.stack(dx, dy)),
        size=[size, size],
        inverse_map=False,
        fill_value=0.0,
        interp_type=types.INTERP_LINEAR,
        dtype=types.FLOAT,
    )
    return shifted * on + grey * (1.0 - on)


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
        if p.get("tilt") is not None:
            image, uv = _warp_homography(image, shape, kp, cx, cy, side, image_size, p)
        else:
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
            image = colour(image, p["colour"], p.get("gains"))
        image = fn.crop_mirror_normalize(
            image,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in mean],
            std=[255.0 * s for s in std],
        )
        return image, uv, vis, sid

    return pipe()


def _warp_homography(
    image: Any, shape: Any, kp: Any, cx: Any, cy: Any, side: Any, size: int, p: dict[str, Any]
) -> tuple[Any, Any]:
    """The warp of a crop turned in depth: (float image, uv (21, 2)) by the 3x3 homography."""
    fn, types, _, _ = _dali()
    h = crop_matrix(cx, cy, side, size, p)
    image, fx, fy = _antialias(image, shape, homography_scale(h, size))
    # from the shrunk image: H @ diag(1 / fx, 1 / fy, 1), i.e. its first two columns scaled
    e = [[h[i, 0] / fx, h[i, 1] / fy, h[i, 2]] for i in range(3)]
    image = fn.experimental.warp_perspective(
        image,
        matrix=_matrix3(e),
        size=[size, size],
        inverse_map=False,  # source -> destination, like geometry.py
        pixel_origin="corner",  # geometry.py's pixel convention
        fill_value=0.0,
        interp_type=types.INTERP_LINEAR,
    )
    pts = fn.reshape(kp, shape=[NUM_JOINTS, 2])
    moved = fn.coord_transform(fn.cat(pts, pts[:, 0:1] * 0.0 + 1.0, axis=1), M=h)  # homogeneous
    return image, moved[:, 0:2] / moved[:, 2:3]


class DaliLoader:
    """Iterable of batch dicts from DALI pipelines; `set_epoch`, `len()`, `stats`, `sets` like WdsLoader."""

    def __init__(self, sets: list[ShardSet], split: str, options: LoaderOptions):
        o = options
        self.sets, self.split, self.train = sets, split, split == "train"
        self.batch_size, self.image_size, self.augment = o.batch_size, o.image_size, o.augment
        self.rank, self.world_size, self.workers, self.seed = o.rank, o.world_size, o.workers, o.seed
        self.device, self.drop_last = o.device, o.drop_last
        self.shares = apportion(o.batch_size, [s.weight for s in sets]) if self.train else []
        self.batches = (
            train_batches_per_rank(sets, o.batch_size, o.world_size, o.samples_per_epoch) if self.train else 0
        )
        self.epoch = o.epoch
        self.stats = LoaderStats()  # DALI cannot skip samples: stays at zero
        self._iterators: list[Any] | None = None
        self._next_epoch = o.epoch  # the epoch the live iterators are positioned at
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
            "present": torch.ones(len(sids), dtype=torch.bool, device=self.device),  # no negatives here
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

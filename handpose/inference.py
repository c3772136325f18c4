"""The per-image inference path: a loaded model and one image -> keypoints in original pixels.

  an image (its encoded bytes, or decoded RGB pixels as displayed) and its hand boxes (None: the
  whole image)
  -> per box the source square (`geometry.source_region`, the loaders' crop) and its matrix
     (`geometry.crop_matrix`) -> the model input (`preprocess`: `imageio.warp_to_input` for
     handpose checkpoints, what the loaders feed the model; the tutorial's own Pillow resize for
     its weights)
  -> batched forward and the model's own `decode` (`forward`)
  -> back to original pixels through the inverse matrix (`to_source`)
  -> `refine` more passes for the whole-image crops, each in the box of the keypoints the last
     pass found, grown to the training data's box size (`refine_box`) and padded as in training.

`Runner` runs the crops of any number of images in batches; `handpose predict` (the job: inputs,
chunks, ranks, resume, outputs) feeds it chunk by chunk. `Predictor` is the same path for one
image in memory, so its keypoints are predict's for that image and model:

    net, spec = models.load_model("best.pt", torch.device("cpu"))
    hands = Predictor(net, spec)(Path("photo.jpg").read_bytes())   # [Crop(uv=..., score=...)]

A model comes with its `model.ModelSpec` (input size, normalisation, preprocessing, the crop it
was trained on, box_pad, box_to_keypoints), from `models.load_model`: a PyTorch module or an
exported graph on onnxruntime (`onnx_model.OnnxModel`), which `forward` runs alike. The Python
API (`handpose.load`, api.py) is a Runner over many images at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from handpose.geometry import (
    Region,
    apply_affine,
    box_region,
    crop_matrix,
    invert,
    keypoints_box,
    source_region,
)
from handpose.imageio import decode_image, image_size, warp_image_to_input, warp_to_input
from handpose.model import ModelSpec
from handpose.onnx_model import OnnxModel
from handpose.skeleton import NUM_JOINTS

ImageData = bytes | np.ndarray  # encoded image bytes, or RGB uint8 (H, W, 3) as displayed
Net = torch.nn.Module | OnnxModel  # a loaded model (`models.load_model`): PyTorch or onnxruntime
DEFAULT_REFINE = 1  # refinement passes for box-crop models: 1 beat 0 and 2 on real photos (BENCHMARKS.md)
MIN_SIDE_PX = 8  # smaller images cannot show a hand
# Data errors while reading or decoding one image: that image fails, the others go on.
DATA_ERRORS = (OSError, ValueError, EOFError, SyntaxError)


def default_refine(spec: ModelSpec) -> int:
    """Refinement passes when none are asked for: DEFAULT_REFINE for models trained on box crops
    (a whole image is not what they saw), 0 for whole-image models."""
    return DEFAULT_REFINE if spec.crop == "box" else 0


def default_batch_size(device: torch.device) -> int:
    """64 on a GPU; 4 on a CPU, where the activations of bigger batches (1 MB per image for each
    16-channel 128 px map) spill out of the L2 cache: per image, batch 4 ran ~1.2x faster than
    batch 8 and ~2x faster than batch 64 (bench predict, 2-core EPYC)."""
    return 64 if device.type == "cuda" else 4


def image_size_of(image: ImageData) -> tuple[int, int]:
    """(width, height) of an image as displayed (from the header of encoded bytes); ValueError
    when it cannot be read or is too small to show a hand (a side under MIN_SIDE_PX)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected RGB uint8 pixels (H, W, 3), got {image.dtype} {image.shape}")
        width, height = image.shape[1], image.shape[0]
    else:
        width, height = image_size(image)
    if min(width, height) < MIN_SIDE_PX:
        raise ValueError(f"image is {width}x{height} px, too small (both sides must be >= {MIN_SIDE_PX} px)")
    return width, height


# ---------------------------------------------------------------------------------------------
# The model input of one crop


def preprocess(image: ImageData, M: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """An image + its source -> input matrix M -> uint8 (size, size, 3).

    Handpose checkpoints: `imageio.warp_to_input`, the WDS loader's own function (augmentation
    off: M is `crop_matrix(region, size)` there too), with its JPEG DCT fast path for bytes.
    The tutorial's weights: a full decode and Pillow's antialiased resize, the tutorial's
    preprocessing, never a DCT-scaled decode (which moves its keypoints by pixels).
    """
    if spec.preprocess == "tutorial":
        pixels = image if isinstance(image, np.ndarray) else decode_image(image)[0]
        return letterbox(pixels, M, spec.size)
    if isinstance(image, np.ndarray):
        return warp_image_to_input(image, M, spec.size)
    return warp_to_input(image, M, spec.size)


def letterbox(image: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """Scale-and-translate `image` by M (no rotation) into a black size x size canvas with Pillow's
    antialiased bilinear resize: exactly M under the pixel-centre convention, also when the bars
    are fractional pixels (the source box is M's inverse of whole destination pixels; where that
    box reaches past the image, zero padding stands for the black bar)."""
    h, w = image.shape[:2]
    s, tx, ty = float(M[0, 0]), float(M[0, 2]), float(M[1, 2])
    x0, x1 = _covered(tx, w * s, size)
    y0, y1 = _covered(ty, h * s, size)
    canvas = np.zeros((size, size, 3), np.uint8)
    if x1 <= x0 or y1 <= y0:  # a crop entirely off the image
        return canvas
    box = [(x0 - tx) / s, (y0 - ty) / s, (x1 - tx) / s, (y1 - ty) / s]
    box = [_snap(v, lim) for v, lim in zip(box, (w, h, w, h), strict=True)]
    # Pad an axis only when its box leaves the image; 1/s + 2 px covers the filter's support.
    pad = math.ceil(max(1.0, 1.0 / s)) + 2
    px = math.ceil(max(0.0, -box[0], box[2] - w)) + pad if box[0] < 0 or box[2] > w else 0
    py = math.ceil(max(0.0, -box[1], box[3] - h)) + pad if box[1] < 0 or box[3] > h else 0
    if px or py:
        image = np.pad(image, ((py, py), (px, px), (0, 0)))
        box = [box[0] + px, box[1] + py, box[2] + px, box[3] + py]
    region = Image.fromarray(image).resize(
        (x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=(box[0], box[1], box[2], box[3])
    )
    canvas[y0:y1, x0:x1] = np.asarray(region)
    return canvas


def _covered(start: float, length: float, size: int) -> tuple[int, int]:
    """Whole destination pixels that [start, start + length) touches, clipped to the canvas."""
    eps = 1e-6
    return max(0, math.floor(start + eps)), min(size, math.ceil(start + length - eps))


def _snap(v: float, limit: int) -> float:
    """Round-off (1e-9 px) must not make an in-image box look like it leaves the image."""
    return 0.0 if abs(v) < 1e-6 else float(limit) if abs(v - limit) < 1e-6 else v


# ---------------------------------------------------------------------------------------------
# Crops, the forward pass, the way back


@dataclass
class Crop:
    """One model input of an image (one hand box, or the whole image) and what the model answered."""

    box: np.ndarray | None  # (4,) x0, y0, x1, y1 original px: the box given (None: the whole image)
    region: Region  # the source square the model input of the last pass showed
    input: np.ndarray | None = None  # uint8 (size, size, 3) until the model has seen it
    uv: np.ndarray | None = None  # (21, 2) original px
    score: np.ndarray | None = None  # (21,) in [0, 1], the model's decoder's
    refined: np.ndarray | None = None  # a whole-image crop's box of its last refinement pass

    @property
    def final_box(self) -> np.ndarray | None:
        """The box the keypoints were found in: the refined box, else the given one."""
        return self.refined if self.refined is not None else self.box


def crops_of(
    image: ImageData, width: int, height: int, boxes: Sequence[np.ndarray | None], spec: ModelSpec
) -> list[Crop]:
    """The first pass's crops of one image: one per box (None: the whole image, letterboxed)."""
    crops = []
    for box in boxes:
        region = source_region(width, height, box, spec.pad)
        crops.append(Crop(box, region, preprocess(image, crop_matrix(region, spec.size), spec)))
    return crops


def forward(
    net: Net, images: torch.Tensor, spec: ModelSpec, *, channels_last: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (B, size, size, 3) -> keypoints (B, 21, 2) in model-input pixels and scores (B, 21),
    through the model's own `decode` (an exported graph holds normalisation and decoder)."""
    if isinstance(net, OnnxModel):
        return net(images)
    device = next(net.parameters()).device
    # NHWC uint8 permuted to NCHW *is* channels_last memory: no copy until the float conversion.
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    x = x if channels_last else x.contiguous()
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = net(x)
    uv, score = net.decode(out)  # type: ignore[operator]
    return uv.float().cpu().numpy().astype(np.float64), score.float().cpu().numpy()


def model_device(net: Net) -> torch.device:
    """Where a loaded model runs (an ONNX model: CUDA when its first provider is CUDA's)."""
    if isinstance(net, OnnxModel):
        return torch.device("cuda" if net.providers[0] == "CUDAExecutionProvider" else "cpu")
    return next(net.parameters()).device


def to_source(uv: np.ndarray, region: Region, size: int) -> np.ndarray:
    """Model-input keypoints -> original pixels through the inverse of the crop's matrix."""
    return apply_affine(invert(crop_matrix(region, size)), uv)


def refine_box(uv: np.ndarray, ratio: float) -> np.ndarray:
    """The hand box a refinement pass crops: the predicted keypoints' extent grown about its
    centre by `ratio` (the training data's labelled box side / keypoint extent side), so it
    matches the boxes the model was trained on; at least MIN_SIDE_PX on its longer side."""
    x0, y0, x1, y1 = keypoints_box(uv)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = np.array([x1 - x0, y1 - y0]) * ratio / 2
    half = np.maximum(half, MIN_SIDE_PX / 2) if max(half) * 2 < MIN_SIDE_PX else half
    return np.array([cx - half[0], cy - half[1], cx + half[0], cy + half[1]])


Reader = Callable[[], ImageData]  # an image's pixels, read again for each refinement pass


class Runner:
    """A loaded model with how it is run: crops in batches of `batch_size`, then `refine` passes
    for the whole-image crops; `pool` (threads) reads and crops the refinement passes' images."""

    def __init__(
        self,
        net: Net,
        spec: ModelSpec,
        *,
        batch_size: int,
        refine: int = 0,
        channels_last: bool = True,
        pool: ThreadPoolExecutor | None = None,
    ):
        self.net, self.spec, self.batch_size, self.refine = net, spec, batch_size, refine
        self.channels_last, self.pool = channels_last, pool

    def run(self, images: Sequence[tuple[Reader, list[Crop]]]) -> None:
        """Fill in every crop's uv and score: one pass over every crop's input (then freed), then
        `refine` passes for the whole-image crops, each in the box the last pass found. An image
        that cannot be read again (gone since the first pass) keeps its last pass."""
        flat = [(read, crop) for read, crops in images for crop in crops]
        uv, score = self._model([crop.input for _, crop in flat])  # type: ignore[misc]
        for (_, crop), u, s in zip(flat, uv, score, strict=True):
            crop.uv, crop.score, crop.input = to_source(u, crop.region, self.spec.size), s, None
        todo = [(read, crop) for read, crop in flat if crop.box is None]
        for _ in range(self.refine if todo else 0):
            boxes = [refine_box(crop.uv, self.spec.box_to_keypoints) for _, crop in todo]  # type: ignore[arg-type]
            jobs = [(read, box_region(b, self.spec.pad)) for (read, _), b in zip(todo, boxes, strict=True)]
            inputs = list(self.pool.map(self._again, jobs)) if self.pool else [self._again(j) for j in jobs]
            kept = [n for n, x in enumerate(inputs) if x is not None]
            uv, score = self._model([inputs[n] for n in kept])  # type: ignore[misc]
            for n, u, s in zip(kept, uv, score, strict=True):
                crop, region = todo[n][1], jobs[n][1]
                crop.uv, crop.score = to_source(u, region, self.spec.size), s
                crop.refined, crop.region = boxes[n], region

    def _again(self, job: tuple[Reader, Region]) -> np.ndarray | None:
        """A refinement crop: the image is read again (a chunk does not hold every image's bytes)."""
        read, region = job
        try:
            return preprocess(read(), crop_matrix(region, self.spec.size), self.spec)
        except DATA_ERRORS:
            return None

    def _model(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Model-input keypoints (N, 21, 2) and scores (N, 21) of N inputs, in batches.

        Every forward pass sees `batch_size` crops (a short last batch is filled with copies of
        its last crop, whose answers are dropped): PyTorch's CPU kernels round differently for other
        batch sizes (3e-5 input px between batches of 1 and 4), so a crop's numbers would depend
        on how many crops came with it: predict's chunks, the API's calls and a video's frames
        give each image the same numbers."""
        uv, score = [], []
        for k in range(0, len(inputs), self.batch_size):
            crops = inputs[k : k + self.batch_size]
            fill = [crops[-1]] * (self.batch_size - len(crops))
            batch = torch.from_numpy(np.stack(crops + fill))
            u, s = forward(self.net, batch, self.spec, channels_last=self.channels_last)
            uv.append(u[: len(crops)])
            score.append(s[: len(crops)])
        if not uv:
            return np.empty((0, NUM_JOINTS, 2)), np.empty((0, NUM_JOINTS))
        return np.concatenate(uv), np.concatenate(score)


class Predictor:
    """The inference path for one image in memory: `Predictor(net, spec)(image, boxes)` returns one
    Crop per box (default: the whole image) with its keypoints in original pixels, as `handpose
    predict` gives them for that image (the same Runner, crops and refinement)."""

    def __init__(
        self,
        net: Net,
        spec: ModelSpec,
        *,
        refine: int | None = None,
        batch_size: int | None = None,
        channels_last: bool = True,
    ):
        device = model_device(net)
        self.runner = Runner(
            net,
            spec,
            batch_size=batch_size or default_batch_size(device),
            refine=default_refine(spec) if refine is None else refine,
            channels_last=channels_last,
        )

    def __call__(self, image: ImageData, boxes: Sequence[np.ndarray | None] | None = None) -> list[Crop]:
        """Keypoints of the hands in `boxes` (x0, y0, x1, y1 original px; None or no boxes: the
        whole image, refined). ValueError for an image that cannot be read."""
        width, height = image_size_of(image)
        crops = crops_of(image, width, height, list(boxes) if boxes else [None], self.runner.spec)
        with torch.inference_mode():
            self.runner.run([(lambda: image, crops)])
        return crops

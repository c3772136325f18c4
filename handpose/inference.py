"""The per-image inference path: loaded models and one image -> hands, keypoints in original pixels.

  an image (its encoded bytes, or decoded RGB pixels as displayed) and its hand boxes (None: the
  detector's hands when there is a detector, else the whole image)
  -> with a detector (`Finder`): the photo letterboxed into its input (`detector.photo_input`),
     batched `detector.detect` (boxes scoring >= the detector's own min_score, or min_score if
     lower: `Finder.min_box_score`; at most max_hands, best first), the boxes back in the photo's
     pixels (`detector.photo_boxes`)
  -> per box the source square (`geometry.source_region`, the loaders' crop) and its matrix
     (`geometry.crop_matrix`) -> the model input (`preprocess`: `imageio.warp_to_input` for
     handpose checkpoints, what the loaders feed the model; the tutorial's own Pillow resize for
     its weights); an image's bytes are decoded once per JPEG DCT scale for all its crops and
     passes in a run (`Runner.cache`, an `imageio.DecodeCache`), which changes no pixel
  -> batched forward and the model's own `decode` (`forward_hands`; with `flip_test` each crop
     and its mirror, averaged: `model.flip_test`), and its hand-presence probability when it has
     a presence head
  -> back to original pixels through the inverse matrix (`to_source`)
  -> `refine` more passes for the crops the path found itself (the whole image, the detector's
     boxes), each in the crop of the keypoints the last pass found (`refine_region`): the box
     of the keypoints grown to the training data's box size (`refine_box`) and padded as in
     training, or (refine_mode "upright") that crop turned so that wrist -> middle MCP points up
     (`geometry.upright_region`, MediaPipe's second-pass crop)
  -> hands whose presence probability is under `min_presence` are dropped (`shows_hand`); with a
     detector, hands whose hand score (`Crop.rank_score`: sqrt(box score x keypoint score)) is
     under min_score too, the rest ranked by it.

`Runner` runs the photos of any number of images in batches; `handpose predict` (the job: inputs,
chunks, ranks, resume, outputs) feeds it chunk by chunk. `Predictor` is the same path for one
image in memory, so its hands are predict's for that image and those models:

    net, spec = models.load_model("best.pt", torch.device("cpu"))
    hands = Predictor(net, spec)(Path("photo.jpg").read_bytes())   # [Crop(uv=..., score=...)]
    det = detector.load_detector("detector.pt")
    hands = Predictor(net, spec, detector=det)(pixels)              # every hand the detector finds

A model comes with its `model.ModelSpec` (input size, normalisation, preprocessing, the crop it
was trained on, box_pad, box_to_keypoints), from `models.load_model`: a PyTorch module or an
exported graph on onnxruntime (`onnx_model.OnnxModel`), which `forward` runs alike; a detector
with its `detector.DetectorSpec`, from `detector.load_detector`. The Python API
(`handpose.load`, api.py) is a Runner over many images at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from handpose.detector import DetectorSpec, detect, photo_boxes, photo_input
from handpose.errors import HandposeError
from handpose.geometry import (
    Region,
    apply_affine,
    box_region,
    crop_matrix,
    invert,
    keypoints_box,
    source_region,
    steady_region,
    upright_region,
)
from handpose.imageio import DecodeCache, decode_image, image_size, warp_image_to_input, warp_to_input
from handpose.model import ModelSpec, flip_test, normalized_input
from handpose.onnx_model import OnnxModel
from handpose.skeleton import NUM_JOINTS

ImageData = bytes | np.ndarray  # encoded image bytes, or RGB uint8 (H, W, 3) as displayed
Net = torch.nn.Module | OnnxModel  # a loaded model (`models.load_model`): PyTorch or onnxruntime
DEFAULT_REFINE = 1  # refinement passes for box-crop models: 1 beat 0 and 2 on real photos (BENCHMARKS.md)
# With a detector: one pass in the box of the keypoints the detector's crop gave beat none on
# every pose figure of the val photos (BENCHMARKS.md; a detector mid-training, so provisional).
DEFAULT_DETECTOR_REFINE = 1
DEFAULT_MAX_HANDS = 4  # hands per photo with a detector
# With a detector a hand is kept when its hand score, sqrt(detector box score x keypoint score),
# is at least this. Both models must agree: on four photo sets (two sources never trained on)
# the product ranked hands better than the box score alone (mean F1 at OKS 0.5: 0.818 against
# 0.760) and 0.45 had the best mean F1 while leaving a hand on 2-3% of hand-free images
# (the box score alone at 0.3: 74% / 40%); BENCHMARKS.md "One hand score from both models".
DEFAULT_MIN_HAND_SCORE = 0.45
# Hands whose presence probability is below this are dropped where the path finds the hands
# itself (whole image, detector); with given boxes nothing is dropped unless asked. Provisional:
# the middle of the logit's range, until measured on photos with and without hands.
DEFAULT_MIN_PRESENCE = 0.5
REFINE_MODES = ("box", "upright")
MIN_SIDE_PX = 8  # smaller images cannot show a hand
# Data errors while reading or decoding one image: that image fails, the others go on.
DATA_ERRORS = (OSError, ValueError, EOFError, SyntaxError)


def default_refine(spec: ModelSpec, *, detector: bool = False, refine_mode: str = "box") -> int:
    """Refinement passes when none are asked for: with a detector DEFAULT_DETECTOR_REFINE;
    otherwise DEFAULT_REFINE for models trained on box crops (a whole image is not what they
    saw), 0 for whole-image models; at least 1 in refine_mode "upright" (a mode of that pass)."""
    if detector:
        n = DEFAULT_DETECTOR_REFINE
    else:
        n = DEFAULT_REFINE if spec.crop == "box" else 0
    return max(n, 1) if refine_mode == "upright" else n


def default_batch_size(device: torch.device) -> int:
    """64 on a GPU; 4 on a CPU. Every forward pass is padded to a full batch (`Runner._model`), so
    the batch is also the least work of one image: 4 keeps the API's and a video's single images
    cheap. A large folder runs faster at 16 on the current models (docs/predict.md)."""
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


def preprocess(
    image: ImageData, M: np.ndarray, spec: ModelSpec, cache: DecodeCache | None = None
) -> np.ndarray:
    """An image + its source -> input matrix M -> uint8 (size, size, 3); `cache` keeps decoded
    bytes for the image's next crops (`imageio.DecodeCache`).

    Handpose checkpoints: `imageio.warp_to_input`, the WDS loader's own function (augmentation
    off: M is `crop_matrix(region, size)` there too), with its JPEG DCT fast path for bytes.
    The tutorial's weights: a full decode and Pillow's antialiased resize, the tutorial's
    preprocessing, never a DCT-scaled decode (which moves its keypoints by pixels).
    """
    if spec.preprocess == "tutorial":
        if abs(M[0, 1]) > 1e-12 or abs(M[1, 0]) > 1e-12:
            raise TypeError("the tutorial's preprocessing (a Pillow resize) cannot turn a crop")
        pixels = image if isinstance(image, np.ndarray) else decode_image(image)[0]
        return letterbox(pixels, M, spec.size)
    if isinstance(image, np.ndarray):
        return warp_image_to_input(image, M, spec.size)
    return warp_to_input(image, M, spec.size, cache)


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
    """One hand of an image (in a given box, in a box the detector found, or the whole image):
    the model input of its last pass and what the models answered."""

    box: np.ndarray | None  # (4,) x0, y0, x1, y1 original px: the box given or found (None: the whole image)
    region: Region  # the source square the model input of the last pass showed
    input: np.ndarray | None = None  # uint8 (size, size, 3) until the model has seen it
    uv: np.ndarray | None = None  # (21, 2) original px
    score: np.ndarray | None = None  # (21,) in [0, 1], the model's decoder's
    refined: np.ndarray | None = None  # the hand's box after a refinement pass: the keypoints' box, grown
    angle: float = 0.0  # the last pass's rotation, degrees (refine_mode "upright")
    presence: float | None = None  # the keypoint model's hand-presence probability (presence head)
    box_score: float | None = None  # the detector's score of `box` (or the --boxes file's)
    found: bool = False  # the detector found `box` (refinement passes apply, as to the whole image)
    hand: int = 0  # index within its image: the given box's, or the rank of a found hand
    label: int | None = None  # --boxes gt: the labelled hand the box is

    @property
    def final_box(self) -> np.ndarray | None:
        """The box the keypoints were found in: the refined box, else the given one."""
        return self.refined if self.refined is not None else self.box

    @property
    def given(self) -> bool:
        """A box the caller gave (--boxes): no refinement, no presence threshold unless asked."""
        return self.box is not None and not self.found

    @property
    def keypoint_score(self) -> float:
        """How sure the keypoint model is that this is a hand: its presence probability with a
        presence head, else the mean of its joint scores."""
        if self.presence is not None:
            return float(self.presence)
        return float(np.mean(self.score)) if self.score is not None else float("nan")

    @property
    def rank_score(self) -> float:
        """The hand's score, which ranks hands (average precision, COCO results) and, for a found
        hand, --min-score keeps: sqrt(box score x keypoint score) for a hand the detector found
        (both models must agree; a face the detector likes gets a low keypoint score), the box's
        score for a --boxes file's box with one, else `keypoint_score`."""
        if self.found and self.box_score is not None:
            return hand_score(self.box_score, self.keypoint_score)
        return float(self.box_score) if self.box_score is not None else self.keypoint_score


def hand_score(box_score: float, keypoint_score: float) -> float:
    """A found hand's score: sqrt(detector box score x keypoint score), both in [0, 1]."""
    return math.sqrt(max(float(box_score), 0.0) * max(float(keypoint_score), 0.0))


def shows_hand(crop: Crop, min_presence: float | None) -> bool:
    """Whether a hand is kept: its presence probability (none without a presence head: kept) is
    at least `min_presence`; None: DEFAULT_MIN_PRESENCE where the path found the hand itself
    (whole image, detector), no threshold for a given box."""
    if crop.presence is None:
        return True
    threshold = (0.0 if crop.given else DEFAULT_MIN_PRESENCE) if min_presence is None else min_presence
    return crop.presence >= threshold


@dataclass(frozen=True)
class Finder:
    """The detector step: a loaded detector (`detector.load_detector`), the hands kept (hand score
    `Crop.rank_score` >= min_score, at most max_hands per photo, best first)."""

    net: torch.nn.Module
    spec: DetectorSpec
    min_score: float = DEFAULT_MIN_HAND_SCORE
    max_hands: int = DEFAULT_MAX_HANDS

    @property
    def min_box_score(self) -> float:
        """The detector's boxes worth a keypoint pass: those scoring at least its own min_score,
        or min_score if that is lower (asking for weaker hands also looks at weaker boxes). The
        floor costs next to nothing: a hand score of 0.45 needs a box of 0.2025 at the least,
        but the hands kept from boxes under 0.3 were 14 of 3,931 on four photo sets (mean F1
        0.8175 against 0.8180) for 24% fewer keypoint crops (BENCHMARKS.md)."""
        return min(self.spec.min_score, self.min_score)

    @classmethod
    def of(
        cls, net: torch.nn.Module, spec: DetectorSpec, min_score: float | None, max_hands: int | None
    ) -> Finder:
        """A Finder with predict's defaults for the options not given (None)."""
        return cls(
            net,
            spec,
            DEFAULT_MIN_HAND_SCORE if min_score is None else min_score,
            DEFAULT_MAX_HANDS if max_hands is None else max_hands,
        )


Reader = Callable[[], ImageData]  # an image's pixels, read again for each later pass


@dataclass
class Photo:
    """One image on the path: how to read it again, its size, and its hands. Before `Runner.run`
    `crops` are the first pass's (given boxes, or the whole image) or, with a detector, empty
    and `detector_input` is the photo letterboxed for it; after, `crops` are the hands kept."""

    read: Reader
    width: int
    height: int
    crops: list[Crop]
    detector_input: np.ndarray | None = None  # uint8 (S, S, 3) until the detector has run
    matrix: np.ndarray | None = None  # photo px -> detector input px
    boxes: int = 0  # hands the first pass took: boxes given, found, or 1 for the whole image
    dropped: int = 0  # hands under the presence threshold


def photo_of(
    image: ImageData,
    width: int,
    height: int,
    boxes: Sequence[np.ndarray | None] | None,
    spec: ModelSpec,
    finder: Finder | None = None,
    read: Reader | None = None,
    cache: DecodeCache | None = None,
) -> Photo:
    """An image ready for `Runner.run`: `boxes` given (a list, maybe empty: no hand) -> their
    crops; None -> the detector's input when there is a `finder`, else the whole image's crop.
    `read` gives the image again for later passes (default: this image, held in memory); `cache`
    (the runner's) keeps its decoded pixels for them."""
    again: Reader = read if read is not None else (lambda: image)
    if boxes is None and finder is not None:
        x, M = photo_input(image, width, height, finder.spec, cache)
        return Photo(again, width, height, [], x, M)
    crops = crops_of(image, width, height, [None] if boxes is None else list(boxes), spec, cache)
    return Photo(again, width, height, crops, boxes=len(crops))


def crops_of(
    image: ImageData,
    width: int,
    height: int,
    boxes: Sequence[np.ndarray | None],
    spec: ModelSpec,
    cache: DecodeCache | None = None,
    *,
    found: bool = False,
) -> list[Crop]:
    """The first pass's crops of one image: one per box (None: the whole image, letterboxed);
    `found`: the boxes came from the detector, so their crops are snapped (`steady_region`)."""
    crops = []
    for box in boxes:
        region = source_region(width, height, box, spec.pad)
        if found:
            region = steady_region(region, spec.size)[0]
        crops.append(Crop(box, region, preprocess(image, crop_matrix(region, spec.size), spec, cache)))
    return crops


def forward(
    net: Net, images: torch.Tensor, spec: ModelSpec, *, channels_last: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (B, size, size, 3) -> keypoints (B, 21, 2) in model-input pixels and scores (B, 21),
    through the model's own `decode` (an exported graph holds normalisation and decoder)."""
    uv, score, _ = forward_hands(net, images, spec, channels_last=channels_last)
    return uv, score


def forward_hands(
    net: Net,
    images: torch.Tensor,
    spec: ModelSpec,
    *,
    channels_last: bool = True,
    flip: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """uint8 (B, size, size, 3) -> keypoints (B, 21, 2) in model-input pixels, scores (B, 21) and
    the hand-presence probability (B,) (None without a presence head, and for an exported graph,
    which has no presence output), through the model's own `decode` and `presence`; `flip`: each
    input and its mirror, averaged (`model.flip_test`; PyTorch models only)."""
    if isinstance(net, OnnxModel):
        if flip:
            raise HandposeError("--flip-test runs on a PyTorch checkpoint, not on an exported .onnx model")
        onnx_uv, onnx_score = net(images)
        return onnx_uv, onnx_score, None
    device = next(net.parameters()).device
    x = normalized_input(images, spec.mean, spec.std, device)  # channels_last memory
    x = x if channels_last else x.contiguous()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if flip:
            uv, score, presence = flip_test(net, x)
        else:
            out = net(x)
            uv, score = net.decode(out)  # type: ignore[operator]
            presence = net.presence(out) if hasattr(net, "presence") else None  # type: ignore[operator]
    return (
        uv.float().cpu().numpy().astype(np.float64),
        score.float().cpu().numpy(),
        None if presence is None else presence.float().cpu().numpy(),
    )


def model_device(net: Net) -> torch.device:
    """Where a loaded model runs (an ONNX model: CUDA when its first provider is CUDA's)."""
    if isinstance(net, OnnxModel):
        return torch.device("cuda" if net.providers[0] == "CUDAExecutionProvider" else "cpu")
    return next(net.parameters()).device


def to_source(uv: np.ndarray, region: Region, size: int, angle: float = 0.0) -> np.ndarray:
    """Model-input keypoints -> original pixels through the inverse of the crop's matrix."""
    return apply_affine(invert(crop_matrix(region, size, angle_deg=angle)), uv)


def refine_box(uv: np.ndarray, ratio: float) -> np.ndarray:
    """The hand box a refinement pass crops: the predicted keypoints' extent grown about its
    centre by `ratio` (the training data's labelled box side / keypoint extent side), so it
    matches the boxes the model was trained on; at least MIN_SIDE_PX on its longer side."""
    x0, y0, x1, y1 = keypoints_box(uv)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = np.array([x1 - x0, y1 - y0]) * ratio / 2
    half = np.maximum(half, MIN_SIDE_PX / 2) if max(half) * 2 < MIN_SIDE_PX else half
    return np.array([cx - half[0], cy - half[1], cx + half[0], cy + half[1]])


def refine_region(uv: np.ndarray, spec: ModelSpec, mode: str = "box") -> tuple[Region, float, np.ndarray]:
    """The crop of a refinement pass from the last pass's keypoints (original px): (region,
    angle_deg, the hand's box). "box": `refine_box` padded by the model's box_pad; "upright":
    `geometry.upright_region` padded by box_to_keypoints x box_pad (the same growth as "box"),
    turned so that wrist -> middle MCP points up; its side at least MIN_SIDE_PX x box_pad. Both
    snapped to `steady_region`'s grid: the crop comes from a model's answer."""
    box = refine_box(uv, spec.box_to_keypoints)
    if mode == "box":
        region, angle = box_region(box, spec.pad), 0.0
    elif mode == "upright":
        (cx, cy, side), angle = upright_region(uv, pad=spec.pad * spec.box_to_keypoints)
        region = (cx, cy, max(side, MIN_SIDE_PX * spec.pad))
    else:
        raise ValueError(f"refine mode must be one of {REFINE_MODES}, got {mode!r}")
    return (*steady_region(region, spec.size, angle), box)


class Runner:
    """Loaded models with how they are run: the detector's photos in batches (with a `finder`),
    then every crop in batches of `batch_size` (`flip_test`: with its mirror), then `refine`
    passes (`refine_mode`) for the crops the path found itself, then the presence threshold
    (`min_presence`, see `shows_hand`); `pool` (threads) reads and crops the later passes' images,
    `cache` keeps each image's decoded pixels from its first crop to its last (`photo_of` takes
    it too), emptied after each `run`."""

    def __init__(
        self,
        net: Net,
        spec: ModelSpec,
        *,
        batch_size: int,
        refine: int = 0,
        refine_mode: str = "box",
        flip_test: bool = False,
        min_presence: float | None = None,
        finder: Finder | None = None,
        channels_last: bool = True,
        pool: ThreadPoolExecutor | None = None,
    ):
        if refine_mode not in REFINE_MODES:
            raise ValueError(f"refine mode must be one of {REFINE_MODES}, got {refine_mode!r}")
        self.net, self.spec, self.batch_size, self.refine = net, spec, batch_size, refine
        self.refine_mode, self.flip_test, self.min_presence = refine_mode, flip_test, min_presence
        self.finder, self.channels_last, self.pool = finder, channels_last, pool
        self.cache = DecodeCache()

    def run(self, photos: Sequence[Photo]) -> None:
        """Find, predict and keep the hands of every photo (see the class docstring): each
        photo's `crops` end as its hands, keypoints in original pixels. An image that cannot be
        read again (gone since the first pass) keeps its last pass (no hand, before the first)."""
        try:
            self._run(photos)
        finally:
            self.cache.clear()  # decoded pixels are kept for one run's passes, not held after it

    def _run(self, photos: Sequence[Photo]) -> None:
        self._find(photos)
        flat = [crop for photo in photos for crop in photo.crops]
        uv, score, presence = self._model([crop.input for crop in flat])  # type: ignore[misc]
        for n, crop in enumerate(flat):
            crop.uv, crop.score, crop.input = to_source(uv[n], crop.region, self.spec.size), score[n], None
            crop.presence = None if presence is None else float(presence[n])
        todo = [(photo.read, crop) for photo in photos for crop in photo.crops if not crop.given]
        for _ in range(self.refine if todo else 0):
            passes = [refine_region(crop.uv, self.spec, self.refine_mode) for _, crop in todo]  # type: ignore[arg-type]
            jobs = [(read, region, angle) for (read, _), (region, angle, _) in zip(todo, passes, strict=True)]
            inputs = list(self.pool.map(self._again, jobs)) if self.pool else [self._again(j) for j in jobs]
            kept = [n for n, x in enumerate(inputs) if x is not None]
            uv, score, presence = self._model([inputs[n] for n in kept])  # type: ignore[misc]
            for k, n in enumerate(kept):
                crop, (region, angle, box) = todo[n][1], passes[n]
                crop.uv, crop.score = to_source(uv[k], region, self.spec.size, angle), score[k]
                crop.presence = None if presence is None else float(presence[k])
                crop.refined, crop.region, crop.angle = box, region, angle
        for photo in photos:
            kept_crops = [c for c in photo.crops if shows_hand(c, self.min_presence)]
            photo.dropped = len(photo.crops) - len(kept_crops)
            if self.finder is not None:  # found hands: both models must call it a hand; best first
                hands = [c for c in kept_crops if c.found and c.rank_score >= self.finder.min_score]
                hands.sort(key=lambda c: -c.rank_score)
                kept_crops = [c for c in kept_crops if not c.found] + hands
            photo.crops = kept_crops
            rank = 0
            for crop in photo.crops:
                if crop.found:
                    crop.hand, rank = rank, rank + 1

    def _find(self, photos: Sequence[Photo]) -> None:
        """The detector over the photos waiting for it, in batches; each box found becomes a crop
        (the image read again: in `pool`)."""
        waiting = [p for p in photos if p.detector_input is not None]
        if not waiting:
            return
        assert self.finder is not None, "a photo waits for a detector the runner does not have"
        f = self.finder
        found: list[tuple[np.ndarray, np.ndarray]] = []
        for k in range(0, len(waiting), self.batch_size):
            batch = np.stack([p.detector_input for p in waiting[k : k + self.batch_size]])  # type: ignore[misc]
            found += detect(f.net, f.spec, batch, min_score=f.min_box_score, max_hands=f.max_hands)  # type: ignore[arg-type]
        jobs = [
            (p, photo_boxes(p.matrix, boxes), scores)  # type: ignore[arg-type]
            for p, (boxes, scores) in zip(waiting, found, strict=True)
        ]
        crops = (
            list(self.pool.map(self._found_crops, jobs))
            if self.pool
            else [self._found_crops(j) for j in jobs]
        )
        for (photo, boxes, _), made in zip(jobs, crops, strict=True):
            photo.crops, photo.detector_input, photo.boxes = made, None, len(boxes)

    def _found_crops(self, job: tuple[Photo, np.ndarray, np.ndarray]) -> list[Crop]:
        """The crops of the boxes found in a photo (the image read again; none when it is gone)."""
        photo, boxes, scores = job
        if not len(boxes):
            return []
        try:
            crops = crops_of(
                photo.read(), photo.width, photo.height, list(boxes), self.spec, self.cache, found=True
            )
        except DATA_ERRORS:
            return []
        for k, (crop, s) in enumerate(zip(crops, scores, strict=True)):
            crop.box_score, crop.found, crop.hand = float(s), True, k
        return crops

    def _again(self, job: tuple[Reader, Region, float]) -> np.ndarray | None:
        """A refinement crop: the image is read again (a chunk does not hold every image's bytes;
        the cache may still hold its pixels)."""
        read, region, angle = job
        try:
            return preprocess(
                read(), crop_matrix(region, self.spec.size, angle_deg=angle), self.spec, self.cache
            )
        except DATA_ERRORS:
            return None

    def _model(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Model-input keypoints (N, 21, 2), scores (N, 21) and presence (N,) or None of N inputs,
        in batches.

        Every forward pass sees `batch_size` crops (a short last batch is filled with copies of
        its last crop, whose answers are dropped): PyTorch's CPU kernels round differently for other
        batch sizes (3e-5 input px between batches of 1 and 4), so a crop's numbers would depend
        on how many crops came with it: predict's chunks, the API's calls and a video's frames
        give each image the same numbers."""
        uv, score, presence = [], [], []
        for k in range(0, len(inputs), self.batch_size):
            crops = inputs[k : k + self.batch_size]
            fill = [crops[-1]] * (self.batch_size - len(crops))
            batch = torch.from_numpy(np.stack(crops + fill))
            u, s, p = forward_hands(
                self.net, batch, self.spec, channels_last=self.channels_last, flip=self.flip_test
            )
            uv.append(u[: len(crops)])
            score.append(s[: len(crops)])
            if p is not None:
                presence.append(p[: len(crops)])
        if not uv:
            return np.empty((0, NUM_JOINTS, 2)), np.empty((0, NUM_JOINTS)), None
        return np.concatenate(uv), np.concatenate(score), np.concatenate(presence) if presence else None


class Predictor:
    """The inference path for one image in memory: `Predictor(net, spec)(image, boxes)` returns one
    Crop per hand with its keypoints in original pixels, as `handpose predict` gives them for that
    image with the same options (the same Runner, crops, detector, refinement and thresholds).

    detector: a (`detector.CenterNet`, `DetectorSpec`) pair from `detector.load_detector`: without
    boxes, the hands it finds (hand score >= min_score, default DEFAULT_MIN_HAND_SCORE; at most
    max_hands). Without a detector and without boxes: the whole image. Given boxes always win."""

    def __init__(
        self,
        net: Net,
        spec: ModelSpec,
        *,
        detector: tuple[torch.nn.Module, DetectorSpec] | None = None,
        min_score: float | None = None,
        max_hands: int = DEFAULT_MAX_HANDS,
        min_presence: float | None = None,
        refine: int | None = None,
        refine_mode: str = "box",
        flip_test: bool = False,
        batch_size: int | None = None,
        channels_last: bool = True,
    ):
        device = model_device(net)
        self.finder = None
        if detector is not None:
            dnet, dspec = detector
            self.finder = Finder.of(dnet, dspec, min_score, max_hands)
        self.runner = Runner(
            net,
            spec,
            batch_size=batch_size or default_batch_size(device),
            refine=default_refine(spec, detector=detector is not None, refine_mode=refine_mode)
            if refine is None
            else refine,
            refine_mode=refine_mode,
            flip_test=flip_test,
            min_presence=min_presence,
            finder=self.finder,
            channels_last=channels_last,
        )

    def __call__(self, image: ImageData, boxes: Sequence[np.ndarray | None] | None = None) -> list[Crop]:
        """The hands in `boxes` (x0, y0, x1, y1 original px), else the detector's, else the whole
        image (refined), under the presence threshold's rule. ValueError for an image that
        cannot be read."""
        photo = self.photo(image, boxes)
        with torch.inference_mode():
            self.runner.run([photo])
        return photo.crops

    def photo(self, image: ImageData, boxes: Sequence[np.ndarray | None] | None = None) -> Photo:
        """`photo_of` with this predictor's finder and decode cache: the image ready for `many`.
        ValueError for an image that cannot be read."""
        width, height = image_size_of(image)
        boxes = list(boxes) if boxes else None
        return photo_of(image, width, height, boxes, self.runner.spec, self.finder, cache=self.runner.cache)

    def many(self, photos: list[Photo]) -> list[list[Crop]]:
        """The hands of several images at once (`photo` each): one Runner pass over all their
        crops, batched together (the Python API's list call)."""
        with torch.inference_mode():
            self.runner.run(photos)
        return [photo.crops for photo in photos]

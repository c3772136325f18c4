"""Stub models and images for the predict tests: models whose answers are known exactly, so
predict's geometry (crops, boxes, refinement, mapping back) can be checked to 1e-3 px against
crops computed here, independently of handpose.geometry (`expected_matrix`); a detector whose
outputs are the ideal CenterNet maps of known boxes (`lookup_detector`); generated photos with
any number of generated hands and their YOLO-pose labels (`hand_photos`)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from handpose.detector import CenterNet, DetectorSpec, detection_targets
from handpose.heatmaps import heatmaps_to_keypoints
from handpose.model import ModelSpec
from handpose.skeleton import NUM_JOINTS

PLAIN = ModelSpec(size=128, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), kind="stub", preprocess="tutorial")
WARP = ModelSpec(size=128, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), kind="stub", preprocess="warp")


class _Stub(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # predict finds the device from a parameter

    def decode(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return heatmaps_to_keypoints(out, 0.5)


class IntensityModel(_Stub):
    """Every heatmap = the input's red channel: the decoder then returns the red centroid, so a
    single bright dot on black comes back where the crop put it (mean 0 / std 1 input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].expand(-1, NUM_JOINTS, -1, -1)


class LookupModel(_Stub):
    """A perfect model for known crops: each model input is matched to the known crop it equals
    (within 1 grey level at every pixel) and answered with that crop's keypoints in model-input
    pixels, each rendered as a bilinear splat on the 4 nearest cells, which the heatmap-mean
    decoder reads back exactly. An input that equals no known crop (a crop predict should not
    have taken) fails the test, unless `default` gives an answer for it. With `presence` (one
    probability per known crop, `default_presence` for the others) it has a presence head: its
    output is (maps, logits), as a model trained with `presence` answers."""

    def __init__(
        self, crops: list[tuple[np.ndarray, np.ndarray]], spec: ModelSpec, presence: list[float] | None = None
    ) -> None:
        super().__init__()
        self.images = np.stack([image for image, _ in crops]).astype(np.int16)
        self.answers = np.stack([uv for _, uv in crops])
        self.spec = spec
        self.default: np.ndarray | None = None  # the answer for crops not in the table (None: fail)
        self.known_presence = presence
        self.default_presence = 0.0
        self.seen: list[int] = []  # the known crop each input was (-1: the default)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        uv, prob = [], []
        for image in to_uint8(x, self.spec):
            diff = np.abs(self.images - image.astype(np.int16)).reshape(len(self.images), -1).max(axis=1)
            k = int(diff.argmin())
            if diff[k] <= 1:
                uv.append(self.answers[k])
                self.seen.append(k)
                prob.append(self.known_presence[k] if self.known_presence else 1.0)
            elif self.default is not None:
                uv.append(self.default)
                self.seen.append(-1)
                prob.append(self.default_presence)
            else:
                raise AssertionError(
                    f"a crop equals none of the expected crops (closest: {diff[k]} grey levels off)"
                )
        maps = torch.from_numpy(splat(np.stack(uv), self.spec.size))
        if self.known_presence is None:
            return maps
        return maps, torch.logit(torch.tensor(prob, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)).float()

    def decode(
        self, out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return heatmaps_to_keypoints(out[0] if isinstance(out, tuple) else out, 0.5)

    def presence(self, out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        return torch.sigmoid(out[1]) if isinstance(out, tuple) else None


class FixedPoseModel(_Stub):
    """Answers the same keypoints (model-input px) for every crop: predictions then show which
    crop was taken."""

    def __init__(self, uv: np.ndarray, size: int) -> None:
        super().__init__()
        self.uv, self.size = uv, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(splat(np.repeat(self.uv[None], len(x), axis=0), self.size))


class RaisingModel(_Stub):
    """Raises `exc` on its `after`-th forward call (an interrupted run)."""

    def __init__(self, inner: torch.nn.Module, after: int, exc: type[BaseException] = KeyboardInterrupt):
        super().__init__()
        self.inner, self.after, self.exc, self.calls = inner, after, exc, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.after:
            raise self.exc()
        return self.inner(x)


def to_uint8(x: torch.Tensor, spec: ModelSpec) -> list[np.ndarray]:
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    u8 = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return [im.contiguous().numpy() for im in u8]


def splat(uv: np.ndarray, size: int) -> np.ndarray:
    """(B, J, 2) model pixels -> (B, J, size, size) maps whose weighted mean of cell centres
    (i + 0.5) is exactly uv (for 0.5 <= uv <= size - 0.5)."""
    b, j, _ = uv.shape
    maps = np.zeros((b, j, size, size), np.float32)
    c = uv - 0.5
    i0 = np.clip(np.floor(c).astype(int), 0, size - 2)
    f = c - i0
    for bi in range(b):
        for ji in range(j):
            (x0, y0), (fx, fy) = i0[bi, ji], f[bi, ji]
            maps[bi, ji, y0 : y0 + 2, x0 : x0 + 2] = np.outer([1 - fy, fy], [1 - fx, fx])
    return maps


def expected_matrix(
    width: int, height: int, box: np.ndarray | None, pad: float, size: int, found: bool = False
) -> np.ndarray:
    """The source -> model-input matrix predict must use, written out here: the whole image
    letterboxed (its longer side fills the input, centred; `box` None), or the hand box squared
    on its longer side, times `pad`, centred in the input; `found` (a detector's box): that
    square snapped, its side to 2^(1/128) steps, its centre to half an input pixel."""
    if box is None:
        cx, cy, side = width / 2, height / 2, max(width, height)
    else:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        side = max(box[2] - box[0], box[3] - box[1]) * pad
    if found and box is not None:
        side = 2.0 ** (round(math.log2(side) * 128) / 128)
        cx, cy = (round(v * 2 * size / side) * side / size / 2 for v in (cx, cy))
    s = size / side
    return np.array([[s, 0.0, size / 2 - s * cx], [0.0, s, size / 2 - s * cy]])


def lookup_model(
    crops: list[tuple[bytes, np.ndarray | None, np.ndarray]],
    spec: ModelSpec,
    presence: list[float] | None = None,
) -> LookupModel:
    """A perfect model for these (image bytes, box or None, keypoints in original px) crops, each
    crop's matrix computed by `expected_matrix` (the pixels by the shared preprocessing, which
    test_predict checks on its own), given or found by a detector (snapped: both are known);
    `presence`: a presence head's answer for each crop."""
    from handpose.inference import preprocess

    table, answers = [], []
    for k, (data, box, uv) in enumerate(crops):
        width, height = Image.open(io.BytesIO(data)).size
        for found in (False, True):
            M = expected_matrix(width, height, box, spec.pad, spec.size, found)
            table.append((preprocess(data, M, spec), np.asarray(uv, np.float64) @ M[:, :2].T + M[:, 2]))
            answers.append(k)
    return LookupModel(table, spec, None if presence is None else [presence[k] for k in answers])


# ----------------------------------------------------------------------------- detectors

DETECT = DetectorSpec(size=128, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), min_score=0.3)


def ideal_detection(boxes: np.ndarray, scores: np.ndarray, size: int, stride: int) -> torch.Tensor:
    """The (5, size / stride, size / stride) output whose decode gives exactly these boxes (input
    px) with these scores: per box the training target's Gaussian (`detection_targets`) times its
    score, the element-wise max, as logits; log-size and offset at each centre cell."""
    cells = size // stride
    heat = torch.zeros(cells, cells, dtype=torch.float64)
    out = torch.zeros(5, cells * cells)
    for box, score in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(scores).reshape(-1), strict=True):
        t = detection_targets(
            torch.tensor(box[None, None], dtype=torch.float32), torch.tensor([[True]]), (cells, cells), stride
        )
        heat = torch.maximum(heat, t.heat[0].double() * float(score))
        i = int(t.index[0, 0])
        out[1:3, i] = t.size[0, 0]
        out[3:5, i] = t.offset[0, 0]
    out[0] = torch.logit(heat.clamp(1e-6, 1 - 1e-6)).float().flatten()
    return out.view(5, cells, cells)


class LookupDetector(CenterNet):
    """A detector with known answers: each letterboxed input is matched to the known photo input it
    equals (within 1 grey level) and answered with `ideal_detection` of that photo's boxes and
    scores; an input that equals none answers "no hand" (every cell at probability 1e-6)."""

    def __init__(self, photos: list[tuple[np.ndarray, np.ndarray, np.ndarray]], spec: DetectorSpec) -> None:
        super().__init__(4, 1, stride=8)
        self.spec = spec
        self.images = np.stack([image for image, _, _ in photos]).astype(np.int16)
        self.answers = [ideal_detection(b, s, spec.size, 8) for _, b, s in photos]
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = []
        empty = ideal_detection(np.zeros((0, 4)), np.zeros(0), self.spec.size, 8)
        for image in to_uint8(x, self.spec):  # type: ignore[arg-type]
            diff = np.abs(self.images - image.astype(np.int16)).reshape(len(self.images), -1).max(axis=1)
            k = int(diff.argmin())
            out.append(self.answers[k] if diff[k] <= 1 else empty)
        return torch.stack(out)


def lookup_detector(
    photos: list[tuple[bytes, np.ndarray, np.ndarray]], spec: DetectorSpec = DETECT
) -> LookupDetector:
    """A detector that finds these boxes (n, 4) (photo px) with these scores (n,) in these photos:
    each photo letterboxed by `expected_matrix` (the pixels by the loaders' preprocessing,
    `imageio.warp_to_input`), its boxes moved by the same matrix."""
    from handpose.imageio import warp_to_input

    table = []
    for data, boxes, scores in photos:
        width, height = Image.open(io.BytesIO(data)).size
        M = expected_matrix(width, height, None, 1.0, spec.size)
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        moved = np.concatenate([b[:, :2] * M[0, 0] + M[:, 2], b[:, 2:] * M[0, 0] + M[:, 2]], axis=1)
        table.append((warp_to_input(data, M, spec.size), moved, np.asarray(scores, np.float64)))
    return LookupDetector(table, spec)


# ----------------------------------------------------------------------------- generated hands


def hand_photos(
    folder: object,
    counts: dict[str, int],
    *,
    width: int = 320,
    height: int = 240,
    tile: int = 96,
    seed: int = 0,
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Generated photos: a smooth random background with `counts[name]` generated hands
    (`synth.make_sample` photos of `tile` px, side by side at random heights), written as a
    YOLO-pose data set FOLDER/images/NAME.jpg + FOLDER/labels/NAME.txt (an empty label file for
    no hand). Returns {name: [(box x0 y0 x1 y1, uv (21, 2)) px]}: the keypoints as drawn, the box
    their extent grown by 1.2 (a labelled box)."""
    from pathlib import Path

    from handpose.geometry import project_points
    from handpose.synth import make_sample

    root = Path(str(folder))
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    gap = (width - 3 * tile) // 4
    for p, (name, n) in enumerate(counts.items()):
        assert n <= 3, "at most 3 hands side by side"
        photo = smooth_image(width, height, seed * 100 + p).copy()
        hands = []
        for k in range(n):
            hand, (pixels,) = make_sample(seed, "training", p * 3 + k, tile, 1)
            x0, y0 = gap + k * (tile + gap), int(rng.integers(0, height - tile))
            photo[y0 : y0 + tile, x0 : x0 + tile] = pixels
            uv = project_points(hand.xyz_m, hand.K) + [x0, y0]
            lo, hi = uv.min(axis=0), uv.max(axis=0)
            c, half = (lo + hi) / 2, (hi - lo) * 1.2 / 2
            hands.append((np.concatenate([c - half, c + half]), uv))
        (root / "images" / f"{name}.jpg").write_bytes(encode(photo, "JPEG", quality=92))
        lines = []
        for box, uv in hands:
            cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
            bw, bh = (box[2] - box[0]) / width, (box[3] - box[1]) / height
            kps = " ".join(f"{x / width:.8f} {y / height:.8f} 2" for x, y in uv)
            lines.append(f"0 {cx:.8f} {cy:.8f} {bw:.8f} {bh:.8f} {kps}\n")
        (root / "labels" / f"{name}.txt").write_text("".join(lines))
        # the labels as predict reads them back (8 decimals): what the lookup models must answer
        truth[name] = [
            (
                np.array(
                    [
                        (cx - bw / 2) * width,
                        (cy - bh / 2) * height,
                        (cx + bw / 2) * width,
                        (cy + bh / 2) * height,
                    ]
                ),
                np.array([[float(v) for v in line.split()[5 + 3 * j : 7 + 3 * j]] for j in range(NUM_JOINTS)])
                * [width, height],
            )
            for line in lines
            for cx, cy, bw, bh in [tuple(float(v) for v in line.split()[1:5])]
        ]
    return truth


def formula_unet() -> torch.nn.Module:
    """The tutorial's network (ShallowUNet width 16, depth 3: model_final's 85 state_dict keys)
    with weights set by a formula, never a random generator, so it answers the same on every
    machine: sines scaled like He's initialisation, batch-norm statistics measured on 8 generated
    photos as training would, output weights pushed negative so each heatmap is low but where the
    image excites it (keypoints then follow the photo, as a trained model's do)."""
    from handpose.model import TUTORIAL_MEAN, TUTORIAL_STD, ShallowUNet
    from handpose.synth import make_sample

    net = ShallowUNet(16, 3)
    with torch.no_grad():
        for k, (name, t) in enumerate(net.state_dict().items()):
            if not t.dtype.is_floating_point or "running" in name:
                continue
            wave = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.7 + k).reshape(t.shape)
            if t.ndim == 4:  # conv weights
                t.copy_(wave * (6.0 / (t.shape[1] * t.shape[2] * t.shape[3])) ** 0.5)
            else:  # batch-norm scale and shift
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * wave)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # a cumulative average: exactly this batch's statistics
        photos = [make_sample(0, "training", i, 224, 1)[1][0] for i in range(10, 18)]
        small = [np.asarray(Image.fromarray(p).resize((128, 128), Image.Resampling.BILINEAR)) for p in photos]
        x = torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2).float() / 255
        net.train()(
            (x - torch.tensor(TUTORIAL_MEAN).view(1, 3, 1, 1)) / torch.tensor(TUTORIAL_STD).view(1, 3, 1, 1)
        )
        w = net.conv_out[0].weight
        w.copy_(w * 4.0 - 4.0 * w.abs().mean())
    return net.eval()


# ----------------------------------------------------------------------------- images


def encode(image: np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def dot_image(w: int, h: int, cx: float, cy: float, sigma: float) -> np.ndarray:
    """Black (h, w, 3) with a Gaussian dot centred at (cx, cy) in pixel-centre coordinates."""
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    g = np.exp(-((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) / (2 * sigma**2))
    return np.repeat(np.round(g * 255).astype(np.uint8)[..., None], 3, axis=2)


def noise_image(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth_image(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth random colours: JPEG-friendly, with detail at every scale a crop might take."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


Loader = Callable[[], object]

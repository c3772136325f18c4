"""The Python API: `handpose.load(MODEL)` -> a model you call on images.

    import handpose
    model = handpose.load("hands")          # the bundled model; or best.pt, model.onnx, model_final
    hands = model("photo.jpg")              # a path, a PIL image or an (H, W, 3) uint8 RGB array
    hands[0].keypoints, hands[0].scores     # (21, 2) px of the given image, (21,) in [0, 1]
    batch = model([img1, img2])             # a list in, a list of lists out, batched inside

It is `handpose predict`'s own path (`inference.Runner`: crops, forward and decoder, the way back
to original pixels, refinement passes), so a path gives predict's numbers for that file exactly.
An image in memory has no JPEG bytes to decode at a reduced scale, so for a JPEG it is predict's
path on the decoded pixels (for PNG and every other format, the same numbers).

Without a detector each image is one hand: the whole image, then `refine` passes in the box of
the keypoints found (predict without --boxes). With one (a bundled model's own, or `detector=`),
every hand the detector finds is predicted as `handpose predict --detector` predicts it (the same
Runner with the same detector step: its boxes, `refine` passes, at most `max_hands`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from handpose.errors import HandposeError
from handpose.inference import (
    DATA_ERRORS,
    DEFAULT_MAX_HANDS,
    Crop,
    ImageData,
    Net,
    Predictor,
    default_batch_size,
)
from handpose.model import ModelSpec
from handpose.models import detector_path, is_bundled, is_onnx, load_model, pick_device
from handpose.sources.files import IMAGE_SUFFIXES, is_image
from handpose.video import is_video

__all__ = ["Hand", "Model", "load"]


@dataclass(frozen=True)
class Hand:
    """One hand found in an image (pixels of the image as given, geometry.py's convention: the
    top-left pixel's centre is (0.5, 0.5))."""

    keypoints: np.ndarray  # (21, 2) float64 x, y px, in skeleton.JOINT_NAMES order
    scores: np.ndarray  # (21,) float32 in [0, 1]: the model's confidence per joint
    box: np.ndarray | None  # (4,) x0, y0, x1, y1 px: where they were found (None: the whole image)
    score: float  # with a detector predict's "hand_score", sqrt(box score x keypoint score); without
    # one predict's "score" (the presence probability with a presence head, else the mean joint score)

    def __repr__(self) -> str:
        box = "whole image" if self.box is None else "[" + ", ".join(f"{v:.1f}" for v in self.box) + "]"
        x, y = self.keypoints[0]
        return f"Hand(score={self.score:.3f}, box={box}, wrist=({x:.1f}, {y:.1f}))"


class Model:
    """A loaded keypoint model (and detector), called on images; see `handpose.load`."""

    def __init__(
        self,
        net: Net,
        spec: ModelSpec,
        *,
        device: torch.device,
        detector: tuple[Any, Any] | None = None,
        min_score: float | None = None,
        max_hands: int = DEFAULT_MAX_HANDS,
        refine: int | None = None,
        batch_size: int | None = None,
        name: str = "",
    ) -> None:
        self.spec, self.device, self.detector, self.name = spec, device, detector, name
        if refine is not None and refine < 0:
            raise HandposeError(f"refine={refine}: must be >= 0")
        if batch_size is not None and batch_size < 1:
            raise HandposeError(f"batch_size={batch_size}: must be >= 1")
        if max_hands < 1:
            raise HandposeError(f"max_hands={max_hands}: must be >= 1")
        self.predictor = Predictor(
            net,
            spec,
            detector=detector,
            min_score=min_score,
            max_hands=max_hands,
            refine=refine,
            batch_size=batch_size or default_batch_size(device),
        )

    def __repr__(self) -> str:
        detector = ", with a detector" if self.detector else ""
        return (
            f"handpose.Model({self.name!r}: {self.spec.kind}, {self.spec.size} px, {self.device}{detector})"
        )

    def __call__(self, images: Any) -> Any:
        """Hands in one image, or in each image of a list.

        images: a path (str or os.PathLike), a PIL image, an (H, W, 3) uint8 RGB numpy array, or a
        list or tuple of them. Returns a list of `Hand` for one image, a list of such lists for a
        list (all crops batched together). HandposeError (one line naming the image) for an image
        that cannot be read."""
        if isinstance(images, (list, tuple)):
            return self._predict([_image_data(x, f"image {k}") for k, x in enumerate(images)])
        return self._predict([_image_data(images, "image")])[0]

    def _predict(self, images: list[tuple[ImageData, str]]) -> list[list[Hand]]:
        photos = []
        for data, name in images:
            try:
                photos.append(self.predictor.photo(data))
            except DATA_ERRORS as e:
                self.predictor.runner.cache.clear()  # the run that would have emptied it does not come
                raise HandposeError(f"{name}: {_reason(e)}") from None
        return [[_hand(c) for c in crops] for crops in self.predictor.many(photos)]


def load(
    path_or_name: str | os.PathLike,
    detector: str | os.PathLike | bool | None = None,
    device: str | None = None,
    *,
    refine: int | None = None,
    batch_size: int | None = None,
    min_score: float | None = None,
    max_hands: int = DEFAULT_MAX_HANDS,
) -> Model:
    """Load a model to call on images: `handpose.load("hands")(image)` -> [Hand, ...].

    path_or_name: a bundled model's name (`hands`; `handpose models` lists them), a handpose
        checkpoint (best.pt), an exported .onnx (run on onnxruntime), or the tutorial's weights.
    detector: a hand detector checkpoint (arch centernet) to find every hand; None: the bundled
        model's own detector when it ships one, else none (each image is one hand); False: none.
    device: "cpu", "cuda", "cuda:N" [default: CUDA when the model's runtime has it].
    refine: more passes in the box of the keypoints found, as `handpose predict --refine`
        [default: with a detector 1; else 1 for models trained on hand boxes, 0 for whole-image
        models].
    min_score, max_hands: with a detector, keep the hands whose hand score, sqrt(box score x
        keypoint score), is at least min_score [default: 0.45] and at most max_hands per image
        [default: 4], as predict's options.
    batch_size: crops per forward pass [default: 4 on a CPU, 64 on CUDA]; every pass is full (a
        short one is padded), so an image gets predict's numbers whatever it is called with.

    Returns a `Model`: `model(image)` -> list of `Hand` (keypoints (21, 2) px of the image as
    given, scores (21,), box, score); `model([a, b])` -> [[Hand, ...], [Hand, ...]].
    Raises `handpose.HandposeError` (one line) for a missing or bad model file or a bad image.
    """
    dev = pick_device(device, onnx=is_onnx(path_or_name))
    net, spec = load_model(path_or_name, dev)
    pair = None
    found = _detector_file(path_or_name, detector)
    if found is not None:
        from handpose.detector import load_detector

        pair = load_detector(found, dev)
    name = str(path_or_name)
    return Model(
        net,
        spec,
        device=dev,
        detector=pair,
        min_score=min_score,
        max_hands=max_hands,
        refine=refine,
        batch_size=batch_size,
        name=name,
    )


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


def _detector_file(model: str | os.PathLike, detector: str | os.PathLike | bool | None) -> Path | None:
    """The detector checkpoint `load` uses (see its docstring)."""
    if detector is None:
        return detector_path(model)
    if detector is False:
        return None
    if detector is True:
        raise HandposeError("detector=True: give a detector checkpoint, a bundled model's name, or False")
    if isinstance(detector, str) and is_bundled(detector):
        found = detector_path(detector)
        if found is None:
            raise HandposeError(f"detector={detector!r}: the bundled model {detector} has no detector")
        return found
    return Path(detector)


def _image_data(image: Any, name: str) -> tuple[ImageData, str]:
    """One image as the inference path takes it: a file's bytes (predict's own input), or RGB
    pixels as displayed; and how an error names it."""
    if isinstance(image, (str, os.PathLike)):
        return _read_file(Path(image)), str(image)
    if isinstance(image, Image.Image):
        from handpose.imageio import pil_to_rgb

        return pil_to_rgb(image), name
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise HandposeError(
                f"{name}: expected RGB uint8 pixels (H, W, 3), got {image.dtype} {image.shape}"
            )
        return image, name
    raise HandposeError(
        f"{name}: expected a path, a PIL image or an (H, W, 3) uint8 numpy array, got {type(image).__name__}"
    )


def _read_file(path: Path) -> bytes:
    """An image file's bytes; one line for what predict would not read as an image."""
    if path.is_dir():
        raise HandposeError(f"{path}: is a folder (give image files; handpose predict takes folders)")
    if not path.exists():
        raise HandposeError(f"{path}: no such file or folder")
    if is_video(path):
        raise HandposeError(
            f"{path}: a video: call the model on its frames (handpose.video.iter_frames) "
            "or run handpose predict on it"
        )
    if not is_image(path.name):
        suffixes = ", ".join(f".{s}" for s in IMAGE_SUFFIXES)
        raise HandposeError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r} (expected {suffixes})"
        )
    try:
        return path.read_bytes()
    except OSError as e:
        raise HandposeError(f"{path}: unreadable ({e.strerror or e})") from None


def _hand(crop: Crop) -> Hand:
    uv, scores = np.asarray(crop.uv, np.float64), np.asarray(crop.score, np.float32)
    # as predict's rows: a found hand's box is the detector's, a whole image's the refined one
    box = crop.box if crop.found else crop.final_box
    return Hand(uv, scores, None if box is None else np.asarray(box, np.float64), crop.rank_score)


def _reason(e: BaseException) -> str:
    from handpose.predict import _reason as reason  # predict's wording of a data error

    return reason(e)

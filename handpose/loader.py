"""`make_loader`: batches from packed shards, by either kind. The one entry to both loader kinds.

    {"image": float (B, 3, H, W), normalised with its set's manifest mean/std, on `device`,
     "uv": float (B, 21, 2) model-input pixels (pixel-centre convention, see geometry.py),
     "visible": bool (B, 21) labelled (visibility > 0) AND inside the H x W frame,
     "key": list[str] sample keys,
     "set": int64 (B,) index of the sample's shard set in `source`,
     "present": bool (B,) the crop shows its hand (False only for the training crops that
                `negatives` moves off every hand of the photo; their joints are never visible)}

Kinds: "wds" (`wds_loader.py`: CPU worker processes, any machine) and "dali"
(`dali_loader.py`: NVIDIA DALI, decode and augmentation on the GPU when there is one). Both take
the same shard sets (`datasets.py`), crop modes and augmentation, and build the same matrix
(`geometry.crop_matrix`) per sample.

`task="detect"` gives the detector's batches instead: whole photos with ALL their hands, laid out
by `layout` in training (mosaics, small photos on a canvas); see detect_data.py for the batch
(boxes, hands, and per hand uv and visible) and dali_detect.py for the DALI kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from handpose.config import AugmentConfig, LayoutConfig
from handpose.datasets import LoaderOptions, Norm, open_sets
from handpose.errors import HandposeError
from handpose.geometry import BOX_PAD
from handpose.remote import Cache
from handpose.shards import SPLITS, Manifest

KINDS = ("wds", "dali")
TASKS = ("pose", "detect")
NO_DALI_NEGATIVES = (
    "negatives need loader = wds: a crop without a hand must avoid every hand box of its photo, "
    "and DALI's reader hands the graph one shuffled sample at a time, never its photo's other hands"
)


def make_loader(
    source: str | Path | Sequence[str | Path],
    split: str,
    *,
    kind: str = "wds",
    batch_size: int,
    image_size: int = 128,
    augment: AugmentConfig | None = None,
    crop: str | Sequence[str] = "image",
    box_pad: float = BOX_PAD,
    weights: Sequence[float] | None = None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    device: str | torch.device = "cpu",
    samples_per_epoch: int | None = None,
    drop_last: bool | None = None,
    shuffle_buffer: int = 1000,
    negatives: float = 0.0,
    task: str = "pose",
    layout: LayoutConfig | None = None,
    cache: Cache | None = None,
    norm: Norm | None = None,
) -> Any:
    """A loader over `split` of one packed folder, or of several (`source` a list, `weights` the
    share of each in every training batch, `crop` one mode for all or one per folder).

    Augmentation applies to the train split only (None or enabled=False: the plain crop).
    `rank`/`world_size` are the GLOBAL rank and world size. Train: shuffled, `len()` whole batches
    per rank (equal on all ranks); an epoch is about one pass over the first folder, or
    `samples_per_epoch` samples (the WDS kind then draws whole shards with replacement).
    Val/test/eval: every sample of every folder exactly once per epoch across ranks and workers
    (ranks may get batch counts differing by one); `drop_last` (default False) drops a partial
    last batch. The loader has `set_epoch(epoch)`, `len()`, `stats` (skipped corrupt samples) and
    `sets` (the `datasets.ShardSet`s, with their manifests). A folder may be a URL (http(s)://,
    s3://, file://): its shards stream, or with `cache` (remote.Cache) are kept on local disk.
    `negatives` (train, WDS kind only): that share of the samples of box-crop folders is cropped,
    with the same augmentation, from a square of the photo (the size of its padded hand box) that
    overlaps none of the photo's hand boxes, where the photo leaves room; "present" is False for
    them. Whole-photo ("image") folders always show their hands.

    `norm` (mean, std) normalises every folder instead of its own statistics (validating a folder
    the model never trained on, as predict feeds it: with the first training folder's).

    `task="detect"`: detection items (one per photo, every hand of it; `layout` lays out the train
    split's items); crop must be "image". Its val/test/eval loaders have no `len()`.
    """
    if kind not in KINDS:
        raise HandposeError(f"loader kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if task not in TASKS:
        raise HandposeError(f"loader task must be one of {', '.join(TASKS)}, got {task!r}")
    if split not in SPLITS:
        raise HandposeError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if batch_size < 1 or image_size < 1 or workers < 0:
        raise HandposeError(
            f"batch_size/image_size must be >= 1 and workers >= 0, got {batch_size}/{image_size}/{workers}"
        )
    if not 0 <= rank < world_size:
        raise HandposeError(f"rank {rank} is outside world size {world_size}")
    if not 0 <= negatives < 1:
        raise HandposeError(f"negatives is a share of the training crops in [0, 1), got {negatives}")
    if kind == "dali" and negatives > 0 and split == "train":
        raise HandposeError(NO_DALI_NEGATIVES)
    roots = [source] if isinstance(source, (str, Path)) else list(source)
    crops = [crop] if isinstance(crop, str) else list(crop)
    sets = open_sets(roots, split, crops=crops, pad=box_pad, weights=weights, cache=cache, norm=norm)
    train = split == "train"
    options = LoaderOptions(
        batch_size=batch_size,
        image_size=image_size,
        augment=augment if train and augment is not None and augment.enabled else None,
        rank=rank,
        world_size=world_size,
        workers=workers,
        seed=seed,
        epoch=epoch,
        device=torch.device(device),
        samples_per_epoch=samples_per_epoch if train else None,
        drop_last=bool(drop_last) and not train,
    )
    if task == "detect":
        from handpose.detect_data import check_detect_options

        check_detect_options(crops, options.augment, negatives)
        layout = layout if train else None
        if kind == "dali":
            from handpose.dali_detect import DaliDetectLoader

            return DaliDetectLoader(sets, split, options, layout=layout, shuffle_buffer=shuffle_buffer)
        from handpose.detect_data import DetectWdsLoader

        return DetectWdsLoader(sets, split, options, layout=layout, shuffle_buffer=shuffle_buffer)
    if kind == "dali":
        from handpose.dali_loader import DaliLoader

        return DaliLoader(sets, split, options)
    from handpose.wds_loader import WdsLoader

    return WdsLoader(
        sets, split, options, shuffle_buffer=shuffle_buffer, negatives=negatives if train else 0.0
    )


def denormalise(image: torch.Tensor, manifest: Manifest) -> torch.Tensor:
    """Inverse of the loaders' normalisation: float (B, 3, H, W) back to [0, 255]."""
    mean = torch.tensor(manifest.mean, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(manifest.std, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image * std + mean) * 255.0

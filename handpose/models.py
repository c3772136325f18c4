"""What a MODEL argument names, where it runs, and loading it: the one dispatch on the model file
that `predict`, `export`, the Python API (`handpose.load`) and the benchmarks share.

MODEL is
  a bundled model's name   `hands`: files shipped inside the package (handpose/bundled/), each
                           with its card (`read_card`); the card's sha256 of every file is checked
                           when it is loaded. A name is exactly a card's name (a str without a
                           folder); anything else is a path (./hands is the file hands).
  a path ending in .onnx   a `handpose export` graph on onnxruntime (`onnx_model.load_onnx`)
  any other path           a handpose checkpoint or the tutorial's bare state_dict
                           (`checkpoint.load_model`)

Either way the result is (net, ModelSpec), where net is a torch module with `decode` or an
`onnx_model.OnnxModel`: `inference.forward` runs both, so everything after loading is one path.

A bundle (format "handpose-model-card" v1) is NAME.json, the card, beside the files it lists:

  name, summary         the name MODEL gives, one line on what it does
  files.keypoints       {"file", "sha256", "bytes", "arch", "input_size", "crop", "parameters"}
  files.detector        the same for a hand detector (optional: `load("hands")` then finds every
                        hand with it)
  data                  [{"name", "images", "licence", "url", "labels"}]: the training data
  recipe, command       the recipe and the exact commands that made the files
  date, commit          when, and from which handpose commit
  training              epochs, time, machine
  figures               {"on": what was scored, "rows": [{"input", "mean_px", "pct_box",
                        "pct_image", "pck_box"}]}: the model's figures on the val photos
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from handpose.errors import HandposeError

if TYPE_CHECKING:
    from handpose.model import ModelSpec
    from handpose.onnx_model import OnnxModel

BUNDLED = Path(__file__).resolve().parent / "bundled"
CARD_FORMAT = "handpose-model-card"
CARD_VERSION = 1
ROLES = ("keypoints", "detector")  # what a bundled file is for
CARD_KEYS = ("name", "summary", "files", "data", "recipe", "command", "date", "commit", "figures")
FILE_KEYS = ("file", "sha256", "bytes", "arch", "input_size")
ONNX_SUFFIX = ".onnx"


# ---------------------------------------------------------------------------------------------
# Bundled models


@dataclass(frozen=True)
class Bundle:
    """A bundled model's files, checked against its card."""

    name: str
    card: dict[str, Any]
    keypoints: Path
    detector: Path | None


def bundled_names() -> list[str]:
    """The names of the bundled models (their cards in handpose/bundled/), sorted."""
    return sorted(p.stem for p in BUNDLED.glob("*.json")) if BUNDLED.is_dir() else []


def is_bundled(model: Any) -> bool:
    """Whether MODEL names a bundled model: a str equal to a card's name (a Path is a path)."""
    return isinstance(model, str) and model in bundled_names()


def read_card(name: str) -> dict[str, Any]:
    """A bundled model's card, its keys and files checked (one line naming the card otherwise)."""
    path = BUNDLED / f"{name}.json"
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HandposeError(f"bundled model {name}: card {path} unreadable ({e})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise HandposeError(f"bundled model {name}: {path} is not a {CARD_FORMAT} file")
    if card.get("version") != CARD_VERSION:
        raise HandposeError(
            f"bundled model {name}: card version {card.get('version')!r}, this handpose reads {CARD_VERSION}"
        )
    missing = [k for k in CARD_KEYS if k not in card]
    files = card.get("files")
    if not missing and not (isinstance(files, dict) and "keypoints" in files and set(files) <= set(ROLES)):
        missing = ["files.keypoints"]
    for role, entry in (files or {}).items() if not missing else ():
        missing += [f"files.{role}.{k}" for k in FILE_KEYS if not isinstance(entry, dict) or k not in entry]
    if missing:
        raise HandposeError(f"bundled model {name}: card {path} lacks {', '.join(missing)}")
    if card["name"] != name:
        raise HandposeError(f"bundled model {name}: card {path} names {card['name']!r}")
    return card


def bundle(name: str) -> Bundle:
    """A bundled model's files, each file's sha256 checked against the card (a mismatch is one line:
    a damaged or replaced file is never loaded)."""
    from handpose.shards import sha256_file

    card = read_card(name)
    paths: dict[str, Path] = {}
    for role, entry in card["files"].items():
        path = BUNDLED / entry["file"]
        if not path.is_file():
            raise HandposeError(f"bundled model {name}: {path} is missing (reinstall handpose)")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise HandposeError(
                f"bundled model {name}: {path} has sha256 {digest[:16]}..., its card says "
                f"{entry['sha256'][:16]}... (damaged or replaced; reinstall handpose)"
            )
        paths[role] = path
    return Bundle(name, card, paths["keypoints"], paths.get("detector"))


def model_path(model: str | os.PathLike) -> Path:
    """The keypoint model file MODEL names: a bundled model's (checked), else MODEL as a path."""
    return bundle(model).keypoints if is_bundled(model) else Path(model)  # type: ignore[arg-type]


def describe(name: str) -> str:
    """A bundled model's card as text (`handpose models`)."""
    card = read_card(name)
    lines = [f"{name}: {card['summary']}"]
    for role, entry in card["files"].items():
        size = f"{entry['bytes'] / 1e6:.2f} MB"
        params = f", {entry['parameters']:,} parameters" if entry.get("parameters") else ""
        lines.append(
            f"  {role}: {entry['file']} ({entry['arch']}, {entry['input_size']} px{params}, {size}), "
            f"sha256 {entry['sha256']}"
        )
    lines.append("  training data:")
    for d in card["data"]:
        images = f"{d['images']:,} images, " if isinstance(d.get("images"), int) else ""
        lines.append(f"    {d['name']} ({images}licence {d['licence']})")
        if d.get("url"):
            lines.append(f"      {d['url']}")
        if d.get("labels"):
            lines.append(f"      labels: {d['labels']}")
    lines.append(f"  recipe: {card['recipe']}")
    commands = card["command"] if isinstance(card["command"], list) else [card["command"]]
    lines += ["  made by:"] + [f"    {c}" for c in commands]
    lines.append(f"  date {card['date']}, commit {card['commit']}")
    if card.get("training"):
        lines.append("  training: " + ", ".join(f"{k} {v}" for k, v in card["training"].items()))
    figures = card["figures"]
    lines.append(f"  figures on {figures.get('on', 'the val photos')}:")
    lines.append(f"    {'input':<34} {'mean px':>8} {'% of box':>9} {'% of image':>11} {'PCK@0.2 box':>12}")
    for r in figures.get("rows", []):
        lines.append(
            f"    {r['input']:<34} {r['mean_px']:>8.2f} {r['pct_box']:>9.2f} {r['pct_image']:>11.2f} "
            f"{r['pck_box']:>12.3f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Devices and loading


def is_onnx(model: Any) -> bool:
    """Whether MODEL is an ONNX file (by its suffix; a bundled name never is)."""
    return (
        isinstance(model, (str, os.PathLike))
        and not is_bundled(model)
        and (Path(model).suffix.lower() == ONNX_SUFFIX)
    )


def pick_device(device: str | None, *, onnx: bool = False) -> torch.device:
    """`device` as given, else CUDA where the model's runtime has it (PyTorch; with `onnx`,
    onnxruntime's CUDA provider), else the CPU."""
    if device is None:
        if onnx:
            from handpose.onnx_model import require_onnxruntime

            cuda = "CUDAExecutionProvider" in require_onnxruntime("a .onnx model").get_available_providers()
        else:
            cuda = torch.cuda.is_available()
        return torch.device("cuda" if cuda else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise HandposeError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not onnx and not torch.cuda.is_available():
        raise HandposeError(f"--device {device}: CUDA is not available on this machine")
    return dev


def load_model(
    model: str | os.PathLike, device: torch.device, *, channels_last: bool = True
) -> tuple[torch.nn.Module | OnnxModel, ModelSpec]:
    """MODEL (a bundled name, a .onnx, a checkpoint or the tutorial's weights; see the module
    docstring) loaded for `device`: (net, spec), net in eval mode. An ONNX model runs on
    onnxruntime with as many threads as PyTorch has (torchrun gives each rank its share). Every
    failure is one HandposeError line naming the file."""
    from handpose import checkpoint

    path = model_path(model)
    if is_onnx(path):
        from handpose.onnx_model import load_onnx

        return load_onnx(path, device=str(device), threads=torch.get_num_threads())
    return checkpoint.load_model(path, device, channels_last=channels_last)


def detector_path(model: str | os.PathLike) -> Path | None:
    """The detector a bundled model ships with (None: it has none, or MODEL is a path)."""
    return bundle(model).detector if is_bundled(model) else None  # type: ignore[arg-type]

"""Exported models on onnxruntime: the ONNX metadata that `handpose export` writes, read back into
the spec predict uses, and a runner with predict's forward interface.

A handpose .onnx graph (written by `handpose.export`):
  input   "image"      uint8 (B, S, S, 3): RGB crops already cut to the model's input (S px), as
                       predict's preprocessing makes them
  output  "keypoints"  float32 (B, 21, 2): model-input pixels (geometry.py's convention)
          "scores"     float32 (B, 21): the model's own per-joint confidence in [0, 1]
Normalisation (mean/std) and the model's `decode` are inside the graph. Everything else predict
needs is in the model's metadata_props (strings; lists and numbers as JSON), see METADATA.

The runner takes onnxruntime's CPU provider, or its CUDA provider where one is installed
(`onnxruntime-gpu`). `onnxruntime` is the optional extra `handpose[onnx]`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from handpose.errors import HandposeError
from handpose.skeleton import JOINT_NAMES, NUM_JOINTS

if TYPE_CHECKING:
    from handpose.model import ModelSpec

FORMAT = "handpose-onnx"
FORMAT_VERSION = 1
INPUT, KEYPOINTS, SCORES = "image", "keypoints", "scores"
INSTALL = "pip install 'handpose[onnx]'"
# Every key `handpose export` writes, and what it holds.
METADATA = {
    "handpose.format": f"{FORMAT!r}: marks a graph written by handpose export",
    "handpose.format_version": "int: the layout of graph and metadata (this module's FORMAT_VERSION)",
    "handpose.version": "the handpose version that exported it",
    "arch": "the architecture (model.ARCHS)",
    "source": "what was exported: 'handpose checkpoint' | 'tutorial state_dict'",
    "source_sha256": "sha256 of the exported checkpoint / state_dict file",
    "input_size": "int: S, the model input side in px",
    "mean": "JSON [r, g, b]: normalisation of [0, 1] pixels, applied inside the graph",
    "std": "JSON [r, g, b]",
    "preprocess": "how predict cuts crops: 'warp' (imageio.warp_to_input) | 'tutorial' (Pillow resize)",
    "crop": "what the model was trained on: 'image' (whole images) | 'box' (hand boxes)",
    "box_pad": "float: a box's side x box_pad fills the input",
    "box_to_keypoints": "float: labelled box side / keypoint-extent side (predict --refine)",
    "joint_names": "JSON list of the 21 joint names, in output order",
}
SOURCES = ("handpose checkpoint", "tutorial state_dict")
PREPROCESS = ("warp", "tutorial")
CROPS = ("image", "box")


def require_onnxruntime(what: str) -> Any:
    """The onnxruntime module, or one line saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise HandposeError(f"{what} needs onnxruntime: {INSTALL}") from None
    return onnxruntime


# ---------------------------------------------------------------------------------------------
# Metadata


def metadata_of(spec: ModelSpec, *, arch: str, source_sha256: str, version: str) -> dict[str, str]:
    """The metadata_props of an export of a model with this spec (floats as JSON: they read back
    bit for bit)."""
    return {
        "handpose.format": FORMAT,
        "handpose.format_version": str(FORMAT_VERSION),
        "handpose.version": version,
        "arch": arch,
        "source": spec.kind,
        "source_sha256": source_sha256,
        "input_size": str(spec.size),
        "mean": json.dumps([float(v) for v in spec.mean]),
        "std": json.dumps([float(v) for v in spec.std]),
        "preprocess": spec.preprocess,
        "crop": spec.crop,
        "box_pad": json.dumps(float(spec.pad)),
        "box_to_keypoints": json.dumps(float(spec.box_to_keypoints)),
        "joint_names": json.dumps(list(JOINT_NAMES)),
    }


def spec_from_metadata(meta: Mapping[str, str], path: str | os.PathLike, digest: str) -> ModelSpec:
    """The ModelSpec predict uses, from an export's metadata; `digest` identifies the .onnx file
    (a resumed run must use the same). One line naming the file and key for anything wrong."""
    from handpose.model import ModelSpec

    check_format(meta, path)

    def get(key: str, parse: Callable[[str], Any], ok: Callable[[Any], bool], want: str) -> Any:
        if key not in meta:
            raise HandposeError(f"{path}: ONNX metadata lacks {key!r}")
        try:
            value = parse(meta[key])
        except (ValueError, TypeError):
            value = None
        if value is None or not ok(value):
            raise HandposeError(f"{path}: ONNX metadata {key} = {meta[key][:60]!r}: expected {want}")
        return value

    def rgb(text: str) -> tuple[float, float, float] | None:
        v = json.loads(text)
        ok = isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
        return (float(v[0]), float(v[1]), float(v[2])) if ok else None

    positive = "a positive number"
    # predict writes the joints in JOINT_NAMES order: a graph for other joints is refused
    get("joint_names", json.loads, lambda v: v == list(JOINT_NAMES), f"the {NUM_JOINTS} joint names")
    source = get("source", str, lambda v: v in SOURCES, " | ".join(SOURCES))
    return ModelSpec(
        size=get("input_size", int, lambda v: v > 0, "a positive integer"),
        mean=get("mean", rgb, lambda v: True, "[r, g, b]"),
        std=get("std", rgb, lambda v: min(v) > 0, "[r, g, b], each > 0"),
        kind=f"onnx ({source})",
        preprocess=get("preprocess", str, lambda v: v in PREPROCESS, " | ".join(PREPROCESS)),
        crop=get("crop", str, lambda v: v in CROPS, " | ".join(CROPS)),
        pad=get("box_pad", float, lambda v: v > 0, positive),
        box_to_keypoints=get("box_to_keypoints", float, lambda v: v > 0, positive),
        digest=digest,
    )


def check_format(meta: Mapping[str, str], path: str | os.PathLike) -> None:
    """Refuse an ONNX model that handpose did not export, or a newer layout than this version reads."""
    if meta.get("handpose.format") != FORMAT:
        raise HandposeError(
            f"{path}: an ONNX model without handpose metadata (make one with handpose export)"
        )
    version = meta.get("handpose.format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise HandposeError(
            f"{path}: handpose ONNX format {version!r} is newer than this handpose reads "
            f"({FORMAT_VERSION}); upgrade handpose"
        )


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of a .onnx file (any ONNX model: nothing is checked but that it loads)."""
    return dict(_session(Path(path), ["CPUExecutionProvider"], threads=1).get_modelmeta().custom_metadata_map)


# ---------------------------------------------------------------------------------------------
# The runner


class OnnxModel:
    """A handpose .onnx graph on onnxruntime, called as predict's forward: uint8 (B, S, S, 3) RGB
    crops -> keypoints (B, 21, 2) float64 in model-input pixels, scores (B, 21) float32."""

    def __init__(self, session: Any, size: int) -> None:
        self.session, self.size = session, size

    @property
    def providers(self) -> list[str]:
        """The onnxruntime execution providers in use, preferred first."""
        return list(self.session.get_providers())

    def __call__(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph on a batch (a numpy array or a CPU tensor, uint8 NHWC)."""
        x = np.ascontiguousarray(np.asarray(images))
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (self.size, self.size, 3):
            raise ValueError(
                f"expected uint8 (B, {self.size}, {self.size}, 3) crops, got {x.dtype} {x.shape}"
            )
        uv, score = self.session.run([KEYPOINTS, SCORES], {INPUT: x})
        return uv.astype(np.float64), score.astype(np.float32, copy=False)


def load_onnx(
    path: str | os.PathLike, *, device: str | None = None, threads: int | None = None, spin: bool = False
) -> tuple[OnnxModel, ModelSpec]:
    """A `handpose export` .onnx on onnxruntime, and its spec (`spec_from_metadata`).

    device: None (CUDA where onnxruntime has its CUDA provider, else the CPU), "cpu", "cuda" or
    "cuda:N". threads: onnxruntime's intra-op threads (None: its default, one per physical core).
    spin: let idle intra-op threads busy-wait for the next run (onnxruntime's default); off, they
    sleep and leave the cores to what runs between batches (decoding, cropping), see
    `handpose bench onnx`. Every problem with the file is one HandposeError line naming it.
    """
    from handpose.shards import sha256_file

    path = Path(path)
    session = _session(path, _providers(device), threads, spin=spin)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    spec = spec_from_metadata(meta, path, sha256_file(path))
    _check_signature(session, spec.size, path)
    return OnnxModel(session, spec.size), spec


def _providers(device: str | None) -> list[Any]:
    ort = require_onnxruntime("running a .onnx model")
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device is None:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device)
    if m is None:
        raise HandposeError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if m.group(1) == "cpu":
        return ["CPUExecutionProvider"]
    if not cuda:
        raise HandposeError(
            f"--device {device}: this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
        )
    return [("CUDAExecutionProvider", {"device_id": int(m.group(2) or 0)}), "CPUExecutionProvider"]


def _session(path: Path, providers: list[Any], threads: int | None, *, spin: bool = True) -> Any:
    """An onnxruntime session of `path`; a missing, damaged or foreign file is one line."""
    ort = require_onnxruntime("running a .onnx model")
    if not path.exists():
        raise HandposeError(f"{path}: model file not found")
    if not path.is_file():
        raise HandposeError(f"{path}: is not a file")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings (node placement) are not the user's
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own classes (Fail, InvalidProtobuf, ...)
        raise HandposeError(f"{path}: {_unloadable(e)}") from None


def _unloadable(error: Exception) -> str:
    """onnxruntime's refusal in words: `[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model
    from /long/path failed: ...` names its category; the rest repeats the path."""
    m = re.search(r"\[ONNXRuntimeError\] : \d+ : (\w+) :", str(error))
    code = m.group(1) if m else type(error).__name__
    if code in ("INVALID_PROTOBUF", "NO_SUCHFILE", "INVALID_ARGUMENT"):
        return "not a readable ONNX model (truncated, damaged, or another kind of file)"
    detail = " ".join(str(error).split(" : ")[-1].split())[:160]
    return f"onnxruntime cannot load this ONNX model ({code}: {detail})"


def _check_signature(session: Any, size: int, path: Path) -> None:
    """The graph must take and give what FORMAT says (a hand-edited file might not)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}

    def fits(shape: list[Any], want: tuple[int, ...]) -> bool:
        return len(shape) == len(want) + 1 and all(
            s == w or not isinstance(s, int) for s, w in zip(shape[1:], want, strict=True)
        )

    image = inputs.get(INPUT)
    if (
        len(inputs) != 1
        or image is None
        or image.type != "tensor(uint8)"
        or not fits(image.shape, (size, size, 3))
    ):
        got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs.values())
        raise HandposeError(f"{path}: expected one input {INPUT!r} uint8 [B, {size}, {size}, 3], found {got}")
    for name, want in ((KEYPOINTS, (NUM_JOINTS, 2)), (SCORES, (NUM_JOINTS,))):
        out = outputs.get(name)
        if out is None or out.type != "tensor(float)" or not fits(out.shape, want):
            raise HandposeError(f"{path}: expected an output {name!r} float [B, {', '.join(map(str, want))}]")

"""`handpose export MODEL --out model.onnx`: any model predict loads (a handpose checkpoint of any
architecture, the tutorial's bare ShallowUNet state_dict) as one ONNX graph that needs no PyTorch.

The graph (`ExportGraph`) is predict's forward pass: uint8 RGB crops (B, S, S, 3) of the model's
input size (B dynamic) -> float, /255, (x - mean) / std -> the network -> the model's own
`decode` (the tutorial's weights: its decoder with its index offset) -> keypoints (B, 21, 2) in
model-input pixels and scores (B, 21). Cutting the crops stays outside (the spec's preprocess,
crop and box_pad say how: onnx_model.METADATA lists every key written). Any architecture whose
`decode` is written in torch ops that torch.export traces exports as it is: nothing here names
an architecture.

Exporter: torch.onnx.export(dynamo=True) (torch.export + onnxscript, PyTorch's default since
2.9; the TorchScript exporter is deprecated): with its optimizer the graph is constant-folded
(66 nodes for the strided model against 142 from the TorchScript exporter, whose graphs also
recompute shapes at run time) and its batch norms after a conv are folded into the conv. Each
node's debugging metadata (Python stack traces with this machine's file paths) is stripped, so
the file holds the model and nothing about where it was made, and the same input gives the same
bytes on any machine.

Before anything is written, the graph is run on onnxruntime against PyTorch on generated crops;
the file is written only when they agree (PARITY_PX), atomically, at --out and nowhere else.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from handpose import __version__, checkpoint
from handpose.atomic import check_output_file, write_bytes
from handpose.checkpoint import load_model
from handpose.console import make_console
from handpose.errors import HandposeError
from handpose.inference import forward
from handpose.model import ModelSpec, PoseModel
from handpose.models import ONNX_SUFFIX, model_path
from handpose.onnx_model import INPUT, INSTALL, KEYPOINTS, SCORES, OnnxModel, metadata_of
from handpose.shards import sha256_file

WEIGHTS_SUFFIX = ".pt"  # --out model.pt: the checkpoint's weights alone (export_weights)
EXTRA = ("onnx", "onnxscript", "onnxruntime")  # the exporter needs onnxscript; the check, onnxruntime
PARITY_PX = 0.05  # largest keypoint difference (model-input px) onnxruntime vs PyTorch allowed
PROBES = 4  # generated crops the export is checked on
EXAMPLE_BATCH = 2  # the traced batch: not 0 or 1, which torch.export would specialise on


class ExportGraph(nn.Module):
    """uint8 (B, S, S, 3) RGB crops -> (keypoints (B, 21, 2) input px, scores (B, 21)): the
    normalisation of `inference.forward`, the network, and the network's own `decode`."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: PoseModel, spec: ModelSpec) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the same ops in the same order as inference.forward, so the same float32 rounding
        x = image.permute(0, 3, 1, 2).float()
        x = (x / 255.0 - self.mean) / self.std
        uv, score = self.net.decode(self.net(x))
        return uv.float(), score.float()


def export(
    model: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, quiet: bool = False
) -> dict[str, Any]:
    """Export `model` (a path, or a bundled model's name) to `out` (refused if it exists, unless
    `overwrite`): a .onnx graph, or with a .pt `out` the checkpoint's weights alone
    (`export_weights`).

    Returns {"out", "arch", "source", "input_size", "bytes", "sha256", "seconds", "parity_max_px",
    "parity_mean_px", "score_max_diff"}: the parity figures are onnxruntime against PyTorch on
    PROBES generated crops. Raises HandposeError (one line) without the `onnx` extra, for a bad
    MODEL or --out.
    """
    model, out = model_path(model), Path(out)
    if out.suffix.lower() == WEIGHTS_SUFFIX:
        return export_weights(model, out, overwrite=overwrite, quiet=quiet)
    require_extra()
    out = _check_out(out, model, overwrite)
    start = time.perf_counter()
    net, spec = load_model(model, torch.device("cpu"), channels_last=False)
    if not isinstance(net, PoseModel) or not net.arch:
        raise TypeError(f"{type(net).__name__} is not a PoseModel with an arch name")
    graph = to_onnx(net, spec)
    _set_metadata(
        graph, metadata_of(spec, arch=net.arch, source_sha256=sha256_file(model), version=__version__)
    )
    data = graph.SerializeToString()
    parity = check_parity(data, net, spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out, data)
    summary = {
        "out": str(out),
        "arch": net.arch,
        "source": spec.kind,
        "input_size": spec.size,
        "bytes": len(data),
        "sha256": sha256_file(out),
        "seconds": round(time.perf_counter() - start, 3),
        **parity,
    }
    make_console(quiet=quiet).print(
        f"exported {net.arch} ({spec.kind}, {spec.size} px) -> {out}: {len(data) / 1e6:.2f} MB in "
        f"{summary['seconds']:.1f} s; onnxruntime vs PyTorch: max {parity['parity_max_px']:.2g} px"
    )
    return summary


def export_weights(
    model: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, quiet: bool = False
) -> dict[str, Any]:
    """A handpose checkpoint (keypoint model or detector) without its optimizer, scheduler, RNG
    and loop state (`checkpoint.weights_only`): what predict, `handpose.load` and a bundle need,
    about a third of a training checkpoint. Written atomically at `out` (a .pt file) only.
    Returns {"out", "arch", "bytes", "source_bytes", "sha256"}."""
    model, out = Path(model), _check_out(Path(out), Path(model), overwrite)
    if not model.is_file():
        raise HandposeError(
            f"{model}: model file not found" if not model.exists() else f"{model}: is not a file"
        )
    try:
        state = checkpoint.load(model)
    except checkpoint.CorruptCheckpoint as e:
        tutorial = "not a handpose" in str(e)
        raise HandposeError(
            f"{model}: not a handpose checkpoint (the tutorial's state_dict is weights only already)"
            if tutorial
            else str(e)
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(out, checkpoint.weights_only(state))
    arch = str({**checkpoint.OLD_FILES, **state["config"]}["arch"])
    summary: dict[str, Any] = {
        "out": str(out),
        "arch": arch,
        "bytes": out.stat().st_size,
        "source_bytes": model.stat().st_size,
        "sha256": sha256_file(out),
    }
    make_console(quiet=quiet).print(
        f"weights of {arch} ({model}, {summary['source_bytes'] / 1e6:.2f} MB) -> {out}: "
        f"{summary['bytes'] / 1e6:.2f} MB"
    )
    return summary


def require_extra() -> None:
    """One line naming what to install when the `onnx` extra is missing."""
    missing = []
    for name in EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise HandposeError(f"handpose export needs {', '.join(missing)}: {INSTALL}")


def _check_out(out: Path, model: Path, overwrite: bool) -> Path:
    """--out names one new .onnx or .pt file (or, with overwrite, one to replace); nothing else
    is written."""
    if out.suffix.lower() not in (ONNX_SUFFIX, WEIGHTS_SUFFIX):
        raise HandposeError(f"--out {out}: give a file name ending in .onnx (ONNX) or .pt (weights only)")
    check_output_file(out, "--out")
    if out.exists() and model.exists() and out.resolve() == model.resolve():
        raise HandposeError(f"--out {out}: is MODEL itself")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise HandposeError(f"--out {out}: exists; pass --overwrite to replace it")
    return out


# ---------------------------------------------------------------------------------------------
# The graph


def to_onnx(net: PoseModel, spec: ModelSpec) -> Any:
    """The onnx.ModelProto of `ExportGraph(net, spec)` with a dynamic batch, node metadata
    stripped (see the module docstring), checked by onnx.checker."""
    import onnx

    graph = ExportGraph(net, spec).eval()
    example = torch.zeros(EXAMPLE_BATCH, spec.size, spec.size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            optimize=True,
            verbose=False,
            input_names=[INPUT],
            output_names=[KEYPOINTS, SCORES],
            dynamic_shapes=({0: batch},),
        )
    if program is None:  # only the TorchScript exporter returns None
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    _strip(proto.graph)
    for function in proto.functions:
        for node in function.node:
            del node.metadata_props[:]
            node.doc_string = ""
    proto.producer_name, proto.producer_version = "handpose", __version__
    onnx.checker.check_model(proto, full_check=True)
    return proto


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's progress lines, its notes about torchvision and its deprecation warnings are
    for PyTorch developers; errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _strip(graph: Any) -> None:
    """Drop the debugging metadata and doc strings of every node, value and initializer (also in
    subgraphs): stack traces, module paths and FX node text."""
    del graph.metadata_props[:]
    for items in (graph.node, graph.input, graph.output, graph.value_info, graph.initializer):
        for item in items:
            del item.metadata_props[:]
            item.doc_string = ""
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip(attr.g)
            for sub in attr.graphs:
                _strip(sub)


def _set_metadata(proto: Any, meta: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


# ---------------------------------------------------------------------------------------------
# The check before writing


def check_parity(data: bytes, net: torch.nn.Module, spec: ModelSpec) -> dict[str, float]:
    """Run the serialised graph on onnxruntime (CPU) and `inference.forward` on the same generated
    crops; refuse (RuntimeError: a bug, not the user's) a graph further than PARITY_PX from it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    crops = probe_crops(spec.size, PROBES)
    uv, score = OnnxModel(session, spec.size)(crops)
    with torch.inference_mode():
        ref_uv, ref_score = forward(net, torch.from_numpy(crops), spec, channels_last=False)
    d = np.abs(uv - ref_uv)
    parity = {
        "parity_max_px": float(d.max()),
        "parity_mean_px": float(d.mean()),
        "score_max_diff": float(np.abs(score - ref_score).max()),
    }
    if not parity["parity_max_px"] <= PARITY_PX:  # also catches NaN
        raise RuntimeError(
            f"the exported graph's keypoints differ from PyTorch's by up to {parity['parity_max_px']} px "
            f"(allowed {PARITY_PX}): not written"
        )
    return parity


def probe_crops(size: int, n: int, seed: int = 0) -> np.ndarray:
    """n uint8 (size, size, 3) crops of smooth random colours: structure at every scale, so the
    maps and their decoded keypoints differ from crop to crop."""
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        small = rng.integers(0, 256, (size // 8 + 2, size // 8 + 2, 3)).astype(np.uint8)
        crops.append(np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(crops)

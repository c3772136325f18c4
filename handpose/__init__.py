"""handpose: labelled photos -> WebDataset shards -> DDP training -> bulk predict, for 21-joint 2D
hand keypoints; and the models, to use anywhere:

    import handpose
    model = handpose.load("hands")       # the bundled model, or a path: best.pt, model.onnx
    hands = model("photo.jpg")           # [Hand(keypoints (21, 2) px, scores (21,), box, score)]
"""

from typing import TYPE_CHECKING, Any

from handpose.errors import HandposeError

__version__ = "0.1.0"
__all__ = ["Hand", "HandposeError", "Model", "load"]

if TYPE_CHECKING:
    from handpose.api import Hand, Model, load


def __getattr__(name: str) -> Any:
    # The API pulls in torch: `import handpose` (the CLI's first import, `--version`) stays light.
    if name in ("load", "Model", "Hand"):
        from handpose import api

        return getattr(api, name)
    raise AttributeError(f"module 'handpose' has no attribute {name!r}")

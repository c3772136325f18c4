"""Shared fixtures: tiny generated FreiHAND data and its packed shards (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip, with the reason, where torch sees no CUDA device."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    reason = (
        f"CUDA is not available (torch {torch.__version__} is a CPU build)"
        if torch.version.cuda is None
        else f"CUDA is not available (torch {torch.__version__} finds no CUDA device)"
    )
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip the test cleanly when it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is absent")
    return path


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated FreiHAND root: 40 ids x 2 versions (gs, hom) + 8 evaluation ids, 224 px."""
    from handpose.synth import synth

    root = tmp_path_factory.mktemp("synth")
    synth(root, n=40, n_eval=8, versions=2, seed=0, size=224, workers=1)
    return root


@pytest.fixture(scope="session")
def packed(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`synth_root` packed with all versions, tiny shards (several per split), split 0.6/0.2/0.2."""
    from handpose.pack import pack

    out = tmp_path_factory.mktemp("shards")
    pack(synth_root, out, versions="all", split="0.6,0.2,0.2", shard_size_mb=0.06, workers=1)
    return out

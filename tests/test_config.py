"""Config: TOML + overrides -> frozen dataclass, unknown keys named, round trip through to_toml."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from handpose.config import AugmentConfig, load_config, to_toml
from handpose.errors import HandposeError


@dataclasses.dataclass(frozen=True)
class _Cfg:
    lr: float = 0.1
    epochs: int = 3
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    augment: AugmentConfig = AugmentConfig()


def test_overrides_are_typed(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('lr = 0.5\nname = "a"\n[augment]\nflip = true\n')
    cfg = load_config(_Cfg, recipe, {"epochs": "7", "augment.rotate_deg": "12.5", "sizes": "3,4"})
    assert (cfg.lr, cfg.epochs, cfg.name, cfg.sizes) == (0.5, 7, "a", (3, 4))
    assert cfg.augment.flip is True and cfg.augment.rotate_deg == 12.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config(_Cfg, None, {"lr": "0.01", "augment.enabled": "false"})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(_Cfg, path) == cfg


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"lrr": "1"}, "--lrr"),
        ({"augment.spin": "1"}, "--augment.spin"),
        ({"epochs": "two"}, "--epochs"),
        ({"epochs": "1.5"}, "--epochs"),
        ({"augment.scale_min": "2"}, "--augment.scale_min"),
    ],
)
def test_errors_name_the_key(overrides: dict, needle: str) -> None:
    with pytest.raises(HandposeError, match=needle):
        load_config(_Cfg, None, overrides)


def test_bad_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(HandposeError, match="not found"):
        load_config(_Cfg, tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 1")
    with pytest.raises(HandposeError, match="bad.toml"):
        load_config(_Cfg, bad)

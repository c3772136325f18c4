"""Frozen config dataclasses, built from TOML recipes plus `--key value` overrides.

One home for config parsing: `load_config` reads a recipe (tables become nested dataclasses,
`[augment]` -> `cfg.augment`), applies dotted overrides (`augment.rotate_deg=20`), rejects unknown
keys by name, and `to_toml` writes the resolved config back out.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from handpose.errors import HandposeError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training-split augmentation; the same distributions drive the WDS and DALI loaders.

    Geometry: one affine per sample (letterbox fit to the model size, then these), see geometry.py.
    Flip mirrors the image and keeps joint identities (a hand has no left/right joint pairs), so a
    flipped right hand becomes a left hand: turn it on to train one model for both hands.
    """

    enabled: bool = True
    rotate_deg: float = 30.0  # uniform in [-r, r], clockwise on screen
    scale_min: float = 0.8  # uniform zoom factor on top of the letterbox fit
    scale_max: float = 1.2
    translate: float = 0.1  # shift, uniform in [-t, t] x the model size, per axis
    flip: bool = False  # mirror with probability 0.5
    brightness: float = 0.2  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.2  # factor uniform in [1 - c, 1 + c] about mid-grey
    saturation: float = 0.2  # factor uniform in [1 - s, 1 + s]
    hue_deg: float = 10.0  # rotation uniform in [-h, h] degrees
    blur: float = 0.0  # probability of a Gaussian blur after the warp
    blur_sigma: float = 1.5  # its sigma, uniform in [0.3, blur_sigma] model-input px
    occlude: float = 0.0  # probability of one occluding rectangle of a random grey
    occlude_size: float = 0.4  # its sides, uniform in [0.1, occlude_size] x the model input size

    def __post_init__(self) -> None:
        if not 0 < self.scale_min <= self.scale_max:
            raise HandposeError(
                f"augment.scale_min/scale_max must satisfy 0 < min <= max, got "
                f"{self.scale_min}, {self.scale_max}"
            )
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise HandposeError(f"augment.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("blur", "occlude"):
            if not 0 <= getattr(self, name) <= 1:
                raise HandposeError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.blur_sigma < 0.3:
            raise HandposeError(f"augment.blur_sigma must be >= 0.3 px, got {self.blur_sigma}")
        if not 0.1 <= self.occlude_size <= 1:
            raise HandposeError(f"augment.occlude_size must be in [0.1, 1], got {self.occlude_size}")
        if self.rotate_deg < 0 or self.translate < 0 or self.hue_deg < 0:
            raise HandposeError("augment.rotate_deg, translate and hue_deg must be >= 0")


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a TOML value or a CLI string to the field's type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], where)
    try:
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise HandposeError(f"{where}: expected a table, got {value!r}")
            return from_dict(tp, value, where=where)  # type: ignore[arg-type]
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if origin is tuple:
            items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            inner = typing.get_args(tp)[0]
            return tuple(_coerce(v.strip() if isinstance(v, str) else v, inner, where) for v in items)
        if origin is typing.Literal:
            if value not in typing.get_args(tp):
                raise HandposeError(f"{where}: must be one of {typing.get_args(tp)}, got {value!r}")
            return value
    except (TypeError, ValueError):
        raise HandposeError(f"{where}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping; unknown keys are an error naming the key."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise HandposeError(f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise HandposeError(f"{where}: {e}") from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.replace("-", "_").split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise HandposeError(f"override {dotted!r}: {p!r} is not a table")
    node[leaf] = value


def load_config(cls: type[T], recipe: str | Path | None, overrides: Mapping[str, Any] | None = None) -> T:
    """Recipe TOML (optional) + dotted overrides -> frozen `cls`. Errors name the file and key."""
    data: dict[str, Any] = {}
    where = "config"
    if recipe is not None:
        path = Path(recipe)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HandposeError(f"recipe not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise HandposeError(f"recipe {path}: invalid TOML: {e}") from None
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return from_dict(cls, data, where=where)
    except HandposeError as e:
        raise HandposeError(f"{recipe or 'config'}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain dicts/lists (JSON/TOML/checkpoint friendly)."""
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(cfg: Any) -> str:
    """Resolved config as TOML that `load_config` reads back to an equal object (None omitted)."""
    flat = [(k, v) for k, v in to_dict(cfg).items() if not isinstance(v, dict) and v is not None]
    tables = [(k, v) for k, v in to_dict(cfg).items() if isinstance(v, dict)]
    lines = [f"{k} = {_toml_value(v)}" for k, v in flat]
    for name, table in tables:
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"

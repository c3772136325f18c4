"""Frozen config dataclasses, built from TOML recipes plus `--key value` overrides.

One home for config parsing: `load_config` reads a recipe (tables become nested dataclasses,
`[augment]` -> `cfg.augment`), applies dotted overrides (`augment.rotate_deg=20`), rejects unknown
keys by name, and `to_toml` writes the resolved config back out. An error names where the value
came from: `--sigma` for a command-line value, `RECIPE: sigma` for the recipe's. `describe_toml`
lists every key with its value, default and meaning, taken from the dataclass fields and their
`# comments` (what `handpose train --show-config` prints).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from handpose.errors import ConfigError, HandposeError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training-split augmentation; the same distributions drive the WDS and DALI loaders.

    Geometry: one affine per sample (letterbox fit to the model size, then these), see geometry.py.
    Flip mirrors the image and keeps joint identities (a hand has no left/right joint pairs), so a
    flipped right hand becomes a left hand: turn it on to train one model for both hands.
    """

    enabled: bool = True  # augment the training split at all
    rotate_deg: float = 30.0  # uniform in [-r, r], clockwise on screen
    scale_min: float = 0.8  # uniform zoom factor on top of the letterbox fit
    scale_max: float = 1.2  # upper end of the zoom factor
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
            raise ConfigError(
                ("scale_min", "scale_max"),
                f"must satisfy 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}",
            )
        for name in ("rotate_deg", "translate", "hue_deg"):
            if not getattr(self, name) >= 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("blur", "occlude"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f"is a probability in [0, 1], got {getattr(self, name)}")
        if not self.blur_sigma >= 0.3:
            raise ConfigError("blur_sigma", f"must be >= 0.3 px, got {self.blur_sigma}")
        if not 0.1 <= self.occlude_size <= 1:
            raise ConfigError("occlude_size", f"must be in [0.1, 1], got {self.occlude_size}")


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """Detection training items: how photos are laid out on the model input, before the
    per-item augmentation ([augment]) moves the whole canvas. The rest of the time an item is one
    photo letterboxed into the input. Validation always shows each photo once, letterboxed.

    Each photo is letterboxed into a square of the canvas (`geometry.place_matrix`); squares never
    overlap, so the tiles add up to the canvas and every pixel outside the photos' hand boxes is
    a negative. The same draws drive the WDS and DALI kinds (`detect_data.sample_layout`).
    """

    mosaic: float = 0.0  # probability of a 2x2 mosaic of four photos around a random centre
    mosaic_centre: float = 0.3  # the centre is uniform in [c, 1 - c] x the input side, per axis
    mosaic_scale_min: float = 0.6  # each photo's square side: uniform in [min, 1] x its cell's shorter side
    canvas: float = 0.0  # probability of one photo placed small, at a random position
    canvas_scale_min: float = 0.25  # its square side: uniform in [min, max] x the input side
    canvas_scale_max: float = 0.75  # the upper end of that side

    def __post_init__(self) -> None:
        for name in ("mosaic", "canvas"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f"is a probability in [0, 1], got {getattr(self, name)}")
        if not self.mosaic + self.canvas <= 1:
            raise ConfigError(("mosaic", "canvas"), f"add up to {self.mosaic + self.canvas}, more than 1")
        if not 0 <= self.mosaic_centre <= 0.5:
            raise ConfigError("mosaic_centre", f"must be in [0, 0.5], got {self.mosaic_centre}")
        if not 0 < self.mosaic_scale_min <= 1:
            raise ConfigError("mosaic_scale_min", f"must be in (0, 1], got {self.mosaic_scale_min}")
        if not 0 < self.canvas_scale_min <= self.canvas_scale_max <= 1:
            raise ConfigError(
                ("canvas_scale_min", "canvas_scale_max"),
                f"must satisfy 0 < canvas_scale_min <= canvas_scale_max <= 1, got "
                f"{self.canvas_scale_min}, {self.canvas_scale_max}",
            )

    @property
    def enabled(self) -> bool:
        """Whether any item is laid out other than as one letterboxed photo."""
        return self.mosaic > 0 or self.canvas > 0


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    return str(getattr(tp, "__name__", tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a TOML value or a CLI string to the field's type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], key)
    try:
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(key, f"expected a table, got {value!r}")
            return from_dict(tp, value, prefix=f"{key}.")  # type: ignore[arg-type]
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
            return tuple(_coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in items)
        if origin is typing.Literal:
            if value not in typing.get_args(tp):
                raise ConfigError(key, f"must be one of {_type_name(tp)}, got {value!r}")
            return value
    except (TypeError, ValueError):
        raise ConfigError(key, f"cannot read {value!r} as {_type_name(tp)}") from None
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and bad values raise ConfigError naming
    the dotted key (`prefix` + field name)."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}", f"unknown key ({hint}known keys: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # raised by __post_init__ with the class's own field names
        raise ConfigError(tuple(prefix + k for k in e.keys), e.problem) from None
    except TypeError as e:
        raise HandposeError(f"{prefix or 'config'}: {e}") from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.replace("-", "_").split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"{p!r} is not a table")
    node[leaf] = value


def _dotted_keys(data: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for k, v in data.items():
        keys.add(prefix + k)
        if isinstance(v, Mapping):
            keys |= _dotted_keys(v, f"{prefix}{k}.")
    return keys


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where each config value came from, so an error names what the user typed or wrote."""

    recipe: Path | None = None
    recipe_keys: frozenset[str] = frozenset()  # dotted keys set in the recipe
    flag_keys: frozenset[str] = frozenset()  # dotted keys given as --key value

    def name(self, *keys: str) -> str:
        """`--key` for a command-line value, `RECIPE: key` for the recipe's, else the bare key
        (a default). With several keys, the first given explicitly is named."""
        for k in keys:
            if k in self.flag_keys:
                return f"--{k}"
        for k in keys:
            if k in self.recipe_keys:
                return f"{self.recipe}: {k}"
        return keys[0]


def read_recipe(recipe: str | Path) -> dict[str, Any]:
    """A recipe TOML as a dict; a clear error naming --config when it cannot be read."""
    path = Path(recipe)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HandposeError(f"--config {path}: recipe not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HandposeError(
            f"--config {path}: cannot read the recipe ({getattr(e, 'strerror', e)})"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise HandposeError(f"--config {path}: invalid TOML: {e}") from None


def read_config(
    cls: type[T], recipe: str | Path | None, overrides: Mapping[str, Any] | None = None
) -> tuple[T, Sources]:
    """Recipe TOML (optional) + dotted overrides -> (frozen `cls`, where each value came from).

    A bad value raises HandposeError naming its source: `--key` when the command line gave it,
    `RECIPE: key` when the recipe did.
    """
    data = read_recipe(recipe) if recipe is not None else {}
    flags = {k.replace("-", "_") for k in (overrides or {})}
    sources = Sources(
        Path(recipe) if recipe is not None else None, frozenset(_dotted_keys(data)), frozenset(flags)
    )
    try:
        for key, value in (overrides or {}).items():
            _set_dotted(data, key, value)
        return from_dict(cls, data), sources
    except ConfigError as e:
        raise HandposeError(f"{sources.name(*e.keys)}: {e.problem}") from None


def load_config(cls: type[T], recipe: str | Path | None, overrides: Mapping[str, Any] | None = None) -> T:
    """Recipe TOML (optional) + dotted overrides -> frozen `cls`. Errors name the flag or the
    recipe file and key (see `read_config`)."""
    return read_config(cls, recipe, overrides)[0]


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


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description: the `# comment` on its line in the class source, else a Literal
    field's choices. Read from the source so the comments the code is maintained with are the
    only copy (a field without either has an empty description; tests require one)."""
    hints = _hints(cls)
    docs = {f.name: "" for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: choices only
        source = ""
    lines = source.splitlines(keepends=True)
    body = ast.parse(source).body[0].body if source else []  # type: ignore[attr-defined]
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in docs:
            text = "".join(lines[node.lineno - 1 : node.end_lineno])
            tokens = tokenize.generate_tokens(io.StringIO(text).readline)
            comments = [t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT]
            docs[node.target.id] = " ".join(comments)
    for name, tp in hints.items():
        choices = typing.get_origin(tp) is typing.Literal and _type_name(tp)
        if name in docs and choices and choices not in docs[name]:
            docs[name] = f"{choices}; {docs[name]}" if docs[name] else str(choices)
    return docs


def _defaults(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def describe_toml(cfg: Any, title: str = "") -> str:
    """Every key of `cfg` as commented TOML: `key = value  # meaning (default: d)`, the default
    shown where the value differs from it. `load_config` reads the text back to `cfg`."""

    def block(obj: Any, defaults: dict[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, Any]]]:
        docs, rows, tables = field_docs(type(obj)), [], []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                tables.append((f.name, value))
                continue
            note = docs[f.name]
            default = defaults.get(f.name, dataclasses.MISSING)
            if default is not dataclasses.MISSING and default != value and default is not None:
                note += f" (default: {_toml_value(default)})"
            line = f"{f.name} = {_toml_value(value)}" if value is not None else f"# {f.name} = (unset)"
            rows.append((line, note))
        return rows, tables

    def render(rows: list[tuple[str, str]]) -> list[str]:
        width = max((len(line) for line, _ in rows), default=0)
        return [f"{line.ljust(width)}  # {note}" if note else line for line, note in rows]

    defaults = _defaults(type(cfg))
    rows, tables = block(cfg, defaults)
    out = [f"# {line}" for line in title.splitlines()] + render(rows)
    for name, sub in tables:
        parent = defaults.get(name)
        sub_defaults = to_dict(parent) if dataclasses.is_dataclass(parent) else _defaults(type(sub))
        sub_rows, _ = block(sub, sub_defaults)
        out += ["", f"[{name}]", *render(sub_rows)]
    return "\n".join(out) + "\n"

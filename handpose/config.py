"""Frozen config dataclasses, built from TOML recipes plus `--key value` overrides.

One home for config parsing: `load_config` reads a recipe (tables become nested dataclasses,
`[augment]` -> `cfg.augment`), applies dotted overrides (`augment.rotate_deg=20`), rejects unknown
keys by name, and `to_toml` writes the resolved config back out. An error names where the value
came from: `--sigma` for a command-line value, `RECIPE: sigma` for the recipe's.

Each field declares itself once, with `setting(default, doc, ...)`: its meaning, simple bounds
(checked by `check_bounds` in `__post_init__`), and what a resumed training run may do with a
change (`resume=` how it takes effect, or `fixed=` what it would break). `--show-config`
(`describe_toml`), the resume rules (`resume.py`) and docs/train.md's table of keys
(`markdown_table`) are all read from these declarations.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from handpose.errors import ConfigError, HandposeError

T = TypeVar("T")


# What a refused resume change would break (a field's `fixed=`), as docs/train.md says it.
MODEL, DATA, STATE = "the model", "the data", "the saved optimizer, scheduler or loop state"


def setting(
    default: Any,
    doc: str,
    *,
    resume: str | None = None,
    fixed: str | None = None,
    fixed_values: tuple[Any, ...] = (),
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field that declares itself: its default and meaning (`doc`); what a resumed
    training run does when it changes (`resume`: how the change takes effect; `fixed`: why it is
    refused, MODEL / DATA / STATE; `fixed_values`: values it may not change to or from, where the
    rest may change); and simple bounds on a number, or on every item of a tuple of numbers
    (`ge` >=, `gt` >, `le` <=, `lt` <). Cross-field rules stay in the class's `__post_init__`."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"doc": doc, "resume": resume, "fixed": fixed, "fixed_values": fixed_values, "bounds": bounds}
    return dataclasses.field(default=default, metadata=meta)


def bounds_text(bounds: Mapping[str, float]) -> str:
    """`>= 0`, `> 0`, `in (0, 1)`, `in [0, 1)`: a field's bounds as its error and the docs say them."""
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    return f"{'<=' if hi and hi[0] == ']' else '<'} {hi[1]:g}" if hi else ""


def _within(value: float, bounds: Mapping[str, float]) -> bool:
    """Whether `value` keeps `bounds`; NaN never does (every comparison with it is false)."""
    checks = {"ge": value >= bounds.get("ge", -math.inf), "gt": value > bounds.get("gt", -math.inf)}
    checks |= {"le": value <= bounds.get("le", math.inf), "lt": value < bounds.get("lt", math.inf)}
    return all(checks[k] for k in bounds)


def check_bounds(obj: Any) -> None:
    """Every declared bound of a config dataclass instance; ConfigError names the first field out
    of bounds (what each class's `__post_init__` calls first)."""
    for f in dataclasses.fields(obj):
        bounds = f.metadata.get("bounds")
        if not bounds:
            continue
        value = getattr(obj, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if not _within(v, bounds):
                raise ConfigError(f.name, f"must be {bounds_text(bounds)}, got {v}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training-split augmentation; the same distributions drive the WDS and DALI loaders.

    Geometry: one matrix per sample (letterbox fit to the model size, then these), see geometry.py:
    an affine, or a homography when `perspective_deg` > 0. Flip mirrors the image and keeps joint
    identities (a hand has no left/right joint pairs), so a flipped right hand becomes a left hand:
    turn it on to train one model for both hands. Everything added after `occlude_size` is off by
    default, and while off draws no random numbers: recipes without it give the same batches.
    """

    enabled: bool = setting(True, "augment the training split at all")
    rotate_deg: float = setting(
        30.0, "uniform in [-r, r], clockwise on screen; 180 = any angle", ge=0, le=180
    )
    scale_min: float = setting(0.8, "uniform zoom factor on top of the letterbox fit", gt=0)
    scale_max: float = setting(1.2, "upper end of the zoom factor", gt=0)
    translate: float = setting(0.1, "shift, uniform in [-t, t] x the model size, per axis", ge=0)
    flip: bool = setting(False, "mirror with probability 0.5")
    brightness: float = setting(0.2, "factor uniform in [1 - b, 1 + b]", ge=0, lt=1)
    contrast: float = setting(0.2, "factor uniform in [1 - c, 1 + c] about mid-grey", ge=0, lt=1)
    saturation: float = setting(0.2, "factor uniform in [1 - s, 1 + s]", ge=0, lt=1)
    hue_deg: float = setting(10.0, "rotation uniform in [-h, h] degrees", ge=0)
    blur: float = setting(0.0, "probability of a Gaussian blur after the warp", ge=0, le=1)
    blur_sigma: float = setting(1.5, "its sigma, uniform in [0.3, blur_sigma] model-input px", ge=0.3)
    occlude: float = setting(0.0, "probability of one occluding rectangle of a random grey", ge=0, le=1)
    occlude_size: float = setting(
        0.4, "its sides, uniform in [0.1, occlude_size] x the model input size", ge=0.1, le=1
    )
    aspect: float = setting(
        0.0, "stretch x by sqrt(a), y by 1/sqrt(a); ln a uniform in [-ln(1 + r), ln(1 + r)]", ge=0
    )
    # steeper tilts than 45 deg bring the plane's horizon near the crop (the warp folds over there)
    perspective_deg: float = setting(
        0.0, "hand turned in depth: tilt uniform in [-p, p] deg about a random axis", ge=0, le=45
    )
    channel_gain: float = setting(
        0.0, "R, G, B gains each uniform in [1 - g, 1 + g] (white balance, skin tone)", ge=0, lt=1
    )
    grayscale: float = setting(
        0.0, "probability of dropping colour (saturation 0: YIQ luma only)", ge=0, le=1
    )
    occlude_patch: float = setting(
        0.0, "probability an occluder is a patch of the same crop from elsewhere, not grey", ge=0, le=1
    )

    def __post_init__(self) -> None:
        check_bounds(self)
        if not self.scale_min <= self.scale_max:
            raise ConfigError(
                ("scale_min", "scale_max"),
                f"must satisfy 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}",
            )


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """Detection training items: how photos are laid out on the model input, before the
    per-item augmentation ([augment]) moves the whole canvas. The rest of the time an item is one
    photo letterboxed into the input. Validation always shows each photo once, letterboxed.

    Each photo is letterboxed into a square of the canvas (`geometry.place_matrix`); squares never
    overlap, so the tiles add up to the canvas and every pixel outside the photos' hand boxes is
    a negative. The same draws drive the WDS and DALI kinds (`detect_data.sample_layout`).
    """

    mosaic: float = setting(
        0.0, "probability of a 2x2 mosaic of four photos around a random centre", ge=0, le=1
    )
    mosaic_centre: float = setting(
        0.3, "the centre is uniform in [c, 1 - c] x the input side, per axis", ge=0, le=0.5
    )
    mosaic_scale_min: float = setting(
        0.6, "each photo's square side: uniform in [min, 1] x its cell's shorter side", gt=0, le=1
    )
    canvas: float = setting(0.0, "probability of one photo placed small, at a random position", ge=0, le=1)
    canvas_scale_min: float = setting(
        0.25, "its square side: uniform in [min, max] x the input side", gt=0, le=1
    )
    canvas_scale_max: float = setting(0.75, "the upper end of that side", gt=0, le=1)

    def __post_init__(self) -> None:
        check_bounds(self)
        if not self.mosaic + self.canvas <= 1:
            raise ConfigError(("mosaic", "canvas"), f"add up to {self.mosaic + self.canvas}, more than 1")
        if not self.canvas_scale_min <= self.canvas_scale_max:
            raise ConfigError(
                ("canvas_scale_min", "canvas_scale_max"),
                f"must satisfy canvas_scale_min <= canvas_scale_max, got "
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
    """Each field's meaning, from its declaration (`setting`'s `doc`), a Literal field's choices
    in front ("unet | strided; ..."); empty for a field declared without one."""
    hints = _hints(cls)
    docs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        doc = f.metadata.get("doc", "")
        choices = typing.get_origin(hints[f.name]) is typing.Literal and _type_name(hints[f.name])
        docs[f.name] = f"{choices}; {doc}" if choices and doc else choices or doc
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


def resume_rule(f: dataclasses.Field) -> str:
    """What a resumed training run does when the field `f` changes, as its declaration says:
    "may change: how the change takes effect", or "refused: it would not fit what it breaks"."""
    if f.metadata.get("fixed"):
        return f"refused: it would not fit {f.metadata['fixed']}"
    if not f.metadata.get("resume"):
        return ""
    rule = f"may change: {f.metadata['resume']}"
    values = f.metadata.get("fixed_values")
    if values:
        rule += f"; not to or from {' or '.join(str(v) for v in values)}"
    return rule


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(cls: type) -> str:
    """Every key of the config dataclass `cls` as a Markdown table (key, default, meaning with its
    bounds, what a resumed run does with a change), read from the fields' declarations; a table
    field (`augment`) gives one row per key of its own, with the table's resume rule. docs/train.md
    holds this text for TrainConfig (tools/config_table.py writes it; a test keeps it equal)."""
    rows = ["| key | default | meaning | on resume |", "|---|---|---|---|"]
    defaults = _defaults(cls)

    def add(prefix: str, owner: type, values: Mapping[str, Any], rule: str | None) -> None:
        docs = field_docs(owner)
        for f in dataclasses.fields(owner):  # type: ignore[arg-type]
            value = values[f.name]
            if dataclasses.is_dataclass(value):
                add(f"{prefix}{f.name}.", type(value), to_dict(value), resume_rule(f))
                continue
            meaning = docs[f.name]
            bounds = bounds_text(f.metadata.get("bounds", {}))
            if bounds:
                meaning += f" ({'each ' if isinstance(value, tuple) else ''}{bounds})"
            shown = "(unset)" if value is None else _toml_value(value)
            cells = (
                f"`{prefix}{f.name}`",
                f"`{shown}`",
                meaning,
                rule if rule is not None else resume_rule(f),
            )
            rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")

    add("", cls, defaults, None)
    return "\n".join(rows) + "\n"

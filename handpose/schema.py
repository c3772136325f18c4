"""Tiny JSON checks: each builds a `Check`, a pure function (value, key path) -> problem lines.

A problem line names the key path and says what was expected and what was found, e.g.
`shards[3].samples: expected an integer >= 0, got "many"`. Checks compose (`table`, `items`,
`vector`, `nullable`), so a file's whole schema is one declaration (see `shards.MANIFEST_SCHEMA`)
and every problem is reported, not only the first. Keys a table does not declare are allowed:
newer writers may add information older readers do not use.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any, str], list[str]]


def show(value: Any, limit: int = 40) -> str:
    """A found value as JSON, shortened: what a problem line quotes."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def join(at: str, key: str | int) -> str:
    """The key path of `key` inside `at` (`shards[3]`, `stats.mean`)."""
    if isinstance(key, int):
        return f"{at}[{key}]"
    return f"{at}.{key}" if at else key


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int = 0) -> Check:
    """An integer >= `minimum` (a JSON boolean is not one)."""

    def check(value: Any, at: str) -> list[str]:
        if _is_int(value) and value >= minimum:
            return []
        return [f"{at}: expected an integer >= {minimum}, got {show(value)}"]

    return check


def number(minimum: float = -math.inf, maximum: float = math.inf, *, positive: bool = False) -> Check:
    """A finite number in [minimum, maximum]; `positive` also refuses 0 and below."""
    bounds = "a finite number" + (" > 0" if positive else "")
    if minimum > -math.inf or maximum < math.inf:
        bounds += f" in [{minimum:g}, {maximum:g}]"

    def check(value: Any, at: str) -> list[str]:
        if _is_number(value) and minimum <= value <= maximum and (value > 0 or not positive):
            return []
        return [f"{at}: expected {bounds}, got {show(value)}"]

    return check


def text(pattern: str | None = None, what: str = "a string") -> Check:
    """A string, matching `pattern` in full when given (`what` says it in words)."""
    regex = re.compile(pattern) if pattern is not None else None

    def check(value: Any, at: str) -> list[str]:
        if isinstance(value, str) and (regex is None or regex.fullmatch(value)):
            return []
        return [f"{at}: expected {what}, got {show(value)}"]

    return check


def one_of(*choices: Any) -> Check:
    def check(value: Any, at: str) -> list[str]:
        if value in choices:
            return []
        return [f"{at}: expected one of {', '.join(show(c) for c in choices)}, got {show(value)}"]

    return check


def nullable(inner: Check) -> Check:
    """`inner`, or null."""

    def check(value: Any, at: str) -> list[str]:
        return [] if value is None else inner(value, at)

    return check


def items(item: Check) -> Check:
    """A list of any length, each element checked by `item`."""

    def check(value: Any, at: str) -> list[str]:
        if not isinstance(value, list):
            return [f"{at}: expected a list, got {show(value)}"]
        return [p for i, v in enumerate(value) for p in item(v, join(at, i))]

    return check


def vector(n: int, item: Check, what: str = "") -> Check:
    """A list of exactly `n` elements, each checked by `item` (`what` names them: "numbers")."""

    def check(value: Any, at: str) -> list[str]:
        if not isinstance(value, list) or len(value) != n:
            return [f"{at}: expected a list of {n}{' ' + what if what else ''}, got {show(value)}"]
        return [p for i, v in enumerate(value) for p in item(v, join(at, i))]

    return check


def table(
    required: Mapping[str, Check], optional: Mapping[str, Check] | None = None, *, values: Check | None = None
) -> Check:
    """A JSON object: `required` keys must be present, `optional` ones are checked when present,
    and `values` (if given) checks the value of every key (e.g. the counts per split)."""

    def check(value: Any, at: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{at or 'manifest'}: expected a JSON object, got {show(value)}"]
        problems = [f"{join(at, k)}: missing" for k in required if k not in value]
        for k, inner in {**required, **(optional or {})}.items():
            if k in value:
                problems += inner(value[k], join(at, k))
        if values is not None:
            problems += [p for k, v in value.items() for p in values(v, join(at, k))]
        return problems

    return check

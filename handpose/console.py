"""Terminal output: every rich Console in handpose comes from `make_console`.

Text is printed as given. Rich's markup would read the `[v2]` of a path `data[v2]` as a style
(and print `data`), and raise on a `[/]`; its highlighter recolours numbers and paths; and it
wraps long lines at the terminal width (80 columns when output is a file), splitting a path or
an error line in two. Styles, where wanted, go in as `rich.text.Text` spans, never as markup.
"""

from __future__ import annotations

from rich.console import Console


def make_console(*, stderr: bool = False, quiet: bool = False) -> Console:
    """A Console that prints strings literally (no markup, no highlighting) and never wraps them."""
    return Console(stderr=stderr, quiet=quiet, markup=False, highlight=False, soft_wrap=True)

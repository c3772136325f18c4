"""The one user-facing exception: the CLI turns it into a clean message and exit code 1."""

from __future__ import annotations


class HandposeError(Exception):
    """A problem with the user's data, files or options (never a bug in handpose).

    The message must name the file, sample or field at fault.
    """


class ConfigError(HandposeError):
    """A config value at fault, by its dotted key (`augment.scale_min`).

    `config.load_config` re-raises it naming where the value came from: the command-line flag
    (`--sigma`), the recipe file and key, or the default. `keys` lists every field the problem
    involves (e.g. image_size and depth); the first one given explicitly is the one named.
    """

    def __init__(self, keys: str | tuple[str, ...], problem: str):
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)
        self.problem = problem
        super().__init__(f"{self.keys[0]}: {problem}")

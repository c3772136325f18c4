"""The one user-facing exception: the CLI turns it into a clean message and exit code 1."""


class HandposeError(Exception):
    """A problem with the user's data, files or options (never a bug in handpose).

    The message must name the file, sample or field at fault.
    """

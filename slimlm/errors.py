"""The one exception type that the CLI turns into a clear one-line message."""


class SlimlmError(Exception):
    """A problem with the user's input or environment: printed as one line, no traceback."""

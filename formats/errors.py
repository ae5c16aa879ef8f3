"""The one exception type user-facing code raises; CLIs print it as a single line."""


class LlamafuseError(Exception):
    """A problem with the user's input (files, flags, data), worded for the user."""

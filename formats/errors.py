"""The one exception type user-facing code raises; CLIs print it as a single line."""


class LlamafuseError(Exception):
    """A problem with the user's input (files, flags, data), worded for the user."""


def one_line(e: BaseException) -> str:
    """An exception from a library as one short line: its type and the first line of its text."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__

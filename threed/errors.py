"""The one exception type the CLI turns into a one-line message (no traceback)."""


class UserError(Exception):
    """Bad input or environment the user can fix; the message names the problem and the fix."""


class Diverged(UserError):
    """The optimisation broke down (a non-finite loss, a surface that vanished): the run stops, keeping its last
    good checkpoint."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type name): wrapped libraries' errors often span
    many lines, and a UserError is one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

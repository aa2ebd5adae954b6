"""The one exception type the CLI turns into a one-line message (no traceback)."""


class UserError(Exception):
    """Bad input or environment the user can fix; the message names the problem and the fix."""

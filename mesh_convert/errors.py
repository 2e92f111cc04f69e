"""The one exception type that reaches users as a one-line message (see `cli.main`), and the cut
of other errors to one line for such messages."""


class UserError(Exception):
    """A problem with the user's input or environment: shown as one line, exit code 1.

    Anything else escaping a command is a bug and is reported as such (with --debug, in full).
    """

    exit_code = 1


class Interrupted(UserError):
    """A stop signal that came too late to stop the work: the message says what was done."""

    exit_code = 130


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

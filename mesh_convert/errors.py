"""The one exception type that reaches users as a one-line message (see `cli.main`)."""


class UserError(Exception):
    """A problem with the user's input or environment: shown as one line, exit code 1.

    Anything else escaping a command is a bug and is reported as such (with --debug, in full).
    """

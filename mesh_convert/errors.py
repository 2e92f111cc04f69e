"""The one exception type that reaches users as a one-line message (see `cli.main`), the cut
of other errors to one line for such messages, and the output-directory check every command shares."""

from pathlib import Path


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


def check_output_directory(path: str | Path, what: str = "--output") -> None:
    """Refuse an output directory that cannot be one (it, or a folder above it, is a file),
    before any work whose results would then have nowhere to go."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                named = "is a file" if candidate == path else f"is inside {candidate}, which is a file"
                raise UserError(f"{what} {path} {named}: give a directory")
            return

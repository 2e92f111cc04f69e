"""The one exception type that reaches users as a one-line message (see `cli.main`), the cut of
other errors to one line for such messages, the one table that turns the Hugging Face Hub's
errors (downloads and uploads) into such lines, without ever showing a token, and what makes text
from elsewhere (a folder's name, a value in a checkpoint) safe to show in them and in any output.

Light to import: huggingface_hub's error classes load when a Hub error is being explained, rich's
markup when text is shown through it."""

from __future__ import annotations

import re
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_HF_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")  # scheme://user:password@host


class UserError(Exception):
    """A problem with the user's input or environment: shown as one line, exit code 1.

    Anything else escaping a command is a bug and is reported as such (with --debug, in full).
    """

    exit_code = 1


class Interrupted(UserError):
    """A stop signal that came too late to stop the work: the message says what was done."""

    exit_code = 130


def is_our_fault(error: BaseException) -> bool:
    """Whether `error` arose in this package's own code below the frame that caught it: a bug of
    ours, which must reach the user as one (`internal error`, the real frame under --debug), not
    as a mistake of theirs. Where a library fails on what the user gave it, no frame of ours is
    involved, except the configuration's ValueErrors, which are its checks of a user's config."""
    frame = error.__traceback__.tb_next if error.__traceback__ is not None else None
    while frame is not None:
        file = Path(frame.tb_frame.f_code.co_filename)
        if file.is_relative_to(_PACKAGE) and not (file.name == "configuration_mesh.py" and isinstance(error, ValueError)):
            return True
        frame = frame.tb_next
    return False


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def unpickling_refusal(error: BaseException) -> str:
    """Why a weights-only load failed, in one line: for torch's refusal, whose first line is
    advice, the line that names what it refused (e.g. "unsupported GLOBAL posix.system")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Weights only load failed"):
        return lines[1].removeprefix("WeightsUnpickler error: ").rstrip(".")
    return first_line(error)


# ----------------------------------------------------------------------------- the Hub's errors


def scrub(text: str, token: str | None) -> str:
    """`text` without the token or anything shaped like one (servers may echo request headers),
    and without credentials written into a URL (an HF_ENDPOINT of `https://user:password@host`)."""
    if token:
        text = text.replace(token, "***")
    text = _BEARER.sub(r"\1***", text)
    text = _URL_CREDENTIALS.sub(r"\1***@", text)
    return _HF_TOKEN_LIKE.sub("***", text)


def error_line(error: BaseException, token: str | None = None) -> str:
    """An error's first line, safe to show: a server may echo the request's token back in it."""
    return scrub(first_line(error), token)


def _server_detail(error, token: str | None) -> str:
    """The server's own explanation, first line only, kept short (scrubbed before it is cut, so
    that no fragment of a token survives the cut)."""
    message = scrub(getattr(error, "server_message", None) or "", token).strip()
    return message.splitlines()[0][:200] if message else ""


def http_error_message(error, repo_id: str, endpoint: str, token: str | None = None) -> str:
    """One line for an HTTP error from the Hub during an upload, by status code."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    detail = _server_detail(error, token)
    suffix = f" ({detail})" if detail else ""
    if status == 401:
        return (
            f"the Hub at {endpoint} refused the token (401 Unauthorized){suffix}: "
            "run `hf auth login` or set HF_TOKEN to a valid token"
        )
    if status == 403:
        return (
            f"the Hub refused the upload to {repo_id} (403 Forbidden){suffix}: "
            "the token needs write access to this namespace"
        )
    if status == 404:
        return f"repository {repo_id} or its branch was not found on {endpoint} (404 Not Found){suffix}"
    return _answered(error, endpoint, token, f"pushing to {repo_id}")


def _answered(error, endpoint: str, token: str | None, doing: str) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    reason = getattr(response, "reason_phrase", "") or "error"
    shown = f"{status} {reason}" if status else "HTTP error"
    detail = _server_detail(error, token)
    return f"the Hub at {endpoint} answered {shown} while {doing}" + (f" ({detail})" if detail else "")


def hub_error(
    error: BaseException,
    repo_id: str,
    endpoint: str,
    token: str | None = None,
    *,
    fetching: bool = False,
    revision: str | None = None,
    upload_wait: float | None = None,
) -> UserError | None:
    """A `UserError` for a Hub failure a user can cause or fix while pushing (or, with `fetching`,
    downloading) `repo_id`; None for anything else (a bug). huggingface_hub wraps some failures
    (an LFS upload's in a RuntimeError), so the chain of causes is searched too. `upload_wait`:
    how long a push waited for the answer to its upload (longer than for other requests)."""
    seen = error
    while seen is not None:
        message = _fetch_message(seen, repo_id, endpoint, revision) if fetching else None
        message = message or _message(seen, repo_id, endpoint, token, fetching, upload_wait)
        if message is not None:
            return UserError(scrub(message, token))
        seen = seen.__cause__
    return None


def _fetch_message(error: BaseException, repo_id: str, endpoint: str, revision: str | None) -> str | None:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # The most specific classes first: huggingface_hub derives them from each other (a missing
    # file found neither online nor in the cache is a LocalEntryNotFoundError, which is also an
    # EntryNotFoundError, and a gated repo's error is a RepositoryNotFoundError).
    if isinstance(error, LocalEntryNotFoundError):
        cause = error.__cause__
        why = _message(cause, repo_id, endpoint, None, fetching=True) if cause is not None else None
        return f"{why or f'cannot reach the Hub at {endpoint} to fetch {repo_id}'} (and it is not in the local cache)"
    if isinstance(error, RevisionNotFoundError):
        return f"revision {revision} not found in {repo_id}"
    if isinstance(error, GatedRepoError):
        return f"{repo_id} is gated: accept its terms on the Hub and log in (hf auth login)"
    if isinstance(error, RepositoryNotFoundError):
        return f"no model {repo_id} on the Hub (or it is private and you are not logged in)"
    if isinstance(error, EntryNotFoundError):
        return f"{repo_id} has no such file"
    if isinstance(error, OfflineModeIsEnabled):
        return f"cannot fetch {repo_id}: offline mode is on (HF_HUB_OFFLINE)"
    return None


def _httpx():
    """The HTTP library huggingface_hub talks through: `httpx2` from 2.x on, `httpx` before."""
    try:
        import httpx2
    except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
        import httpx

        return httpx
    return httpx2


def hub_unreachable(error: BaseException) -> bool:
    """Whether `error` says that the Hub gave no answer about the repository: offline mode, no
    connection or no answer in time, or the Hub failing (a server error, too many requests).
    An answer about the repository itself (not found, gated, no such revision, a bad token) is not
    this, and must not be hidden behind a cached copy."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, (OfflineModeIsEnabled, _httpx().TransportError)):
        return True
    status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(error, HfHubHTTPError) and isinstance(status, int) and (status >= 500 or status in (408, 429))


def _message(
    error: BaseException, repo_id: str, endpoint: str, token: str | None, fetching: bool, upload_wait: float | None = None
) -> str | None:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    httpx = _httpx()
    doing = f"fetching {repo_id}" if fetching else f"pushing to {repo_id}"
    if isinstance(error, UnicodeEncodeError):  # HTTP headers are Latin-1 at most; tokens are ASCII
        return "the Hugging Face token has characters that are not ASCII: check HF_TOKEN or run `hf auth login`"
    if isinstance(error, HfHubHTTPError):
        return _answered(error, endpoint, token, doing) if fetching else http_error_message(error, repo_id, endpoint, token)
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it to push to the Hub"
    if isinstance(error, httpx.TimeoutException):
        if fetching:
            settings = (f"HF_HUB_DOWNLOAD_TIMEOUT={constants.HF_HUB_DOWNLOAD_TIMEOUT} s, "
                        f"HF_HUB_ETAG_TIMEOUT={constants.HF_HUB_ETAG_TIMEOUT} s")
            advice = "raise them for a slow connection"
        else:
            settings = f"HF_HUB_DOWNLOAD_TIMEOUT={constants.HF_HUB_DOWNLOAD_TIMEOUT} s a request"
            advice = "raise HF_HUB_DOWNLOAD_TIMEOUT for a slow connection"
            if upload_wait is not None:
                settings += f", {upload_wait:g} s for the upload's answer"
                advice += f" (above {upload_wait:g} s to lengthen the upload's wait)"
        return f"the Hub at {endpoint} did not answer in time while {doing} ({settings}): check the network, or {advice}"
    if isinstance(error, (httpx.RequestError, ConnectionError)):
        return f"cannot reach the Hub at {endpoint} ({first_line(error)}): check the network or HF_ENDPOINT"
    if fetching and isinstance(error, OSError):
        return f"cannot fetch {repo_id}: {first_line(error)}"
    if not fetching and isinstance(error, ValueError):
        # huggingface_hub raises ValueError for content the Hub rejects (README metadata, LFS batch).
        return f"the Hub rejected the upload to {repo_id}: {first_line(error)}"
    return None


# ----------------------------------------------------------------------------- text from elsewhere

# A folder's name, a tensor's name in a safetensors header, a value in a config: any may hold
# control characters. Printed as they are, an escape sequence can retitle the terminal, move the
# cursor, rewrite what was printed before or hide what follows, and a newline can forge a line of
# our output.


def printable(value: object) -> str:
    """`value` as text, each character that is not printable (control and format characters such
    as ESC or a right-to-left override, line and paragraph separators, spaces other than ' ')
    written as Python writes it in a string's repr: `\\x1b`, `\\n`, `\\u202e`."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)


def shown(value: object) -> str:
    """`printable(value)` with rich's markup escaped, for `Console.print` and rich tables (where a
    `[link=...]` in a name would otherwise become a hyperlink)."""
    from rich.markup import escape

    return escape(printable(value))

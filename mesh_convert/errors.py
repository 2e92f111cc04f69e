"""The one exception type that reaches users as a one-line message (see `cli.main`), the cut of
other errors to one line for such messages, and the one table that turns the Hugging Face Hub's
errors (downloads and uploads) into such lines, without ever showing a token."""

from __future__ import annotations

import re

_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_HF_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")


class UserError(Exception):
    """A problem with the user's input or environment: shown as one line, exit code 1.

    Anything else escaping a command is a bug and is reported as such (with --debug, in full).
    """


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- the Hub's errors


def scrub(text: str, token: str | None) -> str:
    """`text` without the token or anything shaped like one (servers may echo request headers)."""
    if token:
        text = text.replace(token, "***")
    text = _BEARER.sub(r"\1***", text)
    return _HF_TOKEN_LIKE.sub("***", text)


def _server_detail(error, token: str | None) -> str:
    """The server's own explanation, first line only, kept short (scrubbed before it is cut, so
    that no fragment of a token survives the cut)."""
    message = scrub(getattr(error, "server_message", None) or "", token).strip()
    return message.splitlines()[0][:200] if message else ""


def http_error_message(error, repo_id: str, endpoint: str, token: str | None = None) -> str:
    """One line for an HTTP error from the Hub, by status code."""
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
    reason = getattr(response, "reason_phrase", "") or "error"
    shown = f"{status} {reason}" if status else "HTTP error"
    return f"the Hub at {endpoint} answered {shown} while pushing to {repo_id}{suffix}"


def error_line(error: BaseException, token: str | None = None) -> str:
    """An error's first line, safe to show: a server may echo the request's token back in it."""
    return scrub(first_line(error), token)


def _download_messages() -> dict:
    """What went wrong fetching `{repo}`, by huggingface_hub's exception type (most specific first)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    return {
        RevisionNotFoundError: "revision {revision} not found in {repo}",
        GatedRepoError: "{repo} is gated: accept its terms on the Hub and log in (hf auth login)",
        RepositoryNotFoundError: "no model {repo} on the Hub (or it is private and you are not logged in)",
        EntryNotFoundError: "{repo} has no such file",
        OfflineModeIsEnabled: "cannot fetch {repo}: offline mode is on (HF_HUB_OFFLINE)",
        LocalEntryNotFoundError: "cannot reach the Hub to fetch {repo} (no network, and not in the local cache)",
        HfHubHTTPError: "the Hub refused {repo}: {error}",
        ConnectionError: "cannot reach the Hub to fetch {repo}: {error}",
        OSError: "cannot reach the Hub to fetch {repo}: {error}",
    }


def _network_errors() -> tuple[type[BaseException], ...]:
    try:  # huggingface_hub 2.x talks through `httpx2`; older releases used `httpx`.
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
        import httpx
    return (httpx.RequestError, ConnectionError)


def hub_error(
    error: BaseException,
    repo: str,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    uploading: bool = False,
) -> UserError | None:
    """A `UserError` for a failed Hub call about `repo` that the user can cause or fix, None for
    anything else (a bug). Downloads are told apart by exception type, uploads by HTTP status."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if not uploading:
        for kind, message in _download_messages().items():
            if isinstance(error, kind):
                return UserError(scrub(message.format(repo=repo, revision=revision, error=error_line(error, token)), token))
        return None
    if isinstance(error, HfHubHTTPError):
        message = http_error_message(error, repo, endpoint, token)
    elif isinstance(error, OfflineModeIsEnabled):
        message = "HF_HUB_OFFLINE is set: unset it to push to the Hub"
    elif isinstance(error, _network_errors()):
        message = f"cannot reach the Hub at {endpoint} ({first_line(error)}): check the network or HF_ENDPOINT"
    elif isinstance(error, ValueError):
        # huggingface_hub raises ValueError for content the Hub rejects (README metadata, LFS batch).
        message = f"the Hub rejected the upload to {repo}: {first_line(error)}"
    else:
        return None
    return UserError(scrub(message, token))

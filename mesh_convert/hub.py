"""Publishing a converted model to the Hugging Face Hub, and the one-line messages for what can
go wrong talking to the Hub (also when a source checkpoint is downloaded, see `checkpoint.py`).

`push_to_hub` uploads a converted model's directory as it is (weights, config, the remote-code
`.py` files, tokenizer, README.md, conversion.json) in one commit. Whatever goes wrong, the user
gets one `UserError` line and the local directory is left as it was; the token is never
printed, not even inside a server's error message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, validate_repo_id

from .card import write_model_card
from .errors import UserError, first_line

try:  # huggingface_hub 2.x talks through `httpx2`; older releases used `httpx`.
    import httpx2 as _httpx
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _httpx

DEFAULT_BRANCH = constants.DEFAULT_REVISION  # "main"
DEFAULT_COMMIT_MESSAGE = "Upload MeSH model converted with mesh-convert"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
# Local clutter that is never part of a model (huggingface_hub already skips .git and its cache).
IGNORE_PATTERNS = ["__pycache__", "__pycache__/*", "**/__pycache__/**", "*.pyc"]

_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_HF_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{8,}")


# ----------------------------------------------------------------------------- checks


def check_model_folder(folder: Path) -> None:
    """Refuse folders that are not a converted model, before anything touches the network."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a directory")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a converted model: config.json is missing")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"{folder} is not a converted model: no weights (*.safetensors or pytorch_model*.bin)")


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"invalid repository id {repo_id!r}: expected NAME or NAMESPACE/NAME "
            "(letters, digits, '-', '_', '.'; at most 96 characters)"
        ) from None


def resolve_token(token: str | None) -> str:
    """The explicit token, else what huggingface_hub finds (HF_TOKEN, then the login cache)."""
    token = token or huggingface_hub.get_token()
    if not token:
        raise UserError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN")
    return token


def resolve_endpoint() -> str:
    """HF_ENDPOINT as it is now: huggingface_hub reads it only once, at import time."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


@contextmanager
def hub_endpoint(endpoint: str) -> Iterator[None]:
    """Make huggingface_hub's import-time default agree with `endpoint` while pushing.

    `HfApi(endpoint=...)` is not passed everywhere inside huggingface_hub: some paths build a
    `RepoUrl` from `constants.ENDPOINT` (e.g. `create_repo(exist_ok=True)` on a 403 for a repo
    that exists) and then fail to parse a URL on any other host.
    """
    saved = constants.ENDPOINT
    constants.ENDPOINT = endpoint
    try:
        yield
    finally:
        constants.ENDPOINT = saved


def load_conversion_info(folder: Path) -> dict | None:
    path = folder / "conversion.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if not isinstance(info, dict):
        raise UserError(f"cannot read {path}: expected a JSON object")
    return info


# ----------------------------------------------------------------------------- error messages


def scrub(text: str, token: str | None) -> str:
    """`text` without the token or anything shaped like one (servers may echo request headers)."""
    if token:
        text = text.replace(token, "***")
    text = _BEARER.sub(r"\1***", text)
    return _HF_TOKEN_LIKE.sub("***", text)


def _server_detail(error: HfHubHTTPError, token: str | None) -> str:
    """The server's own explanation, first line only, kept short (scrubbed before it is cut, so
    that no fragment of a token survives the cut)."""
    message = scrub(getattr(error, "server_message", None) or "", token).strip()
    return message.splitlines()[0][:200] if message else ""


def http_error_message(error: HfHubHTTPError, repo_id: str, endpoint: str, token: str | None = None) -> str:
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
    return _answered(error, endpoint, token, f"pushing to {repo_id}")


def _answered(error: HfHubHTTPError, endpoint: str, token: str | None, doing: str) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    reason = getattr(response, "reason_phrase", "") or "error"
    shown = f"{status} {reason}" if status else "HTTP error"
    detail = _server_detail(error, token)
    return f"the Hub at {endpoint} answered {shown} while {doing}" + (f" ({detail})" if detail else "")


def error_line(error: BaseException, token: str | None = None) -> str:
    """An error's first line, safe to show: a server may echo the request's token back in it."""
    return scrub(first_line(error), token)


def to_user_error(
    error: BaseException,
    repo_id: str,
    endpoint: str,
    token: str | None = None,
    *,
    fetching: bool = False,
    revision: str | None = None,
) -> UserError | None:
    """A `UserError` for a Hub failure a user can cause or fix while pushing (or, with `fetching`,
    downloading) `repo_id`; None for anything else (a bug). huggingface_hub wraps some failures
    (an LFS upload's in a RuntimeError), so the chain of causes is searched too."""
    seen = error
    while seen is not None:
        message = _fetch_message(seen, repo_id, endpoint, revision) if fetching else None
        message = message or _message(seen, repo_id, endpoint, token, fetching)
        if message is not None:
            return UserError(scrub(message, token))
        seen = seen.__cause__
    return None


def _fetch_message(error: BaseException, repo_id: str, endpoint: str, revision: str | None) -> str | None:
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


def _message(error: BaseException, repo_id: str, endpoint: str, token: str | None, fetching: bool) -> str | None:
    doing = f"fetching {repo_id}" if fetching else f"pushing to {repo_id}"
    if isinstance(error, UnicodeEncodeError):  # HTTP headers are Latin-1 at most; tokens are ASCII
        return "the Hugging Face token has characters that are not ASCII: check HF_TOKEN or run `hf auth login`"
    if isinstance(error, HfHubHTTPError):
        return _answered(error, endpoint, token, doing) if fetching else http_error_message(error, repo_id, endpoint, token)
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it to push to the Hub"
    if isinstance(error, _httpx.TimeoutException):
        return (
            f"the Hub at {endpoint} did not answer in time while {doing} (HF_HUB_DOWNLOAD_TIMEOUT="
            f"{constants.HF_HUB_DOWNLOAD_TIMEOUT} s, HF_HUB_ETAG_TIMEOUT={constants.HF_HUB_ETAG_TIMEOUT} s): "
            "check the network, or raise them for a slow connection"
        )
    if isinstance(error, (_httpx.RequestError, ConnectionError)):
        return f"cannot reach the Hub at {endpoint} ({first_line(error)}): check the network or HF_ENDPOINT"
    if fetching and isinstance(error, OSError):
        return f"cannot fetch {repo_id}: {first_line(error)}"
    if not fetching and isinstance(error, ValueError):
        # huggingface_hub raises ValueError for content the Hub rejects (README metadata, LFS batch).
        return f"the Hub rejected the upload to {repo_id}: {first_line(error)}"
    return None


@contextmanager
def hub_timeout() -> Iterator[None]:
    """Requests to the Hub time out after HF_HUB_DOWNLOAD_TIMEOUT seconds without an answer.

    huggingface_hub's shared HTTP client has no timeout of its own, and only downloads pass one:
    API calls (creating a repo, listing files, committing) would wait forever on a server that
    accepts the connection and never answers. For the duration, the shared client (whatever
    factory made it, so a user's proxy settings stay) gets a timeout; its own comes back afterwards.
    """
    client = get_session()
    previous = client.timeout
    client.timeout = _httpx.Timeout(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    try:
        yield
    finally:
        client.timeout = previous


# ----------------------------------------------------------------------------- pushing


def repo_url(endpoint: str, repo_id: str, revision: str | None) -> str:
    url = f"{endpoint}/{repo_id}"
    return f"{url}/tree/{revision}" if revision and revision != DEFAULT_BRANCH else url


def _upload(
    api: HfApi,
    folder: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str,
    info: dict | None,
) -> str:
    """The network part: create the repo (and branch), then upload the folder in one commit.
    Returns the full repo id, which the Hub completes with the user's namespace if it was left out."""
    # private=None, not False, so that a namespace whose default is private keeps that default.
    created = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    full_id = getattr(created, "repo_id", None) or repo_id
    if revision and revision != DEFAULT_BRANCH:
        api.create_branch(full_id, branch=revision, exist_ok=True)

    # A folder converted without a card (or whose card was deleted) gets one, but only for as long
    # as the upload runs unless it succeeds: a failed push leaves the folder exactly as it was.
    card_path = folder / "README.md"
    wrote_card = info is not None and not card_path.exists()
    if wrote_card:
        try:
            write_model_card(folder, info, repo_id=full_id)
        except OSError as error:
            with suppress(OSError):  # a partly written card, where the folder let us start one
                card_path.unlink(missing_ok=True)
            raise UserError(
                f"README.md is missing and cannot be written into {folder} ({error.strerror or error}): "
                "make the folder writable or add a model card"
            ) from None
    try:
        api.upload_folder(
            repo_id=full_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    except BaseException:
        if wrote_card:
            card_path.unlink(missing_ok=True)
        raise
    return full_id


@dataclass(frozen=True)
class PushResult:
    url: str
    repo_id: str  # complete, with the namespace the Hub filled in when it was left out
    revision: str


def push_folder(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> PushResult:
    """`push_to_hub`, returning the full repo id and branch along with the URL."""
    folder = Path(folder)
    check_model_folder(folder)
    check_repo_id(repo_id)
    info = load_conversion_info(folder)
    token = resolve_token(token)
    endpoint = resolve_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        with hub_endpoint(endpoint), hub_timeout():
            full_id = _upload(api, folder, repo_id, private, revision, commit_message or DEFAULT_COMMIT_MESSAGE, info)
    except Exception as error:
        user_error = to_user_error(error, repo_id, endpoint, token)
        if user_error is not None:
            raise user_error from None
        if token in str(error):  # a bug, reported as such, but still without the token
            raise RuntimeError(scrub(f"{type(error).__name__}: {error}", token)) from None
        raise
    return PushResult(repo_url(endpoint, full_id, revision), full_id, revision or DEFAULT_BRANCH)


def push_to_hub(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload the converted model in `folder` to the Hub repo `repo_id` and return its URL.

    The repo is created if needed (private if asked; an existing repo keeps its visibility), and
    so is the branch `revision`. The token is `token`, else HF_TOKEN, else the `hf auth login`
    cache; the endpoint is HF_ENDPOINT as set when this is called. If the folder has a
    conversion.json but no README.md, the model card is generated and uploaded too (and kept
    locally only if the push succeeds). Every failure is a one-line `UserError`.
    """
    return push_folder(folder, repo_id, private, revision, commit_message, token).url

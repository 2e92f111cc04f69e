"""Publishing a converted model to the Hugging Face Hub (the one-line messages for what can go
wrong talking to the Hub, here and when a source checkpoint is downloaded, are `errors.hub_error`).

`push_to_hub` uploads a converted model's directory (weights, config, the remote-code `.py`
files, tokenizer, README.md, conversion.json) in one commit, as it is, except that config.json,
conversion.json and the card are published without local paths even where an older converter
wrote them there. Whatever goes wrong, the user gets one `UserError` line and the local directory is left as
it was; the token is never printed, not even inside a server's error message.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..convert.record import FILENAME, ConversionRecord, published_config
from ..convert.card import write_model_card
from ..errors import UserError, hub_error, scrub
from ..io import hub_timeout, resolve_endpoint, upload_answer_timeout

DEFAULT_BRANCH = constants.DEFAULT_REVISION  # "main"
DEFAULT_COMMIT_MESSAGE = "Upload MeSH model converted with mesh-convert"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
# Local clutter that is never part of a model (huggingface_hub already skips .git and its cache).
IGNORE_PATTERNS = ["__pycache__", "__pycache__/*", "**/__pycache__/**", "*.pyc"]


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


# ----------------------------------------------------------------------------- what is published


def published_metadata(folder: Path, record: ConversionRecord | None) -> dict[str, str]:
    """The metadata files whose published text differs from the folder's: conversion.json,
    config.json and a model card written before local paths were cut on writing still hold them."""
    changed = {}
    published_record = record.published() if record is not None else None
    if published_record != record:
        changed[FILENAME] = published_record.to_json()
        card_path = folder / "README.md"
        if card_path.is_file():
            card = published_card = card_path.read_text(encoding="utf-8")
            for local, cut in sorted(record.local_texts().items(), key=lambda pair: -len(pair[0])):
                published_card = published_card.replace(local, cut)
            if published_card != card:
                changed["README.md"] = published_card
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {folder / 'config.json'}: {str(error).splitlines()[0]}") from None
    published = published_config(config) if isinstance(config, dict) else config
    if published != config:
        changed["config.json"] = json.dumps(published, indent=2, sort_keys=True) + "\n"
    return changed


def _never_uploaded(directory: str, name: str) -> bool:
    """Folders huggingface_hub never uploads (.git, .cache/huggingface), and Python's caches."""
    return name in (".git", "__pycache__") or (name == "huggingface" and Path(directory).name == ".cache")


def link(source: Path, target: Path) -> None:
    """`target` as `source`'s file without copying it where the system allows (a symbolic link,
    else a hard link), else as a copy."""
    for make in (lambda: target.symlink_to(source.resolve()), lambda: os.link(source, target)):
        try:
            return make()
        except OSError:
            continue
    shutil.copy2(source, target)


@contextmanager
def staged(folder: Path, changed: dict[str, str]) -> Iterator[Path]:
    """The folder to upload: `folder` itself, or, where some files are published in another form,
    a temporary mirror that holds those and links to every other file (`folder` is not touched)."""
    if not changed:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="mesh-convert-push-") as staging:
        try:
            for directory, subdirs, files in os.walk(folder):
                subdirs[:] = [d for d in subdirs if not _never_uploaded(directory, d)]
                for name in files:
                    source = Path(directory, name)
                    relative = source.relative_to(folder).as_posix()
                    target = Path(staging, relative)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if relative in changed:
                        target.write_text(changed[relative], encoding="utf-8")
                    else:
                        link(source, target)
        except OSError as error:
            raise UserError(f"cannot prepare the upload of {folder} in {staging}: {error.strerror or error}") from None
        yield Path(staging)


# ----------------------------------------------------------------------------- pushing


def repo_url(endpoint: str, repo_id: str, revision: str | None) -> str:
    url = f"{endpoint}/{repo_id}"
    return f"{url}/tree/{revision}" if revision and revision != DEFAULT_BRANCH else url


def _upload(
    api: HfApi,
    folder: Path,
    upload: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str,
    record: ConversionRecord | None,
) -> str:
    """The network part: create the repo (and branch), then upload `upload` (the folder, or its
    staged mirror) in one commit. Returns the full repo id, which the Hub completes with the
    user's namespace if it was left out."""
    # private=None, not False, so that a namespace whose default is private keeps that default.
    created = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    full_id = getattr(created, "repo_id", None) or repo_id
    if revision and revision != DEFAULT_BRANCH:
        api.create_branch(full_id, branch=revision, exist_ok=True)

    # A folder converted without a card (or whose card was deleted) gets one, but only for as long
    # as the upload runs unless it succeeds: a failed push leaves the folder exactly as it was.
    card_path = folder / "README.md"
    wrote_card = record is not None and not card_path.exists()
    if wrote_card:
        try:
            write_model_card(folder, record, repo_id=full_id)
        except OSError as error:
            with suppress(OSError):  # a partly written card, where the folder let us start one
                card_path.unlink(missing_ok=True)
            raise UserError(
                f"README.md is missing and cannot be written into {folder} ({error.strerror or error}): "
                "make the folder writable or add a model card"
            ) from None
    try:
        if wrote_card and upload != folder:
            link(card_path, upload / "README.md")
        with hub_timeout(read=upload_answer_timeout()):
            api.upload_folder(
                repo_id=full_id,
                folder_path=upload,
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
    record = ConversionRecord.read(folder)
    changed = published_metadata(folder, record)
    token = resolve_token(token)
    endpoint = resolve_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        # Staged before any request, so that a staging failure leaves no new repo behind.
        with staged(folder, changed) as upload, hub_endpoint(endpoint), hub_timeout():
            full_id = _upload(api, folder, upload, repo_id, private, revision, commit_message or DEFAULT_COMMIT_MESSAGE,
                              record)
    except Exception as error:
        user_error = hub_error(error, repo_id, endpoint, token, upload_wait=upload_answer_timeout())
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

"""Publishing a converted model to the Hugging Face Hub (the one-line messages for what can go
wrong talking to the Hub, here and when a source checkpoint is downloaded, are `errors.hub_error`).

`push_to_hub` uploads what a model repo needs from a converted model's directory (weights,
config, the remote-code `.py` files, tokenizer, README.md, conversion.json, adapter files) in one
commit, and other files only where the user names them; it says what it left out. The files go as
they are, except that config.json, conversion.json and the card are published without local paths
even where an older converter wrote them there, and no JSON file names remote code but ours.
Whatever goes wrong, the user gets one `UserError` line and the local directory is left as it
was; the token is never printed, not even inside a server's error message.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from ..artifacts.record import FILENAME, ConversionRecord, published_adapter_config, published_config
from ..artifacts.card import write_model_card
from ..errors import UserError, hub_error, scrub
from ..io import TOKENIZER_FILES, hub_timeout, open_safetensors, refuse_links_out, resolve_endpoint, upload_answer_timeout
from ..artifacts.remote_code import REMOTE_CODE_FILES, may_name_code, without_foreign_code

DEFAULT_BRANCH = constants.DEFAULT_REVISION  # "main"
DEFAULT_COMMIT_MESSAGE = "Upload MeSH model converted with mesh-convert"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")


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

# What a model repo needs, at the top of the folder: weights (shards and their index, an adapter's
# too), configs, the tokenizer, our remote code, the card and the conversion record. Anything else
# in the folder (notes, a .env, notebooks' checkpoints, training checkpoints) is published only
# where the user names it (--include).
MODEL_FILES = (*WEIGHT_PATTERNS, "pytorch_model.bin.index.json", "config.json", "generation_config.json",
               "adapter_config.json", *TOKENIZER_FILES, *REMOTE_CODE_FILES, "README.md", FILENAME)
# Chat templates besides the default one (transformers' CHAT_TEMPLATE_DIR).
MODEL_SUBFOLDER_FILES = ("additional_chat_templates/*.jinja",)
# JSON files published with the local paths in them cut, each by what knows its fields.
PATH_CUTS = {"config.json": published_config, "adapter_config.json": published_adapter_config}


@dataclass(frozen=True)
class Published:
    """A folder as it is published: the files (relative POSIX paths), those published in another
    form than the folder's (path -> text), what was left out (top-level files by name, folders as
    `name/`), and what remote code not ours was dropped (`remote_code.py`)."""

    files: list[str]
    changed: dict[str, str]
    left_out: list[str]
    removed_code: list[str]


def _folder_files(folder: Path) -> list[str]:
    """Every file below `folder`, as relative POSIX paths, but those in the folders that are never
    uploaded."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not _never_uploaded(directory, d))
        found += [Path(directory, name).relative_to(folder).as_posix() for name in sorted(files)]
    return found


def _is_model_file(relative: str) -> bool:
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in MODEL_SUBFOLDER_FILES) or (
        "/" not in relative and any(fnmatch.fnmatchcase(relative, pattern) for pattern in MODEL_FILES)
    )


def published_form(folder: Path, record: ConversionRecord | None, include: Sequence[str] = ()) -> Published:
    """What publishing `folder` uploads: the files a model repo needs and those matching `include`
    (huggingface_hub's `allow_patterns`), never code but our two files, with the local paths cut
    from conversion.json, config.json, adapter_config.json and a card written before paths were cut
    on writing, and the code references not ours dropped from every JSON file."""
    every = _folder_files(folder)
    included = set(filter_repo_objects(every, allow_patterns=list(include))) if include else set()
    files = [relative for relative in every if _is_model_file(relative) or relative in included]
    chosen = set(files)
    left_out = {relative.split("/")[0] + ("/" if "/" in relative else "") for relative in every if relative not in chosen}
    changed = _published_metadata(folder, record, files)
    removed, kept = [], []
    for relative in files:
        if not may_name_code(relative):
            kept.append(relative)
            continue
        text = changed.get(relative)
        content = text.encode() if text is not None else (folder / relative).read_bytes()
        cleaned, dropped = without_foreign_code(relative, content)
        removed += dropped
        if cleaned is not None:
            kept.append(relative)
            if cleaned != content:
                changed[relative] = cleaned.decode()
    return Published(kept, changed, sorted(left_out), removed)


TOKEN_SCAN_BYTES = 64 << 20  # files up to this size are searched for the token (weights are larger, and binary)


def check_publishable(folder: Path, published: Published, token: str) -> None:
    """Refuse, before any request, to publish a file that links out of the folder (the link would
    publish what it points to), safetensors that do not open (a broken upload), or a file that
    holds the user's own Hub token (a config or card a tool wrote it into), which is never named."""
    originals = [folder / relative for relative in published.files if relative not in published.changed]
    refuse_links_out(folder, originals, "push publishes a folder's own files")
    for relative in published.files:
        path = folder / relative
        if relative.endswith(".safetensors"):
            with open_safetensors(path):
                pass
        text = published.changed.get(relative)
        if text is not None:
            holds_token = token in text
        elif path.stat().st_size <= TOKEN_SCAN_BYTES:
            holds_token = token.encode() in path.read_bytes()
        else:
            continue
        if holds_token:
            raise UserError(f"{path} holds your Hugging Face token: remove it from the file before pushing "
                            "(nothing was uploaded)")


def _published_metadata(folder: Path, record: ConversionRecord | None, files: list[str]) -> dict[str, str]:
    """The files among `files` whose published text differs from the folder's by local paths:
    conversion.json, config.json and a model card written before paths were cut on writing still
    hold them, and adapter_config.json names its base model by its path."""
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
    for name, cut in PATH_CUTS.items():
        if name not in files:
            continue
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read {folder / name}: {str(error).splitlines()[0]}") from None
        published = cut(data) if isinstance(data, dict) else data
        if published != data:
            changed[name] = json.dumps(published, indent=2, sort_keys=True) + "\n"
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
def staged(folder: Path, published: Published) -> Iterator[Path]:
    """A temporary mirror of what is published from `folder`: the files published in another form,
    and links to the others (`folder` is not touched)."""
    with tempfile.TemporaryDirectory(prefix="mesh-convert-push-") as staging:
        try:
            for relative in published.files:
                target = Path(staging, relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                if relative in published.changed:
                    target.write_text(published.changed[relative], encoding="utf-8")
                else:
                    link(folder / relative, target)
        except OSError as error:
            raise UserError(f"cannot prepare the upload of {folder} in {staging}: {error.strerror or error}") from None
        yield Path(staging)


# ----------------------------------------------------------------------------- pushing


@contextmanager
def upload_bars_on_terminals() -> Iterator[None]:
    """huggingface_hub's upload bars where someone watches (stderr is a terminal) and nowhere else:
    in a log they are lines of carriage returns above the result or the error line."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if sys.stderr is not None and sys.stderr.isatty() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


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
    """The network part: create the repo (and branch), then upload `upload` (the folder's staged
    mirror) in one commit. Returns the full repo id, which the Hub completes with the
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
        if wrote_card:
            link(card_path, upload / "README.md")
        with hub_timeout(commit_read=upload_answer_timeout()):
            api.upload_folder(
                repo_id=full_id,
                folder_path=upload,
                revision=revision,
                commit_message=commit_message,
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
    left_out: list[str]  # what of the folder was not published (`Published.left_out`)
    removed_code: list[str]  # remote code not ours that was not published


def push_folder(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    include: Sequence[str] = (),
) -> PushResult:
    """`push_to_hub`, returning the full repo id and branch, and what was left out, along with the URL."""
    folder = Path(folder)
    check_model_folder(folder)
    check_repo_id(repo_id)
    record = ConversionRecord.read(folder)
    published = published_form(folder, record, include)
    token = resolve_token(token)
    check_publishable(folder, published, token)
    endpoint = resolve_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        # Staged before any request, so that a staging failure leaves no new repo behind.
        with staged(folder, published) as upload, hub_endpoint(endpoint), hub_timeout(), upload_bars_on_terminals():
            full_id = _upload(api, folder, upload, repo_id, private, revision, commit_message or DEFAULT_COMMIT_MESSAGE,
                              record)
    except Exception as error:
        user_error = hub_error(error, repo_id, endpoint, token, upload_wait=upload_answer_timeout())
        if user_error is not None:
            raise user_error from None
        if token in str(error):  # a bug, reported as such, but still without the token
            raise RuntimeError(scrub(f"{type(error).__name__}: {error}", token)) from None
        raise
    # Shown and returned without credentials an HF_ENDPOINT may carry (https://user:password@host).
    return PushResult(repo_url(scrub(endpoint, None), full_id, revision), full_id, revision or DEFAULT_BRANCH, published.left_out,
                      published.removed_code)


def push_to_hub(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    include: Sequence[str] = (),
) -> str:
    """Upload the converted model in `folder` to the Hub repo `repo_id` and return its URL.

    What a model repo needs is uploaded (weights, configs, tokenizer, our remote code, card,
    conversion.json, adapter files), and the files matching the patterns in `include` (as
    huggingface_hub's `allow_patterns`); never code but our two model files, nor another code
    reference. The repo is created if needed (private if asked; an existing repo keeps its
    visibility), and so is the branch `revision`. The token is `token`, else HF_TOKEN, else the
    `hf auth login` cache; the endpoint is HF_ENDPOINT as set when this is called. If the folder has
    a conversion.json but no README.md, the model card is generated and uploaded too (and kept
    locally only if the push succeeds). Every failure is a one-line `UserError`.
    """
    return push_folder(folder, repo_id, private, revision, commit_message, token, include).url

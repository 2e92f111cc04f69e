"""Where what users point the package at is, and reading its files, one way for every command:
Hub ids and the Hub's answers, checkpoint directories and their weight files, output locations,
dtype names, JSON and JSONL. Imports only `errors`: loading models and tokenizers (which needs
the model classes) is `loading`'s.

Light to import: torch, transformers and huggingface_hub load inside the functions that need them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError, first_line

if TYPE_CHECKING:
    import torch

# Files that make up a tokenizer (the converter copies them next to the weights).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
# Any of these is enough for AutoTokenizer to build a tokenizer (the others only add to one).
_TOKENIZER_CORE = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")

# dtype names accepted on command lines and in recipes, with the short spellings.
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    """`float32` / `bfloat16` / `float16` (or fp32, bf16, fp16) -> the torch dtype."""
    import torch

    canonical = DTYPE_ALIASES.get(name.lower())
    if canonical is None:
        raise UserError(f"unknown dtype '{name}' (choose float32, bfloat16 or float16)")
    return getattr(torch, canonical)


# ----------------------------------------------------------------------------- where things are

# What `train` exports into a run's output_dir, first the one to use: a full run's model, a LoRA
# run's merged model, its adapter.
RUN_EXPORTS = ("model", "merged", "adapter")


def is_hub_id(name: str) -> bool:
    """`namespace/name` that is a valid Hub repo id and not a local path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1 or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cache_snapshot(directory: Path) -> tuple[str, str] | None:
    """(repo id, revision) when `directory` is a model snapshot in the Hugging Face cache,
    `models--ORG--NAME/snapshots/REV` (`models--NAME/...` for an id without namespace), else None.
    A Hub name cannot hold `--`, so the folder's name gives the id back unambiguously."""
    repo, snapshots = directory.parent.parent.name, directory.parent.name
    parts = repo.removeprefix("models--").split("--")
    if snapshots == "snapshots" and repo.startswith("models--") and len(parts) <= 2 and all(parts):
        return "/".join(parts), directory.name
    return None


def refuse_links_out(directory: Path, files: list[Path], why: str) -> None:
    """Refuse any of `files` that is a link to a file outside `directory`: what we read would carry
    that file into the output (and --push-to-hub onto the Hub); `why` says how. A Hub cache
    snapshot's files are links into the cache's blob store by design, whether we downloaded it
    or the user names the snapshot's folder."""
    directory = directory.resolve()
    allowed = [directory]
    if cache_snapshot(directory) is not None:
        allowed.append((directory.parent.parent / "blobs").resolve())
    for path in files:
        if not any(path.resolve().is_relative_to(root) for root in allowed):
            raise UserError(
                f"{path} is a link to {path.resolve()}, outside the checkpoint; {why}, "
                "so copy that file into the checkpoint instead"
            )


def check_model_dir(name: str | Path) -> Path:
    """The checkpoint directory `name`, or a UserError saying what is missing."""
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"model directory {name} does not exist" if not path.exists() else f"{name} is not a directory")
    if not (path / "config.json").is_file():
        if (path / "optimizer.bin").is_file() or any(path.glob("random_states_*.pkl")):
            run = path.parent.parent if path.parent.name == "checkpoints" else None
            exports = [run / n for n in RUN_EXPORTS if (run / n).is_dir()] if run else []
            export = exports[0] if exports else "the model (LoRA: adapter) that the run exports when it ends"
            raise UserError(f"{name} is a training checkpoint (the state `train` resumes from), not a model: "
                            f"use {export}")
        raise UserError(f"{name} is not a model checkpoint (no config.json)")
    check_weights_inside(path)
    check_safetensors(path)
    return path


def check_weights_inside(directory: Path) -> None:
    """Refuse weight files that link out of `directory`: a planted link would carry whatever it
    points to into what we write (a model, a merge) and from there onto the Hub."""
    weights = [*directory.glob("*.safetensors"), *directory.glob("*.bin")]
    refuse_links_out(directory, weights, "mesh-convert reads a model's weights from its own folder only")


def model_source(name: str | Path) -> str:
    """What `from_pretrained` should get: a Hub id as it is, else the checked local directory."""
    return str(name) if is_hub_id(str(name)) else str(check_model_dir(name))


def has_tokenizer(name: str | Path) -> bool:
    """Whether `name` holds tokenizer files (a Hub id is assumed to)."""
    if is_hub_id(str(name)):
        return True
    path = Path(name).expanduser()
    return any((path / file).is_file() for file in _TOKENIZER_CORE)


# The Hub gives itself up to 60 s to check a commit's files before it answers (huggingface_hub's
# upload guide), so an upload waits twice that for an answer, or longer if HF_HUB_DOWNLOAD_TIMEOUT says so.
UPLOAD_ANSWER_SECONDS = 120.0


def upload_answer_timeout() -> float:
    from huggingface_hub import constants

    return max(UPLOAD_ANSWER_SECONDS, float(constants.HF_HUB_DOWNLOAD_TIMEOUT))


@contextmanager
def hub_timeout(commit_read: float | None = None) -> Iterator[None]:
    """Requests to the Hub time out after HF_HUB_DOWNLOAD_TIMEOUT seconds without an answer
    (`commit_read` seconds, if given, for the answer to a commit, which takes longer to come).

    huggingface_hub's shared HTTP client has no timeout of its own, and only downloads pass one:
    API calls (creating a repo, listing files, committing) would wait forever on a server that
    accepts the connection and never answers. For the duration, the shared client (whatever
    factory made it, so a user's proxy settings stay) gets a timeout; its own comes back afterwards.
    Only the commit gets the long wait: huggingface_hub retries a request that timed out five
    times, so a long wait on every request (the preupload question too) held a push for minutes.
    """
    from huggingface_hub import constants, get_session

    try:  # huggingface_hub 2.x talks through `httpx2`; older releases used `httpx`.
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
        import httpx

    session = get_session()
    previous = session.timeout
    seconds = constants.HF_HUB_DOWNLOAD_TIMEOUT
    session.timeout = httpx.Timeout(seconds)
    commit_timeout = httpx.Timeout(seconds, read=commit_read).as_dict() if commit_read is not None else None

    def wait_longer_for_a_commit(request) -> None:
        if "/commit/" in request.url.path:
            request.extensions["timeout"] = commit_timeout

    hooks = session.event_hooks["request"]
    if commit_timeout is not None:
        hooks.append(wait_longer_for_a_commit)
    try:
        yield
    finally:
        session.timeout = previous
        if wait_longer_for_a_commit in hooks:
            hooks.remove(wait_longer_for_a_commit)


class HubUnreachable(UserError):
    """The Hub gave no answer (offline mode, no network, no answer in time, the Hub failing): a
    caller may turn to the local cache, as transformers does."""


def hub_info(repo_id: str, revision: str | None = None, repo_type: str = "model"):
    """The Hub's info of the model (or dataset) `repo_id`, with its files, asked once and not retried:
    huggingface_hub retries a failing connection for some 23 s (five times, backing off), so
    without a network every call would wait that long. HubUnreachable where the Hub gives no
    answer; an answer about the repository itself (not found, gated, no such revision, a refused
    token) is a UserError, never hidden behind a cached copy."""
    from huggingface_hub import HfApi, constants

    from .errors import hub_error, hub_unreachable

    if constants.is_offline_mode():
        raise HubUnreachable(f"cannot fetch {repo_id}: offline mode is on (HF_HUB_OFFLINE)")
    endpoint = resolve_endpoint()
    try:
        # Its own timeout, given: repo_info passes one to the client, which overrides the client's.
        return HfApi(endpoint=endpoint).repo_info(repo_id, revision=revision, repo_type=repo_type, expand=["siblings"],
                                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
    except Exception as error:
        user_error = hub_error(error, repo_id, endpoint, fetching=True, revision=revision)
        if user_error is None:
            raise
        if hub_unreachable(error):
            raise HubUnreachable(str(user_error)) from None
        raise user_error from None


def pretrained_source(name: str | Path) -> tuple[str, HubUnreachable | None]:
    """What `from_pretrained` should get for `name` (a Hub id as it is, else the checked local
    directory), and, for a Hub id the Hub gives no answer about, why: the caller then loads with
    `local_files_only=True`, from the local cache, at once."""
    if not is_hub_id(str(name)):
        return str(check_model_dir(name)), None
    try:
        hub_info(str(name))
    except HubUnreachable as unreachable:
        return str(name), unreachable
    return str(name), None


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


def open_safetensors(file: Path):
    """A safetensors file opened lazily (memory-mapped); a damaged or truncated one is a UserError."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as error:
        raise UserError(f"corrupt or truncated safetensors file {file}: {error}") from None


def check_safetensors(directory: Path) -> None:
    """Open every safetensors file in `directory`, so that a damaged one is named in one line
    before a library that loads the model fails on it with its own error."""
    for file in sorted(Path(directory).glob("*.safetensors")):
        with open_safetensors(file):
            pass


def resolve_endpoint() -> str:
    """HF_ENDPOINT as it is now: huggingface_hub reads it only once, at import time."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


# ----------------------------------------------------------------------------- files

# Configs and records nest a few levels. Far deeper nesting breaks whatever reads the value next
# (json itself, transformers, pydantic and our own code recurse into it: RecursionError).
MAX_JSON_DEPTH = 64


def parse_json(text: str | bytes) -> object:
    """`json.loads`, refusing a value nested more than MAX_JSON_DEPTH levels deep with a ValueError,
    as it refuses malformed JSON."""
    too_deep = ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    level = [value]
    for _ in range(MAX_JSON_DEPTH):
        level = [child for item in level if isinstance(item, (dict, list)) for child in
                 (item.values() if isinstance(item, dict) else item)]
    if any(isinstance(item, (dict, list)) for item in level):
        raise too_deep
    return value


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; one line naming the file for anything else (not
    UTF-8, not JSON, nested too deep, not an object, unreadable)."""
    try:
        value = parse_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error.msg} (line {error.lineno})") from None
    except ValueError as error:  # parse_json's refusal of deep nesting
        raise UserError(f"{path} is not usable: {first_line(error)}") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object (it holds a {type(value).__name__})")
    return value


def json_problem(error: ValueError) -> str:
    """What `parse_json` refused, in a few words (a JSON error's message without its position)."""
    return error.msg if isinstance(error, json.JSONDecodeError) else first_line(error)


def checked_text(text: str, where: str | Callable[[], str]) -> str:
    """`text` as read from JSON, refused where it holds an unpaired surrogate (`"\\ud800"` is valid
    JSON, but no valid Unicode: tokenizers cannot take it). `where` names the text in the message;
    a callable is asked only then (finding a line number can mean reading the file up to it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        where = where() if callable(where) else where
        raise UserError(f"{where}: the text holds an unpaired surrogate ({text[error.start]!r}), which is not "
                        "valid Unicode") from None
    return text


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, value) for every non-blank line of a JSONL file, as the file is read."""
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    value = parse_json(line)
                except ValueError as error:  # malformed, nested too deep, a number too long to read
                    raise UserError(f"{path} line {number} is not valid JSON: {json_problem(error)}") from None
                yield number, value
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None

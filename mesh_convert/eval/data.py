"""The text that `mesh-convert eval` evaluates on: a built-in name (wikitext2, lambada), found in a
data folder or fetched once from the Hub, or a .txt / .jsonl file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, error_line, is_our_fault
from ..io import HubUnreachable, checked_text, hub_info, read_jsonl, resolve_endpoint

DATA_ENV = "MESH_CONVERT_DATA"
CACHE_ENV = "MESH_CONVERT_CACHE"

# Built-in data names: file under a data folder, and the evaluation it is meant for.
DATA_NAMES: dict[str, tuple[str, str]] = {
    "wikitext2": ("wikitext-2-raw/wiki.test.raw", "perplexity"),
    "lambada": ("lambada_openai/lambada_test.jsonl", "lambada"),
}

# Where a built-in name is fetched from when no data folder has it: (dataset repo, parquet file).
# The parquet holds the raw file's lines as rows, so joining them gives the raw file back.
HUB_DATA: dict[str, tuple[str, str]] = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet"),
}


@dataclass(frozen=True)
class TextDataset:
    """Evaluation text: `documents` holds one string for a text file, one per line of a jsonl."""

    name: str
    path: Path
    documents: list[str]
    default_task: str  # "perplexity" or "lambada"

    def text(self, separator: str = "\n\n") -> str:
        """All documents as one text for perplexity (a text file is returned unchanged)."""
        return separator.join(self.documents)


def cache_data_dir() -> Path:
    """Where data fetched from the Hub is kept as plain files ($MESH_CONVERT_CACHE/data)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "mesh-convert")).expanduser() / "data"


def data_dirs() -> list[Path]:
    """Folders searched for built-in data names: $MESH_CONVERT_DATA first, then what was fetched
    before. Nothing relative to the package: an installed one has no checkout around it."""
    dirs = []
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]).expanduser())
    dirs.append(cache_data_dir())
    return dirs


def resolve_data(name_or_path: str | os.PathLike) -> tuple[Path, str | None]:
    """The file behind a data name or path, and the task the name implies (None for a path)."""
    key = str(name_or_path)
    if key in DATA_NAMES:
        relative, task = DATA_NAMES[key]
        candidates = [folder / relative for folder in data_dirs()]
        for candidate in candidates:
            if candidate.is_file():
                return candidate, task
        looked = ", ".join(str(c) for c in candidates)
        if key in HUB_DATA:
            return fetch_hub_data(key, looked), task
        raise UserError(
            f"data '{key}' not found (looked for {looked}); set {DATA_ENV} to a folder holding "
            f"{relative}, or pass a file path"
        )
    path = Path(key).expanduser()
    if not path.exists():
        names = ", ".join(DATA_NAMES)
        raise UserError(f"data file not found: {path} (built-in names: {names})")
    if not path.is_file():
        raise UserError(f"data path is not a file: {path}")
    return path, None


def fetch_hub_data(key: str, looked: str) -> Path:
    """Download a built-in data set's parquet from the Hub and keep its text as the raw file under
    `cache_data_dir()`, so later runs (and offline ones) find it without the Hub."""
    from huggingface_hub import hf_hub_download

    repo_id, filename = HUB_DATA[key]
    target = cache_data_dir() / DATA_NAMES[key][0]
    remedy = f"set {DATA_ENV} to a folder holding {DATA_NAMES[key][0]}, or pass a file path"
    try:
        hub_info(repo_id, repo_type="dataset")  # asked once: without an answer, the download would retry for 25 s
    except HubUnreachable as unreachable:
        raise UserError(f"data '{key}' is not on this machine (looked for {looked}) and {unreachable}; {remedy}") from None
    try:
        import pyarrow.parquet as pq

        parquet = hf_hub_download(repo_id, filename, repo_type="dataset", endpoint=resolve_endpoint())
        text = "".join(pq.read_table(parquet, columns=["text"]).column(0).to_pylist())
    except Exception as error:  # no network, offline mode, a refused request, a damaged file
        if is_our_fault(error):
            raise
        raise UserError(
            f"data '{key}' is not on this machine (looked for {looked}) and fetching it from the Hub "
            f"dataset {repo_id} failed ({type(error).__name__}: {error_line(error)}); {remedy}"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)  # atomic: a killed run leaves no half-written data file behind
    return target


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None


def read_jsonl_texts(path: Path) -> list[str]:
    """The "text" field of every non-blank line of a jsonl file."""
    texts = []
    for number, record in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'{path} line {number} has no string "text" field')
        texts.append(checked_text(record["text"], f"{path} line {number}"))
    return texts


def load_text_dataset(name_or_path: str | os.PathLike) -> TextDataset:
    """Load `wikitext2`, `lambada`, a text file (one document) or a jsonl of {"text": ...}."""
    path, task = resolve_data(name_or_path)
    is_jsonl = path.suffix.lower() == ".jsonl"
    documents = read_jsonl_texts(path) if is_jsonl else [_read_utf8(path)]
    if not any(doc.strip() for doc in documents):
        raise UserError(f"{path} holds no text")
    return TextDataset(str(name_or_path), path, documents, task or "perplexity")

"""Preparing a token store (store.py) once: text files (.txt, .jsonl, .parquet) or a Hub dataset,
tokenized by worker processes, each input cut into chunks whose tokens are kept as parts, so an
interrupted preparation goes on where it stopped; the store is assembled from the parts and
published whole (`staged_directory`), or not at all.

Documents: a .txt file is one document; each .jsonl record's and each .parquet or Hub row's text
field is one. EOS follows each document. In the store, each record is one sequence (and one
document); a .txt file is one document of one sequence per chunk.

Recipes that list files train from a store prepared here on first use and kept in a cache
(`cached_store`), keyed by the files (paths, sizes, times), the tokenizer and the settings.
"""

import codecs
import hashlib
import json
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Interrupted, UserError, first_line
from ..io import checked_text, json_problem, parse_json
from .store import METADATA, TOKENS, token_dtype, write_index, write_metadata

FORMATS = {".txt": "txt", ".text": "txt", ".raw": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
CHUNK_BYTES = 4 << 20  # the unit of work and of resumption: a few seconds of one worker's tokenizing
PIECE_BYTES = 1 << 20  # the most text one tokenizer call gets: a long document is tokenized in pieces
MAX_RECORD_MB = 64  # a longer JSONL record (or parquet value) is refused: it would be held whole in memory
ENCODE_BATCH = 256  # documents per tokenizer call


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown data format {path.suffix!r}; use .txt, .jsonl or .parquet")
    return fmt


def check_data_file(path: str | Path) -> str:
    """The format of a data file; anything that is not a regular file of a known format is refused
    (data is read more than once, and its size and time key the cache: a pipe or a device cannot be)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"data file {path} does not exist") from None
    except OSError as error:
        raise UserError(f"cannot read data file {path}: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"data file {path} is a directory: list the data files in it")
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise UserError(f"data file {path} is a pipe, not a file: data is read more than once, so save it to a file")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise UserError(f"data file {path} is a device, not a data file")
    if not stat.S_ISREG(mode):
        raise UserError(f"data file {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read data file {path}: permission denied")
    return file_format(path)


# ---------------------------------------------------------------------------------------------
# Chunks: the units of work.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    index: int
    path: str
    fmt: str  # txt | jsonl | parquet | arrow (a Hub dataset's cache file)
    start: int  # bytes (txt, jsonl), row group (parquet) or row (arrow)
    stop: int
    first: bool  # the first chunk of its file (a .txt file's document starts there)
    last: bool  # the last chunk of its file (a .txt file's document ends there, with EOS)
    size: int  # bytes of input, for the progress bar
    rows_before: int = 0  # parquet: rows in the file before this chunk, for messages


def plan_file_chunks(paths: list[str], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    chunks: list[Chunk] = []
    for path in paths:
        fmt = check_data_file(path)
        if fmt == "parquet":
            spans = _row_group_spans(Path(path))
        else:
            cuts = _line_cuts(Path(path), chunk_bytes)
            spans = [(start, stop, stop - start, 0) for start, stop in zip(cuts, cuts[1:])] or [(0, 0, 0, 0)]
        for number, (start, stop, size, rows_before) in enumerate(spans):
            chunks.append(Chunk(len(chunks), str(path), fmt, start, stop, number == 0, number == len(spans) - 1,
                                size, rows_before))
    return chunks


def _line_cuts(path: Path, chunk_bytes: int) -> list[int]:
    """Offsets that cut the file into pieces of about `chunk_bytes`, each just after a newline."""
    size = path.stat().st_size
    cuts = [0]
    with path.open("rb") as handle:
        for target in range(chunk_bytes, size, chunk_bytes):
            if target <= cuts[-1]:
                continue  # a long line took the previous cut past this one
            handle.seek(target - 1)
            cut = size
            while block := handle.read(1 << 16):
                newline = block.find(b"\n")
                if newline >= 0:
                    cut = handle.tell() - len(block) + newline + 1
                    break
            if cut >= size:
                break
            cuts.append(cut)
    return [*cuts, size] if size else cuts


def _row_group_spans(path: Path) -> list[tuple[int, int, int, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except (OSError, ValueError, pa.ArrowException) as error:  # the kinds pyarrow raises for a damaged file
        raise UserError(f"cannot read parquet file {path}: {first_line(error)}") from None
    spans, rows = [], 0
    for group in range(metadata.num_row_groups):
        spans.append((group, group + 1, metadata.row_group(group).total_byte_size, rows))
        rows += metadata.row_group(group).num_rows
    return spans or [(0, 0, 0, 0)]


def plan_arrow_chunks(cache_files: list[str], rows_per_chunk: int = 20_000) -> list[Chunk]:
    """Chunks of a downloaded Hub dataset: row ranges of its Arrow cache files."""
    import pyarrow as pa

    chunks = []
    for path in cache_files:
        with pa.memory_map(path) as source:
            rows = pa.ipc.open_stream(source).read_all().num_rows
        size = os.path.getsize(path)
        spans = [(start, min(rows, start + rows_per_chunk)) for start in range(0, rows, rows_per_chunk)]
        for start, stop in spans:
            chunks.append(Chunk(len(chunks), path, "arrow", start, stop, True, True, size * (stop - start) // rows))
    return chunks


# ---------------------------------------------------------------------------------------------
# Reading a chunk's documents (bounded memory: pieces of at most PIECE_BYTES, records capped).
# ---------------------------------------------------------------------------------------------


def chunk_documents(chunk: Chunk, text_field: str, max_record_bytes: int) -> Iterator[str | list[str]]:
    """A .txt chunk: its text as a list of pieces (one sequence); otherwise each record's text."""
    try:
        if chunk.fmt == "txt":
            yield list(_text_pieces(chunk))
        elif chunk.fmt == "jsonl":
            yield from _jsonl_texts(chunk, text_field, max_record_bytes)
        elif chunk.fmt == "parquet":
            yield from _parquet_texts(chunk, text_field, max_record_bytes)
        else:
            yield from _arrow_texts(chunk, text_field)
    except UnicodeDecodeError:
        raise UserError(f"data file {chunk.path} is not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"cannot read data file {chunk.path}: {error.strerror or error}") from None


def _text_pieces(chunk: Chunk) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()  # a piece may end inside a character
    with open(chunk.path, "rb") as handle:
        handle.seek(chunk.start)
        position, lines, size = chunk.start, [], 0
        while position < chunk.stop:
            line = handle.readline(min(PIECE_BYTES, chunk.stop - position))
            if not line:
                break
            position += len(line)
            lines.append(line)
            size += len(line)
            if size >= PIECE_BYTES:
                yield decoder.decode(b"".join(lines))
                lines, size = [], 0
        yield decoder.decode(b"".join(lines), final=True)


def _jsonl_texts(chunk: Chunk, text_field: str, max_record_bytes: int) -> Iterator[str]:
    with open(chunk.path, "rb") as handle:
        handle.seek(chunk.start)
        position = chunk.start
        while position < chunk.stop:
            line = handle.readline(max_record_bytes + 1)
            if not line:
                break
            if len(line) > max_record_bytes and not line.endswith(b"\n"):
                raise UserError(f"{chunk.path} line {_line_number(chunk.path, position)} is a record of more than "
                                f"{max_record_bytes / 2**20:g} MiB: split it into smaller documents (or prepare the "
                                "data with `mesh-convert prepare-data --max-record-mb N`)")
            start, position = position, position + len(line)
            if not line.strip():
                continue
            try:
                record = parse_json(line)
            except ValueError as error:  # malformed, nested too deep, a number too long to read
                raise UserError(f"{chunk.path} line {_line_number(chunk.path, start)} is not valid JSON: "
                                f"{json_problem(error)}") from None
            yield _text_of(record, text_field, lambda: f"{chunk.path} line {_line_number(chunk.path, start)}")


def _text_of(record, text_field: str, where) -> str:
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{where()} has no {text_field!r} field (it has: {fields}); set data.text_field")
    text = record[text_field]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise UserError(f"{where()}: {text_field!r} is {kind}, not a string of text")
    return checked_text(text, where)


def _line_number(path: str, offset: int) -> int:
    """The line at byte `offset` (counted only for a message)."""
    count = 1
    with open(path, "rb") as handle:
        while offset > 0 and (block := handle.read(min(1 << 20, offset))):
            count += block.count(b"\n")
            offset -= len(block)
    return count


def _parquet_texts(chunk: Chunk, text_field: str, max_record_bytes: int) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(chunk.path)
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise UserError(f"{chunk.path} has no {text_field!r} column (it has: {', '.join(columns)}); set data.text_field")
    kind = parquet.schema_arrow.field(text_field).type
    if pa.types.is_dictionary(kind):  # repeated texts stored once: still strings
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{chunk.path}: column {text_field!r} holds {kind}, not strings of text")
    row = chunk.rows_before
    for batch in parquet.iter_batches(batch_size=256, row_groups=range(chunk.start, chunk.stop), columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                continue
            if len(value) > max_record_bytes:
                raise UserError(f"{chunk.path} row {row} holds a text of more than {max_record_bytes / 2**20:g} MiB: "
                                "split it into smaller documents")
            yield value


def _arrow_texts(chunk: Chunk, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    with pa.memory_map(chunk.path) as source:
        table = pa.ipc.open_stream(source).read_all().slice(chunk.start, chunk.stop - chunk.start)
        for batch in table.select([text_field]).to_batches(max_chunksize=256):
            for value in batch.column(0).to_pylist():
                if value is not None:
                    yield str(value)


def pieces_of(text: str) -> list[str]:
    """`text` cut into pieces of at most PIECE_BYTES characters, at a line end or space where one
    is near, so that a long document never reaches the tokenizer whole."""
    if len(text) <= PIECE_BYTES:
        return [text]
    pieces, start = [], 0
    while len(text) - start > PIECE_BYTES:
        cut = start + PIECE_BYTES
        near = max(text.rfind("\n", cut - 4096, cut), text.rfind(" ", cut - 4096, cut))
        cut = near + 1 if near > start else cut
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


# ---------------------------------------------------------------------------------------------
# Workers: one chunk in, one part out.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What a worker needs besides its chunk."""

    tokenizer_spec: str  # the fast tokenizer's JSON
    eos: int
    dtype: str
    text_field: str
    max_record_bytes: int
    parts: str  # the folder of the parts


_worker: dict = {}


def _start_worker(settings: Settings, parallel: bool) -> None:
    """Load the tokenizer (once per worker process). A worker tokenizes on one core (its own
    process is the parallelism); a single in-process preparation lets the tokenizer use them all."""
    if not parallel:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(settings.tokenizer_spec)
    tokenizer.no_truncation()  # as transformers calls it, whatever tokenizer.json set
    tokenizer.no_padding()
    _worker.update(settings=settings, tokenizer=tokenizer)


def _encode(texts: list[str]) -> list[list[int]]:
    return [encoding.ids for encoding in _worker["tokenizer"].encode_batch(texts, add_special_tokens=False)]


def tokenize_chunk(chunk: Chunk) -> tuple[int, int, int]:
    """Tokenize `chunk` into its part; returns (chunk index, tokens, input bytes)."""
    settings: Settings = _worker["settings"]
    lengths: list[int] = []
    arrays: list[np.ndarray] = []
    dtype = np.dtype(settings.dtype)

    def add(ids: list[int]) -> None:
        arrays.append(np.asarray(ids, dtype=np.int64))
        lengths.append(len(ids))

    pending: list[list[str]] = []

    def flush() -> None:
        flat = [piece for pieces in pending for piece in pieces]
        encoded = iter(_encode(flat))
        for pieces in pending:
            add([token for _ in pieces for token in next(encoded)] + [settings.eos])
        pending.clear()

    for document in chunk_documents(chunk, settings.text_field, settings.max_record_bytes):
        if isinstance(document, list):  # a .txt chunk: one sequence, EOS only where its file ends
            ids = [token for piece_ids in _encode(document) for token in piece_ids]
            add(ids + [settings.eos] if chunk.last else ids)
        else:
            pending.append(pieces_of(document))
            if len(pending) >= ENCODE_BATCH:
                flush()
    if pending:
        flush()
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    largest = int(tokens.max()) if len(tokens) else -1
    if largest >= np.iinfo(dtype).max + 1:
        raise UserError(f"token id {largest} does not fit the store's {dtype} (the tokenizer's vocabulary is larger "
                        "than it says)")
    _write_part(Path(settings.parts), chunk.index, tokens.astype(dtype), np.asarray(lengths, np.int32), largest)
    return chunk.index, len(tokens), chunk.size


def _write_part(folder: Path, index: int, tokens: np.ndarray, lengths: np.ndarray, largest: int) -> None:
    """A part is complete once its .json exists (written last, by rename)."""
    stem = folder / f"{index:06d}"
    for suffix, write in ((".bin", tokens.tofile), (".lengths.npy", lambda path: np.save(path, lengths))):
        temporary = Path(f"{stem}{suffix}.tmp-{os.getpid()}")
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, f"{stem}{suffix}")
    temporary = Path(f"{stem}.json.tmp-{os.getpid()}")
    temporary.write_text(json.dumps({"tokens": len(tokens), "max_token_id": largest}))
    os.replace(temporary, f"{stem}.json")


def _part_done(folder: Path, index: int) -> dict | None:
    try:
        return json.loads((folder / f"{index:06d}.json").read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Preparing a store.
# ---------------------------------------------------------------------------------------------


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def source_fingerprint(paths: list[str]) -> list[dict]:
    """The files as the cache knows them: resolved path, size and modification time."""
    described = []
    for path in paths:
        check_data_file(path)
        info = os.stat(path)
        described.append({"path": str(Path(path).resolve()), "bytes": info.st_size, "modified_ns": info.st_mtime_ns})
    return described


def job_key(sources, tokenizer_id: dict, text_field: str, chunk_bytes: int) -> str:
    """What the tokens are a function of."""
    text = json.dumps([sources, tokenizer_id["sha256"], text_field, chunk_bytes, PIECE_BYTES, 1], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prepare_store(
    chunks: list[Chunk],
    sources,
    target: Path,
    tokenizer,
    tokenizer_id: dict,
    text_field: str = "text",
    workers: int | None = None,
    max_record_mb: float = MAX_RECORD_MB,
    overwrite: bool = False,
    console=None,
    chunk_bytes: int = CHUNK_BYTES,
    transient: bool = False,
) -> dict:
    """Tokenize `chunks` into a store at `target`, published whole; the parts are kept beside it
    (in `.NAME.parts-KEY`) until then, so that running it again after an interruption goes on.
    `transient`: the progress bar goes when done (a step of a longer command)."""
    from ..artifacts.output import resolve_target, staged_directory

    target = Path(target)
    key = job_key(sources, tokenizer_id, text_field, chunk_bytes)
    parts = resolve_target(target).parent / f".{target.name}.parts-{key[:16]}"
    dtype = token_dtype(tokenizer_id["vocab_size"])
    settings = Settings(tokenizer.backend_tokenizer.to_str(), tokenizer_id["eos_token_id"], dtype.name, text_field,
                        int(max_record_mb * 2**20), str(parts))
    begun = time.perf_counter()
    with staged_directory(target, overwrite) as staging:
        for stale in parts.parent.glob(f".{target.name}.parts-*"):
            if stale != parts:  # left by a preparation of other inputs to the same place
                shutil.rmtree(stale, ignore_errors=True)
        parts.mkdir(exist_ok=True)
        reused = [chunk for chunk in chunks if _part_done(parts, chunk.index) is not None]
        todo = [chunk for chunk in chunks if _part_done(parts, chunk.index) is None]
        workers = max(1, min(workers or default_workers(), len(todo) or 1))
        with _PrepareProgress(console, sum(c.size for c in chunks), sum(c.size for c in reused), target.name,
                              transient) as progress:
            try:
                _run_workers(todo, settings, workers, progress)
            except KeyboardInterrupt:
                done = sum(_part_done(parts, chunk.index) is not None for chunk in chunks)
                raise Interrupted(f"interrupted: {done} of {len(chunks)} parts are kept in {parts}; run the same "
                                  "command again to go on from there") from None
        summary = _assemble(chunks, parts, staging, dtype)
        write_metadata(staging, {"tokenizer": tokenizer_id, "dtype": dtype.name, "text_field": text_field,
                                 "sources": sources, **summary})
    shutil.rmtree(parts, ignore_errors=True)
    seconds = time.perf_counter() - begun
    tokenized = progress.tokens
    return {"store": str(target), **summary, "bytes_per_token": summary["bytes"] / max(1, summary["tokens"]),
            "tokenizer": tokenizer_id["name"], "workers": workers, "parts": len(chunks), "parts_reused": len(reused),
            "seconds": seconds, "tokens_per_s": tokenized / seconds if seconds > 0 else None}


def _run_workers(todo: list[Chunk], settings: Settings, workers: int, progress: "_PrepareProgress") -> None:
    if not todo:
        return
    if workers == 1 and len(todo) == 1:  # not worth a process of its own
        _start_worker(settings, parallel=True)
        progress.advance(*tokenize_chunk(todo[0])[1:])
        return
    import multiprocessing

    # spawn: a fresh interpreter per worker (forking a process that holds torch's and the
    # tokenizer's threads can deadlock); the workers import only numpy and tokenizers.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(settings, False)) as pool:
        for _, tokens, size in pool.imap_unordered(tokenize_chunk, todo):
            progress.advance(tokens, size)


def _assemble(chunks: list[Chunk], parts: Path, staging: Path, dtype: np.dtype) -> dict:
    """tokens.bin (the parts back to back) and tokens.idx; the counts for store.json."""
    lengths, starts, largest, tokens = [], [], -1, 0
    with open(staging / f"{TOKENS}.bin", "wb") as out:
        for chunk in chunks:
            stem = parts / f"{chunk.index:06d}"
            info = _part_done(parts, chunk.index)
            part_lengths = np.load(f"{stem}.lengths.npy", allow_pickle=False)
            if chunk.fmt == "txt":
                if chunk.first:
                    starts.append(sum(map(len, lengths)))
            else:
                first = sum(map(len, lengths))
                starts.append(np.arange(first, first + len(part_lengths)))
            lengths.append(part_lengths)
            with open(f"{stem}.bin", "rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)
            largest = max(largest, info["max_token_id"])
            tokens += info["tokens"]
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    document_starts = np.concatenate([np.atleast_1d(np.asarray(s, np.int64)) for s in starts] + [[len(lengths)]])
    write_index(staging / f"{TOKENS}.idx", dtype, lengths, document_starts)
    size = sum((staging / name).stat().st_size for name in (f"{TOKENS}.bin", f"{TOKENS}.idx"))
    return {"tokens": tokens, "documents": len(document_starts) - 1, "max_token_id": largest, "bytes": size}


class _PrepareProgress:
    """A rich progress bar over the input bytes, with the tokens made and their rate."""

    def __init__(self, console, total: int, done: int, name: str, transient: bool):
        self.tokens, self.begun, self.bar = 0, time.perf_counter(), None
        if console is None:
            return
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(f"[bold]preparing {name}"), BarColumn(), TaskProgressColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                            transient=transient)
        self.task = self.bar.add_task("prepare", total=max(total, 1), completed=done, info="")

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def advance(self, tokens: int, size: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.begun, 1e-9)
            self.bar.update(self.task, advance=size, info=f"{self.tokens:,} tokens  {rate:,.0f} tokens/s")


# ---------------------------------------------------------------------------------------------
# The cache of stores for recipes that list files.
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """MESH_CONVERT_CACHE, else the user's cache folder (XDG_CACHE_HOME, else ~/.cache)/mesh-convert:
    one store serves every run on the same files, and a run's output_dir stays the run's."""
    if os.environ.get("MESH_CONVERT_CACHE"):
        return Path(os.environ["MESH_CONVERT_CACHE"]).expanduser() / "data"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "mesh-convert" / "data"


def cached_store(paths: list[str], tokenizer, tokenizer_id: dict, text_field: str, console=None) -> Path:
    """The store of the files `paths`, prepared on first use."""
    return cached(source_fingerprint(paths), Path(paths[0]).stem, lambda: plan_file_chunks(paths), tokenizer,
                  tokenizer_id, text_field, console)


def cached(sources, stem: str, make_chunks: Callable[[], list[Chunk]], tokenizer, tokenizer_id: dict,
           text_field: str, console=None) -> Path:
    """The cached store of `sources` (what its tokens are a function of, with the tokenizer and the
    settings), prepared from `make_chunks()` on first use. Processes that ask at once (the ranks of
    one run, or two runs) take turns under a file lock: one prepares, the others then find it made."""
    from filelock import FileLock

    key = job_key(sources, tokenizer_id, text_field, CHUNK_BYTES)
    root = cache_root()
    target = root / f"{stem[:40]}-{key[:16]}"
    if not (target / METADATA).is_file():
        try:
            root.mkdir(parents=True, exist_ok=True)
            with FileLock(root / f"{target.name}.lock"):
                if not (target / METADATA).is_file():
                    prepare_store(make_chunks(), sources, target, tokenizer, tokenizer_id, text_field, console=console,
                                  transient=True)
        except OSError as error:
            raise UserError(f"cannot prepare the data in the cache {root}: {error.strerror or error} (set "
                            "MESH_CONVERT_CACHE to a writable folder)") from None
    return target

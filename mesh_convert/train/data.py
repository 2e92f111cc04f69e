"""Training data: documents from local files or a Hub dataset, tokenised with the model's
tokenizer and packed into fixed-length blocks with EOS between documents.

The order of blocks is a pure function of (seed, position), so a resumed run sees exactly the
batches that an uninterrupted run would, whatever the number of processes: global step s takes
blocks [s*G, (s+1)*G) of an endless sequence of seeded per-epoch permutations.
"""

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io import read_jsonl
from .recipe import DataSection

FORMATS = {".txt": "txt", ".text": "txt", ".raw": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
TXT_CHUNK_CHARS = 1 << 20  # tokenise big text files a megabyte of whole lines at a time


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown data format {path.suffix!r}; use .txt, .jsonl or .parquet")
    return fmt


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one file: a whole .txt file is one document (in line-aligned chunks),
    each .jsonl record's `text_field` is one, each .parquet row's `text_field` column is one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    fmt = file_format(path)
    try:
        if fmt == "txt":
            yield from _read_txt(path)
        elif fmt == "jsonl":
            yield from _read_jsonl(path, text_field)
        else:
            yield from _read_parquet(path, text_field)
    except UnicodeDecodeError:
        raise UserError(f"data file {path} is not UTF-8 text") from None


def _read_txt(path: Path) -> Iterator[str]:
    # One document, yielded in pieces so a large file never becomes one huge string; the pieces are
    # joined again by the packer (no EOS between them). Chunk boundaries fall after a newline.
    with path.open(encoding="utf-8") as handle:
        chunk: list[str] = []
        size = 0
        for line in handle:
            chunk.append(line)
            size += len(line)
            if size >= TXT_CHUNK_CHARS:
                yield _Piece("".join(chunk))
                chunk, size = [], 0
        yield "".join(chunk)


class _Piece(str):
    """A part of a document that continues in the next item (no EOS after it)."""


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for number, record in read_jsonl(path):
        if not isinstance(record, dict) or text_field not in record:
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{path} line {number} has no {text_field!r} field (it has: {fields}); set data.text_field")
        if not isinstance(record[text_field], str):
            kind = "null" if record[text_field] is None else type(record[text_field]).__name__
            raise UserError(f"{path} line {number}: {text_field!r} is {kind}, not a string of text")
        yield record[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise UserError(f"cannot read parquet file {path}: {error}") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise UserError(f"{path} has no {text_field!r} column (it has: {', '.join(columns)}); set data.text_field")
    kind = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {text_field!r} holds {kind}, not strings of text")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def hub_documents(section: DataSection) -> Iterable[str]:
    """Documents of a Hub dataset via the `datasets` library (streamed when asked)."""
    try:
        import datasets
    except ImportError:
        raise UserError("data.hub needs the `datasets` library: pip install datasets") from None
    hub = section.hub
    try:
        dataset = datasets.load_dataset(
            hub.path, hub.name, split=hub.split, revision=hub.revision, streaming=hub.streaming
        )
    except Exception as error:  # network, missing dataset, bad split: all user-facing
        raise UserError(f"cannot load Hub dataset {hub.path!r}: {type(error).__name__}: {error}") from None
    columns = dataset.column_names or []
    if columns and section.text_field not in columns:
        raise UserError(
            f"Hub dataset {hub.path!r} has no {section.text_field!r} column (it has: {', '.join(columns)}); "
            "set data.text_field"
        )
    return (str(row[section.text_field]) for row in dataset)


def tokenize_stream(documents: Iterable[str], tokenizer, batch_docs: int = 256) -> Iterator[list[int]]:
    """Token ids of the documents, with EOS after each complete document (not after a `_Piece`)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token, which packing puts between documents")
    pending: list[str] = []

    def flush():
        encoded = tokenizer(pending, add_special_tokens=False)["input_ids"]
        for text, ids in zip(pending, encoded):
            yield ids if isinstance(text, _Piece) else [*ids, eos]
        pending.clear()

    for document in documents:
        pending.append(document)
        if len(pending) >= batch_docs:
            yield from flush()
    if pending:
        yield from flush()


def tokenize_all(documents: Iterable[str], tokenizer) -> np.ndarray:
    parts = [np.asarray(ids, dtype=np.int32) for ids in tokenize_stream(documents, tokenizer)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


@dataclass
class PackedBlocks:
    """A token stream cut into `len(self)` blocks of `block_size` tokens (the remainder is dropped)."""

    tokens: np.ndarray
    block_size: int

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def block(self, index: int) -> torch.Tensor:
        start = index * self.block_size
        return torch.from_numpy(self.tokens[start : start + self.block_size].astype(np.int64))

    def stack(self, indices: Iterable[int]) -> torch.Tensor:
        return torch.stack([self.block(i) for i in indices])

    def split_tail(self, count: int) -> tuple["PackedBlocks", "PackedBlocks"]:
        """(head, tail) with the last `count` blocks held out: contiguous, so no block is in both."""
        cut = (len(self) - count) * self.block_size
        return PackedBlocks(self.tokens[:cut], self.block_size), PackedBlocks(
            self.tokens[cut : len(self) * self.block_size], self.block_size
        )


class ShuffledBlocks:
    """Global batches of an in-memory block set, in a seeded order that restarts each epoch."""

    def __init__(self, blocks: PackedBlocks, seed: int):
        self.blocks = blocks
        self.seed = seed
        self._epoch = -1
        self._order = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.blocks), generator=generator)
            self._epoch = epoch
        return self._order

    def global_batch(self, step: int, size: int) -> torch.Tensor:
        """The `size` blocks of optimizer step `step`, as a [size, block_size] LongTensor."""
        n = len(self.blocks)
        indices = []
        for position in range(step * size, (step + 1) * size):
            indices.append(int(self._permutation(position // n)[position % n]))
        return self.blocks.stack(indices)

    def epochs(self, steps: int, size: int) -> float:
        return steps * size / len(self.blocks)


class StreamedBlocks:
    """Global batches packed on the fly from a (possibly endless) document stream, shuffled in a
    seeded buffer. Steps must be asked for in order; resuming at step s skips s*G blocks."""

    def __init__(self, token_stream: Iterator[list[int]], block_size: int, seed: int, buffer: int):
        self.block_size = block_size
        self.buffer_size = buffer
        self.random = random.Random(seed)
        self.blocks = self._pack(token_stream)
        self.buffer: list[torch.Tensor] = []
        self.next_step = 0

    def _pack(self, token_stream):
        carry: list[int] = []
        for ids in token_stream:
            carry.extend(ids)
            while len(carry) >= self.block_size:
                yield torch.tensor(carry[: self.block_size], dtype=torch.long)
                carry = carry[self.block_size :]

    def _next_block(self) -> torch.Tensor:
        for block in self.blocks:
            self.buffer.append(block)
            if len(self.buffer) >= self.buffer_size:
                break
        if not self.buffer:
            raise UserError("the streamed dataset ran out of data; lower train.max_steps")
        return self.buffer.pop(self.random.randrange(len(self.buffer)))

    def global_batch(self, step: int, size: int) -> torch.Tensor:
        while self.next_step < step:  # resuming: replay (and drop) the blocks already trained on
            for _ in range(size):
                self._next_block()
            self.next_step += 1
        if step != self.next_step:
            raise RuntimeError(f"streamed data asked for step {step} after step {self.next_step - 1}")
        self.next_step += 1
        return torch.stack([self._next_block() for _ in range(size)])

    def epochs(self, steps: int, size: int) -> float:
        return float("nan")


@dataclass
class TrainData:
    train: ShuffledBlocks | StreamedBlocks
    eval: PackedBlocks | None
    train_blocks: int | None  # None when streamed (unknown)


def build_data(section: DataSection, tokenizer, seed: int, max_positions: int | None) -> TrainData:
    """Load, tokenise, pack and split the recipe's data."""
    if max_positions is not None and section.block_size > max_positions:
        raise UserError(
            f"data.block_size={section.block_size} is above the model's context of {max_positions} tokens"
        )
    eval_blocks = None
    if section.eval_files:
        eval_tokens = tokenize_all(_documents_of(section.eval_files, section.text_field), tokenizer)
        eval_blocks = PackedBlocks(eval_tokens, section.block_size)
        if len(eval_blocks) == 0:
            raise UserError(f"data.eval_files hold fewer than one block of {section.block_size} tokens")

    if section.hub is not None and section.hub.streaming:
        stream = tokenize_stream(hub_documents(section), tokenizer)
        if eval_blocks is None and section.eval_blocks:
            # The first blocks of the stream are held out; training starts after them.
            stream = _hold_out(stream, section.eval_blocks * section.block_size)
            eval_blocks = PackedBlocks(next(stream), section.block_size)
        return TrainData(StreamedBlocks(stream, section.block_size, seed, section.shuffle_buffer), eval_blocks, None)

    documents = hub_documents(section) if section.hub is not None else _documents_of(section.train, section.text_field)
    blocks = PackedBlocks(tokenize_all(documents, tokenizer), section.block_size)
    if eval_blocks is None and section.eval_blocks:
        if len(blocks) < section.eval_blocks + 1:
            raise UserError(
                f"the data has {len(blocks)} blocks of {section.block_size} tokens: too few to hold out "
                f"data.eval_blocks={section.eval_blocks} and still train"
            )
        blocks, eval_blocks = blocks.split_tail(section.eval_blocks)
    if len(blocks) == 0:
        raise UserError(f"the data holds fewer than one block of {section.block_size} tokens")
    return TrainData(ShuffledBlocks(blocks, seed), eval_blocks, len(blocks))


def _documents_of(files: list[str], text_field: str) -> Iterator[str]:
    for path in files:
        yield from read_documents(path, text_field)


def _hold_out(stream: Iterator[list[int]], count: int):
    """First yield an array of the stream's first `count` tokens, then the rest of the stream."""
    head: list[int] = []
    rest: list[int] = []
    for ids in stream:
        take = count - len(head)
        head.extend(ids[:take])
        if len(head) >= count:
            rest = ids[take:]
            break
    yield np.asarray(head, dtype=np.int32)
    if rest:
        yield rest
    yield from stream

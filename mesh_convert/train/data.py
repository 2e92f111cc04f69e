"""Training data: token stores (store.py) read memory-mapped, or a Hub dataset streamed.

Global step s takes the rows at positions [s*G, (s+1)*G) of the data's order, and each process
reads only its own rows of them (`BatchPlan`), so a resumed run sees exactly the batches that an
uninterrupted one would, whatever the number of processes, and finding step s costs the same at
any s. The orders:

- shuffled (stores made from files, the default): the token stream cut into blocks of block_size
  tokens, in a seeded permutation per epoch, evaluated per position (no table of the corpus's size);
- stored (a store of equal sequences, e.g. Pythia's pre-shuffled Pile): the store's sequences in
  their order, from data.start_step on; each is block_size + 1 tokens, as GPT-NeoX trains on them;
- streamed (Hub datasets with streaming: true): each process reads its own shards, tokenized in
  loader workers, and a checkpoint keeps its position in the stream.
"""

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..loading import check_largest_id
from .prepare import chunk_documents, plan_file_chunks
from .store import IndexedTokens


# ---------------------------------------------------------------------------------------------
# Documents and tokens (also what `diagnose` reads its text with).
# ---------------------------------------------------------------------------------------------


class _Piece(str):
    """A part of a document that continues in the next item (no EOS after it)."""


def read_documents(path: str | Path, text_field: str = "text", max_record_mb: float = 64) -> Iterator[str]:
    """Yield the documents of one file: a whole .txt file is one document (in pieces: all but the
    last are `_Piece`s), each .jsonl record's `text_field` is one, each .parquet row's is one."""
    for chunk in plan_file_chunks([str(path)]):
        for document in chunk_documents(chunk, text_field, int(max_record_mb * 2**20)):
            if isinstance(document, list):
                for number, piece in enumerate(document):
                    yield piece if chunk.last and number == len(document) - 1 else _Piece(piece)
            else:
                yield document


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


# ---------------------------------------------------------------------------------------------
# Which rows a process reads, and what the model gets of them.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """A run's batches: `steps` optimizer steps of `global_batch` rows, of which this process
    (`rank` of `world`) takes micro-batches of `micro_batch` rows: the accumulation steps take
    consecutive slices of world x micro_batch rows, and process r the r-th part of each."""

    global_batch: int
    micro_batch: int
    steps: int
    rank: int = 0
    world: int = 1

    def positions(self, step: int, micro: int) -> np.ndarray:
        start = step * self.global_batch + (micro * self.world + self.rank) * self.micro_batch
        return np.arange(start, start + self.micro_batch, dtype=np.int64)


def model_inputs(ids: torch.Tensor, block_size: int) -> dict:
    """The model's arguments for the language-model loss on the rows `ids`. A block of block_size
    tokens is its own input, and the loss predicts its tokens 2..L from those before them. A
    sample of block_size + 1 tokens (GPT-NeoX's: Pythia's are 2049) is cut as GPT-NeoX cuts it:
    the first block_size tokens are the input and the last block_size the targets (`shift_labels`:
    already shifted), so the loss is the one GPT-NeoX trained with on that sample."""
    if ids.shape[1] == block_size + 1:
        targets = ids[:, 1:].contiguous()
        return {"input_ids": ids[:, :-1], "labels": targets, "shift_labels": targets}
    return {"input_ids": ids, "labels": ids}


def _rows_tensor(rows: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def _key(seed: int, epoch: int, round_: int) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{round_}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (splitmix64's finaliser): every input bit affects every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shuffled(positions: np.ndarray, count: int, seed: int, epoch: int) -> np.ndarray:
    """Where a seeded permutation of range(count) sends `positions`, in constant time and memory
    whatever `count`: a 4-round Feistel network on the smallest even number of bits holding
    count, re-applied to values that land past it (cycle walking, under 4 rounds on average)."""
    half = max(1, ((count - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    keys = [_key(seed, epoch, r) for r in range(4)]
    values = positions.astype(np.uint64)
    outside = np.ones(len(values), dtype=bool)
    with np.errstate(over="ignore"):
        while outside.any():
            left, right = values[outside] >> shift, values[outside] & mask
            for key in keys:
                left, right = right, left ^ (_mix(right ^ key) & mask)
            values[outside] = (left << shift) | right
            outside = values >= np.uint64(count)
    return values.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Orders.
# ---------------------------------------------------------------------------------------------


@dataclass
class PackedBlocks:
    """A token stream (in memory or memory-mapped) cut into blocks of `block_size` tokens (the
    remainder is dropped)."""

    tokens: np.ndarray
    block_size: int

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def block(self, index: int) -> np.ndarray:
        return self.tokens[index * self.block_size : (index + 1) * self.block_size]

    def stack(self, indices: Iterable[int]) -> torch.Tensor:
        return _rows_tensor([self.block(int(i)) for i in indices])

    def split_tail(self, count: int) -> tuple["PackedBlocks", "PackedBlocks"]:
        """(head, tail) with the last `count` blocks held out: contiguous, so no block is in both."""
        cut = (len(self) - count) * self.block_size
        return PackedBlocks(self.tokens[:cut], self.block_size), PackedBlocks(
            self.tokens[cut : len(self) * self.block_size], self.block_size
        )


@dataclass
class StoredSequences:
    """Sequences of a store, each one sample of block_size + 1 tokens (held-out ones, or those of
    the stored order)."""

    indexed: IndexedTokens
    first: int
    count: int
    block_size: int

    def __len__(self) -> int:
        return self.count

    def stack(self, indices: Iterable[int]) -> torch.Tensor:
        rows = []
        for index in indices:
            row = self.indexed.sequence(self.first + int(index))
            if len(row) != self.block_size + 1:
                raise UserError(f"{self.indexed.name}: sequence {self.first + int(index)} has {len(row)} tokens, not "
                                f"block_size + 1 = {self.block_size + 1} as order: stored needs")
            rows.append(row)
        return _rows_tensor(rows)


class ShuffledOrder:
    """Blocks in a seeded order that changes each epoch: position p is block
    shuffled(p mod n) of epoch p div n."""

    def __init__(self, blocks: PackedBlocks, seed: int, plan: BatchPlan):
        self.blocks, self.seed, self.plan = blocks, seed, plan

    def rows(self, step: int, micro: int) -> torch.Tensor:
        positions = self.plan.positions(step, micro)
        count = len(self.blocks)
        epochs, places = np.divmod(positions, count)
        indices = np.empty_like(places)
        for epoch in np.unique(epochs):
            mine = epochs == epoch
            indices[mine] = shuffled(places[mine], count, self.seed, int(epoch))
        return self.blocks.stack(indices)

    def epochs(self, steps: int) -> float:
        return steps * self.plan.global_batch / len(self.blocks)


class StoredOrder:
    """The store's sequences in their stored order: step s takes sequences [s G, (s + 1) G) from
    `start_step` on (for Pythia's pre-shuffled Pile, Pythia's own step s)."""

    def __init__(self, sequences: StoredSequences, start_step: int, plan: BatchPlan, vocab_size: int | None):
        self.sequences, self.start_step, self.plan, self.vocab_size = sequences, start_step, plan, vocab_size

    def rows(self, step: int, micro: int) -> torch.Tensor:
        ids = self.sequences.stack(self.plan.positions(self.start_step + step, micro))
        if self.vocab_size is not None:  # a store made elsewhere records no largest id: check as read
            check_largest_id(int(ids.max()), self.vocab_size, "the recipe's `tokenizer` and data.store")
        return ids

    def epochs(self, steps: int) -> float:
        return steps * self.plan.global_batch / len(self.sequences)


@dataclass
class TrainData:
    train: ShuffledOrder | StoredOrder
    eval: PackedBlocks | StoredSequences | None
    train_blocks: int | None  # None when streamed (unknown)

"""Token stores on disk, in the Megatron / GPT-NeoX indexed format (`PREFIX.bin` + `PREFIX.idx`),
read memory-mapped with numpy, so that opening one costs the same whatever its size.

One reader serves the stores `mesh-convert prepare-data` writes and the data others publish in
this format (EleutherAI's pre-shuffled Pile, on which Pythia was trained), and GPT-NeoX and
Megatron train on our stores as they are.

The format (little-endian): `.bin` holds the token ids back to back; `.idx` holds the header
b"MMIDIDX\\x00\\x00", version 1 (u64), the token dtype's code (u8), the number of sequences N (u64)
and of document indices D (u64), then the sequences' lengths (int32 x N), their byte offsets in
`.bin` (int64 x N) and the document indices (int64 x D: the sequence each document starts at,
beginning with 0 and ending with N), and, in Megatron's multimodal variant only, a mode per
sequence (int8 x N).

A prepared store is a folder: `tokens.bin`, `tokens.idx` and `store.json`, which records how the
tokens were made (the tokenizer's identity, the sources, the counts).
"""

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence and document counts
# Megatron's dtype codes, the integer ones (token ids); 6 and 7 are floats.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
CODE_OF = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}

STORE_FORMAT = "mesh-convert token store"
STORE_VERSION = 1
TOKENS, METADATA = "tokens", "store.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """2 bytes a token where every id fits (a vocabulary of at most 65,536), else 4."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def tokenizer_identity(tokenizer) -> dict:
    """What makes a tokenizer's ids what they are: a hash of its fast (Rust) tokenizer's full
    definition, which is also what tokenizes in preparation workers, with its name, size and EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"the tokenizer {tokenizer.name_or_path} has no fast (tokenizer.json) form, which "
                        "data preparation needs")
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token, which packing puts between documents")
    return {
        "name": str(tokenizer.name_or_path),
        "sha256": hashlib.sha256(backend.to_str().encode()).hexdigest(),
        "vocab_size": len(tokenizer),
        "eos_token_id": int(tokenizer.eos_token_id),
    }


def write_index(path: Path, dtype: np.dtype, lengths: np.ndarray, document_starts: np.ndarray) -> None:
    """Write `path` (.idx) for sequences of `lengths` tokens of `dtype` lying back to back in the
    .bin; `document_starts`: the sequence each document starts at, in order (ends with N)."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(path, "wb") as handle:
        handle.write(MAGIC)
        handle.write(struct.pack("<QBQQ", 1, CODE_OF[np.dtype(dtype)], len(lengths), len(document_starts)))
        handle.write(lengths.tobytes())
        handle.write(pointers.tobytes())
        handle.write(np.asarray(document_starts, dtype=np.int64).tobytes())


@dataclass
class IndexedTokens:
    """A `.bin`/`.idx` pair, memory-mapped and checked for consistency (in constant time)."""

    name: str  # as the user gave it, for messages
    tokens: np.ndarray  # every token of the .bin, in order
    lengths: np.ndarray
    pointers: np.ndarray  # in tokens (the .idx holds bytes)
    documents: np.ndarray

    @property
    def sequences(self) -> int:
        return len(self.lengths)

    def sequence(self, index: int) -> np.ndarray:
        start = int(self.pointers[index])
        return self.tokens[start : start + int(self.lengths[index])]

    @classmethod
    def open(cls, prefix: Path, name: str) -> "IndexedTokens":
        bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        for path in (bin_path, idx_path):
            if not path.is_file():
                raise UserError(f"{name}: {path} is missing (a Megatron store is a .bin and an .idx file)")
        idx_size, bin_size = idx_path.stat().st_size, bin_path.stat().st_size
        with open(idx_path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or not header.startswith(MAGIC):
            raise UserError(f"{name}: {idx_path} is not a Megatron index (no MMIDIDX header)")
        version, code, count, documents = struct.unpack("<QBQQ", header[len(MAGIC) :])
        if version != 1:
            raise UserError(f"{name}: {idx_path} is a Megatron index of version {version}; only version 1 is read")
        if code not in DTYPE_CODES:
            raise UserError(f"{name}: {idx_path} holds dtype code {code}, not token ids")
        dtype = np.dtype(DTYPE_CODES[code])
        plain = HEADER_BYTES + 12 * count + 8 * documents
        if idx_size not in (plain, plain + count):  # + the multimodal variant's modes
            raise UserError(f"{name}: {idx_path} is truncated or damaged ({idx_size:,} bytes where its header "
                            f"describes {plain:,}); prepare the store again")
        if count == 0:
            raise UserError(f"{name} holds no tokens")
        index = np.memmap(idx_path, mode="r")
        lengths = np.frombuffer(index, np.int32, count, HEADER_BYTES)
        pointers = np.frombuffer(index, np.int64, count, HEADER_BYTES + 4 * count)
        starts = np.frombuffer(index, np.int64, documents, HEADER_BYTES + 12 * count)
        described = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize
        if pointers[0] != 0 or described != bin_size or documents < 2 or starts[0] != 0 or starts[-1] != count:
            raise UserError(f"{name}: {idx_path} does not match {bin_path} (the .bin holds {bin_size:,} bytes, the "
                            f".idx describes {described:,}): a truncated copy, or the two files of different stores")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        return cls(name, tokens, lengths, pointers // dtype.itemsize, starts)


@dataclass
class TokenStore:
    """A store to train from: its tokens, and what `store.json` says of them (None: a Megatron
    store made elsewhere, which records nothing beyond its tokens)."""

    path: Path
    indexed: IndexedTokens
    metadata: dict | None

    @property
    def largest_id(self) -> int | None:
        return None if self.metadata is None else self.metadata["max_token_id"]


def store_prefix(path: Path) -> Path | None:
    """The .bin/.idx prefix `path` names: a prepared store folder, a prefix, or one of the two files."""
    if (path / METADATA).is_file() or (path / f"{TOKENS}.idx").is_file():
        return path / TOKENS
    if path.suffix in (".bin", ".idx"):
        path = path.with_suffix("")
    return path if Path(f"{path}.idx").exists() or Path(f"{path}.bin").exists() else None


def open_store(path: str | Path, tokenizer_id: dict | None, what: str = "data.store") -> TokenStore:
    """Open and check a store: consistent files, made (if it says) with the tokenizer `tokenizer_id`."""
    path = Path(path).expanduser()
    name = f"{what} {path}"
    prefix = store_prefix(path)
    if prefix is None:
        unfinished = sorted(path.parent.glob(f".{path.name}.parts-*")) if path.parent.is_dir() else []
        if unfinished:
            raise UserError(f"{name} was not finished: its preparation was interrupted (its parts are kept in "
                            f"{unfinished[0]}); run the same prepare-data command again to finish it")
        raise UserError(f"{name} does not exist (give a folder made by `mesh-convert prepare-data`, or the "
                        "prefix of a Megatron .bin/.idx pair)")
    indexed = IndexedTokens.open(prefix, name)
    metadata = None
    if (prefix.parent / METADATA).is_file() and prefix.name == TOKENS:
        metadata = read_metadata(prefix.parent / METADATA, name)
        if metadata["tokens"] != len(indexed.tokens):
            raise UserError(f"{name} is truncated or damaged: {METADATA} records {metadata['tokens']:,} tokens, "
                            f"its .bin holds {len(indexed.tokens):,}; prepare it again")
        made_with = metadata["tokenizer"]
        if tokenizer_id is not None and made_with["sha256"] != tokenizer_id["sha256"]:
            raise UserError(f"{name} was made with the tokenizer {made_with['name']} ({made_with['vocab_size']:,} "
                            f"tokens), not the recipe's {tokenizer_id['name']} ({tokenizer_id['vocab_size']:,} tokens): "
                            "prepare it with the recipe's tokenizer, or set `tokenizer` to the one it was made with")
    return TokenStore(path, indexed, metadata)


def read_metadata(path: Path, name: str) -> dict:
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{name}: cannot read {path.name} ({error}); prepare the store again") from None
    if not isinstance(metadata, dict) or metadata.get("format") != STORE_FORMAT:
        raise UserError(f"{name}: {path.name} is not the record of a mesh-convert token store")
    if metadata.get("version") != STORE_VERSION:
        raise UserError(f"{name} is a store of version {metadata.get('version')}; this mesh-convert reads version "
                        f"{STORE_VERSION}: prepare it again")
    tokenizer = metadata.get("tokenizer")
    if not (isinstance(metadata.get("tokens"), int) and isinstance(metadata.get("max_token_id"), int)
            and isinstance(tokenizer, dict) and all(key in tokenizer for key in ("name", "sha256", "vocab_size"))):
        raise UserError(f"{name}: {path.name} is damaged (fields are missing); prepare the store again")
    return metadata


def write_metadata(folder: Path, metadata: dict) -> None:
    path = folder / METADATA
    path.write_text(json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION, **metadata}, indent=1) + "\n")

"""Hub datasets: downloaded ones are prepared into a cached store (prepare.py); streamed ones are
read by each training process from its own shards (`datasets.distributed.split_dataset_by_node`),
tokenized and packed in the workers of a `torchdata` StatefulDataLoader, whose state (each
worker's position in its shards and its unfinished block) a checkpoint keeps, so that a resumed
run goes on from there instead of reading the stream again from its start.

A process's stream is read in the dataset's stored order, again from the start at each epoch
(shuffle an unshuffled dataset by preparing it: `mesh-convert prepare-data --hub ...`). Held-out
blocks are the head of the whole stream, the same for any number of processes; the documents
they come from are left out of training wherever they occur.
"""

import hashlib
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, is_our_fault
from .data import BatchPlan, PackedBlocks, TrainData
from .prepare import cached, plan_arrow_chunks
from .recipe import DataSection

STATE_FILE = "data-state-{rank}.pt"  # in each checkpoint, one per process


def load_hub(section: DataSection, streaming: bool):
    try:
        import datasets
    except ImportError:
        raise UserError("data.hub needs the `datasets` library: pip install 'mesh-convert[hub]'") from None
    hub = section.hub
    try:
        dataset = datasets.load_dataset(hub.path, hub.name, split=hub.split, revision=hub.revision, streaming=streaming)
    except Exception as error:  # network, missing dataset, bad split: the datasets library raises many kinds
        if is_our_fault(error):
            raise
        raise UserError(f"cannot load Hub dataset {hub.path!r}: {type(error).__name__}: {error}") from None
    columns = dataset.column_names or []
    if columns and section.text_field not in columns:
        raise UserError(f"Hub dataset {hub.path!r} has no {section.text_field!r} column (it has: {', '.join(columns)}); "
                        "set data.text_field")
    return dataset


def hub_store(section: DataSection, tokenizer, identity: dict, console=None) -> Path:
    """The store of a (downloaded) Hub dataset, prepared on first use from its Arrow cache files."""

    def chunks():
        dataset = load_hub(section, streaming=False)
        return plan_arrow_chunks([file["filename"] for file in dataset.cache_files])

    sources = {"hub": section.hub.model_dump()}
    return cached(sources, Path(section.hub.path).name, chunks, tokenizer, identity, section.text_field, console)


def _document_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class TokenBlocks(torch.utils.data.IterableDataset):
    """One process's share of a streamed dataset as blocks of `block_size` tokens (in a loader
    worker: that worker's share of it). Its state: the stream's position, the tokens read past
    the last block and the epoch."""

    def __init__(self, dataset, tokenizer_spec: str, eos: int, text_field: str, block_size: int, left_out: set[bytes]):
        self.dataset, self.tokenizer_spec, self.eos = dataset, tokenizer_spec, eos
        self.text_field, self.block_size, self.left_out = text_field, block_size, left_out
        self.start = dataset.state_dict()  # the stream's own start, for each epoch after a resumed one
        self.carry: list[int] = []
        self.epoch = 0

    def __iter__(self):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self.tokenizer_spec)
        tokenizer.no_truncation()
        tokenizer.no_padding()
        while True:
            made = False
            for row in self.dataset:
                text = row[self.text_field]
                if text is None or _document_key(text) in self.left_out:
                    continue
                self.carry.extend(tokenizer.encode(text, add_special_tokens=False).ids)
                self.carry.append(self.eos)
                while len(self.carry) >= self.block_size:
                    block = torch.tensor(self.carry[: self.block_size], dtype=torch.long)
                    del self.carry[: self.block_size]
                    made = True
                    yield block
            if not made:  # an empty share: the loader ends, and the run says so
                return
            self.epoch += 1
            self.dataset.load_state_dict(self.start)

    def state_dict(self) -> dict:
        return {"stream": self.dataset.state_dict(), "carry": list(self.carry), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["stream"])
        self.carry, self.epoch = list(state["carry"]), int(state["epoch"])


@contextmanager
def _torchdata_quiet():
    """torchdata 0.11's loader calls a torch function that now warns of itself, which the user
    can do nothing about: on building the loader and on starting its iterator."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        yield


class StreamedOrder:
    """This process's rows: the next micro_batch blocks of its own stream, in order."""

    def __init__(self, blocks: TokenBlocks, plan: BatchPlan, workers: int):
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.plan = plan
        # spawn: the workers start clean (forking a process that holds torch's and the
        # tokenizer's threads can deadlock them).
        with _torchdata_quiet():
            self.loader = StatefulDataLoader(blocks, batch_size=plan.micro_batch, num_workers=workers,
                                             multiprocessing_context="spawn", persistent_workers=True)
        self.batches = None
        self.next = (0, 0)

    def rows(self, step: int, micro: int) -> torch.Tensor:
        if (step, micro) != self.next:
            raise RuntimeError(f"streamed data asked for step {step}.{micro} where {self.next} comes next")
        if self.batches is None:
            with _torchdata_quiet():
                self.batches = iter(self.loader)
        try:
            ids = next(self.batches)
        except StopIteration:
            raise UserError(f"this process's share of the streamed dataset (process {self.plan.rank} of "
                            f"{self.plan.world}) holds fewer than {self.plan.micro_batch} blocks") from None
        last = micro + 1 == self.plan.global_batch // (self.plan.micro_batch * self.plan.world)
        self.next = (step + 1, 0) if last else (step, micro + 1)
        return ids

    def epochs(self, steps: int) -> float:
        return float("nan")

    def save(self, folder: str) -> None:
        torch.save({"loader": self.loader.state_dict(), "next": self.next},
                   Path(folder) / STATE_FILE.format(rank=self.plan.rank))

    def load(self, folder: str) -> None:
        path = Path(folder) / STATE_FILE.format(rank=self.plan.rank)
        if not path.is_file():
            raise UserError(f"cannot resume from {folder}: it holds no position in the streamed data for process "
                            f"{self.plan.rank} ({path.name}); was it saved by a run with as many processes?")
        state = torch.load(path, weights_only=True)
        self.loader.load_state_dict(state["loader"])
        self.next = tuple(state["next"])
        self.batches = None


def streamed_data(section: DataSection, tokenizer, seed: int, plan: BatchPlan, eval_blocks, console=None) -> TrainData:
    from datasets.distributed import split_dataset_by_node

    from .store import tokenizer_identity

    identity = tokenizer_identity(tokenizer)
    dataset = load_hub(section, streaming=True)
    left_out: set[bytes] = set()
    if eval_blocks is None and section.eval_blocks:
        wanted = section.eval_blocks * section.block_size
        head: list[int] = []
        for row in dataset:
            text = row[section.text_field]
            if text is None:
                continue
            left_out.add(_document_key(text))
            head.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [identity["eos_token_id"]])
            if len(head) >= wanted:
                break
        if len(head) < wanted:
            raise UserError(f"the streamed dataset holds fewer than data.eval_blocks={section.eval_blocks} blocks of "
                            f"{section.block_size} tokens")
        eval_blocks = PackedBlocks(np.asarray(head[:wanted], dtype=np.int64), section.block_size)
    mine = split_dataset_by_node(dataset, rank=plan.rank, world_size=plan.world)
    blocks = TokenBlocks(mine, tokenizer.backend_tokenizer.to_str(), identity["eos_token_id"], section.text_field,
                         section.block_size, left_out)
    return TrainData(StreamedOrder(blocks, plan, section.loader_workers), eval_blocks, None)

"""Where a run's data comes from: the recipe's data section as the training and held-out data of
`data.py`'s orders, from a token store (`data.store`, or one prepared from files or a Hub dataset on
first use and cached) or a Hub dataset streamed (`stream.py`)."""

from ..errors import UserError
from ..loading import check_largest_id
from .data import BatchPlan, PackedBlocks, ShuffledOrder, StoredOrder, StoredSequences, TrainData
from .prepare import cached_store, check_data_file
from .recipe import DataSection
from .store import TokenStore, open_store, tokenizer_identity


def check_sources(section: DataSection) -> None:
    """What the recipe names exists and is of a kind we read: checked before any work."""
    for path in [*section.train, *section.eval_files]:
        check_data_file(path)
    if section.store is not None:
        open_store(section.store, None)


def build_data(section: DataSection, tokenizer, seed: int, plan: BatchPlan, config=None, console=None) -> TrainData:
    """The recipe's training and held-out data, from its store (files are prepared into one on first
    use); `config`: the model's, whose context and vocabulary the data must fit."""
    max_positions = getattr(config, "max_position_embeddings", None)
    vocab_size = getattr(config, "vocab_size", None)
    if max_positions is not None and section.block_size > max_positions:
        raise UserError(f"data.block_size={section.block_size} is above the model's context of {max_positions} tokens")
    identity = tokenizer_identity(tokenizer)

    def checked(store: TokenStore) -> TokenStore:
        if store.largest_id is not None:
            check_largest_id(store.largest_id, vocab_size, "the recipe's `tokenizer`")
        return store

    eval_blocks = None
    if section.eval_files:
        store = checked(open_store(cached_store(section.eval_files, tokenizer, identity, section.text_field, console),
                                   identity))
        eval_blocks = PackedBlocks(store.indexed.tokens, section.block_size)
        if len(eval_blocks) == 0:
            raise UserError(f"data.eval_files hold fewer than one block of {section.block_size} tokens")

    if section.hub is not None and section.hub.streaming:
        from .stream import streamed_data

        return streamed_data(section, tokenizer, seed, plan, eval_blocks, console)
    if section.store is not None:
        store = checked(open_store(section.store, identity))
    elif section.hub is not None:
        from .stream import hub_store

        store = checked(open_store(hub_store(section, tokenizer, identity, console), identity))
    else:
        store = checked(open_store(cached_store(section.train, tokenizer, identity, section.text_field, console),
                                   identity))
    if section.order == "stored":
        return _stored(store, section, plan, eval_blocks, vocab_size if store.largest_id is None else None)
    return _shuffled(store, section, seed, plan, eval_blocks)


def _shuffled(store: TokenStore, section: DataSection, seed: int, plan: BatchPlan, eval_blocks) -> TrainData:
    blocks = PackedBlocks(store.indexed.tokens, section.block_size)
    held_out = 0 if eval_blocks is not None else section.eval_blocks
    if len(blocks) < held_out + plan.global_batch:
        kept = f", after holding out data.eval_blocks={held_out}," if held_out else ""
        raise UserError(f"the data holds {len(blocks):,} blocks of {section.block_size} tokens{kept} too few for one "
                        f"global batch of {plan.global_batch}")
    if held_out:
        blocks, eval_blocks = blocks.split_tail(held_out)
    return TrainData(ShuffledOrder(blocks, seed, plan), eval_blocks, len(blocks))


def _stored(store: TokenStore, section: DataSection, plan: BatchPlan, eval_blocks, vocab_size) -> TrainData:
    indexed, sample = store.indexed, section.block_size + 1
    if int(indexed.lengths[0]) != sample or len(indexed.tokens) != indexed.sequences * sample:
        raise UserError(f"data.store {store.path} does not hold sequences of block_size + 1 = {sample} tokens (its "
                        f"first has {int(indexed.lengths[0])}), which order: stored reads one per sample: set "
                        f"data.block_size to {int(indexed.lengths[0]) - 1} for a store of equal sequences, or use "
                        "order: shuffled")
    held_out = 0 if eval_blocks is not None else section.eval_blocks
    usable = indexed.sequences - held_out
    needed = (section.start_step + plan.steps) * plan.global_batch
    if usable < plan.global_batch or needed > usable:
        kept = f" ({held_out} of them held out for evaluation at its end)" if held_out else ""
        raise UserError(f"data.store {store.path} holds {indexed.sequences:,} sequences{kept}: steps "
                        f"{section.start_step:,} to {section.start_step + plan.steps - 1:,} of "
                        f"{plan.global_batch} need {needed:,}; lower data.start_step or the run's steps")
    if held_out:
        eval_blocks = StoredSequences(indexed, usable, held_out, section.block_size)
    train = StoredSequences(indexed, 0, usable, section.block_size)
    return TrainData(StoredOrder(train, section.start_step, plan, vocab_size), eval_blocks, usable)

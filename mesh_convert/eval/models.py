"""The loaded model and tokenizer as every evaluation meets them: where the model runs, how much
context it takes, the ids its tokenizer puts before any text and the check that the ids fit the
model; and the callback through which the long loops report progress."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import UserError
from ..loading import check_largest_id

Progress = Callable[[int, int], None]
"""`on_progress(done, total)`: called after each batch with the units done so far."""

MAX_DEFAULT_CONTEXT = 2048


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def default_context(model) -> int:
    """The model's maximum positions, capped at 2048 (Pythia's training context)."""
    limit = max_positions(model)
    return min(limit, MAX_DEFAULT_CONTEXT) if limit else MAX_DEFAULT_CONTEXT


def max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _vocab_size(model) -> int | None:
    try:
        return model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return getattr(getattr(model, "config", None), "vocab_size", None)


def check_token_ids(model, ids: Sequence[int]) -> None:
    """A tokenizer that does not belong to the model shows up as ids past its vocabulary; say
    so instead of failing deep inside an embedding lookup."""
    if ids:
        check_largest_id(max(ids), _vocab_size(model), "--tokenizer")


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text by default: the BOS token of a Llama-style
    tokenizer, nothing for GPT-NeoX's. lm-eval's HFLM encodes with the tokenizer's defaults, so
    `eval` starts its texts the same way."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    default = tokenizer("a")["input_ids"]
    for start in range(len(default) - len(plain) + 1):
        if default[start : start + len(plain)] == plain:
            return list(default[:start])
    return []

"""Sliding-window perplexity of a loaded model on a text (scripts can call `perplexity` directly;
`mesh-convert eval` is a thin layer over it). Nothing here prints: the loop reports through an
optional `on_progress(done, total)` callback.

Sliding-window perplexity, precisely. The text is tokenized once (no special tokens added).
A forward pass sees `context` input tokens and predicts the `context` tokens that follow each
of them, so a window covers `context + 1` tokens. Window k starts at `k * stride`; the last
window is moved left so that it ends at the end of the text (every window then has the same
length, which lets them be batched, and the last tokens get more left context, not less).
Each token is scored exactly once, in the first window that predicts it: the first window
scores all of its tokens except the very first token of the text (nothing predicts it), later
windows score only their new tokens (the last `stride`, fewer for the last window). A scored
token therefore sees at least `context - stride + 1` tokens of left context, except in the
first window where the context grows from 1. With `stride == context` the windows overlap by
one token, the input of one window's first prediction (as in lm-eval's rolling windows; the
textbook `labels[:-stride] = -100` loop silently drops that token instead).

Bits per byte = total nats / (ln 2 * bytes), where bytes = the UTF-8 bytes of the evaluated
text: the whole text, or with `max_tokens` the text up to the end of the last kept token. The
unscored first token's bytes are included (as lm-eval divides a document's log-likelihood by
the document's bytes); on any real text that changes the figure by a few parts per million.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from .models import Progress, check_token_ids, default_context, leading_special_ids, max_positions, model_device


@dataclass(frozen=True)
class PerplexityResult:
    """Totals of a sliding-window perplexity run. `tokens` counts scored tokens (all tokens of
    the evaluated text but the first); `bytes` the UTF-8 bytes of the evaluated text."""

    tokens: int
    nats: float
    bytes: int
    context: int
    stride: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * self.bytes)

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "nats": self.nats,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "bytes": self.bytes,
            "context": self.context,
            "stride": self.stride,
        }


@dataclass(frozen=True)
class Window:
    """One forward pass: inputs `ids[begin:end - 1]`, scored targets `ids[end - scored:end]`."""

    begin: int
    end: int
    scored: int


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The window schedule described in the module docstring."""
    if n_tokens < 2:
        raise UserError("the text has fewer than 2 tokens: nothing to score")
    if context < 1 or not 1 <= stride <= context:
        raise UserError(f"need context >= 1 and 1 <= stride <= context (got context {context}, stride {stride})")
    windows = []
    scored_until = 1  # token 0 is never predicted
    k = 0
    while scored_until < n_tokens:
        end = min(context + 1 + k * stride, n_tokens)
        begin = max(0, end - 1 - context)
        windows.append(Window(begin, end, end - scored_until))
        scored_until = end
        k += 1
    return windows


def _supports_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _forward_logits(model, input_ids: torch.Tensor, keep: int, attention_mask=None) -> torch.Tensor:
    """Logits of the last `keep` positions; asks the model for only those when it can, since
    the full [batch, context, vocab] tensor is the largest thing in memory."""
    kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
    if _supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
    return logits[:, -keep:, :]


@torch.inference_mode()
def sliding_window_nats(
    model,
    ids: Sequence[int],
    *,
    context: int,
    stride: int,
    batch_size: int = 4,
    on_progress: Progress | None = None,
) -> tuple[float, int]:
    """Total NLL (nats) and number of scored tokens of `ids` under the window schedule."""
    windows = sliding_windows(len(ids), context, stride)
    all_ids = torch.tensor(list(ids), dtype=torch.long)
    device = model_device(model)
    nats = 0.0
    tokens = 0
    for start in range(0, len(windows), max(1, batch_size)):
        batch = windows[start : start + max(1, batch_size)]
        # Batching needs equal lengths: all windows are `context` long except when the whole
        # text is shorter, in which case there is a single window.
        inputs = torch.stack([all_ids[w.begin : w.end - 1] for w in batch]).to(device)
        keep = max(w.scored for w in batch)
        logits = _forward_logits(model, inputs, keep)
        for row, window in enumerate(batch):
            # The prediction for target position p comes from input position p - 1, so the
            # targets ids[end - scored:end] use the last `scored` logits of the row.
            row_logits = logits[row, keep - window.scored :, :].float()
            targets = all_ids[window.end - window.scored : window.end].to(device)
            nats += F.cross_entropy(row_logits, targets, reduction="sum").item()
            tokens += window.scored
        if on_progress:
            on_progress(min(start + len(batch), len(windows)), len(windows))
    return nats, tokens


def encode_text(tokenizer, text: str, max_tokens: int | None = None) -> tuple[list[int], int]:
    """Token ids of `text` (no special tokens) and the UTF-8 bytes of the text they cover."""
    use_offsets = max_tokens is not None and getattr(tokenizer, "is_fast", False)
    encoding = _tokenize_enough(tokenizer, text, max_tokens, use_offsets)
    ids = list(encoding["input_ids"])
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, len(text.encode("utf-8"))
    ids = ids[:max_tokens]
    if use_offsets:
        # Character offset where the last kept token ends: the evaluated text is text[:end].
        covered = text[: encoding["offset_mapping"][max_tokens - 1][1]]
    else:
        covered = tokenizer.decode(ids)
    return ids, len(covered.encode("utf-8"))


def _tokenize_enough(tokenizer, text: str, max_tokens: int | None, use_offsets: bool):
    """Tokenize the whole text, or with a token limit only a prefix of it, doubled until it
    yields a margin of tokens past the limit: a limited run on a large corpus then does not
    pay for tokenizing all of it, and the margin keeps the cut from changing kept tokens."""
    margin = 64
    chars = len(text) if max_tokens is None else max_tokens * 8 + 1024
    while True:
        encoding = tokenizer(
            text[:chars], add_special_tokens=False, return_offsets_mapping=use_offsets, verbose=False
        )
        if chars >= len(text) or len(encoding["input_ids"]) > max_tokens + margin:
            return encoding
        chars *= 2


def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    on_progress: Progress | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of `text` (see the module docstring for the exact schedule).

    `context` defaults to the model's maximum positions (at most 2048), `stride` to half of it;
    `max_tokens` keeps only the first tokens of the text."""
    context = default_context(model) if context is None else context
    stride = max(1, context // 2) if stride is None else stride
    limit = max_positions(model)
    if limit is not None and context > limit:
        raise UserError(f"context {context} exceeds the model's {limit} positions")
    if max_tokens is not None and max_tokens < 2:
        raise UserError("the token limit must be at least 2")
    ids, n_bytes = encode_text(tokenizer, text, max_tokens)
    ids = leading_special_ids(tokenizer) + ids
    check_token_ids(model, ids)
    nats, tokens = sliding_window_nats(
        model, ids, context=context, stride=stride, batch_size=batch_size, on_progress=on_progress
    )
    return PerplexityResult(tokens=tokens, nats=nats, bytes=n_bytes, context=context, stride=stride)

"""LAMBADA in lm-eval's `lambada_openai` protocol: last-word accuracy and perplexity of a loaded
model over LAMBADA-style texts, with the texts split and tokenized as lm-eval's HFLM does."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError
from .models import Progress, check_token_ids, default_context, leading_special_ids, model_device


@dataclass(frozen=True)
class LambadaResult:
    """LAMBADA in lm-eval's `lambada_openai` protocol. Per example: `target_nats` is the
    target's negative log-likelihood summed over its tokens, `greedy` whether greedy argmax
    decoding reproduces every target token."""

    target_nats: list[float] = field(repr=False)
    greedy: list[bool] = field(repr=False)

    @property
    def count(self) -> int:
        return len(self.greedy)

    @property
    def correct(self) -> int:
        return sum(self.greedy)

    @property
    def accuracy(self) -> float:
        return self.correct / self.count

    @property
    def nats(self) -> float:
        return math.fsum(self.target_nats)

    @property
    def perplexity(self) -> float:
        # lm-eval's `perplexity` aggregation: exp of the mean per-example NLL (not per token).
        return math.exp(self.nats / self.count)

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "perplexity": self.perplexity,
            "nats": self.nats,
        }


def lambada_split(text: str) -> tuple[str, str]:
    """(context, target): the target is the last space-separated word with its leading space.

    lm-eval's `lambada_openai` splits on ' ' exactly (`text.split(' ')`), not on any
    whitespace: in 7 of the 5,153 test lines the last piece holds a newline ("of\\n\\nPower"),
    and the target then keeps it. Matching that keeps the numbers comparable."""
    context, sep, word = text.rpartition(" ")
    if not sep:
        raise UserError(f"LAMBADA line without a space, so no last word to predict: {text[:60]!r}")
    return context, " " + word


def encode_pair(
    tokenizer, context: str, target: str, prefix_token_id: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of (context, target) as lm-eval's HFLM makes them: trailing spaces of the
    context move to the target; the target's ids are those of the whole string past the
    context's, so tokenization across the boundary is the natural one; the context starts with
    the tokenizer's BOS token where it adds one. An empty context becomes lm-eval's prefix
    token (BOS, or end-of-text without one) unless the target already starts with it."""
    if not context:
        token = prefix_token_id
        if token is None:
            token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if token is None:
            raise UserError("an example has an empty context and the tokenizer has no end-of-text token")
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if target_ids and target_ids[0] == token:
            return target_ids[:1], target_ids[1:]
        return [token], target_ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, target = context[:-n_spaces], context[-n_spaces:] + target
    prefix = leading_special_ids(tokenizer)
    whole = tokenizer(context + target, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return prefix + list(context_ids), list(whole[len(context_ids) :])


def _lambada_inputs(pairs, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(model input, target) per example: the last `max_length` tokens of context+target minus
    the final token (it is only predicted), as lm-eval truncates from the left."""
    out = []
    for context_ids, target_ids in pairs:
        if not target_ids:
            raise UserError("a LAMBADA target tokenizes to nothing")
        if len(target_ids) > max_length:
            raise UserError(
                f"a LAMBADA target has {len(target_ids)} tokens, more than the {max_length} the model sees"
            )
        out.append(((context_ids + target_ids)[-(max_length + 1) :][:-1], target_ids))
    return out


@torch.inference_mode()
def _score_targets(model, examples: list[tuple[list[int], list[int]]], pad_id: int) -> list[tuple[float, bool]]:
    """(target NLL, greedy match) for examples of possibly different lengths, right-padded in
    one batch: with causal attention the padding after a row's tokens cannot change them."""
    device = model_device(model)
    width = max(len(inputs) for inputs, _ in examples)
    batch = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (inputs, _) in enumerate(examples):
        batch[row, : len(inputs)] = torch.tensor(inputs)
        mask[row, : len(inputs)] = 1
    logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False).logits
    scores = []
    for row, (inputs, target) in enumerate(examples):
        n = len(target)
        row_logits = logits[row, len(inputs) - n : len(inputs), :].float()
        target_t = torch.tensor(target, device=row_logits.device)
        nll = F.cross_entropy(row_logits, target_t, reduction="sum").item()
        greedy = bool(torch.equal(row_logits.argmax(dim=-1), target_t))
        scores.append((nll, greedy))
    return scores


def lambada(
    model,
    tokenizer,
    examples: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    on_progress: Progress | None = None,
) -> LambadaResult:
    """Last-word accuracy and perplexity over LAMBADA-style texts (lm-eval `lambada_openai`).

    `max_length` (default: the model's positions, at most 2048) bounds the model input, which
    is truncated from the left like lm-eval does."""
    if not examples:
        raise UserError("no LAMBADA examples to evaluate")
    max_length = max_length or default_context(model)
    pairs = [encode_pair(tokenizer, *lambada_split(text)) for text in examples]
    for context_ids, target_ids in pairs:
        check_token_ids(model, context_ids + target_ids)
    inputs = _lambada_inputs(pairs, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # Longest first, so that each batch pads little and a too-large batch fails at once.
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    nats: list[float] = [0.0] * len(inputs)
    greedy: list[bool] = [False] * len(inputs)
    step = max(1, batch_size)
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        for index, (nll, ok) in zip(chunk, _score_targets(model, [inputs[i] for i in chunk], pad_id)):
            nats[index], greedy[index] = nll, ok
        if on_progress:
            on_progress(min(start + step, len(order)), len(order))
    return LambadaResult(target_nats=nats, greedy=greedy)

"""Evaluation: sliding-window perplexity, LAMBADA (lm-eval's `lambada_openai` protocol) and,
when lm-eval is installed, any lm-eval harness task.

The functions take a loaded model and tokenizer, so that scripts can call them directly; the
`mesh-convert eval` command (`cli/eval.py`, `eval/runner.py`) is a thin layer over them. Nothing here prints:
long loops report through an optional `on_progress(done, total)` callback.

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
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError, error_line, is_our_fault
from ..io import HubUnreachable, hub_info, read_jsonl, resolve_endpoint
from ..loading import check_largest_id

Progress = Callable[[int, int], None]
"""`on_progress(done, total)`: called after each batch with the units done so far."""

DATA_ENV = "MESH_CONVERT_DATA"
CACHE_ENV = "MESH_CONVERT_CACHE"
MAX_DEFAULT_CONTEXT = 2048

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

# --------------------------------------------------------------------------------- results


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


# ------------------------------------------------------------------------------------ data


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
        texts.append(record["text"])
    return texts


def load_text_dataset(name_or_path: str | os.PathLike) -> TextDataset:
    """Load `wikitext2`, `lambada`, a text file (one document) or a jsonl of {"text": ...}."""
    path, task = resolve_data(name_or_path)
    is_jsonl = path.suffix.lower() == ".jsonl"
    documents = read_jsonl_texts(path) if is_jsonl else [_read_utf8(path)]
    if not any(doc.strip() for doc in documents):
        raise UserError(f"{path} holds no text")
    return TextDataset(str(name_or_path), path, documents, task or "perplexity")


# ---------------------------------------------------------------------------------- models


def parse_device(name: str) -> torch.device:
    """`auto` means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device '{name}' (e.g. cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available")
    return device


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


# ------------------------------------------------------------------------------ perplexity


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


# -------------------------------------------------------------------------------- lambada


def lambada_split(text: str) -> tuple[str, str]:
    """(context, target): the target is the last space-separated word with its leading space.

    lm-eval's `lambada_openai` splits on ' ' exactly (`text.split(' ')`), not on any
    whitespace: in 7 of the 5,153 test lines the last piece holds a newline ("of\\n\\nPower"),
    and the target then keeps it. Matching that keeps the numbers comparable."""
    context, sep, word = text.rpartition(" ")
    if not sep:
        raise UserError(f"LAMBADA line without a space, so no last word to predict: {text[:60]!r}")
    return context, " " + word


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


# -------------------------------------------------------------------------------- lm-eval

LM_EVAL_MISSING = "--tasks needs lm-eval, which is not installed: pip install 'mesh-convert[eval]'"


def require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(LM_EVAL_MISSING) from None
    return lm_eval, HFLM, TaskManager


def lm_eval_task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None = None):
    """An lm-eval TaskManager that knows every name in `tasks`, or a UserError naming those it
    does not. lm-eval's own index (~15k tasks, ~10 s to build) is skipped when the local
    task folder already defines everything asked for."""
    _, _, TaskManager = require_lm_eval()
    if include_path is None:
        manager = TaskManager()
    else:
        path = Path(include_path).expanduser()
        if not path.is_dir():
            raise UserError(f"--include-path is not a directory: {path}")
        manager = TaskManager(include_path=str(path), include_defaults=False)
        if not all(task in manager.all_tasks for task in tasks):
            manager = TaskManager(include_path=str(path))
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (local task YAMLs: --include-path DIR)")
    return manager


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    task_manager=None,
    limit: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval harness tasks on an already loaded model; {task: {metric: value}}.

    Metric names lose lm-eval's ",none" filter suffix (other filters keep theirs). Tasks
    defined in local YAML files (e.g. over a local jsonl) work offline via `include_path`;
    pass a `task_manager` from `lm_eval_task_manager` to reuse one across models."""
    lm_eval, HFLM, _ = require_lm_eval()
    manager = task_manager or lm_eval_task_manager(tasks, include_path)
    wrapper = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length or default_context(model),
    )
    output = lm_eval.simple_evaluate(model=wrapper, tasks=list(tasks), task_manager=manager, limit=limit)
    return {task: _metrics(values) for task, values in output["results"].items()}


def _metrics(values: dict) -> dict[str, float]:
    metrics = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # "alias" and "N/A" stderr placeholders
        name, _, filter_name = key.partition(",")
        metrics[name if filter_name in ("", "none") else key] = float(value)
    return metrics

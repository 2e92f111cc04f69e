"""Running `mesh-convert eval`: validate the options, load the data, evaluate every model in turn
(only one in memory at a time) and build the report that the command prints."""

from __future__ import annotations

import contextlib
import gc
import sys

import torch

from ..errors import UserError, shown
from ..io import model_source
from ..loading import load_model, load_tokenizer, parse_device, transformers_bars_hidden
from .data import TextDataset, load_text_dataset
from .lambada import lambada
from .models import model_device
from .options import EvalOptions
from .perplexity import perplexity
from .tasks import lm_eval_task_manager, lm_eval_tasks


def validate(options: EvalOptions) -> None:
    """Reject bad options before any model is loaded, so mistakes fail in a second."""
    for name in ("context", "stride", "limit", "batch_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer (got {value})")
    if options.context and options.stride and options.stride > options.context:
        raise UserError(f"--stride ({options.stride}) cannot exceed --context ({options.context})")
    parse_device(options.device)
    for model in options.models:
        model_source(model)
    if options.tokenizer:
        model_source(options.tokenizer)


def choose_task(options: EvalOptions, dataset: TextDataset) -> str:
    return dataset.default_task if options.task == "auto" else options.task


def evaluate_model(
    model_name: str, tokenizer, options: EvalOptions, dataset, task_manager, progress
) -> dict:
    """All requested evaluations of one model, as a JSON-able dict."""
    model = load_model(model_name, dtype=options.dtype, device=parse_device(options.device))
    result: dict = {"model": model_name}
    try:
        if dataset is not None:
            kind = choose_task(options, dataset)
            bar = progress.add_task(f"{shown(model_name)} · {shown(dataset.name)} {kind}", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(bar, completed=done, total=total)

            result[kind] = _run_data_task(kind, model, tokenizer, dataset, options, advance).to_dict()
        if options.tasks:
            bar = progress.add_task(f"{shown(model_name)} · lm-eval {shown(','.join(options.tasks))}", total=None)
            result["lm_eval"] = lm_eval_tasks(
                model,
                tokenizer,
                options.tasks,
                task_manager=task_manager,
                limit=options.limit,
                batch_size=options.batch_size or 1,
                max_length=options.context,
            )
            progress.update(bar, total=1, completed=1)
    finally:
        # Only one model in memory at a time: drop this one before the next is loaded.
        on_cuda = model_device(model).type == "cuda"
        del model
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    return result


def _run_data_task(kind, model, tokenizer, dataset, options: EvalOptions, advance):
    if kind == "lambada":
        examples = dataset.documents[: options.limit] if options.limit else dataset.documents
        return lambada(
            model,
            tokenizer,
            examples,
            batch_size=options.batch_size or 8,
            max_length=options.context,
            on_progress=advance,
        )
    return perplexity(
        model,
        tokenizer,
        dataset.text(),
        context=options.context,
        stride=options.stride,
        batch_size=options.batch_size or 4,
        max_tokens=options.limit,
        on_progress=advance,
    )


def build_report(options: EvalOptions, dataset, results: list[dict]) -> dict:
    data = None
    if dataset is not None:
        data = {"name": dataset.name, "path": str(dataset.path), "task": choose_task(options, dataset)}
    settings = {
        key: getattr(options, key)
        for key in ("context", "stride", "limit", "batch_size", "device", "dtype", "tokenizer")
    }
    return {
        "data": data,
        "tasks": options.tasks,
        "include_path": _str_or_none(options.include_path),
        "settings": settings,
        "results": results,
    }


def _str_or_none(value) -> str | None:
    return None if value is None else str(value)


def evaluate_all(options: EvalOptions, progress) -> dict:
    """Validate, load the data, evaluate every model in turn; `progress` is a rich Progress (or
    anything with its task methods)."""
    validate(options)
    data = options.data or (None if options.tasks else "wikitext2")
    dataset = load_text_dataset(data) if data else None
    task_manager = lm_eval_task_manager(options.tasks, options.include_path) if options.tasks else None
    # Tokenizers are cheap to load: a missing one fails now rather than after the first model.
    tokenizers = [load_tokenizer(options.tokenizer or name) for name in options.models]
    results = []
    # Under --json, stdout is reserved for the JSON document: anything else a library prints
    # (lm-eval does) goes to stderr.
    redirect = contextlib.redirect_stdout(sys.stderr) if options.as_json else contextlib.nullcontext()
    with transformers_bars_hidden(), redirect, progress:  # one progress display: ours
        for model_name, tokenizer in zip(options.models, tokenizers):
            results.append(evaluate_model(model_name, tokenizer, options, dataset, task_manager, progress))
    return build_report(options, dataset, results)

"""`mesh-convert eval`: perplexity, LAMBADA and lm-eval tasks for one or more checkpoints.

Several models are evaluated one after another (only one is in memory at a time) and shown
side by side in one table, typically the original next to its conversions. `--json` prints
the results as JSON on stdout and nothing else.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import evaluate as ev
from .errors import UserError
from .hf_bars import transformers_bars_hidden

TASK_CHOICES = ("auto", "perplexity", "lambada")


@dataclass(frozen=True)
class EvalOptions:
    models: list[str]
    data: str | None
    task: str
    tasks: list[str]
    include_path: Path | None
    context: int | None
    stride: int | None
    limit: int | None
    batch_size: int | None
    device: str
    dtype: str
    tokenizer: str | None
    json: bool


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        models: list[str] = typer.Argument(
            ..., help="Checkpoint directories (or Hub ids); several are shown side by side.", show_default=False
        ),
        data: str | None = typer.Option(
            None,
            "--data",
            help="wikitext2, lambada, a .txt file, or a .jsonl of {\"text\": ...}. "
            "Default: wikitext2, unless --tasks is given.",
            show_default=False,
        ),
        task: str = typer.Option(
            "auto",
            "--task",
            help="What to compute on --data: perplexity, lambada, or auto (lambada for 'lambada').",
        ),
        tasks: str | None = typer.Option(
            None,
            "--tasks",
            help="Comma-separated lm-eval harness tasks (needs: pip install 'mesh-convert\\[eval]').",
        ),
        include_path: Path | None = typer.Option(
            None, "--include-path", help="Folder of extra lm-eval task YAMLs (e.g. tasks over local files)."
        ),
        context: int | None = typer.Option(
            None, "--context", help="Perplexity window in tokens. Default: the model's positions, at most 2048."
        ),
        stride: int | None = typer.Option(
            None, "--stride", help="Tokens the perplexity window advances by. Default: half the context."
        ),
        limit: int | None = typer.Option(
            None, "--limit", help="Only the first N tokens (perplexity) or N examples (lambada, lm-eval tasks)."
        ),
        batch_size: int | None = typer.Option(
            None, "--batch-size", help="Windows or examples per forward pass. Default: 4 windows, 8 examples."
        ),
        device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, or auto (CUDA when available)."),
        dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
        tokenizer: str | None = typer.Option(
            None, "--tokenizer", help="Tokenizer directory for all models. Default: each model's own directory."
        ),
        json_output: bool = typer.Option(
            False, "--json", help="Print the results as JSON on stdout, nothing else."
        ),
    ):
        """Evaluate checkpoints: sliding-window perplexity, LAMBADA (lm-eval's lambada_openai), lm-eval tasks."""
        options = EvalOptions(
            models=models,
            data=data,
            task=task,
            tasks=[name.strip() for name in (tasks or "").split(",") if name.strip()],
            include_path=include_path,
            context=context,
            stride=stride,
            limit=limit,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            tokenizer=tokenizer,
            json=json_output,
        )
        run_eval(options)


# ---------------------------------------------------------------------------------- running


def validate(options: EvalOptions) -> None:
    """Reject bad options before any model is loaded, so mistakes fail in a second."""
    if options.task not in TASK_CHOICES:
        raise UserError(f"--task must be one of {', '.join(TASK_CHOICES)} (got '{options.task}')")
    for name in ("context", "stride", "limit", "batch_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer (got {value})")
    if options.context and options.stride and options.stride > options.context:
        raise UserError(f"--stride ({options.stride}) cannot exceed --context ({options.context})")
    ev.parse_dtype(options.dtype)
    ev.parse_device(options.device)
    for model in options.models:
        ev.check_model_source(model)
    if options.tokenizer:
        ev.check_model_source(options.tokenizer)


def choose_task(options: EvalOptions, dataset: ev.TextDataset) -> str:
    return dataset.default_task if options.task == "auto" else options.task


def evaluate_model(
    model_name: str, tokenizer, options: EvalOptions, dataset, task_manager, progress: Progress
) -> dict:
    """All requested evaluations of one model, as a JSON-able dict."""
    model = ev.load_model(model_name, dtype=options.dtype, device=options.device)
    result: dict = {"model": model_name}
    try:
        if dataset is not None:
            kind = choose_task(options, dataset)
            bar = progress.add_task(f"{model_name} · {dataset.name} {kind}", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(bar, completed=done, total=total)

            result[kind] = _run_data_task(kind, model, tokenizer, dataset, options, advance).to_dict()
        if options.tasks:
            bar = progress.add_task(f"{model_name} · lm-eval {','.join(options.tasks)}", total=None)
            result["lm_eval"] = ev.lm_eval_tasks(
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
        on_cuda = ev.model_device(model).type == "cuda"
        del model
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    return result


def _run_data_task(kind, model, tokenizer, dataset, options: EvalOptions, advance):
    if kind == "lambada":
        examples = dataset.documents[: options.limit] if options.limit else dataset.documents
        return ev.lambada(
            model,
            tokenizer,
            examples,
            batch_size=options.batch_size or 8,
            max_length=options.context,
            on_progress=advance,
        )
    return ev.perplexity(
        model,
        tokenizer,
        dataset.text(),
        context=options.context,
        stride=options.stride,
        batch_size=options.batch_size or 4,
        max_tokens=options.limit,
        on_progress=advance,
    )


def _progress(disabled: bool) -> Progress:
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disabled or not console.is_terminal,
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


def run_eval(options: EvalOptions) -> dict:
    """Validate, load the data, evaluate every model in turn, then print a table or JSON."""
    validate(options)
    data = options.data or (None if options.tasks else "wikitext2")
    dataset = ev.load_text_dataset(data) if data else None
    task_manager = ev.lm_eval_task_manager(options.tasks, options.include_path) if options.tasks else None
    # Tokenizers are cheap to load: a missing one fails now rather than after the first model.
    tokenizers = [ev.load_tokenizer(options.tokenizer or name) for name in options.models]
    results = []
    # Under --json, stdout is reserved for the JSON document: anything else a library prints
    # (lm-eval does) goes to stderr.
    redirect = contextlib.redirect_stdout(sys.stderr) if options.json else contextlib.nullcontext()
    with transformers_bars_hidden(), redirect, _progress(options.json) as progress:  # one progress display: ours
        for model_name, tokenizer in zip(options.models, tokenizers):
            results.append(evaluate_model(model_name, tokenizer, options, dataset, task_manager, progress))
    report = build_report(options, dataset, results)
    if options.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        sys.stdout.flush()
    else:
        Console().print(*render_tables(report))
    return report


# ----------------------------------------------------------------------------------- tables


def render_tables(report: dict) -> list[Table]:
    results = report["results"]
    tables = []
    if any("perplexity" in r for r in results):
        tables.append(perplexity_table(report["data"]["name"], results))
    if any("lambada" in r for r in results):
        tables.append(lambada_table(report["data"]["name"], results))
    if any("lm_eval" in r for r in results):
        tables.append(lm_eval_table(results))
    return tables


def _format_ppl(value: float) -> str:
    return f"{value:.3f}" if value < 1e6 else f"{value:.4g}"  # random models reach 1e15


def _ratio(value: float, first: float) -> str:
    return f"×{value / first:.3f}" if first > 0 else "-"


def perplexity_table(data_name: str, results: list[dict]) -> Table:
    rows = [r["perplexity"] for r in results]
    windows = {(row["context"], row["stride"]) for row in rows}
    title = f"Perplexity on {data_name}"
    if len(windows) == 1:
        context, stride = windows.pop()
        title += f" (context {context}, stride {stride})"
    table = Table(title=title, title_justify="left")
    table.add_column("model", overflow="fold")
    for name in ("tokens", "nats", "perplexity", "bits/byte"):
        table.add_column(name, justify="right")
    if len(rows) > 1:
        table.add_column("ppl vs first", justify="right")
    for result, row in zip(results, rows):
        cells = [result["model"], f"{row['tokens']:,}", f"{row['nats']:,.1f}", _format_ppl(row["perplexity"]),
                 f"{row['bits_per_byte']:.4f}"]
        if len(rows) > 1:
            cells.append(_ratio(row["perplexity"], rows[0]["perplexity"]))
        table.add_row(*cells)
    return table


def lambada_table(data_name: str, results: list[dict]) -> Table:
    rows = [r["lambada"] for r in results]
    table = Table(title=f"LAMBADA ({data_name}, lm-eval lambada_openai protocol)", title_justify="left")
    table.add_column("model", overflow="fold")
    for name in ("examples", "accuracy", "perplexity"):
        table.add_column(name, justify="right")
    if len(rows) > 1:
        table.add_column("ppl vs first", justify="right")
    for result, row in zip(results, rows):
        accuracy = f"{100 * row['accuracy']:.2f}%"
        cells = [result["model"], f"{row['count']:,}", accuracy, _format_ppl(row["perplexity"])]
        if len(rows) > 1:
            cells.append(_ratio(row["perplexity"], rows[0]["perplexity"]))
        table.add_row(*cells)
    return table


def lm_eval_table(results: list[dict]) -> Table:
    """One column per task/metric (standard errors and sample counts are in the JSON only)."""
    columns = []
    for result in results:
        for task, metrics in result.get("lm_eval", {}).items():
            for metric in metrics:
                shown = not metric.endswith("_stderr") and metric != "sample_len"
                if shown and (task, metric) not in columns:
                    columns.append((task, metric))
    table = Table(title="lm-eval tasks", title_justify="left")
    table.add_column("model", overflow="fold")
    for task, metric in columns:
        table.add_column(f"{task}\n{metric}", justify="right")
    for result in results:
        values = result.get("lm_eval", {})
        table.add_row(result["model"], *[_format_metric(values.get(t, {}).get(m)) for t, m in columns])
    return table


def _format_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"

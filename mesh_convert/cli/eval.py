"""`mesh-convert eval`: perplexity, LAMBADA and lm-eval tasks for one or more checkpoints.

Several models are evaluated one after another (only one is in memory at a time, see
`eval.runner`) and shown side by side in one table, typically the original next to its
conversions. `--json` prints the results as JSON on stdout and nothing else.
"""

from __future__ import annotations

import json
import sys

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

from ..eval.options import EvalOptions
from ..errors import shown
from .params import with_options


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @with_options(EvalOptions)
    def eval_command(ctx: typer.Context, **values):
        """Evaluate checkpoints: sliding-window perplexity, LAMBADA (lm-eval's lambada_openai), lm-eval tasks."""
        run_eval(EvalOptions(**values))


def run_eval(options: EvalOptions) -> dict:
    """Evaluate, then print a table or JSON."""
    from ..eval.runner import evaluate_all

    report = evaluate_all(options, _progress(options.as_json))
    if options.as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        sys.stdout.flush()
    else:
        Console().print(*render_tables(report))
    return report


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
    title = f"Perplexity on {shown(data_name)}"
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
        cells = [shown(result["model"]), f"{row['tokens']:,}", f"{row['nats']:,.1f}", _format_ppl(row["perplexity"]),
                 f"{row['bits_per_byte']:.4f}"]
        if len(rows) > 1:
            cells.append(_ratio(row["perplexity"], rows[0]["perplexity"]))
        table.add_row(*cells)
    return table


def lambada_table(data_name: str, results: list[dict]) -> Table:
    rows = [r["lambada"] for r in results]
    table = Table(title=f"LAMBADA ({shown(data_name)}, lm-eval lambada_openai protocol)", title_justify="left")
    table.add_column("model", overflow="fold")
    for name in ("examples", "accuracy", "perplexity"):
        table.add_column(name, justify="right")
    if len(rows) > 1:
        table.add_column("ppl vs first", justify="right")
    for result, row in zip(results, rows):
        accuracy = f"{100 * row['accuracy']:.2f}%"
        cells = [shown(result["model"]), f"{row['count']:,}", accuracy, _format_ppl(row["perplexity"])]
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
        table.add_column(f"{shown(task)}\n{shown(metric)}", justify="right")
    for result in results:
        values = result.get("lm_eval", {})
        table.add_row(shown(result["model"]), *[_format_metric(values.get(t, {}).get(m)) for t, m in columns])
    return table


def _format_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"

"""`mesh-convert diagnose` (the paper's representation probes) and `mesh-convert inspect`
(layout, provenance, parameters, routers). Heavy imports happen inside the commands, so that
registering them costs nothing for the other subcommands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..artifacts.output import check_target, staged_directory
from ..errors import UserError, shown
from ..io import RUN_EXPORTS

DEFAULT_SEQ_LEN = 512  # the paper's samples are longer; 512 keeps CPU runs practical

console = Console()
err_console = Console(stderr=True)


TABLE_SLOTS, TOP_SLOTS = 12, 4  # router tables: a column per slot up to 12 slots, else the 4 heaviest
OVERWRITE_HELP = (
    "Replace a non-empty --output folder "
    "(one holding only this command's earlier results is replaced anyway)."
)


def _default_output(prefix: str, model: str) -> Path:
    """`<prefix>-<model name>` in the working directory. A hub id "org/name" becomes
    "org--name", like the hub cache does; a run's exports (`model`, `merged`, `adapter`) and its
    `checkpoints/step-N` carry the run's name too, so two runs do not share one folder."""
    path = Path(model).expanduser()
    if not path.exists():
        return Path(f"{prefix}-{model.replace('/', '--')}")
    path = path.resolve()
    name = path.name
    if path.parent.name == "checkpoints":
        name = f"{path.parent.parent.name}-{name}"
    elif name in RUN_EXPORTS:  # what `train` exports into a run's output folder
        name = f"{path.parent.name}-{name}"
    return Path(f"{prefix}-{name or 'model'}")


def _data_file(data: Path) -> Path:
    """--data: a file, or one of `eval`'s built-in data names (wikitext2, lambada)."""
    from ..eval.data import resolve_data

    return resolve_data(data)[0]


def _check_at_least(**options: tuple[int | None, int]) -> None:
    """A one-line UserError for an integer option below its minimum (None = not given)."""
    for name, (value, minimum) in options.items():
        if value is not None and value < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be at least {minimum}, not {value}")


def _print_json(record: dict) -> None:
    # Plain stdout, not rich: rich would wrap long lines and break the JSON.
    sys.stdout.write(json.dumps(record, indent=2) + "\n")


def _local_inputs(*names) -> tuple[Path, ...]:
    """The inputs that are local paths, which the output must not replace."""
    return tuple(Path(name).expanduser() for name in names if name is not None and Path(name).expanduser().exists())


def _publish_outputs(output: Path, overwrite: bool, inputs: tuple[Path, ...], own_files, write) -> dict[str, Path]:
    """Run `write(folder)` in a staging folder that becomes `output` whole, so that nothing is
    written through a link planted in `output` and a failure leaves it as it was. A folder
    holding only `own_files` (an earlier run's results) is replaced without --overwrite."""
    with staged_directory(output, overwrite, inputs, own_files) as staging:
        written = write(staging)
    return {key: output / path.name for key, path in written.items()}


def _print_written(paths: dict[str, Path]) -> None:
    for path in paths.values():
        err_console.print(f"wrote {shown(path)}", highlight=False)


# ---------------------------------------------------------------------------------------------
# diagnose
# ---------------------------------------------------------------------------------------------


def diagnostics_tables(result) -> list[Table]:
    """Update magnitudes, mean CKA matrix, and a few points of each spectrum."""
    from ..analysis.diagnose import DiagnosticsResult

    update_mean, update_std = DiagnosticsResult.mean_std(result.updates)
    updates = Table(title="Relative update")
    updates.add_column("block")
    updates.add_column("mean ± std", justify="right")
    for name, mean, std in zip(result.block_names, update_mean.tolist(), update_std.tolist()):
        updates.add_row(name, f"{mean:.4f} ± {std:.4f}")

    cka_mean, _ = DiagnosticsResult.mean_std(result.cka)
    cka = Table(title=f"RBF CKA (threshold {result.threshold:g})")
    cka.add_column("")
    for name in result.state_names:
        cka.add_column(name, justify="right")
    for name, row in zip(result.state_names, cka_mean.tolist()):
        cka.add_row(name, *(f"{value:.3f}" for value in row))

    spectra_mean, _ = DiagnosticsResult.mean_std(result.spectra)
    top = spectra_mean.shape[1]
    ranks = [rank for rank in (2, 5, 10, 20, 50) if rank <= top]
    spectra = Table(title="sigma_k / sigma_1")
    spectra.add_column("state")
    for rank in ranks:
        spectra.add_column(f"k={rank}", justify="right")
    for name, row in zip(result.state_names, spectra_mean.tolist()):
        spectra.add_row(name, *(f"{row[rank - 1]:.4f}" for rank in ranks))
    return [updates, cka, spectra]


def diagnose(
    model: str = typer.Argument(..., help="MeSH or plain (e.g. Pythia) model: directory or hub id."),
    data: Path = typer.Option(
        ..., "--data", help='Text to sample from: .txt/.raw, or .jsonl/.parquet with a "text" field.'
    ),
    samples: int = typer.Option(32, "--samples", help="Number of samples (the paper uses 500)."),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="Tokens per sample, consecutive windows (default: 512, or the context if shorter)."
    ),
    output: Path | None = typer.Option(
        None, "--output", help="Directory for diagnostics.json and the plots (default: ./diagnostics-<model>)."
    ),
    layout: str | None = typer.Option(
        None, "--layout", help="P+CRK+Q split of a plain model (MeSH models use their own)."
    ),
    loops: int | None = typer.Option(None, "--loops", help="Split a plain model like the converter does for K loops."),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Tokenizer directory or hub id (default: the model's)."
    ),
    threshold: float = typer.Option(
        1.0, "--threshold", help="CKA bandwidth, 0.01 to 100: sigma^2 = threshold^2 * median squared distance."
    ),
    top: int = typer.Option(50, "--top", help="Singular values kept per state."),
    batch_size: int = typer.Option(1, "--batch-size", help="Samples per forward pass."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if available)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON instead of tables."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Probe how each block updates the hidden state: relative update magnitude, RBF CKA between
    states, singular value spectra (the MeSH paper's figures 3-5)."""
    from ..analysis.diagnose import check_threshold, load_samples, resolve_layout, run_diagnostics
    from ..analysis.plots import DIAGNOSTICS_FILES, write_outputs
    from ..loading import load_model, load_tokenizer, parse_device

    # Everything checkable without the model first, so that mistakes cost no loading time.
    _check_at_least(
        samples=(samples, 1), seq_len=(seq_len, 2), loops=(loops, 1), top=(top, 1), batch_size=(batch_size, 1)
    )
    check_threshold(threshold)
    output = output or _default_output("diagnostics", model)
    inputs = _local_inputs(model, tokenizer, data)
    check_target(output, overwrite, inputs, DIAGNOSTICS_FILES.values())
    data = _data_file(data)  # after the local checks: a built-in name may be downloaded
    lm = load_model(model, device=parse_device(device))
    chosen = resolve_layout(lm, layout, loops)
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, lm.config.max_position_embeddings)
    if seq_len > lm.config.max_position_embeddings:
        raise UserError(
            f"--seq-len {seq_len} exceeds the model's context of {lm.config.max_position_embeddings} tokens"
        )
    ids = load_samples(data, load_tokenizer(tokenizer or model), samples, seq_len, lm.config.vocab_size)

    with Progress(
        TextColumn("probing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,  # elsewhere (a log, a pipe) a bar draws only a blank line
    ) as progress:
        task = progress.add_task("samples", total=samples)
        result = run_diagnostics(
            lm,
            ids,
            chosen,
            threshold=threshold,
            top=top,
            batch_size=batch_size,
            name=model,
            data=str(data),
            on_sample=lambda done, _total: progress.update(task, completed=done),
        )
    paths = _publish_outputs(
        output, overwrite, inputs, DIAGNOSTICS_FILES.values(), lambda folder: write_outputs(result, folder)
    )
    if as_json:
        _print_json(result.to_dict())
    else:
        console.print(
            f"[bold]{shown(model)}[/]: {shown(result.variant)}, layout {shown(result.layout)}; "
            f"mean ± std over {result.samples} samples of {result.seq_len} tokens",
            highlight=False,
        )
        for table in diagnostics_tables(result):
            console.print(table)
    _print_written(paths)


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def inspect_tables(report) -> list[Table]:
    """Model summary, provenance, parameters, and the routers' mean weights."""
    from ..analysis.inspect import provenance_rows

    summary = Table(title=shown(report.model_dir), show_header=False)
    summary.add_column("field")
    summary.add_column("value")
    summary.add_row("model type", shown(report.model_type))
    summary.add_row("layout", shown(report.layout))
    summary.add_row("variant", shown(report.variant))
    if report.num_slots is not None:
        summary.add_row("memory slots (B)", str(report.num_slots))
    if report.relax_rank is not None:
        summary.add_row("relax rank", shown(report.relax_rank))
    tables = [summary]

    provenance = Table(title="Provenance", show_header=False)
    provenance.add_column("key", overflow="fold")
    provenance.add_column("value", overflow="fold")
    for key, value in provenance_rows(report.provenance) or [("(none)", "no provenance recorded")]:
        provenance.add_row(shown(key), shown(value))
    tables.append(provenance)

    total = report.parameters["total"] or 1
    parameters = Table(title="Parameters")
    parameters.add_column("group")
    parameters.add_column("count", justify="right")
    parameters.add_column("share", justify="right")
    for group, count in report.parameters.items():
        style = "bold" if group == "total" else None
        parameters.add_row(group, f"{count:,}", f"{100 * count / total:.2f}%", style=style)
    tables.append(parameters)

    if report.routers is not None:
        stats = report.routers
        slots = stats.write.shape[1]
        for label, weights in (("write", stats.write), ("read", stats.read)):
            if slots <= TABLE_SLOTS:
                table = Table(title=f"Mean {label} weight per slot ({stats.tokens} tokens)")
                table.add_column("step")
                for slot in range(slots):
                    table.add_column(f"slot {slot}", justify="right")
                for step, row in zip(stats.steps, weights.tolist()):
                    table.add_row(step, *(f"{value:.3f}" for value in row))
            else:  # a column per slot would not fit a terminal: each step's heaviest slots (all in the JSON)
                table = Table(title=f"Heaviest of {slots} slots by mean {label} weight ({stats.tokens} tokens)")
                table.add_column("step")
                table.add_column("slot: weight")
                top = weights.topk(TOP_SLOTS, dim=1)
                for step, values, indices in zip(stats.steps, top.values.tolist(), top.indices.tolist()):
                    table.add_row(step, ", ".join(f"{slot}: {value:.3f}" for slot, value in zip(indices, values)))
            tables.append(table)
    return tables


def inspect(
    model_dir: Path = typer.Argument(..., help="Saved model directory (MeSH or plain)."),
    data: Path | None = typer.Option(
        None, "--data", help="Text for the router probe, .txt/.raw, .jsonl or .parquet (default: built-in sentences)."
    ),
    samples: int = typer.Option(8, "--samples", help="Sequences for the router probe."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sequence taken from --data."),
    output: Path | None = typer.Option(
        None, "--output", help="Directory for inspect.json and routers.png (default: ./inspect-<model>)."
    ),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Tokenizer directory or hub id (default: the model's)."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if available)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON instead of tables."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Show a model's layout, variant, provenance, parameter counts and (MeSH) router behaviour."""
    from ..analysis.inspect import INSPECT_FILES, inspect_model, write_inspect_outputs
    from ..loading import parse_device

    _check_at_least(samples=(samples, 1), seq_len=(seq_len, 2))
    output = output or _default_output("inspect", str(model_dir))
    inputs = _local_inputs(model_dir, tokenizer, data)
    check_target(output, overwrite, inputs, INSPECT_FILES.values())
    if data is not None:
        data = _data_file(data)  # after the local checks: a built-in name may be downloaded
    report = inspect_model(model_dir, data, samples, seq_len, parse_device(device), tokenizer)
    paths = _publish_outputs(
        output, overwrite, inputs, INSPECT_FILES.values(), lambda folder: write_inspect_outputs(report, folder)
    )
    if as_json:
        _print_json(report.to_dict())
    else:
        for table in inspect_tables(report):
            console.print(table)
    for note in report.notes + ([f"routers probed on {report.routers.source}"] if report.routers else []):
        err_console.print(f"note: {shown(note)}", highlight=False)
    _print_written(paths)


def register(app: typer.Typer) -> None:
    """Add `diagnose` and `inspect` to the mesh-convert app (once, however often it is called)."""
    present = {command.name for command in app.registered_commands}
    for name, function in (("diagnose", diagnose), ("inspect", inspect)):
        if name not in present:
            app.command(name)(function)

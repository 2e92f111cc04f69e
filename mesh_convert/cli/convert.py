"""`mesh-convert MODEL --loops K [options]`: plan or run a conversion, with tables and --json."""

import json
import shlex
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..convert.options import ConvertOptions
from ..artifacts.remote_code import warn_removed
from ..errors import UserError, shown
from .params import flag, with_options

console = Console()
err_console = Console(stderr=True)


def _options_error(error: ValidationError) -> UserError:
    first = error.errors()[0]
    flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
    return UserError(f"{flag}: {first['msg'].removeprefix('Value error, ')}")  # pydantic's prefix for a validator's own message


def _plan_tables(plan) -> list[Table]:
    params, layout = plan.params, plan.layout
    recurrence = "MeSH" if plan.options.variant == "mesh" else f"recursive ({plan.options.variant})"
    summary = Table(title=f"{shown(plan.options.model)} -> {recurrence} {layout.text}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    fields = plan.mesh_fields
    summary.add_row("source", shown(fields["provenance"]["source"]["model"]))
    summary.add_row("layout", f"{layout.text}  (prelude {layout.prelude}, core {layout.core} x {layout.loops} loops, coda {layout.coda})")
    summary.add_row("variant", fields["variant"])
    if fields["variant"] == "mesh":
        summary.add_row("memory", f"{fields['num_slots']} slots, router gap {fields['router_gap']:g}")
    summary.add_row("tie", plan.options.tie)
    relax_init = fields["provenance"]["relax_init"]
    summary.add_row("relax rank", f"{fields['relax_rank']} ({relax_init} start)" if relax_init else str(fields["relax_rank"]))
    summary.add_row("dtype", plan.dtype_name)
    summary.add_row("output", shown(plan.output_dir))

    counts = Table(title="parameters", title_justify="left")
    counts.add_column("")
    counts.add_column("count", justify="right")
    counts.add_row("original non-embedding", f"{params['original_nonembedding']:,}")
    counts.add_row("converted non-embedding", f"{params['converted_nonembedding']:,}")
    counts.add_row("routers", f"{params['routers']:,}")
    counts.add_row("relax deltas", f"{params['relax']:,}")
    counts.add_row("embedding + head", f"{params['embedding']:,}")
    counts.add_row("reduction (layers + routers + deltas)", f"{params['reduction']:.1%}")

    layers = Table(title="layer map", title_justify="left")
    layers.add_column("unique layer")
    layers.add_column("original layers it is made from")
    layers.add_column("runs as unrolled layers")
    layer_map = fields["provenance"]["layer_map"]
    loop_sources = fields["provenance"]["loop_sources"]
    for j, sources in enumerate(layer_map["prelude"]):
        layers.add_row(f"prelude {j}", _ints(sources), str(sources[0]))
    for i, sources in enumerate(layer_map["core"]):
        joined = "mean of " + _ints(sources) if len(sources) > 1 else _ints(sources)
        layers.add_row(f"core {i}", joined, _ints([loop[i] for loop in loop_sources]))
    for j, sources in enumerate(layer_map["coda"]):
        layers.add_row(f"coda {j}", _ints(sources), str(sources[0]))
    return [summary, counts, layers]


def _ints(values) -> str:
    return ", ".join(str(v) for v in values)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        # Off where stderr is no terminal (a log, a pipe): there a bar draws nothing but a blank line.
        disable=not enabled or not err_console.is_terminal,
    )


@with_options(
    ConvertOptions,
    flag("dry_run", "--dry-run", help="Print the plan only; downloads no weights."),
    flag("as_json", "--json", help="Print one JSON object instead of tables."),
)
def convert_command(ctx: typer.Context, dry_run: bool = False, as_json: bool = False, **values):
    """Convert a pretrained GPT-NeoX (Pythia) or Llama-family (Llama, Qwen2, SmolLM2) checkpoint into a MeSH recursive transformer."""
    from ..convert.plan import make_plan

    try:
        options = ConvertOptions(**values)
    except ValidationError as error:
        raise _options_error(error) from None
    push_to_hub = options.push_to_hub
    if push_to_hub:
        _check_push_target(push_to_hub)

    command = shlex.join(["mesh-convert", *ctx.obj["argv"]])  # as typed (the record cuts its paths)
    plan = make_plan(options, command=command, builtin_facts=dry_run)
    if dry_run:
        if as_json:
            typer.echo(json.dumps(plan.to_dict(), indent=2))
        else:
            for table in _plan_tables(plan):
                console.print(table)
        return

    from ..convert.conversion import convert  # torch and transformers: only for a real conversion

    with _progress(enabled=not as_json) as progress:
        result = convert(plan, progress)
    if result.non_finite:
        err_console.print(
            f"[bold yellow]warning:[/] NaN or inf in source tensors {shown(', '.join(result.non_finite))} (converted as they are)",
            highlight=False,
            soft_wrap=True,
        )
    warn_removed(err_console, result.removed_code)
    url = _push(result.output_dir, push_to_hub) if push_to_hub else None
    if as_json:
        info = plan.to_dict() | {"shards": result.shards, "bytes": result.bytes_written, "seconds": round(result.seconds, 3),
                                 "removed_remote_code": result.removed_code}
        typer.echo(json.dumps(info | ({"url": url} if url else {}), indent=2))
        return
    summary, counts, _ = _plan_tables(plan)
    summary.add_row("written", f"{len(result.shards)} shard(s), {result.bytes_written / 2**20:,.1f} MiB in {result.seconds:.1f} s")
    console.print(summary)
    console.print(counts)
    console.print(f"[green]done:[/] {shown(result.output_dir)}  (load with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))")
    if url:
        console.print(f"[green]pushed:[/] {shown(url)}")


def _check_push_target(repo_id: str) -> None:
    """A bad repo id is known before the conversion, not after it."""
    from ..hub.push import check_repo_id

    try:
        check_repo_id(repo_id)
    except UserError as error:
        raise UserError(f"--push-to-hub: {error}") from None


def _push(output_dir: Path, repo_id: str) -> str:
    """Upload a finished conversion; on failure the local result stays and the error says so."""
    from ..hub.push import push_to_hub

    try:
        return push_to_hub(output_dir, repo_id)
    except UserError as error:
        raise UserError(f"converted to {output_dir}, but the upload failed: {error}") from None


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_command)

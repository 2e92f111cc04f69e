"""`mesh-convert train | finetune | init | merge`: training commands (wired by `cli.register`)."""

import shlex
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..artifacts.remote_code import strip_foreign_code, warn_removed
from ..errors import UserError, shown
from ..io import check_output_directory
from ..layout import Layout
from ..train.recipe import InitSpec  # light: pydantic and yaml
from .params import flag, option, with_options

console = Console(stderr=True)
OVERWRITE_RUN_HELP = "Replace an earlier run in output_dir (one with checkpoints resumes, see checkpoint.resume)."


def _recipe(path: Path, overrides: list[str], method: str | None = None):
    from ..train.recipe import load_recipe

    base = {"method": method} if method else None
    recipe = load_recipe(path, overrides or [], base=base)
    if method and recipe.method != method:
        raise UserError(f"`mesh-convert finetune` runs LoRA recipes, but {path} sets method: {recipe.method}")
    return recipe


def _run(recipe_path: Path, overrides: list[str], dry_run: bool, method: str | None = None, overwrite: bool = False) -> None:
    from ..train.recipe import recipe_yaml

    recipe = _recipe(recipe_path, overrides, method)
    if dry_run:
        from ..train.loop import describe

        plan = describe(recipe, processes=_processes())
        typer.echo(recipe_yaml(recipe).rstrip())
        table = Table(title="plan", show_header=False)
        for key in ("processes", "micro_batch_size", "grad_accum", "global_batch_size", "tokens_per_step", "steps",
                    "total_tokens", "peak_lr", "trainable"):
            value = plan[key]
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
        counts = plan["parameters"]
        table.add_row("trainable parameters", f"{counts['trainable']:,}")
        table.add_row("  of which routers / deltas / lora", f"{counts['routers']:,} / {counts['deltas']:,} / {counts['lora']:,}")
        table.add_row("frozen parameters", f"{counts['frozen']:,}")
        Console().print(table)
        return
    from ..train.loop import report, train

    report(train(recipe, console=console, overwrite=overwrite, recipe_file=recipe_path), console)


def _processes() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
        overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. train.max_steps=100 optim.lr=1e-4."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and the plan; do not train."),
        overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_RUN_HELP),
    ):
        """Continue pretraining a converted model (or LoRA, with `method: lora`), from a recipe.

        Multi-GPU: `accelerate launch --config_file recipes/accelerate/ddp.yaml -m mesh_convert.cli train RECIPE`."""
        _run(recipe, overrides, dry_run, overwrite=overwrite)

    @app.command("finetune")
    def finetune_command(
        recipe: Path = typer.Argument(..., help="Recipe YAML (method defaults to lora)."),
        overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. lora.r=8."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and the plan; do not train."),
        overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_RUN_HELP),
    ):
        """LoRA fine-tuning via peft: only the adapter (and router copies) train."""
        _run(recipe, overrides, dry_run, method="lora", overwrite=overwrite)

    @app.command("init")
    @with_options(
        InitSpec,
        option("output", Path, ..., "--output", "-o", help="Output directory."),
        option("tokenizer", Path | None, None, "--tokenizer", help="Tokenizer directory to copy next to the model."),
        option("seed", int, 0, "--seed", help="Seed of the random weights (numpy's are 32-bit).", min=0, max=2**32 - 1),
        flag("overwrite", "--overwrite", help="Replace a non-empty output directory."),
    )
    def init_command(ctx: typer.Context, output: Path, tokenizer: Path | None, seed: int, overwrite: bool, **values):
        """A randomly initialised MeSH model, with the paper's from-scratch init."""
        from pydantic import ValidationError

        from ..artifacts.card import write_model_card
        from ..artifacts.output import check_target, staged_directory
        from ..artifacts.record import with_removed_code
        from ..convert.plan import mesh_parameter_counts
        from ..loading import load_tokenizer
        from ..train.recipe import explain
        from ..train.scratch import init_scratch_model, scratch_config, scratch_record

        check_output_directory(output)
        try:
            spec = InitSpec(**values)
        except ValidationError as error:
            raise explain(error, "init") from None
        sources = (tokenizer,) if tokenizer is not None else ()
        check_target(output, overwrite, sources)  # before building a model that may be large
        # and the tokenizer before any weight: a broken one is one line, not one after a progress bar
        copied = load_tokenizer(tokenizer, remedy="pass another --tokenizer, or none") if tokenizer else None
        config = scratch_config(spec)
        model = init_scratch_model(config, seed, spec.router_init)
        counts = mesh_parameter_counts(config)
        with staged_directory(output, overwrite, sources) as staging:
            model.save_pretrained(staging)
            if copied is not None:
                copied.save_pretrained(staging)
            removed = strip_foreign_code(staging)  # a tokenizer's own auto_map, saved from its config
            record = scratch_record(config, spec, seed, command=shlex.join(["mesh-convert", *ctx.obj["argv"]]))
            record = with_removed_code(record, removed)
            record.write(staging)
            write_model_card(staging, record, name=output.resolve().name)  # the name the user gave it
        console.print(f"{Layout.of(config)} ({config.variant}): {counts['nonembedding']:,} non-embedding parameters, "
                      f"{counts['routers']:,} router parameters -> {shown(output)}", highlight=False)
        warn_removed(console, removed)

    @app.command("merge")
    def merge_command(
        adapter: Path = typer.Argument(..., help="LoRA adapter directory (from a `method: lora` run)."),
        output: Path = typer.Option(..., "--output", "-o", help="Output directory for the merged model."),
        base: Path = typer.Option(None, "--base", help="Base model (default: the one recorded in the adapter)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    ):
        """Merge a LoRA adapter (and its routers) into a standalone checkpoint."""
        from ..train.lora import merge_adapter

        path, removed = merge_adapter(adapter, output, base, overwrite=overwrite)
        console.print(f"merged {shown(adapter)} -> {shown(path)}", highlight=False)
        warn_removed(console, removed)

"""`mesh-convert prepare-data`: text files or a Hub dataset -> a token store to train from
(wired by `cli.register`)."""

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UserError

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command("prepare-data")
    def prepare_data_command(
        inputs: list[Path] = typer.Argument(None, help=".txt / .jsonl / .parquet files (or use --hub)."),
        tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="Tokenizer directory (or a model's)."),
        output: Path = typer.Option(..., "--output", "-o", help="The store's folder (recipes: data.store)."),
        hub: str = typer.Option(None, "--hub", help="A Hub dataset (downloaded, then prepared) instead of files."),
        hub_config: str = typer.Option(None, "--hub-config", help="The Hub dataset's configuration name."),
        split: str = typer.Option("train", "--split", help="The Hub dataset's split."),
        revision: str = typer.Option(None, "--revision", help="The Hub dataset's revision."),
        text_field: str = typer.Option("text", "--text-field", help="The text of a .jsonl record or a row."),
        workers: int = typer.Option(None, "--workers", min=1, help="Tokenizing processes (default: one per core)."),
        max_record_mb: float = typer.Option(64, "--max-record-mb", min=0.001, help="Refuse a JSONL record or parquet text longer than this."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ):
        """Tokenize text once into a store that training memory-maps (the Megatron / GPT-NeoX .bin/.idx
        format, 2 bytes a token for vocabularies up to 65,536). Interrupted, it goes on where it stopped
        when run again."""
        from ..io import check_output_directory
        from ..loading import load_tokenizer
        from ..train.prepare import plan_arrow_chunks, plan_file_chunks, prepare_store, source_fingerprint
        from ..train.store import tokenizer_identity

        if bool(inputs) == bool(hub):
            raise UserError("give data files or --hub, not both" if inputs else "give data files to prepare, or --hub")
        check_output_directory(output)
        loaded = load_tokenizer(tokenizer, remedy="pass --tokenizer DIR")
        identity = tokenizer_identity(loaded)
        if hub:
            from ..train.recipe import DataSection
            from ..train.stream import load_hub

            section = DataSection(hub={"path": hub, "name": hub_config, "split": split, "revision": revision},
                                  text_field=text_field)
            sources = {"hub": section.hub.model_dump()}
            dataset = load_hub(section, streaming=False)
            chunks = plan_arrow_chunks([file["filename"] for file in dataset.cache_files])
        else:
            paths = [str(path) for path in inputs]
            sources = source_fingerprint(paths)
            chunks = plan_file_chunks(paths)
        result = prepare_store(chunks, sources, output, loaded, identity, text_field, workers, max_record_mb,
                               overwrite, console=None if as_json else console)
        if as_json:
            typer.echo(json.dumps(result, indent=1))
            return
        table = Table(title=f"prepared {output}", show_header=False)
        rows = {
            "tokens": f"{result['tokens']:,}",
            "documents": f"{result['documents']:,}",
            "on disk": f"{result['bytes']:,} bytes ({result['bytes_per_token']:.2f} a token)",
            "tokenizer": f"{result['tokenizer']} (largest id {result['max_token_id']:,})",
            "parts": f"{result['parts']} ({result['parts_reused']} kept from an interrupted run)",
            "time": f"{result['seconds']:.1f} s with {result['workers']} worker(s)"
            + (f", {result['tokens_per_s']:,.0f} tokens/s" if result["tokens_per_s"] else ""),
        }
        for key, value in rows.items():
            table.add_row(key, value)
        Console().print(table)
        console.print(f"train from it with data.store={Path(output)}", highlight=False)

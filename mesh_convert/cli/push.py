"""`mesh-convert push DIR REPO_ID`: publish a converted model to the Hugging Face Hub.

There is deliberately no `--token` option: a token on the command line ends up in shell
history and process listings. The token comes from HF_TOKEN or `hf auth login`.
"""

import json
from pathlib import Path

import typer
from rich.console import Console

from ..artifacts.remote_code import warn_removed
from ..errors import shown

console = Console()
err_console = Console(stderr=True)
# Names in the line that says what was left out (--json lists them all).
SHOWN_LEFT_OUT = 10


def register(app: typer.Typer) -> None:
    """Add the `push` command to `app`."""

    @app.command("push")
    def push(
        directory: Path = typer.Argument(..., help="Directory of a converted model (as written by mesh-convert)."),
        repo_id: str = typer.Argument(..., help="Hub repository, NAMESPACE/NAME (or NAME for your own namespace)."),
        private: bool = typer.Option(False, "--private", help="Create the repository as private (if it is new)."),
        revision: str | None = typer.Option(
            None, "--revision", help="Branch to push to; created from main if it does not exist."
        ),
        commit_message: str | None = typer.Option(None, "--commit-message", "-m", help="Commit message."),
        include: list[str] = typer.Option(
            None, "--include", metavar="PATTERN",
            help="Also publish the files matching PATTERN (a glob on paths in DIRECTORY, e.g. 'eval/*'; repeatable). "
            "By default only what a model repo needs is published.",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print {url, repo_id, revision, left_out, removed_remote_code} as JSON."),
    ):
        """Upload a converted model (weights, config, remote code, tokenizer, card) to the Hub.

        Other files in the folder are left out (and named) unless --include names them; code other
        than the model's own two files never goes. The token comes from HF_TOKEN or `hf auth login`;
        HF_ENDPOINT selects another Hub.
        """
        from ..hub.push import push_folder

        result = push_folder(
            directory,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            include=include or (),
        )
        if as_json:
            # Plain stdout, no rich markup, so that scripts can parse it.
            typer.echo(json.dumps({"url": result.url, "repo_id": result.repo_id, "revision": result.revision,
                                   "left_out": result.left_out, "removed_remote_code": result.removed_code}))
        else:
            console.print(f"pushed {shown(directory)} to {shown(result.url)}", highlight=False, soft_wrap=True)
        if result.left_out:
            names = ", ".join(result.left_out[:SHOWN_LEFT_OUT])
            more = len(result.left_out) - SHOWN_LEFT_OUT
            names += f" and {more} more" if more > 0 else ""
            err_console.print(f"note: not published, as a model repo does not need them (add with --include PATTERN): "
                              f"{shown(names)}", highlight=False, soft_wrap=True)
        warn_removed(err_console, result.removed_code)

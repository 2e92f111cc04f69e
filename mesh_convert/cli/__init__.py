"""The `mesh-convert` command line.

`mesh-convert MODEL --loops K` converts (the default command); other work lives in
subcommands (`mesh-convert eval ...`, `mesh-convert push ...`). Every failure that a user can
cause is a `UserError`, printed as one line with a non-zero exit; `--debug` shows tracebacks.
"""

import errno
import os
import sys
from contextlib import suppress

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from ..errors import UserError, printable, scrub, shown
from . import convert as convert_commands
from . import data as data_commands
from . import diagnose as diagnose_commands
from . import eval as eval_commands
from . import push as push_commands
from . import train as train_commands

err_console = Console(stderr=True)


class PlainFlagsHelp:
    """Help as users read it elsewhere: typer's rich help prints `<bool>` after an on/off flag
    (as if it took a value) and `{model}` for a required argument; show `--debug` and `MODEL`."""

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = (param.metavar or param.name).upper() + ("..." if param.nargs != 1 else "")
            pieces.append(name if param.required else f"[{name}]")
        return pieces


class PlainHelpCommand(PlainFlagsHelp, TyperCommand):
    pass


class DefaultToConvert(PlainFlagsHelp, TyperGroup):
    """Routes `mesh-convert MODEL ...` to the `convert` command, so that the common case needs
    no subcommand while `mesh-convert eval ...` etc. still work."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [*super().collect_usage_pieces(ctx), self.subcommand_metavar]

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        root_options = [a for a in args[:1] if a == "--debug"]  # root options stay before the command
        rest = args[len(root_options) :]
        first = rest[0] if rest else None
        if first is not None and first not in self.commands and first not in ("--help", "-h", "--version"):
            args = [*root_options, "convert", *rest]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=DefaultToConvert,
    help="Convert pretrained GPT-NeoX (Pythia) and Llama-family (Llama, Qwen2, SmolLM2) checkpoints into MeSH "
    "recursive transformers, then train, evaluate, diagnose and push them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool):
    if value:
        from .. import __version__

        typer.echo(f"mesh-convert {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (or set MESH_CONVERT_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    pass  # `main` reads --debug from the arguments itself: a process-wide setting would leak into later calls


for commands in (convert_commands, train_commands, data_commands, eval_commands, push_commands, diagnose_commands):
    commands.register(app)
for command in app.registered_commands:
    if command.cls in (None, TyperCommand):
        command.cls = PlainHelpCommand


def _escape_what_the_terminal_cannot_show() -> None:
    """Characters the output's encoding lacks (PYTHONIOENCODING=ascii, a C locale) are written as
    escapes instead of ending the command with an internal error."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _output_failed(error: Exception) -> bool:
    """Whether `error` is the command's output failing to be written (stdout on a full disk, a
    closed pipe): the commands turn every failure to write a file of theirs into a UserError."""
    return isinstance(error, OSError) and error.filename is None and error.errno in (
        errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EBADF, errno.EDQUOT)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("MESH_CONVERT_DEBUG") == "1"
    _escape_what_the_terminal_cannot_show()
    try:
        os.getcwd()  # relative paths, and much else, need it
    except FileNotFoundError:
        err_console.print("[bold red]error:[/] the working folder no longer exists (it was deleted): change to another "
                          "one", highlight=False)
        return 1
    try:
        # Not standalone: typer then returns exit codes (130 for Ctrl-C) instead of exiting.
        code = app(args=args, standalone_mode=False, prog_name="mesh-convert", obj={"argv": list(args)})
        if sys.stdout is not None:  # None where the caller closed it
            sys.stdout.flush()  # here, where a full disk or a closed pipe can still be reported
    except UserError as error:
        if debug:
            raise
        # Under a launcher every process reports; the others' lines are tagged, so that one line
        # reads as the error and an error only one process met is not lost.
        rank = os.environ.get("RANK", "0")
        tag = "" if rank == "0" else shown(f"[rank {rank}] ")
        err_console.print(f"{tag}[bold red]error:[/] {shown(scrub(str(error), None))}", highlight=False, soft_wrap=True)
        return error.exit_code
    except typer.Exit as exit_:
        return exit_.exit_code
    except typer.TyperException as error:  # usage errors (a bad flag, value or choice): as typer shows them, exit 2
        error.message = printable(error.message)  # they quote arguments, which a shell glob may have filled
        error.show()
        return error.exit_code
    except typer.Abort:
        err_console.print("[bold red]error:[/] interrupted", highlight=False)
        return 130
    except KeyboardInterrupt:
        err_console.print("[bold red]error:[/] interrupted", highlight=False)
        return 130
    except Exception as error:  # a bug: say so in one line, unless --debug
        if _output_failed(error):
            err_console.print(f"[bold red]error:[/] cannot write the output: {shown(error.strerror)}", highlight=False)
            # What stays buffered for stdout would fail again when Python flushes it on exit.
            with suppress(OSError, ValueError, AttributeError):  # a stdout without a file descriptor
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        if debug:
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(error).__name__}: {shown(scrub(str(error), None))} (rerun with --debug "
            "for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        return 2
    if code == 130:
        err_console.print("[bold red]error:[/] interrupted", highlight=False)
    return code if isinstance(code, int) else 0

"""Typer parameters derived from pydantic options (as mergekit derives its click options), so
that each option's type, choices, default and help are declared once, on the options model.

A field takes part when its `json_schema_extra` has a `cli` entry (see `mesh_convert.options`):
`argument`, or the option's `flags`, and optionally `type`/`default` for parsing it as text.
`Literal` fields become choices, which typer checks and lists in the error.
"""

import inspect
from collections.abc import Callable

import typer
from pydantic import BaseModel


def option_parameters(options: type[BaseModel]) -> list[inspect.Parameter]:
    parameters = []
    for name, field in options.model_fields.items():
        cli = (field.json_schema_extra or {}).get("cli")
        if cli is None:
            continue
        default = cli.get("default", ... if field.is_required() else field.default)
        extra = {"help": field.description, **cli.get("typer", {})}
        if cli.get("argument"):
            info = typer.Argument(default, **extra)
        else:
            info = typer.Option(default, *cli["flags"], **extra)
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=cli.get("type", field.annotation))
        )
    return parameters


def with_options(options: type[BaseModel], *extra: inspect.Parameter) -> Callable:
    """Decorate `command(ctx, **values)`: typer sees the context, the options' parameters, then `extra`."""

    def decorate(command: Callable) -> Callable:
        context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        parameters = [context, *option_parameters(options), *extra]
        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return decorate


def option(name: str, annotation, default, *flags: str, help: str, **bounds) -> inspect.Parameter:
    """A command-line option that is not one of the options model's (e.g. init's --output; `...`:
    required); `bounds`: typer's `min`/`max`."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                             default=typer.Option(default, *flags, help=help, **bounds), annotation=annotation)


def flag(name: str, *flags: str, help: str) -> inspect.Parameter:
    """A boolean command-line switch that is not one of the options (e.g. --dry-run)."""
    return option(name, bool, False, *flags, help=help)

"""How an option is declared once: a pydantic field whose metadata also gives its command-line
form, from which `cli.params` derives the typer parameter (the options of `convert` and `eval`).
Light to import: pydantic only."""


def cli_argument(**cli) -> dict:
    """Field metadata: a positional command-line argument."""
    return {"cli": {"argument": True, **cli}}


def cli_option(*flags: str, **cli) -> dict:
    """Field metadata: a command-line option under `flags`; `type` overrides the field's type for
    parsing (the field's validator then reads the text)."""
    return {"cli": {"flags": flags, **cli}}

"""How an option is declared once: a pydantic field whose metadata also gives its command-line
form, from which `cli.params` derives the typer parameter; and the options of a MeSH model's
shape that `convert`, `init` and recipes' `init` share, each with its one type, bound, help text
and flag (a model that uses one adds the default, and a description where it says more).

Light to import: pydantic only."""

from typing import Annotated, Literal

from pydantic import Field

from .errors import UserError


def cli_argument(**cli) -> dict:
    """Field metadata: a positional command-line argument."""
    return {"cli": {"argument": True, **cli}}


def cli_option(*flags: str, **cli) -> dict:
    """Field metadata: a command-line option under `flags`; `type` overrides the field's type for
    parsing (the field's validator then reads the text)."""
    return {"cli": {"flags": flags, **cli}}


Variant = Literal["mesh", "base", "residual", "anchor", "anchor_emb"]

# Logit gap of the function-preserving router init (spec section 5): off-target mass is
# (B-1)*e^-gap; BENCHMARKS.md shows how it was chosen.
DEFAULT_ROUTER_GAP = 8.0
# The largest finite value of each dtype (torch.finfo(dtype).max), known here without torch:
# the router init stores the gap as a bias in the model's dtype.
DTYPE_MAX = {"float32": 3.4028234663852886e38, "float16": 65504.0, "bfloat16": 3.3895313892515355e38}

Loops = Annotated[int, Field(ge=1, description="K: how many times the shared core runs.",
                             json_schema_extra=cli_option("--loops", "-k"))]
Prelude = Annotated[int | None, Field(ge=0, description="P unshared bottom layers (default: the paper's layout).",
                                      json_schema_extra=cli_option("--prelude"))]
Coda = Annotated[int | None, Field(ge=0, description="Q unshared top layers (default: the paper's layout).",
                                   json_schema_extra=cli_option("--coda"))]
VariantOption = Annotated[Variant, Field(description="The recurrence between loops: MeSH's memory, or a baseline.",
                                         json_schema_extra=cli_option("--variant"))]
# Its upper bound depends on the dtype that stores it: `check_router_gap`.
RouterGap = Annotated[float, Field(gt=0, allow_inf_nan=False, json_schema_extra=cli_option("--router-gap"))]


def check_router_gap(gap: float, dtype_name: str) -> None:
    """The router init stores the gap as a bias in the model's dtype: it must be a number that dtype holds."""
    largest = DTYPE_MAX[dtype_name]
    if gap > largest:
        raise UserError(
            f"--router-gap {gap:g} does not fit {dtype_name}, the dtype the router biases are "
            f"stored in: use a gap in (0, {largest:g}] (the default is {DEFAULT_ROUTER_GAP:g})"
        )

"""The options of a conversion, each declared once: its type and choices, default, bounds, and the
flag and help text the command line derives from it (`cli.params`). Those that `init` shares (the
layout, the variant, the router gap) are declared in `mesh_convert.options`."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, TypeAdapter, field_validator

from ..options import DEFAULT_ROUTER_GAP, Coda, Loops, Prelude, RouterGap, VariantOption, cli_argument, cli_option

Tie = Literal["upper", "stepwise", "lower", "average"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
RelaxInit = Literal["svd", "zero"]

# Each slot is one more hidden state per token in the memory buffer, and one more output of every
# router; the paper uses K+3 and found K+1 .. K+4 alike. Far beyond that is a typo, not a design.
MAX_SLOTS = 1024


def default_slots(loops: int) -> int:
    """The paper's memory size B = K + 3 (one slot per step, the embedding's, and one spare);
    `configuration_mesh.MeshConfig`, which travels as remote code, keeps its own copy of this rule."""
    return loops + 3


def _bytes(size: str) -> int:
    """The bytes in a size like 500MB, 5GB (powers of ten) or 5GiB; a ValueError for anything else."""
    return int(TypeAdapter(ByteSize).validate_python(size))


class ConvertOptions(BaseModel):
    """Everything a conversion depends on; the CLI (and recipes) build this, and it validates."""

    model_config = ConfigDict(extra="forbid", defer_build=True)  # validators are built on first use, not for --help

    model: str = Field(
        description="GPT-NeoX or Llama-family checkpoint: local dir, Hub id, or alias pythia-<size>[-deduped] (14m ... 12b).",
        json_schema_extra=cli_argument(),
    )
    loops: Loops
    prelude: Prelude = None
    coda: Coda = None
    variant: VariantOption = "mesh"
    tie: Tie = Field(
        default="upper",
        description="How a core layer is made from its K stand-ins (upper: best after healing, BENCHMARKS.md).",
        json_schema_extra=cli_option("--tie"),
    )
    slots: int | None = Field(default=None, ge=2, description="B memory slots (default K+3).",
                              json_schema_extra=cli_option("--slots"))
    router_gap: RouterGap = Field(default=DEFAULT_ROUTER_GAP,
                                  description="Logit gap of the function-preserving router init (with --relax-rank full, 16 or more reproduces the logits within 1e-4).")
    relax_rank: int | Literal["full"] = Field(
        default=0, description="Per-loop delta rank: 0 (none), N, or full (dense: with --relax-init svd the original layers; mesh then gives the original's logits with a large --router-gap, base exactly, anchor and residual not).",
        json_schema_extra=cli_option("--relax-rank", type=str, default="0"),
    )
    relax_init: RelaxInit | None = Field(
        default=None, validate_default=True,
        description="How the deltas start: zero (LoRA-style: the model starts as the plain tie and the deltas learn "
                    "while healing; the default for a rank N) or svd (each loop's truncated difference to the shared "
                    "layer; the default for full, where it is the original model).",
        json_schema_extra=cli_option("--relax-init"),
    )
    dtype: Dtype = Field(default="auto", description="Output dtype; auto keeps the source's.",
                         json_schema_extra=cli_option("--dtype"))
    revision: str | None = Field(default=None, description="Hub revision, e.g. step143000 for Pythia.",
                                 json_schema_extra=cli_option("--revision"))
    output: Path | None = Field(default=None, description="Output directory (default ./<model>-<variant>-<layout>[-relax<rank>], the layout written P_CRK_Q).",
                                json_schema_extra=cli_option("--output", "-o"))
    overwrite: bool = Field(default=False, description="Replace a non-empty output directory.",
                            json_schema_extra=cli_option("--overwrite"))
    max_shard_size: str = Field(default="5GB", description="Largest safetensors shard, e.g. 500MB.",
                                json_schema_extra=cli_option("--max-shard-size"))
    push_to_hub: str | None = Field(  # the card's usage snippet then names this repo
        default=None, description="Then upload the result to this Hub repo.",
        json_schema_extra=cli_option("--push-to-hub"),
    )

    @field_validator("relax_rank", mode="before")
    @classmethod
    def _parse_rank(cls, value):
        if isinstance(value, str) and value.strip().lower() == "full":
            return "full"
        try:
            rank = int(value)
        except (TypeError, ValueError):
            raise ValueError("must be a non-negative integer or 'full'") from None
        if rank < 0:
            raise ValueError("must be a non-negative integer or 'full'")
        return rank

    @field_validator("relax_init")
    @classmethod
    def _start_of_the_deltas(cls, value, info):
        rank = info.data.get("relax_rank")
        if value == "zero" and rank == 0:  # svd, once the only start, stays accepted without deltas
            raise ValueError("zero needs deltas to start at zero: set --relax-rank (N or full)")
        if value is None and rank not in (0, None):
            # Healing SmolLM2 (BENCHMARKS.md): a rank-16/64 SVD start healed to 49.8/58.3 perplexity, a zero
            # start to 40.9/40.7; a full-rank SVD start is the original model itself.
            return "svd" if rank == "full" else "zero"
        return value

    @field_validator("max_shard_size")
    @classmethod
    def _parse_size(cls, value: str):
        try:
            if _bytes(value) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError("must be a size like 500MB or 5GB") from None
        return value

    @property
    def max_shard_bytes(self) -> int:
        return _bytes(self.max_shard_size)

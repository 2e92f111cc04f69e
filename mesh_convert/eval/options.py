"""The options of `mesh-convert eval`, each declared once (the command line derives from them)."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..options import cli_argument, cli_option

Task = Literal["auto", "perplexity", "lambada"]
EvalDtype = Literal["float32", "bfloat16", "float16"]


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # built on first use, not for --help

    models: list[str] = Field(
        description="Checkpoint directories (or Hub ids); several are shown side by side.",
        json_schema_extra=cli_argument(typer={"show_default": False}),
    )
    data: str | None = Field(
        default=None,
        description="wikitext2, lambada, a .txt file, or a .jsonl of {\"text\": ...}. Default: wikitext2, unless --tasks is given.",
        json_schema_extra=cli_option("--data", typer={"show_default": False}),
    )
    task: Task = Field(default="auto", description="What to compute on --data (auto: lambada for 'lambada', else perplexity).",
                       json_schema_extra=cli_option("--task"))
    tasks: list[str] = Field(
        default=[],
        description="Comma-separated lm-eval harness tasks (needs: pip install 'mesh-convert\\[eval]').",
        json_schema_extra=cli_option("--tasks", type=str | None, default=None),
    )
    include_path: Path | None = Field(default=None, description="Folder of extra lm-eval task YAMLs (e.g. tasks over local files).",
                                      json_schema_extra=cli_option("--include-path"))
    context: int | None = Field(default=None, description="Perplexity window in tokens. Default: the model's positions, at most 2048.",
                                json_schema_extra=cli_option("--context"))
    stride: int | None = Field(default=None, description="Tokens the perplexity window advances by. Default: half the context.",
                               json_schema_extra=cli_option("--stride"))
    limit: int | None = Field(default=None, description="Only the first N tokens (perplexity) or N examples (lambada, lm-eval tasks).",
                              json_schema_extra=cli_option("--limit"))
    batch_size: int | None = Field(default=None, description="Windows or examples per forward pass. Default: 4 windows, 8 examples.",
                                   json_schema_extra=cli_option("--batch-size"))
    device: str = Field(default="auto", description="cpu, cuda, cuda:N, or auto (CUDA when available).",
                        json_schema_extra=cli_option("--device"))
    dtype: EvalDtype = Field(default="float32", description="Weights' dtype while evaluating.",
                             json_schema_extra=cli_option("--dtype"))
    tokenizer: str | None = Field(default=None, description="Tokenizer directory for all models. Default: each model's own directory.",
                                  json_schema_extra=cli_option("--tokenizer"))
    as_json: bool = Field(default=False, description="Print the results as JSON on stdout, nothing else.",
                          json_schema_extra=cli_option("--json"))

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_tasks(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

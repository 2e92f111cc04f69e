"""The training recipe: one validated pydantic schema that both YAML files and command-line
overrides (`key.sub=value`) feed, so a typo anywhere is one error naming the closest valid key.

Relative paths are taken from the current directory (run recipes from the repository root).
"""

import difflib
import math
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..convert.source import MAX_LAYERS
from ..errors import UserError
from ..options import DEFAULT_ROUTER_GAP, Coda, Loops, Prelude, RouterGap, VariantOption, cli_argument, cli_option

TRAINABLE = ("all", "core+routers", "routers", "routers+deltas", "lora", "lora+routers")


class Strict(BaseModel):
    """Every section forbids unknown keys (reported with a difflib suggestion by `load_recipe`)
    and every number must be finite."""

    # Validators are built on first use: `mesh-convert --help` imports InitSpec for `init`'s options.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, defer_build=True)

    @model_validator(mode="before")
    @classmethod
    def _numeric_strings_as_numbers(cls, data):
        """YAML reads `1e8` (no dot) as a string: take such strings as numbers for integer
        fields, so `train.max_tokens=1e8` means 100000000 (a fraction is still refused)."""
        if not isinstance(data, dict):
            return data
        converted = dict(data)
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if isinstance(value, str) and int in getattr(field.annotation, "__args__", (field.annotation,)):
                try:
                    converted[name] = float(value)
                except ValueError:
                    pass  # not a number: pydantic's own message says so
        return converted


class InitSpec(Strict):
    """A randomly initialised MeSH model, built at the start of training (the paper's from-scratch
    recipe); its fields are also `mesh-convert init`'s arguments and options."""

    size: str = Field("pythia-160m", description="pythia-<size> (e.g. pythia-160m), or 'custom' with the dimensions below.",
                      json_schema_extra=cli_argument(default=...))
    loops: Loops = 2
    prelude: Prelude = None
    coda: Coda = None
    variant: VariantOption = "mesh"
    router_init: Literal["random", "base"] = Field(
        "random", description="mesh routers: random, or base (the conversion's function-preserving init: starts as the base "
        "recurrence).", json_schema_extra=cli_option("--router-init"),
    )
    router_gap: RouterGap = Field(DEFAULT_ROUTER_GAP, description="Logit gap of --router-init base.")
    # Dimensions that override (or, for size=custom, define) the Pythia architecture.
    num_layers: int | None = Field(None, ge=1, le=MAX_LAYERS, description="Unrolled layers (custom size, or override).",
                                   json_schema_extra=cli_option("--layers"))
    hidden_size: int | None = Field(None, ge=1, description="Hidden size D.", json_schema_extra=cli_option("--hidden"))
    num_heads: int | None = Field(None, ge=1, description="Attention heads.", json_schema_extra=cli_option("--heads"))
    intermediate_size: int | None = Field(None, ge=1, description="MLP size (default 4*D).",
                                          json_schema_extra=cli_option("--intermediate"))
    vocab_size: int | None = Field(None, ge=1, description="Vocabulary size (default 50304).",
                                   json_schema_extra=cli_option("--vocab"))
    max_position_embeddings: int | None = Field(None, ge=1, description="Context length (default 2048).",
                                                json_schema_extra=cli_option("--context"))


class HubData(Strict):
    path: str
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    streaming: bool = False


class DataSection(Strict):
    train: list[str] = Field(default_factory=list, description=".txt / .jsonl / .parquet files, prepared once into a "
                             "cached token store")
    store: str | None = Field(None, description="a store made by `mesh-convert prepare-data`, or a Megatron .bin/.idx prefix")
    hub: HubData | None = None
    text_field: str = "text"
    block_size: int = Field(2048, ge=2)
    order: Literal["shuffled", "stored"] = Field(
        "shuffled", description="shuffled: blocks of block_size tokens in a seeded order; stored: the store's "
        "sequences of block_size + 1 tokens in their order (Pythia's pre-shuffled Pile)")
    start_step: int = Field(0, ge=0, description="order: stored: the first step's sequences are [start_step G, (start_step + 1) G)")
    eval_files: list[str] = Field(default_factory=list, description="held-out files; else a slice of train")
    eval_blocks: int = Field(64, ge=0, description="blocks held out from train when eval_files is empty")
    loader_workers: int = Field(2, ge=1, description="streamed Hub datasets: tokenizing processes per training process")

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data):
        if isinstance(data, dict) and "shuffle_buffer" in data:
            raise ValueError("data.shuffle_buffer is gone: streamed data is read in its stored order, so that a resumed "
                             "run sees the batches it would have seen; remove the key")
        return data

    @field_validator("train", "eval_files", mode="before")
    @classmethod
    def _one_file(cls, value):
        """`data.train=file.txt` (one file, as a command-line override naturally writes it)."""
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self):
        given = [name for name, value in (("train", self.train), ("store", self.store), ("hub", self.hub)) if value]
        if not given:
            raise ValueError("data needs `train` files, a `store` or a `hub` dataset")
        if len(given) > 1:
            raise ValueError(f"give one of data.train, data.store and data.hub, not {' and '.join(given)}")
        if self.order == "stored" and self.store is None:
            raise ValueError("order: stored reads a data.store (files and Hub datasets are shuffled)")
        if self.start_step and self.order != "stored":
            raise ValueError("data.start_step needs order: stored")
        return self


class OptimSection(Strict):
    # Upper bounds far above any useful value, below what float32 optimizer arithmetic can hold.
    lr: float | None = Field(None, gt=0, le=1e6, description="peak LR; default: the Pythia LR of the source size")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.01, ge=0, lt=1, description="fraction of steps; when > 0, at least min(10, steps // 10) steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine ends at this fraction of the peak")
    grad_clip: float | None = Field(1.0, gt=0)
    router_lr_mult: float = Field(
        10.0, gt=0, le=1e3,
        description="the routers' LR over the model's: they must learn away from their init within the run "
        "(10 beat 1 from scratch at lr 1e-3 and 2e-3 and healing conversions at 3e-4; at lr 4e-3, 1 was "
        "better: the routers did best at about 1e-2 to 2e-2, BENCHMARKS.md)",
    )
    delta_lr_mult: float = Field(1.0, gt=0, le=1e3)


class TrainSection(Strict):
    global_batch_size: int = Field(8, ge=1, description="sequences per optimizer step, all processes")
    micro_batch_size: int = Field(4, ge=1, description="sequences per forward pass on one process")
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    compile: bool = False
    eval_every: int = Field(100, ge=0, description="0 = only at the end")
    eval_batches: int | None = Field(None, ge=1, description="cap on eval micro-batches")
    log_every: int = Field(1, ge=1)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        """YAML 1.1 reads an unquoted `no` as false: `mixed_precision: no` means "no"."""
        return "no" if value is False else value

    @model_validator(mode="after")
    def _length(self):
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("set exactly one of train.max_steps and train.max_tokens")
        return self


class CheckpointSection(Strict):
    every: int = Field(0, ge=0, description="save_state every N steps (0 = never)")
    keep_last: int = Field(2, ge=1)
    resume: str = Field("auto", description="auto | never | a checkpoint directory")


class LoraSection(Strict):
    r: int = Field(16, ge=1)
    alpha: float = 32.0
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="Linear layer names; default: every attention and MLP projection of the model's family"
    )
    merge: bool = Field(False, description="also write the merged standalone model")


class DistillSection(Strict):
    teacher: str | None = Field(None, description="original checkpoint directory")
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)


class AnnealSection(Strict):
    target_rank: int | None = Field(None, ge=0, description="None = off; 0 = fully tied")
    steps: int = Field(1000, ge=1, description="steps over which the rank shrinks to the target")
    every: int = Field(50, ge=1, description="SVD truncation period")
    penalty: float = Field(0.0, ge=0, description="L2 penalty on the deltas, decaying to 0 at the end")


class Recipe(Strict):
    model: str | None = Field(None, description="converted MeSH checkpoint directory")
    init: InitSpec | None = None
    tokenizer: str | None = Field(None, description="default: the model directory")
    output_dir: str = "runs/mesh"
    seed: int = Field(1234, ge=0, lt=2**32, description="numpy's seeds are 32-bit")
    method: Literal["full", "lora"] = "full"
    trainable: Literal[TRAINABLE] | None = Field(None, description="default: all (full) / lora+routers (lora)")
    data: DataSection
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    anneal: AnnealSection = Field(default_factory=AnnealSection)
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self):
        if (self.model is None) == (self.init is None):
            raise ValueError("set exactly one of `model` (a converted checkpoint) and `init` (from scratch)")
        if self.trainable is None:
            self.trainable = "lora+routers" if self.method == "lora" else "all"
        if self.method == "lora" and not self.trainable.startswith("lora"):
            raise ValueError("method: lora trains the adapter, so trainable must be lora or lora+routers")
        if self.method == "full" and self.trainable.startswith("lora"):
            raise ValueError(f"trainable: {self.trainable} needs method: lora")
        if self.anneal.target_rank is not None and self.method == "lora":
            raise ValueError("anneal works on the relax deltas of a full (not LoRA) run")
        if self.tokenizer is None and self.model is None:
            raise ValueError("a model built with `init` needs `tokenizer`")
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages.
# ---------------------------------------------------------------------------------------------


def _section_model(location: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the keys at `location` (a path of field names)."""
    model: Any = Recipe
    for key in location:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            return None
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
        else:
            return None
    return model


def _closest(key: str, location: tuple) -> str:
    model = _section_model(location)
    names = list(model.model_fields) if model is not None else []
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" (did you mean {'.'.join(map(str, (*location, match[0])))!r}?)" if match else ""


def explain(error: ValidationError, source: str) -> UserError:
    """The first validation problem as one line, with a suggestion for unknown keys."""
    problem = error.errors()[0]
    location = tuple(part for part in problem["loc"] if not isinstance(part, int))
    dotted = ".".join(map(str, problem["loc"])) or "recipe"
    if problem["type"] == "extra_forbidden":
        return UserError(f"{source}: unknown key {dotted!r}{_closest(str(location[-1]), location[:-1])}")
    if problem["type"] == "missing":
        return UserError(f"{source}: missing key {dotted!r}")
    message = problem["msg"].removeprefix("Value error, ")
    where = f"{dotted}: " if problem["loc"] else ""
    return UserError(f"{source}: {where}{message}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (["train", "max_steps"], 10); values are parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} is not of the form key.sub=value")
    try:
        return key.split("."), yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as error:  # a python tag is one: safe_load builds no objects
        problem = getattr(error, "problem", None) or "cannot be read"
        raise UserError(f"override {key}: the value is not valid YAML ({problem})") from None
    except RecursionError:
        raise UserError(f"override {key}: the value is nested too deeply") from None


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for depth, key in enumerate(path[:-1]):
        model = _section_model(tuple(path[:depth]))
        if model is not None and key not in model.model_fields:
            raise UserError(f"override: unknown key {'.'.join(path[: depth + 1])!r}{_closest(key, tuple(path[:depth]))}")
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of settings; anything larger is not one


def _recipe_text(path: Path) -> str:
    """The text of the recipe file at `path`: a regular file of at most MAX_RECIPE_BYTES (a pipe or a
    device would be read forever), in UTF-8."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"recipe {path} is not a file" + (" (a directory)" if stat.S_ISDIR(mode) else ""))
        with path.open("rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"recipe {path} does not exist") from None
    except OSError as error:
        raise UserError(f"cannot read recipe {path}: {error.strerror or error}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise UserError(f"recipe {path} is larger than {MAX_RECIPE_BYTES >> 20} MiB: not a recipe")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"recipe {path} is not UTF-8 text (byte {error.start})") from None


def load_recipe(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted overrides, validate; every problem is a one-line UserError."""
    data: dict = dict(base or {})
    source = "recipe"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(_recipe_text(path))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise UserError(f"recipe {path} is not valid YAML{where}") from None
        except RecursionError:
            raise UserError(f"recipe {path} is nested too deeply to be a recipe") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"recipe {path} must be a mapping of keys to values")
        data.update(loaded)
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(data, key_path, value)
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise explain(error, source) from None
    except RecursionError:
        raise UserError(f"{source}: a value is nested too deeply to be a setting") from None


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def lr_schedule(step: int, total: int, warmup: float, min_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warm-up over `warmup` of the steps,
    then cosine from 1 to `min_ratio` at the last step. A warm-up is at least one step, and at
    least min(10, total // 10): 1% of a short run's 200 steps would be 2, too few to warm Adam's
    moment estimates up."""
    warm = max(1, math.ceil(warmup * total), min(10, total // 10)) if warmup > 0 else 0
    if step < warm:
        return (step + 1) / warm
    span = max(1, total - warm - 1)
    progress = min(1.0, (step - warm) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

"""Loading models and tokenizers, one way for every command: one dtype policy, no remote code
(MeSH loads with this package's classes, registered with transformers' Auto classes), offline
from the cache where the Hub gives no answer, and every failure a user can cause one line; and
the check that a tokenizer belongs to a model.

Above `io` (where the files are) and `modeling` (whose import registers MeSH). Light to import:
torch, transformers and the model classes load inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError, first_line, is_our_fault
from .io import has_tokenizer, is_hub_id, pretrained_source, torch_dtype

if TYPE_CHECKING:
    import torch


@contextmanager
def transformers_bars_hidden() -> Iterator[None]:
    """Hide transformers' own tqdm bars ("Loading weights", "Writing model shards"), which it draws
    on stderr between the commands' tables and their own progress display, inside the block, and
    restore them after it (when the user turned them off, they stay off)."""
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


@contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers' loading messages kept off the terminal inside the block (its load report of
    missing weights, warnings about a checkpoint's model type), where the commands say what matters
    of them in their own one line; its own level comes back after."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with transformers_bars_hidden():
            yield
    finally:
        hf_logging.set_verbosity(level)


def model_file_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for model files it cannot use: missing or unreadable files and bad
    JSON (OSError), unknown architectures (ValueError), fields of the wrong type or value
    (huggingface_hub's strict-dataclass errors), damaged safetensors, and weights whose shapes do
    not fit the config (RuntimeError)."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, StrictDataclassError, SafetensorError)


def load_model(name: str | Path, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """A causal LM (MeSH checkpoints included) from a directory or Hub id, in eval mode.

    One policy for every command: the dtype is explicit (transformers 5 otherwise keeps the
    checkpoint's, and Pythia's fp16 is poor on CPU), and remote code is not run: MeSH loads with
    this package's own classes, registered with the Auto classes."""
    from transformers import AutoModelForCausalLM

    import mesh_convert.modeling  # noqa: F401  (registers MeSH with the Auto classes)

    source, unreachable = pretrained_source(name)
    try:
        with transformers_quiet():
            # transformers does not pass local_files_only on to its look for a peft adapter: say it twice.
            offline = {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}} if unreachable else {}
            model, loading = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype(dtype) if isinstance(dtype, str) else dtype, output_loading_info=True, **offline
            )
    except model_file_errors() as error:  # corrupt weights, unknown architecture, weights that do not fit the config
        if is_our_fault(error):
            raise
        if unreachable and isinstance(error, OSError):
            raise UserError(f"{unreachable} (and it is not in the local cache)") from None
        raise UserError(f"cannot load the model in {name}: {type(error).__name__}: {first_line(error)}") from None
    # transformers fills weights a checkpoint lacks with random ones and goes on: a model that
    # evaluates, trains or merges as if it were whole.
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"the model in {name} lacks weights its config needs: {missing[0]}{more}")
    return model.to(device).eval()


def load_tokenizer(name: str | Path, *, remedy: str = "pass --tokenizer DIR"):
    """The tokenizer of a checkpoint directory (or Hub id); `remedy` ends the error messages."""
    from transformers import AutoTokenizer

    # AutoTokenizer reads the model's config.json first: with MeSH registered it needs no remote
    # code, where it would otherwise ask "Do you wish to run the custom code?" on stdin.
    import mesh_convert.modeling  # noqa: F401

    hub = is_hub_id(str(name))
    source = str(name) if hub else str(Path(name).expanduser())
    if not hub and not Path(source).is_dir():
        raise UserError(f"tokenizer directory {name} does not exist")
    # transformers 5 quietly builds an empty tokenizer from a bare config.json: look first.
    if not has_tokenizer(name):
        raise UserError(f"no tokenizer files in {name}; {remedy}")
    unreachable = pretrained_source(name)[1] if hub else None
    try:
        with transformers_quiet():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=bool(unreachable))
    except Exception as error:  # the tokenizers library fails on a damaged file with a plain Exception
        if is_our_fault(error):
            raise
        if unreachable and isinstance(error, OSError):
            raise UserError(f"{unreachable} (and it is not in the local cache); {remedy}") from None
        raise UserError(f"no usable tokenizer at {name} ({first_line(error)}); {remedy}") from None
    if not tokenizer("a b", add_special_tokens=False)["input_ids"]:
        raise UserError(f"the tokenizer at {name} encodes text to nothing; {remedy}")
    return tokenizer


def check_largest_id(largest: int, vocab: int | None, option: str) -> None:
    """A tokenizer that does not belong to the model shows up as ids past its vocabulary: say so
    (on the largest id) instead of failing deep inside an embedding lookup; `option` is what
    chooses the tokenizer."""
    if vocab is not None and largest >= vocab:
        raise UserError(
            f"the tokenizer produced token id {largest} but the model has {vocab} embeddings: "
            f"tokenizer and model do not match (see {option})"
        )


def parse_device(name: str | None) -> torch.device:
    """Where a model runs: `auto` (or nothing) means CUDA when there is a GPU, else the CPU. A
    device this machine does not have, or `meta` (which holds no numbers), is a UserError."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device '{name}' (e.g. cpu, cuda, cuda:1, auto)") from None
    if device.type == "meta":
        raise UserError("device 'meta' holds no numbers, so nothing can be computed on it: use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device '{name}' requested but MPS is not available")
    return device

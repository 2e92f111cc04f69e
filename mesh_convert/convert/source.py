"""Finding the source checkpoint: a local directory, a Hub id, or a `pythia-<size>` alias, and
fetching its config and files (`reader.py` reads its tensors). Light: torch and transformers load
only when a config is read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError, first_line, hub_error
from ..io import (
    TOKENIZER_FILES,
    HubUnreachable,
    cache_snapshot,
    hub_info,
    hub_timeout,
    is_hub_id,
    parse_json,
    refuse_links_out,
    resolve_endpoint,
)
from .pythia import parse_alias

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedConfig

CONFIG_FILES = ["config.json", "generation_config.json"]
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Without an index, only these are weights: a Trainer checkpoint also holds training_args.bin,
# optimizer.pt and the like, which are pickles of other things.
WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")
# Config fields that every supported family needs; a missing one would silently take the
# defaults of some other model size from transformers.
REQUIRED_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Far above any published checkpoint (the deepest Llama, Qwen2 and GPT-NeoX models have ~126
# layers), low enough that planning and checking a layout stays instant.
MAX_LAYERS = 1024
# The largest size (width, vocabulary, context) a config may name: 16M, far above any model's
# (hidden sizes reach some 25k, vocabularies some 260k), and small enough that no product of two
# of them overflows the integer arithmetic of planning and allocation.
MAX_SIZE = 1 << 24


@dataclass(frozen=True)
class SourceRef:
    """What the user named: a local path or a Hub repo (with revision)."""

    name: str  # as the user typed it
    repo_id: str | None  # Hub id, None for a local directory
    revision: str | None
    local_dir: Path | None

    def recorded(self) -> tuple[str, str | None]:
        """(model, revision) as the conversion records them: a Hub id with its revision; a snapshot
        in the Hugging Face cache (`models--ORG--NAME/snapshots/REV`) as that id and revision; any
        other local directory by its folder's name (the record is published, the user's paths are not)."""
        if self.local_dir is None:
            return self.repo_id, self.revision
        return cache_snapshot(self.local_dir) or (self.local_dir.name, None)


def resolve_source(name: str, revision: str | None = None) -> SourceRef:
    path = Path(name).expanduser()
    try:
        exists = path.exists()
    except OSError as error:
        raise UserError(f"cannot read {name}: {error.strerror or error}") from None
    if exists:
        if not path.is_dir():
            raise UserError(f"{name} is a file; give the checkpoint's directory")
        if revision is not None:
            raise UserError(f"--revision applies to Hub models; {name} is a local directory")
        return SourceRef(name, None, revision, path.resolve())
    try:
        alias = parse_alias(name)
    except ValueError as error:
        raise UserError(str(error)) from None
    if alias is not None:
        return SourceRef(name, alias.repo_id, revision, None)
    if not is_hub_id(name):
        raise UserError(f"no such checkpoint directory: {name} (a Hub id is written ORG/NAME; or a pythia-<size> alias)")
    return SourceRef(name, name, revision, None)


def _from_hub(ref: SourceRef, action):
    """Run a huggingface_hub call, turning its errors into one line."""
    try:
        with hub_timeout():
            return action()
    except Exception as error:
        user_error = _fetch_error(ref, error)
        if user_error is None:
            raise
        raise user_error from None


def _fetch_error(ref: SourceRef, error: Exception, suffix: str = "") -> UserError | None:
    """The one line for a failed fetch of `ref` (`suffix` appended); None when no user can cause the error."""
    user_error = hub_error(error, ref.repo_id, resolve_endpoint(), fetching=True, revision=ref.revision)
    return UserError(f"{user_error}{suffix}") if user_error is not None else None


def _hub_files_or_cache(ref: SourceRef) -> list[str] | Path:
    """The repo's files at the revision, when the Hub answers; the snapshot in the local Hugging
    Face cache when it gives no answer (HF_HUB_OFFLINE, no network, the Hub failing), as
    transformers then loads the model; a UserError when neither. Once the Hub has answered,
    downloads keep huggingface_hub's retries."""
    from huggingface_hub import constants

    try:
        info = hub_info(ref.repo_id, ref.revision)
    except HubUnreachable as unreachable:
        cached = _cached_snapshot(ref)
        if cached is not None:
            return cached
        if constants.is_offline_mode():
            raise UserError(f"{unreachable} and it is not in the local cache ({constants.HF_HUB_CACHE}); fetch it once "
                            "with network access") from None
        raise UserError(f"{unreachable} (and it is not in the local cache)") from None
    return [sibling.rfilename for sibling in info.siblings or ()]


def _cached_snapshot(ref: SourceRef) -> Path | None:
    """The snapshot of `ref` in the local Hugging Face cache (HF_HUB_CACHE), found as transformers
    finds it offline: through the revision's ref (`refs/main` by default) or its commit hash."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(ref.repo_id, "config.json", revision=ref.revision)
    return Path(config).parent if isinstance(config, str) else None


def fetch_config(ref: SourceRef) -> Path:
    """Directory holding the source's config.json (for plans that need no weights)."""
    if ref.local_dir is not None:
        return ref.local_dir
    found = _hub_files_or_cache(ref)
    if isinstance(found, Path):
        return found
    from huggingface_hub import hf_hub_download

    path = _from_hub(ref, lambda: hf_hub_download(ref.repo_id, "config.json", revision=ref.revision))
    return Path(path).parent


def fetch_checkpoint(ref: SourceRef) -> Path:
    """Local directory with the source's config, tokenizer and weights (downloading what is needed:
    safetensors when the repo has them, else `.bin`; offline, the cached snapshot as it is)."""
    if ref.local_dir is not None:
        return ref.local_dir
    found = _hub_files_or_cache(ref)
    if isinstance(found, Path):
        if not any(any(found.glob(pattern)) for pattern in WEIGHT_PATTERNS):
            raise UserError(
                f"the local cache holds {ref.repo_id} without its weights ({found}) and the Hub gives no answer: "
                "fetch the model once with network access"
            )
        return found
    from huggingface_hub import snapshot_download

    weights = ["*.safetensors", SAFETENSORS_INDEX] if any(f.endswith(".safetensors") for f in found) else ["*.bin", BIN_INDEX]
    patterns = [*CONFIG_FILES, *TOKENIZER_FILES, *weights]
    return Path(_from_hub(ref, lambda: snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns)))


def load_source_config(directory: Path) -> PreTrainedConfig:
    config_file = directory / "config.json"
    try:
        if not config_file.is_file():
            raise UserError(f"{directory} has no config.json; is it a Hugging Face checkpoint?")
        raw = parse_json(config_file.read_text())
    except OSError as error:
        raise UserError(f"cannot read {config_file}: {error.strerror or error}") from None
    except ValueError as error:  # malformed, not UTF-8, or nested too deeply
        raise UserError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_file} does not hold a JSON object (it holds a {type(raw).__name__})")
    from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassError
    from transformers import AutoConfig

    from .families import source_family

    source_family(raw.get("model_type"))  # a clear error for architectures we do not convert
    missing = [field for field in REQUIRED_CONFIG_FIELDS if field not in raw]
    if missing:
        raise UserError(f"{config_file} lacks {', '.join(missing)}")
    check_fields(raw, str(config_file))  # before transformers, which warns or fails deep inside on them
    try:
        config = AutoConfig.from_pretrained(directory)
    except StrictDataclassError as error:  # transformers checks field types and the architecture
        reason = str(error).splitlines()[-1].strip().split(": ", 1)[-1]
        if isinstance(error, StrictDataclassClassValidationError):  # names no values: add the sizes
            sizes = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
            reason += " (" + ", ".join(f"{name} {raw[name]!r}" for name in sizes if name in raw) + ")"
        raise UserError(f"{config_file}: {reason}") from None
    except (ValueError, OSError, TypeError) as error:
        raise UserError(f"cannot read {config_file}: {str(error).splitlines()[0]}") from None
    check_sizes(config, str(config_file))
    return config


def load_generation_config(directory: Path) -> GenerationConfig | None:
    """The source's generation_config.json (None when it has none), read before any weight is
    written: transformers refuses a malformed one only when it loads it."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return None
    from transformers import GenerationConfig

    try:
        parse_json(path.read_bytes())  # transformers' own reading recurses into the value
        return GenerationConfig.from_pretrained(directory)
    except OSError as error:  # transformers' word for malformed JSON, or a file we may not read
        raise UserError(f"cannot read {path}: {first_line(error)}") from None
    except (ValueError, TypeError, AttributeError) as error:  # not an object, a field of the wrong type
        raise UserError(f"{path} is not a valid generation config: {first_line(error)}") from None


def check_fields(raw: dict, where: str) -> None:
    """Values of a source's config.json that transformers takes as they are but no model can run
    with: sizes that are not positive integers or are beyond any machine (MAX_SIZE), a norm's
    epsilon or a rotary base that is not a positive number, a rotary fraction outside (0, 1], and
    names of an activation, a rotary scaling or a dtype that do not exist (transformers would look
    them up only when the model is built, and fail there)."""
    import torch
    from transformers.activations import ACT2FN
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for field in (*REQUIRED_CONFIG_FIELDS, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = raw.get(field)
        if value is None and field not in REQUIRED_CONFIG_FIELDS:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{where}: {field} must be a positive integer, not {value!r}")
        if value > MAX_SIZE:
            raise UserError(f"{where}: {field} {value:,} is beyond any model (at most {MAX_SIZE:,})")
    ropes = [raw.get(key) or {} for key in ("rope_scaling", "rope_parameters")]  # the older name, and 5.x's
    if not all(isinstance(rope, dict) for rope in ropes):
        raise UserError(f"{where}: rope_scaling and rope_parameters must be objects")
    numbers = [(name, raw.get(name)) for name in ("layer_norm_eps", "rms_norm_eps", "rotary_emb_base", "rope_theta",
                                                   "rotary_pct", "partial_rotary_factor")]
    numbers += [(name, rope.get(name)) for rope in ropes for name in ("rope_theta", "partial_rotary_factor")]
    for name, value in numbers:
        if value is None:
            continue
        bound = 1.0 if name in ("rotary_pct", "partial_rotary_factor") else math.inf
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value <= bound and math.isfinite(value)):
            limit = "in (0, 1]" if bound == 1.0 else "a positive finite number"
            raise UserError(f"{where}: {name} must be {limit}, not {value!r}")
    for rope in ropes:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise UserError(f"{where}: unknown rotary scaling {rope_type!r} (transformers knows "
                            f"{', '.join(['default', *ROPE_INIT_FUNCTIONS])})")
    activation = raw.get("hidden_act")
    if activation is not None and (not isinstance(activation, str) or activation not in ACT2FN):
        raise UserError(f"{where}: unknown activation hidden_act {activation!r}")
    for key in ("torch_dtype", "dtype"):
        dtype = raw.get(key)
        if isinstance(dtype, str) and dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise UserError(f"{where}: {key} {dtype!r} is not a torch dtype")


def check_sizes(config: PreTrainedConfig, where: str) -> None:
    """Sizes that transformers accepts but no model can have (zero or negative), and layer counts
    beyond MAX_LAYERS."""
    for field in REQUIRED_CONFIG_FIELDS:
        value = getattr(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{where}: {field} must be a positive integer, not {value!r}")
    if config.num_hidden_layers > MAX_LAYERS:
        raise UserError(
            f"{where}: num_hidden_layers {config.num_hidden_layers} is more than mesh-convert plans for "
            f"(at most {MAX_LAYERS}; the deepest published checkpoints of these families have about 126)"
        )


def tokenizer_files(directory: Path, local: bool) -> list[Path]:
    """The tokenizer files to copy into the output; in a local directory, none may be a link out of it."""
    found = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if local:
        refuse_links_out(directory, found, "mesh-convert copies tokenizer files into the output")
    return found

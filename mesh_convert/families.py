"""Source-architecture adapters for the converter: where a family keeps its embedding, layers,
final norm and head, and which of its config fields the MeSH config takes over.

Layer tensors keep their names: MeSH's layer classes mirror the family's own, so a source
layer's `attention.dense.weight` becomes a unique layer's `attention.dense.weight`.
"""

from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig

from .errors import UserError

# MeSH output tensor names that do not live inside a layer.
MESH_EMBED = "model.embed_tokens.weight"
MESH_FINAL_NORM = "model.final_norm."
MESH_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class SourceFamily:
    model_type: str
    embed: str  # input embedding tensor
    heads: tuple[str, ...]  # the output projection, under any of these names
    final_norm: str  # prefix of the final norm's tensors
    layer_prefix: str  # prefix of layer i's tensors, with {i}
    config_fields: tuple[str, ...]  # copied verbatim into MeshConfig

    def layer(self, index: int) -> str:
        return self.layer_prefix.format(i=index)

    def mesh_fields(self, config: PreTrainedConfig) -> dict:
        return {name: getattr(config, name) for name in self.config_fields if hasattr(config, name)}


GPT_NEOX = SourceFamily(
    model_type="gpt_neox",
    embed="gpt_neox.embed_in.weight",
    heads=("embed_out.weight", "lm_head.weight"),
    final_norm="gpt_neox.final_layer_norm.",
    layer_prefix="gpt_neox.layers.{i}.",
    config_fields=(
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "hidden_act",
        "max_position_embeddings",
        "layer_norm_eps",
        "use_parallel_residual",
        "attention_bias",
        "attention_dropout",
        "hidden_dropout",
        "rope_parameters",
        "initializer_range",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ),
)

LLAMA = SourceFamily(
    model_type="llama",
    embed="model.embed_tokens.weight",
    heads=("lm_head.weight",),
    final_norm="model.norm.",
    layer_prefix="model.layers.{i}.",
    config_fields=(
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "attention_bias",
        "attention_dropout",
        "mlp_bias",
        "rope_parameters",
        "initializer_range",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ),
)

SOURCE_FAMILIES = {family.model_type: family for family in (GPT_NEOX, LLAMA)}


def source_family(model_type: str | None) -> SourceFamily:
    if model_type not in SOURCE_FAMILIES:
        raise UserError(
            f"unsupported architecture {model_type!r}: mesh-convert converts {', '.join(SOURCE_FAMILIES)} checkpoints"
        )
    return SOURCE_FAMILIES[model_type]


def layer_tensor_shapes(mesh_config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one unshared layer's tensors (relative to the layer), from the MeSH layer class."""
    from .modeling_mesh import FAMILIES

    with torch.device("meta"):
        layer = FAMILIES[mesh_config.base_model_type].layer(mesh_config)
    return {name: tuple(tensor.shape) for name, tensor in layer.state_dict().items()}


def final_norm_names(mesh_config) -> list[str]:
    """The final norm's tensor names (LayerNorm: weight and bias; RMSNorm: weight)."""
    from .modeling_mesh import FAMILIES

    with torch.device("meta"):
        return list(FAMILIES[mesh_config.base_model_type].final_norm(mesh_config).state_dict())

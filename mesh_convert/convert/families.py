"""Source-architecture adapters for the converter: where a family keeps its embedding, layers,
final norm and head, and which of its config fields the MeSH config takes over.

Layer tensors keep their names: MeSH's layer classes mirror the family's own, so a source
layer's `attention.dense.weight` becomes a unique layer's `attention.dense.weight`.
"""

from dataclasses import dataclass

from ..errors import UserError

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
    mesh_layers: str = ""  # the MeSH layer family (MeshConfig.base_model_type); default: model_type
    fixed_fields: tuple[tuple[str, object], ...] = ()  # MeshConfig fields the architecture implies

    def layer(self, index: int) -> str:
        return self.layer_prefix.format(i=index)

    @property
    def base_model_type(self) -> str:
        return self.mesh_layers or self.model_type

    def mesh_fields(self, config) -> dict:
        """From the source's config (or any object with its attributes)."""
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            raise UserError(f"this {self.model_type} checkpoint uses sliding-window attention, which mesh-convert does not support")
        fields = {name: getattr(config, name) for name in self.config_fields if hasattr(config, name)}
        return fields | dict(self.fixed_fields)


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

# Qwen2 is a Llama decoder with biases on the query, key and value projections only.
QWEN2 = SourceFamily(
    model_type="qwen2",
    embed=LLAMA.embed,
    heads=LLAMA.heads,
    final_norm=LLAMA.final_norm,
    layer_prefix=LLAMA.layer_prefix,
    config_fields=tuple(name for name in LLAMA.config_fields if name not in ("attention_bias", "mlp_bias")),
    mesh_layers="llama",
    fixed_fields=(("attention_bias", True), ("attention_output_bias", False), ("mlp_bias", False)),
)

SOURCE_FAMILIES = {family.model_type: family for family in (GPT_NEOX, LLAMA, QWEN2)}


def source_family(model_type: str | None) -> SourceFamily:
    if model_type not in SOURCE_FAMILIES:
        raise UserError(
            f"unsupported architecture {model_type!r}: mesh-convert converts {', '.join(SOURCE_FAMILIES)} checkpoints"
        )
    return SOURCE_FAMILIES[model_type]


def layer_tensor_shapes(mesh_config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one unshared layer's tensors (relative to the layer), from the MeSH layer class."""
    import torch

    from ..modeling.modeling_mesh import FAMILIES

    with torch.device("meta"):
        layer = FAMILIES[mesh_config.base_model_type].layer(mesh_config)
    return {name: tuple(tensor.shape) for name, tensor in layer.state_dict().items()}


def final_norm_names(mesh_config) -> list[str]:
    """The final norm's tensor names (LayerNorm: weight and bias; RMSNorm: weight)."""
    import torch

    from ..modeling.modeling_mesh import FAMILIES

    with torch.device("meta"):
        return list(FAMILIES[mesh_config.base_model_type].final_norm(mesh_config).state_dict())

"""Configuration of a MeSH recursive transformer (arXiv 2510.07739).

Self-contained: this file is copied next to saved checkpoints as remote code, so it may import
only torch, transformers and the other remote-code file (`modeling_mesh.py`).

A model is laid out as `P+CRK+Q`: P unshared prelude layers, C shared core layers looped K
times, Q unshared coda layers. `num_hidden_layers` is the *unrolled* depth P + C*K + Q, because
that is how many attention layers run per token, and so how many KV-cache layers `generate()`
must create.
"""

from typing import Any

import transformers

# The oldest transformers these two files run on, measured from 4.57 up: older ones fail deep inside
# (4.57 has no PreTrainedConfig; 5.0-5.8 take create_causal_mask's arguments differently, and 5.0-5.2
# also lack AttentionInterface.get_interface). Checked before anything else is imported, so that an
# older transformers gets one line that says so. Also written into config.json (`to_dict`) and the card.
MIN_TRANSFORMERS_VERSION = (5, 9)
REQUIRES_TRANSFORMERS = ">=" + ".".join(map(str, MIN_TRANSFORMERS_VERSION))
if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < MIN_TRANSFORMERS_VERSION:
    raise ImportError(
        f"MeSH models need transformers{REQUIRES_TRANSFORMERS}, but transformers {transformers.__version__} is "
        f"installed: pip install -U 'transformers{REQUIRES_TRANSFORMERS}'"
    )

from transformers import PreTrainedConfig  # noqa: E402  (after the version check)

VARIANTS = ("mesh", "base", "residual", "anchor", "anchor_emb")
FAMILIES = ("gpt_neox", "llama")


class MeshConfig(PreTrainedConfig):
    model_type = "mesh"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    # Which decoder family the layers come from (see `modeling_mesh.FAMILIES`).
    base_model_type: str = "gpt_neox"

    # The recursive layout P+CRK+Q.
    num_prelude_layers: int = 2
    num_core_layers: int = 4
    num_loops: int = 2
    num_coda_layers: int = 2
    num_hidden_layers: int = 12  # unrolled depth, P + C*K + Q

    # The recurrence between loop steps, and MeSH's buffer.
    variant: str = "mesh"
    num_slots: int | None = None  # B, defaults to K + 3
    router_gap: float = 8.0  # logit gap of the function-preserving router init

    # Per-loop relaxation of the shared core: 0 = none, "full" = dense deltas, N = rank-N deltas.
    relax_rank: int | str = 0

    # Decoder hyper-parameters (named as in the source family's config; GPT-NeoX defaults).
    vocab_size: int = 50304
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    rope_parameters: dict | None = None
    # Llama-style decoders.
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    mlp_bias: bool = False
    # The attention output projection's bias; None: as attention_bias (Qwen2 has q/k/v biases only).
    attention_output_bias: bool | None = None
    initializer_range: float = 0.02
    # Scale of the token embeddings (the paper's from-scratch recipe uses sqrt(D); 1 for converted models).
    embedding_multiplier: float = 1.0
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None

    # Where the weights came from: source model and revision, tie strategy, the layer map
    # (which original layers fed each unique layer). Written by the converter.
    provenance: dict[str, Any] | None = None

    def __post_init__(self, **kwargs):
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
        if self.num_slots is None:
            self.num_slots = self.num_loops + 3
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self.validate_layout()

    def validate_layout(self):
        P, C, K, Q = self.num_prelude_layers, self.num_core_layers, self.num_loops, self.num_coda_layers
        if min(P, Q) < 0 or C < 1 or K < 1:
            raise ValueError(f"invalid layout {self.layout}: need P, Q >= 0 and C, K >= 1")
        if self.num_hidden_layers != P + C * K + Q:
            raise ValueError(
                f"num_hidden_layers={self.num_hidden_layers} must be the unrolled depth P + C*K + Q = {P + C * K + Q}"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.base_model_type not in FAMILIES:
            raise ValueError(f"unknown base_model_type {self.base_model_type!r}; supported: {', '.join(FAMILIES)}")
        if self.variant == "mesh" and self.num_slots < 2:
            raise ValueError("MeSH needs at least 2 memory slots")
        if not (self.relax_rank == "full" or (isinstance(self.relax_rank, int) and self.relax_rank >= 0)):
            raise ValueError(f"relax_rank must be a non-negative integer or 'full', not {self.relax_rank!r}")

    def to_dict(self) -> dict[str, Any]:
        """As transformers' (which adds `transformers_version`, the version that saved the config), plus
        `requires_transformers`, what this code needs: always this code's, whatever a loaded config said."""
        output = super().to_dict()
        output["requires_transformers"] = REQUIRES_TRANSFORMERS
        return output

    @property
    def layout(self) -> str:
        return f"{self.num_prelude_layers}+{self.num_core_layers}R{self.num_loops}+{self.num_coda_layers}"

    @property
    def num_router_pairs(self) -> int:
        """One write/read pair for the transitional step after the prelude, and one per loop."""
        return self.num_loops + 1

    def unrolled_index(self, stage: str, position: int, loop: int = 0) -> int:
        """Index of a layer call in the unrolled stack; it is also the layer's KV-cache slot."""
        if stage == "prelude":
            return position
        if stage == "core":
            return self.num_prelude_layers + loop * self.num_core_layers + position
        if stage == "coda":
            return self.num_prelude_layers + self.num_loops * self.num_core_layers + position
        raise ValueError(f"unknown stage {stage!r}")


__all__ = ["MeshConfig"]

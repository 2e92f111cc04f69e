"""MeSH recursive transformer (Yu et al., "MeSH: Memory-as-State-Highways for Recursive
Transformers", arXiv 2510.07739), as a Hugging Face causal LM.

Self-contained: this file is copied next to saved checkpoints as remote code, so it may import
only torch, transformers and `configuration_mesh.py`.

    h_emb  = embed(tokens)
    h_pre  = prelude(h_emb)                       P unshared layers
    h^(0)  = transitional step(h_emb, h_pre)      router pair 0 (mesh) or h_pre
    h^(t+1)= recurrence(core(h^(t)), ...)         C shared layers, looped K times
    logits = lm_head(final_norm(coda(h^(K))))     Q unshared layers

Every unique layer is stored once and called K times in `forward`; no parameter is aliased.
Each call has its own position in the unrolled stack, which is also its KV-cache layer.
Core layers may carry per-loop "relaxation" deltas (Bae et al. 2024), picked by the loop index
passed to the layer, so they behave correctly under activation checkpointing.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

# First: it checks that the installed transformers is recent enough, before the imports below fail
# on an older one with errors that do not say so.
from .configuration_mesh import MeshConfig  # isort: skip

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as apply_partial_rotary
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, eager_attention_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as apply_full_rotary
from transformers.utils import logging

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the KV cache argument and output field from `past_key_values` to
# `cache`. The forwards accept both names, and outputs use the installed version's field, so
# `generate` finds its cache on either side of the rename.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# ---------------------------------------------------------------------------------------------
# Relaxed building blocks: a Linear / LayerNorm whose parameters may carry a per-loop delta.
# Subclassing the torch modules keeps parameter names standard, so PEFT can target them.
# ---------------------------------------------------------------------------------------------


def relax_is_dense(rank: int | str, in_features: int, out_features: int) -> bool:
    """A delta of rank >= min(in, out) is stored as a dense matrix: it is exact and smaller."""
    return rank == "full" or rank >= min(in_features, out_features)


class LoopLinear(nn.Linear):
    """`nn.Linear`, plus (in core layers) a per-loop delta on the weight and bias.

    Weight delta of loop t: dense `weight_delta[t]` or low rank `weight_delta_out[t] @ weight_delta_in[t]`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, num_loops: int = 0, rank=0):
        super().__init__(in_features, out_features, bias=bias)
        self.relaxed = num_loops > 0 and rank != 0
        if not self.relaxed:
            return
        if relax_is_dense(rank, in_features, out_features):
            self.weight_delta = nn.Parameter(torch.empty(num_loops, out_features, in_features))
        else:
            self.weight_delta_in = nn.Parameter(torch.empty(num_loops, rank, in_features))
            self.weight_delta_out = nn.Parameter(torch.empty(num_loops, out_features, rank))
        if bias:
            self.bias_delta = nn.Parameter(torch.empty(num_loops, out_features))

    def forward(self, x: torch.Tensor, loop: int | None = None) -> torch.Tensor:
        if not self.relaxed or loop is None:
            return F.linear(x, self.weight, self.bias)
        bias = self.bias + self.bias_delta[loop] if self.bias is not None else None
        if hasattr(self, "weight_delta"):
            return F.linear(x, self.weight + self.weight_delta[loop], bias)
        low_rank = F.linear(F.linear(x, self.weight_delta_in[loop]), self.weight_delta_out[loop])
        return F.linear(x, self.weight, bias) + low_rank


class LoopLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm`, plus (in relaxed core layers) a per-loop delta on its weight and bias."""

    def __init__(self, hidden_size: int, eps: float, num_loops: int = 0, rank=0):
        super().__init__(hidden_size, eps=eps)
        self.relaxed = num_loops > 0 and rank != 0
        if self.relaxed:
            self.weight_delta = nn.Parameter(torch.empty(num_loops, hidden_size))
            self.bias_delta = nn.Parameter(torch.empty(num_loops, hidden_size))

    def forward(self, x: torch.Tensor, loop: int | None = None) -> torch.Tensor:
        if not self.relaxed or loop is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight = self.weight + self.weight_delta[loop]
        bias = self.bias + self.bias_delta[loop]
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class LoopRMSNorm(nn.Module):
    """RMSNorm computed as in transformers' Llama (in float32, weight applied in the input dtype),
    plus (in relaxed core layers) a per-loop delta on its weight."""

    def __init__(self, hidden_size: int, eps: float, num_loops: int = 0, rank=0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.relaxed = num_loops > 0 and rank != 0
        if self.relaxed:
            self.weight_delta = nn.Parameter(torch.empty(num_loops, hidden_size))

    def forward(self, x: torch.Tensor, loop: int | None = None) -> torch.Tensor:
        weight = self.weight if not self.relaxed or loop is None else self.weight + self.weight_delta[loop]
        input_dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return weight * x.to(input_dtype)


# ---------------------------------------------------------------------------------------------
# Attention shared by the families: rotary, the KV cache at the call's unrolled index, and
# transformers' attention backends (eager / sdpa / flash).
# ---------------------------------------------------------------------------------------------


class LoopAttention(nn.Module):
    is_causal = True
    layer_idx = None  # one module serves several unrolled layers: the cache index comes per call
    num_key_value_groups = 1

    def attend(self, query, key, value, attention_mask, position_embeddings, cache, cache_index, **kwargs):
        """query/key/value: (batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim), weights."""
        cos, sin = position_embeddings
        # GPT-NeoX rotates only the leading cos.shape[-1] dims (rotary_pct); its split-and-concat
        # leaves a layout that makes the SDPA wrapper copy the query, so full rotary (Llama, and
        # rotary_pct=1) takes Llama's function: same values, one activation less per layer.
        rotate = apply_full_rotary if cos.shape[-1] == query.shape[-1] else apply_partial_rotary
        query, key = rotate(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, cache_index)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        return attn_output.reshape(*attn_output.shape[:2], -1).contiguous(), attn_weights


# ---------------------------------------------------------------------------------------------
# GPT-NeoX (Pythia) decoder layer. Same parameter names and maths as transformers' GPTNeoXLayer;
# the differences are the loop index and a KV-cache index given per call, not per module.
# ---------------------------------------------------------------------------------------------


class GPTNeoXLoopAttention(LoopAttention):
    def __init__(self, config: MeshConfig, num_loops: int = 0, rank=0):
        super().__init__()
        self.config = config
        self.head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_size**-0.5
        self.attention_dropout = config.attention_dropout
        D = config.hidden_size
        self.query_key_value = LoopLinear(D, 3 * D, config.attention_bias, num_loops, rank)
        self.dense = LoopLinear(D, D, config.attention_bias, num_loops, rank)

    def forward(self, hidden_states, attention_mask, position_embeddings, cache, cache_index, loop, **kwargs):
        input_shape = hidden_states.shape[:-1]
        qkv = self.query_key_value(hidden_states, loop).view(*input_shape, -1, 3 * self.head_size).transpose(1, 2)
        query, key, value = qkv.chunk(3, dim=-1)
        attn_output, attn_weights = self.attend(
            query, key, value, attention_mask, position_embeddings, cache, cache_index, **kwargs
        )
        return self.dense(attn_output, loop), attn_weights


class GPTNeoXLoopMLP(nn.Module):
    def __init__(self, config: MeshConfig, num_loops: int = 0, rank=0):
        super().__init__()
        D, F4 = config.hidden_size, config.intermediate_size
        self.dense_h_to_4h = LoopLinear(D, F4, True, num_loops, rank)
        self.dense_4h_to_h = LoopLinear(F4, D, True, num_loops, rank)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, loop):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(hidden_states, loop)), loop)


class GPTNeoXLoopLayer(GradientCheckpointingLayer):
    def __init__(self, config: MeshConfig, num_loops: int = 0, rank=0):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        D, eps = config.hidden_size, config.layer_norm_eps
        self.input_layernorm = LoopLayerNorm(D, eps, num_loops, rank)
        self.post_attention_layernorm = LoopLayerNorm(D, eps, num_loops, rank)
        self.post_attention_dropout = nn.Dropout(config.hidden_dropout)
        self.post_mlp_dropout = nn.Dropout(config.hidden_dropout)
        self.attention = GPTNeoXLoopAttention(config, num_loops, rank)
        self.mlp = GPTNeoXLoopMLP(config, num_loops, rank)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        cache_index: int = 0,
        loop: int | None = None,
        **kwargs,
    ):
        attn_output, attn_weights = self.attention(
            self.input_layernorm(hidden_states, loop),
            attention_mask,
            position_embeddings,
            cache,
            cache_index,
            loop,
            **kwargs,
        )
        attn_output = self.post_attention_dropout(attn_output)
        if self.use_parallel_residual:
            mlp_output = self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(hidden_states, loop), loop))
            hidden_states = mlp_output + attn_output + hidden_states
        else:
            attn_output = attn_output + hidden_states
            mlp_output = self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(attn_output, loop), loop))
            hidden_states = mlp_output + attn_output
        return hidden_states, attn_weights


# ---------------------------------------------------------------------------------------------
# Llama-style decoder layer (Llama 2/3, SmolLM2, TinyLlama): RMSNorm, grouped KV heads, SwiGLU.
# Same parameter names as transformers' LlamaDecoderLayer.
# ---------------------------------------------------------------------------------------------


class LlamaLoopAttention(LoopAttention):
    def __init__(self, config: MeshConfig, num_loops: int = 0, rank=0):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        D, H, KV, bias = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        self.q_proj = LoopLinear(D, H * self.head_dim, bias, num_loops, rank)
        self.k_proj = LoopLinear(D, KV * self.head_dim, bias, num_loops, rank)
        self.v_proj = LoopLinear(D, KV * self.head_dim, bias, num_loops, rank)
        out_bias = bias if config.attention_output_bias is None else config.attention_output_bias
        self.o_proj = LoopLinear(H * self.head_dim, D, out_bias, num_loops, rank)

    def forward(self, hidden_states, attention_mask, position_embeddings, cache, cache_index, loop, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states, loop).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states, loop).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states, loop).view(shape).transpose(1, 2)
        attn_output, attn_weights = self.attend(
            query, key, value, attention_mask, position_embeddings, cache, cache_index, **kwargs
        )
        return self.o_proj(attn_output, loop), attn_weights


class LlamaLoopMLP(nn.Module):
    def __init__(self, config: MeshConfig, num_loops: int = 0, rank=0):
        super().__init__()
        D, F_, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = LoopLinear(D, F_, bias, num_loops, rank)
        self.up_proj = LoopLinear(D, F_, bias, num_loops, rank)
        self.down_proj = LoopLinear(F_, D, bias, num_loops, rank)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x, loop):
        return self.down_proj(self.act_fn(self.gate_proj(x, loop)) * self.up_proj(x, loop), loop)


class LlamaLoopLayer(GradientCheckpointingLayer):
    def __init__(self, config: MeshConfig, num_loops: int = 0, rank=0):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = LoopRMSNorm(D, eps, num_loops, rank)
        self.self_attn = LlamaLoopAttention(config, num_loops, rank)
        self.post_attention_layernorm = LoopRMSNorm(D, eps, num_loops, rank)
        self.mlp = LlamaLoopMLP(config, num_loops, rank)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        cache_index: int = 0,
        loop: int | None = None,
        **kwargs,
    ):
        attn_output, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states, loop),
            attention_mask,
            position_embeddings,
            cache,
            cache_index,
            loop,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states, loop), loop)
        return hidden_states, attn_weights


@dataclass(frozen=True)
class DecoderFamily:
    """What differs between decoder families, for the model: layers, the final norm, rotary."""

    layer: type[nn.Module]
    final_norm: Callable[[MeshConfig], nn.Module]
    rotary_embedding: type[nn.Module]


FAMILIES = {
    "gpt_neox": DecoderFamily(
        layer=GPTNeoXLoopLayer,
        final_norm=lambda config: LoopLayerNorm(config.hidden_size, config.layer_norm_eps),
        rotary_embedding=GPTNeoXRotaryEmbedding,
    ),
    "llama": DecoderFamily(
        layer=LlamaLoopLayer,
        final_norm=lambda config: LoopRMSNorm(config.hidden_size, config.rms_norm_eps),
        rotary_embedding=LlamaRotaryEmbedding,
    ),
}


# ---------------------------------------------------------------------------------------------
# The recurrence between loop steps.
# ---------------------------------------------------------------------------------------------


class MeshMemory(nn.Module):
    """MeSH's state buffer with K+1 write and K+1 read routers (spec section 2).

    The buffer is never materialised. Writes are additive and never erase, so slot b always
    holds sum_j w_j[b] * v_j over the vectors v_j written so far (v_0 = h_emb in slot 0). A
    read with weights r is therefore sum_j <r, w_j> * v_j: one scalar per token and vector,
    and autograd keeps only those scalars (the v_j are alive anyway).
    """

    def __init__(self, config: MeshConfig):
        super().__init__()
        D, B = config.hidden_size, config.num_slots
        self.num_slots = B
        self.write_routers = nn.ModuleList(nn.Linear(D, B) for _ in range(config.num_router_pairs))
        self.read_routers = nn.ModuleList(nn.Linear(D, B) for _ in range(config.num_router_pairs))

    def initial_state(self, h_emb: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        slot0 = torch.zeros(self.num_slots, device=h_emb.device, dtype=torch.float32)
        slot0[0] = 1.0
        return [(h_emb, slot0)]

    def route(self, step: int, router_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token write and read weights over the B slots; the softmax runs in float32."""
        write = torch.softmax(self.write_routers[step](router_input).float(), dim=-1)
        read = torch.softmax(self.read_routers[step](router_input).float(), dim=-1)
        return write, read

    def write_then_read(self, state, value, write, read) -> torch.Tensor:
        state.append((value, write))
        out = None
        # Under a multi-device map (`device_map="auto"`) the routers, the embeddings and the core may
        # sit on different devices: the coefficients are computed on the read router's, and the
        # weighted sum on the core output's (a no-op on one device).
        for vector, written_with in state:
            coefficient = (read * written_with.to(read.device)).sum(-1, keepdim=True)
            # Sharp routers (logit gaps past ~70) give coefficients so small that their products
            # with a hidden state fall below float32's normal range (1.2e-38), on which x86 CPUs
            # compute hundreds of times slower. Below 2**-100 a coefficient times any value above
            # 2**-26 would be such a subnormal, and what it adds is lost in any sum: zero it.
            coefficient = coefficient.masked_fill(coefficient < 2.0**-100, 0.0)
            term = coefficient.to(value.device, vector.dtype) * vector.to(value.device)
            out = term if out is None else out + term
        return out


# ---------------------------------------------------------------------------------------------
# The models.
# ---------------------------------------------------------------------------------------------


class MeshPreTrainedModel(PreTrainedModel):
    config: MeshConfig
    config_class = MeshConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPTNeoXLoopLayer", "LlamaLoopLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Callable | None = None,
                                    **kwargs):
        """As transformers', but never reentrant: the core's layers run once per loop, and with reentrant
        checkpointing each run has a backward of its own, so DistributedDataParallel sees their
        gradients K times and fails ("Expected to mark a variable ready only once"). Non-reentrant
        checkpointing computes the same gradients without that limit."""
        func = gradient_checkpointing_func
        if func is checkpoint:  # torch's own default may be reentrant
            func = functools.partial(checkpoint, use_reentrant=False)
        elif isinstance(func, functools.partial) and func.keywords.get("use_reentrant", True) is not False:
            if func.keywords.get("use_reentrant"):
                logger.warning_once(
                    "MeSH loops its core layers, which reentrant activation checkpointing cannot train under "
                    "DistributedDataParallel: using use_reentrant=False (the same gradients)."
                )
            func = functools.partial(func.func, *func.args, **{**func.keywords, "use_reentrant": False})
        if func is not None:
            kwargs["gradient_checkpointing_func"] = func
        super()._set_gradient_checkpointing(enable, **kwargs)

    def _init_weights(self, module):
        """Random init (for `from_config` and from-scratch training). Converted checkpoints load
        every tensor, so this only touches parameters that a checkpoint lacks."""
        super()._init_weights(module)
        if isinstance(module, (LoopLinear, LoopLayerNorm, LoopRMSNorm)) and module.relaxed:
            # Deltas start at zero so every loop starts as the shared layer.
            for name in ("weight_delta", "weight_delta_out", "bias_delta"):
                if hasattr(module, name):
                    init.zeros_(getattr(module, name))
            if hasattr(module, "weight_delta_in"):
                init.normal_(module.weight_delta_in, mean=0.0, std=self.config.initializer_range)


class UnrolledCalls:
    """The layer calls of one forward pass, in unrolled order: what every call shares (the mask,
    the rotary embeddings, the positions, the KV cache), and what the caller asked to collect."""

    def __init__(self, shared: dict, hidden_states: list | None, attentions: list | None):
        self.shared = shared
        self.hidden_states = hidden_states
        self.attentions = attentions

    def __call__(self, layer: nn.Module, h: torch.Tensor, cache_index: int, loop: int | None = None) -> torch.Tensor:
        """Run `layer` at `cache_index` of the unrolled stack (and the KV cache), as loop step `loop`."""
        h, weights = layer(h, cache_index=cache_index, loop=loop, **self.shared)
        if self.hidden_states is not None:
            self.hidden_states.append(h)
        if self.attentions is not None and weights is not None:  # sdpa and flash return none, as in transformers
            self.attentions.append(weights)
        return h

    def pass_on(self, h: torch.Tensor) -> None:
        """At a loop boundary the state passed on is the recurrence's, not the last layer's output."""
        if self.hidden_states is not None and len(self.hidden_states) > 1:
            self.hidden_states[-1] = h


class MeshModel(MeshPreTrainedModel):
    def __init__(self, config: MeshConfig):
        super().__init__(config)
        family = FAMILIES[config.base_model_type]
        K = config.num_loops
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.emb_dropout = nn.Dropout(config.hidden_dropout)
        self.prelude = nn.ModuleList(family.layer(config) for _ in range(config.num_prelude_layers))
        self.core = nn.ModuleList(family.layer(config, K, config.relax_rank) for _ in range(config.num_core_layers))
        self.coda = nn.ModuleList(family.layer(config) for _ in range(config.num_coda_layers))
        self.final_norm = family.final_norm(config)
        self.rotary_emb = family.rotary_embedding(config=config)
        self.memory = MeshMemory(config) if config.variant == "mesh" else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        use_cache = use_cache if use_cache is not None else config.use_cache
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        if self.gradient_checkpointing and self.training:
            use_cache = False

        h_emb = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if config.embedding_multiplier != 1.0:
            h_emb = h_emb * config.embedding_multiplier
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        if not use_cache:
            cache = None
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(h_emb.shape[1], device=h_emb.device).unsqueeze(0) + past_seen
        calls = UnrolledCalls(
            dict(
                # Positional: the cache parameter's name depends on the transformers version.
                attention_mask=create_causal_mask(config, h_emb, attention_mask, cache, position_ids),
                position_embeddings=self.rotary_emb(h_emb, position_ids=position_ids),
                # As in transformers' models: flash attention finds packed (padding-free) documents
                # from the restarting positions, since it gets no mask.
                position_ids=position_ids,
                cache=cache,
                output_attentions=output_attentions,
                **kwargs,
            ),
            hidden_states=[h_emb] if output_hidden_states else None,
            attentions=[] if output_attentions else None,
        )

        h_pre = self.run_prelude(calls, h_emb)
        h = self.run_recurrence(calls, h_emb, h_pre)
        h = self.final_norm(self.run_coda(calls, h))
        if output_hidden_states:  # as in transformers: the last state is the normalised one
            calls.hidden_states[-1] = h

        output = BaseModelOutputWithPast(
            last_hidden_state=h,
            **{CACHE_FIELD: cache},
            hidden_states=tuple(calls.hidden_states) if output_hidden_states else None,
            attentions=tuple(calls.attentions) if output_attentions else None,
        )
        return_dict = return_dict if return_dict is not None else config.return_dict
        return output if return_dict else output.to_tuple()

    def run_prelude(self, calls: UnrolledCalls, h_emb: torch.Tensor) -> torch.Tensor:
        """h_pre: the P unshared prelude layers, run once."""
        h = self.emb_dropout(h_emb)
        for i, layer in enumerate(self.prelude):
            h = calls(layer, h, self.config.unrolled_index("prelude", i))
        return h

    def run_recurrence(self, calls: UnrolledCalls, h_emb: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
        """h^(K): the transitional step gives h^(0); then the C core layers run K times, and after
        each loop the variant's recurrence gives the state passed on (MeSH: a write and a read of
        the memory; residual and anchors: a skip connection; base: none)."""
        config = self.config
        h = h_pre
        memory_state = None
        if self.memory is not None:  # transitional step: router pair 0 writes h_pre and reads h^(0)
            memory_state = self.memory.initial_state(h_emb)
            write, read = self.memory.route(0, h_pre)
            h = self.memory.write_then_read(memory_state, h_pre, write, read)
        calls.pass_on(h)

        for t in range(config.num_loops):
            h_in = h
            if self.memory is not None:  # routers read the core's input h^(t)
                write, read = self.memory.route(t + 1, h_in)
            for i, layer in enumerate(self.core):
                h = calls(layer, h, config.unrolled_index("core", i, t), loop=t)
            if self.memory is not None:
                h = self.memory.write_then_read(memory_state, h, write, read)
            elif config.variant == "residual":  # (`.to`: a multi-device map may split these)
                h = h + h_in.to(h.device)
            elif config.variant == "anchor":
                h = h + h_pre.to(h.device)
            elif config.variant == "anchor_emb":
                h = h + h_emb.to(h.device)
            calls.pass_on(h)
        return h

    def run_coda(self, calls: UnrolledCalls, h: torch.Tensor) -> torch.Tensor:
        """h_out: the Q unshared coda layers, run once (the final norm follows)."""
        for j, layer in enumerate(self.coda):
            h = calls(layer, h, self.config.unrolled_index("coda", j))
        return h


class MeshForCausalLM(MeshPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MeshConfig):
        super().__init__(config)
        self.model = MeshModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


__all__ = ["MeshForCausalLM", "MeshModel", "MeshPreTrainedModel"]

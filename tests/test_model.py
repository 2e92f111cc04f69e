"""The MeSH model itself: the recurrences, caching, attention backends, checkpointing, saving."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_loads_as_remote_code
from mesh_convert import MeshConfig, MeshForCausalLM
from mesh_convert.modeling.modeling_mesh import CACHE_FIELD
from mesh_convert.convert.plan import count_parameters, mesh_config_from_source, mesh_parameter_counts
from mesh_convert.layout import default_layout
from mesh_convert.convert.pythia import pythia_config


def small_config(**overrides) -> MeshConfig:
    values = dict(
        num_prelude_layers=1,
        num_core_layers=2,
        num_loops=3,
        num_coda_layers=1,
        num_hidden_layers=8,
        vocab_size=96,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    values.update(overrides)
    return MeshConfig(**values)


def random_model(seed=0, **overrides) -> MeshForCausalLM:
    """A MeSH model whose routers and relax deltas are random (non-trivial), not the converter's init."""
    torch.manual_seed(seed)
    model = MeshForCausalLM(small_config(**overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_delta" in name or "memory" in name:
                param.normal_(0.0, 0.3)
    return model.eval()


def core_outputs(model, input_ids):
    """Raw outputs of the last core layer at each loop (before the recurrence combines them)."""
    captured = []
    hook = model.model.core[-1].register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        outputs = model(input_ids, output_hidden_states=True)
    finally:
        hook.remove()
    return outputs, captured


def test_mesh_buffer_matches_the_papers_explicit_slots():
    """The slot-free buffer equals spec section 2 computed literally with B materialised slots."""
    model = random_model()
    config, memory = model.config, model.model.memory
    input_ids = torch.randint(0, config.vocab_size, (2, 10))
    outputs, raw = core_outputs(model, input_ids)
    hs = outputs.hidden_states
    P, C, K = config.num_prelude_layers, config.num_core_layers, config.num_loops

    h_emb = hs[0]
    h_pre = model.model.prelude[-1](h_emb, position_embeddings=model.model.rotary_emb(h_emb, torch.arange(10)[None]))[0]

    slots = torch.zeros(config.num_slots, *h_emb.shape)
    slots[0] = h_emb

    def step(index, router_input, value):
        write = torch.softmax(memory.write_routers[index](router_input).float(), -1)
        read = torch.softmax(memory.read_routers[index](router_input).float(), -1)
        for b in range(config.num_slots):
            slots[b] = slots[b] + write[..., b : b + 1] * value
        return sum(read[..., b : b + 1] * slots[b] for b in range(config.num_slots))

    h = step(0, h_pre, h_pre)
    torch.testing.assert_close(hs[P], h, atol=1e-5, rtol=1e-5)
    for t in range(K):
        h = step(t + 1, h, raw[t])
        torch.testing.assert_close(hs[P + (t + 1) * C], h, atol=1e-5, rtol=1e-5)


def test_read_coefficients_that_would_make_subnormals_count_as_zero():
    """Sharp routers give read coefficients so small that their products with a hidden state are
    subnormal numbers, on which x86 CPUs compute hundreds of times slower; what they add is lost."""
    memory = random_model().model.memory
    h_emb, value = torch.full((1, 2, 32), 3.0), torch.full((1, 2, 32), 2.0)
    write, read = torch.zeros(1, 2, memory.num_slots), torch.zeros(1, 2, memory.num_slots)
    write[..., 1] = 1.0
    read[..., 0], read[..., 2] = 1e-33, 1.0  # h_emb with a weight below 2**-100, then an empty slot
    out = memory.write_then_read(memory.initial_state(h_emb), value, write, read)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("variant", ["base", "residual", "anchor", "anchor_emb"])
def test_baseline_recurrences(variant):
    model = random_model(variant=variant)
    config = model.config
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    outputs, raw = core_outputs(model, input_ids)
    hs = outputs.hidden_states
    P, C = config.num_prelude_layers, config.num_core_layers
    h_emb, h0 = hs[0], hs[P]
    for t, core_out in enumerate(raw):
        previous = hs[P + t * C]
        expected = {
            "base": core_out,
            "residual": core_out + previous,
            "anchor": core_out + h0,
            "anchor_emb": core_out + h_emb,
        }[variant]
        torch.testing.assert_close(hs[P + (t + 1) * C], expected)


def test_hidden_states_cover_every_unrolled_layer():
    model = random_model()
    x = torch.randint(0, 96, (1, 5))
    outputs = model(x, output_hidden_states=True)
    assert len(outputs.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(outputs.hidden_states[0], model.model.embed_tokens(x))
    # As in transformers, the last entry is the final-normed state that feeds the head.
    torch.testing.assert_close(outputs.hidden_states[-1], model.model(x).last_hidden_state)


@pytest.mark.parametrize("relax_rank", [0, 4, "full"])
def test_cached_decoding_equals_full_recompute(relax_rank):
    model = random_model(relax_rank=relax_rank)
    prompt = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        # Token by token with the cache, against one forward over the whole sequence.
        full = model(cached).logits
        out = model(cached[:, :7], use_cache=True)
        steps = [out.logits]
        cache = getattr(out, CACHE_FIELD)
        assert len(cache.layers) == model.config.num_hidden_layers
        for position in range(7, cached.shape[1]):
            # Both spellings of the cache argument (transformers 5.24 renamed it) feed the same cache.
            name = ("cache", "past_key_values")[position % 2]
            out = model(cached[:, position : position + 1], **{name: cache}, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_left_padding_does_not_change_the_real_tokens():
    model = random_model()
    short = torch.randint(1, 96, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(short).logits
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batched = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, 3:]
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)


def test_eager_sdpa_and_flex_attention_agree(tmp_path):
    random_model(relax_rank=4).save_pretrained(tmp_path)
    x = torch.randint(0, 96, (2, 16))
    logits = {}
    for impl in ("eager", "sdpa", "flex_attention"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl, dtype=torch.float32)
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            logits[impl] = model(x).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits["flex_attention"], logits["sdpa"], atol=1e-4, rtol=0)


def test_attentions_come_from_eager_and_are_left_out_by_sdpa_as_in_transformers(tmp_path):
    random_model().save_pretrained(tmp_path)
    x = torch.randint(0, 96, (1, 8))
    for impl, count in (("eager", 1 + 2 * 3 + 1), ("sdpa", 0)):  # 1+2R3+1: every unrolled layer
        model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl, dtype=torch.float32)
        with torch.no_grad():
            attentions = model(x, output_attentions=True).attentions
        assert len(attentions) == count and all(a.shape == (1, 4, 8, 8) for a in attentions), impl


def test_the_base_model_returns_a_tuple_when_asked():
    model = random_model()
    x = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        expected = model.model(x).last_hidden_state
        assert torch.equal(model.model(x, return_dict=False)[0], expected)
        model.config.return_dict = False
        assert isinstance(model.model(x), tuple) and isinstance(model(x), tuple)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 96, (2, 12))

    def grads(checkpointing: bool):
        model = random_model(relax_rank=4)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    assert any("_delta" in name for name in plain) and any("memory" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_native_save_load_round_trip(tmp_path):
    model = random_model(relax_rank="full")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_mesh.py").is_file() and (tmp_path / "configuration_mesh.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(loaded) is MeshForCausalLM
    x = torch.randint(0, 96, (1, 8))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_remote_code_loads_without_mesh_convert(tmp_path):
    model = random_model(relax_rank=2)
    model.save_pretrained(tmp_path / "model")
    x = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert_loads_as_remote_code(tmp_path / "model", x, model(x).logits, tmp_path)


PAPER = [  # size, K, layout, converted non-embedding, original non-embedding, routers (B = K+3)
    ("160m", 2, "2+4R2+2", 56_704_512, 85_056_000, 23_070),
    ("410m", 2, "4+8R2+4", 201_541_632, 302_311_424, 30_750),
    ("410m", 3, "3+6R3+3", 151_156_736, 302_311_424, 49_200),
    ("1b", 2, "3+5R2+3", 553_945_088, 805_736_448, 61_470),
    ("1.4b", 2, "4+8R2+4", 805_736_448, 1_208_602_624, 61_470),
]


@pytest.mark.parametrize("size,loops,layout,converted,original,routers", PAPER)
def test_paper_layouts_and_parameter_counts(size, loops, layout, converted, original, routers):
    source = pythia_config(size)
    plan_layout = default_layout(source.num_hidden_layers, loops)
    assert plan_layout.text == layout
    counts = count_parameters(source, mesh_config_from_source(source, plan_layout))
    D = source.hidden_size
    # The spec's closed forms: 12*D^2 + 13*D per layer, plus the final norm; 2(K+1)(D*B + B) for routers.
    unique_layers = plan_layout.prelude + plan_layout.core + plan_layout.coda
    assert converted == unique_layers * (12 * D * D + 13 * D) + 2 * D
    assert counts["converted_nonembedding"] == converted
    assert counts["original_nonembedding"] == original
    assert counts["routers"] == routers == 2 * (loops + 1) * (D * (loops + 3) + loops + 3)
    assert counts["relax"] == 0


def _meta_counts(config: MeshConfig) -> dict[str, int]:
    """The parameter counts read off the model built on the meta device."""
    with torch.device("meta"):
        model = MeshForCausalLM(config)
    named = dict(model.named_parameters())
    routers = sum(p.numel() for n, p in named.items() if n.startswith("model.memory."))
    relax = sum(p.numel() for n, p in named.items() if "_delta" in n)
    embeddings = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    embedding = sum(p.numel() for p in embeddings.values())
    total = sum(p.numel() for p in model.parameters())
    return {"nonembedding": total - embedding - routers - relax, "routers": routers, "relax": relax,
            "embedding": embedding, "total": total}


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "qwen2"])
@pytest.mark.parametrize("variant, relax_rank, tied", [("mesh", 0, False), ("mesh", 3, True), ("base", "full", False),
                                                       ("anchor", 40, False)])
def test_parameter_counts_from_the_config_match_the_model(family, variant, relax_rank, tied):
    """The plan counts parameters from config numbers (no torch for --dry-run); the model must agree."""
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=8, num_attention_heads=4,
                  tie_word_embeddings=tied)
    source = {
        "gpt_neox": lambda: GPTNeoXConfig(**common),
        "llama": lambda: LlamaConfig(**common, num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True),
        "qwen2": lambda: Qwen2Config(**common, num_key_value_heads=2),
    }[family]()
    layout = default_layout(8, 2)
    config = mesh_config_from_source(source, layout, variant, 6, 8.0, relax_rank)
    assert mesh_parameter_counts(config) == _meta_counts(config)
    with torch.device("meta"):
        original = AutoModelForCausalLM.from_config(source)
    embedding = sum({id(p): p.numel() for m in (original.get_input_embeddings(), original.get_output_embeddings())
                     for p in m.parameters()}.values())
    counts = count_parameters(source, config)
    assert counts["original_nonembedding"] == sum(p.numel() for p in original.parameters()) - embedding

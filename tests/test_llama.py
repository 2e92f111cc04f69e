"""Llama-family conversion (SmolLM2, TinyLlama, Llama 3.x, and Qwen2) has the GPT-NeoX guarantees."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_loads_as_remote_code, make_tiny_llama
from mesh_convert.cli import main
from mesh_convert.convert.conversion import convert_model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def llama(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}"
    model = make_tiny_llama(path, arch=request.param)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return path, model, x, model(x).logits


@pytest.mark.parametrize("tie", ["average", "stepwise", "lower", "upper"])
@pytest.mark.parametrize("loops", [2, 3])
def test_full_relaxation_is_exact(llama, tie, loops):
    _, model, x, expected = llama
    converted = convert_model(model, loops=loops, tie=tie, relax_rank="full", router_gap=40)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, expected, atol=1e-4, rtol=0)


def test_one_loop_is_exact_and_tying_is_not(llama):
    _, model, x, expected = llama
    with torch.no_grad():
        torch.testing.assert_close(convert_model(model, loops=1, router_gap=40)(x).logits, expected, atol=1e-4, rtol=0)
        assert (convert_model(model, loops=2)(x).logits - expected).abs().max() > 1e-2


def test_written_checkpoint_ties_embeddings_caches_and_loads_as_remote_code(llama, tmp_path, capsys):
    path, _, x, expected = llama
    out = tmp_path / "out"
    assert main([str(path), "--loops", "2", "--relax-rank", "full", "--router-gap", "40", "-o", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.base_model_type == "llama" and model.config.num_key_value_heads == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, atol=1e-4, rtol=0)
        cached = model.generate(x[:, :4], max_new_tokens=8, do_sample=False)
        uncached = model.generate(x[:, :4], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert_loads_as_remote_code(out, x, expected, tmp_path)


def test_eager_and_sdpa_agree_with_grouped_kv_heads(llama, tmp_path):
    _, model, x, _ = llama
    convert_model(model, loops=2, relax_rank=4, relax_init="svd").save_pretrained(tmp_path)  # deltas in use
    logits = {}
    for impl in ("eager", "sdpa"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl, dtype=torch.float32)
        with torch.no_grad():
            logits[impl] = loaded(x).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-4, rtol=0)


def test_lora_defaults_to_the_llama_projections(llama):
    from mesh_convert.train.recipe import LoraSection
    from mesh_convert.train.lora import wrap_lora

    _, model, _, _ = llama
    peft_model = wrap_lora(convert_model(model, loops=2), LoraSection(r=2), train_routers=True)
    adapted = {name.split(".")[-4] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_qwen2_sliding_window_attention_is_refused(tmp_path, capsys):
    from transformers import Qwen2Config

    path = tmp_path / "qwen2-sliding"
    make_tiny_llama(path, arch="qwen2")
    config = Qwen2Config.from_pretrained(path)
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 8, 4
    config.layer_types = None  # recomputed from the three fields above
    Qwen2Config(**config.to_dict()).save_pretrained(path)
    assert main([str(path), "--loops", "2", "-o", str(tmp_path / "out")]) == 1
    assert "sliding-window attention" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

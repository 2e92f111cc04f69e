"""A MeSH model on the GPU computes what it computes on the CPU: forward, backward, cached
generation (fp32, against CPU fp32), bf16, and the SDPA attention. Marked `gpu`; they run on the
device named by GPU_CHECK_DEVICE (default cuda) and skip where it is absent, so CI skips them.
`bash scripts/gpu_check` runs them on the GPU; `bash scripts/gpu_check --device cpu` rehearses
them on the CPU (the comparisons are then CPU against CPU, still exercising every path)."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from mesh_convert.convert.conversion import convert_model
from helpers import char_tokenizer, tiny_converted

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA device (GPU_CHECK_DEVICE=cpu, or `bash scripts/gpu_check --device cpu`, "
                              "rehearses these on the CPU)"),
]


@pytest.fixture(scope="module")
def mesh_dirs(tmp_path_factory):
    """Both families, relaxed (per-loop deltas) so every parameter kind is exercised."""
    from conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("gpu")
    neox = tiny_converted(root / "neox-mesh", char_tokenizer(root / "tokenizer"), relax_rank=2)
    llama = root / "llama-mesh"
    convert_model(make_tiny_llama(root / "llama"), loops=2, relax_rank=2, relax_init="svd", dtype="float32").save_pretrained(llama)
    return {"gpt_neox": neox, "llama": llama}


@pytest.fixture(params=["gpt_neox", "llama"])
def pair(request, mesh_dirs):
    """The same checkpoint on the CPU (fp32) and on the device (fp32, no TF32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = AutoModelForCausalLM.from_pretrained(mesh_dirs[request.param], dtype=torch.float32).eval()
    device = AutoModelForCausalLM.from_pretrained(mesh_dirs[request.param], dtype=torch.float32).to(DEVICE).eval()
    return cpu, device


def tokens(batch=2, length=24, seed=0):
    return torch.randint(0, 98, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_forward_and_backward_match_cpu_fp32(pair):
    cpu, device = pair
    ids = tokens()
    for model in pair:
        model.zero_grad()
        model(ids.to(model.device), labels=ids.to(model.device), use_cache=False).loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(device(ids.to(DEVICE), use_cache=False).logits.cpu(), cpu(ids, use_cache=False).logits,
                                   atol=1e-4, rtol=1e-4)
    gradients = dict(cpu.named_parameters())
    for name, param in device.named_parameters():
        torch.testing.assert_close(param.grad.cpu(), gradients[name].grad, atol=1e-4, rtol=1e-3, msg=name)


def test_cached_generation_matches_cpu_and_uncached(pair):
    cpu, device = pair
    ids = tokens(batch=1, length=8, seed=1)
    settings = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    expected = cpu.generate(ids, **settings)
    cached = device.generate(ids.to(DEVICE), **settings).cpu()
    uncached = device.generate(ids.to(DEVICE), use_cache=False, **settings).cpu()
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)


def test_bf16_stays_close_to_fp32(pair):
    cpu, device = pair
    ids = tokens(seed=2)
    with torch.no_grad():
        exact = cpu(ids, use_cache=False).logits
        half = device.to(torch.bfloat16)(ids.to(DEVICE), use_cache=False).logits.float().cpu()
    assert torch.isfinite(half).all()
    assert (half - exact).abs().max() < 0.05 * exact.abs().max()
    assert (half.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


def test_sdpa_matches_eager_with_padding(pair):
    _, device = pair
    ids = tokens(seed=3).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as batched generation has it
    outputs = {}
    for attention in ("eager", "sdpa"):
        device.set_attn_implementation(attention)
        with torch.no_grad():
            outputs[attention] = device(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], atol=1e-4, rtol=1e-4)


def test_a_read_mixes_vectors_that_live_on_different_devices():
    """Under `device_map="auto"` the embeddings, the routers and the core may sit on different
    devices: the memory forms its read where the core's output is, with the same values."""
    from mesh_convert import MeshConfig
    from mesh_convert.modeling.modeling_mesh import MeshMemory

    torch.manual_seed(0)
    memory = MeshMemory(MeshConfig(num_loops=2, hidden_size=16))  # the routers stay on the CPU
    h_emb, h_pre, h_core = (torch.randn(1, 4, 16) for _ in range(3))

    def final_read(core_device):
        state = memory.initial_state(h_emb)
        h0 = memory.write_then_read(state, h_pre, *memory.route(0, h_pre))
        write, read = memory.route(1, h0)
        return memory.write_then_read(state, h_core.to(core_device), write, read)

    split = final_read(DEVICE)
    assert split.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(split.cpu(), final_read("cpu"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("variant", ["mesh", "anchor", "residual"])
def test_device_map_auto_over_two_gpus_matches_one(tmp_path, variant):
    from conftest import make_tiny_llama

    path = tmp_path / variant
    convert_model(make_tiny_llama(tmp_path / "llama"), loops=2, variant=variant, dtype="float32").save_pretrained(path)
    one = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda:0").eval()
    size = sum(p.numel() * p.element_size() for p in one.parameters())
    split = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="auto",
                                                 max_memory={0: size // 3, 1: 4 * size}).eval()
    assert set(split.hf_device_map.values()) == {0, 1}, split.hf_device_map
    ids = tokens().to("cuda:0")
    with torch.no_grad():
        torch.testing.assert_close(split(ids).logits.to("cuda:0"), one(ids).logits, atol=1e-5, rtol=1e-5)
    settings = dict(do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(split.generate(ids[:1], **settings).to("cuda:0"), one.generate(ids[:1], **settings))

"""Shared fixtures: tiny random checkpoints built in the tests, and `../shared` when present."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import mesh_convert.modeling  # noqa: F401  (registers MeSH with the Auto classes)
from mesh_convert import MeshConfig, MeshForCausalLM

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Tiny models on 2 cores: one thread avoids oversubscription (the suite also runs subprocesses).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def own_data_cache(tmp_path_factory):
    """Token stores that training prepares from data files go to a cache of this test session's
    own, which pytest removes with its other temporary folders (subprocesses inherit it), not
    to the user's."""
    before = os.environ.get("MESH_CONVERT_CACHE")
    os.environ["MESH_CONVERT_CACHE"] = str(tmp_path_factory.mktemp("mesh-convert-cache"))
    yield
    if before is None:
        del os.environ["MESH_CONVERT_CACHE"]
    else:
        os.environ["MESH_CONVERT_CACHE"] = before


def tiny_pythia_config(num_layers: int = 8, **overrides) -> GPTNeoXConfig:
    """A Pythia-shaped config (parallel residual, 25% rotary, untied head), just very small."""
    values = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    values.update(overrides)
    return GPTNeoXConfig(**values)


def make_tiny_pythia(path: Path, num_layers: int = 8, seed: int = 0, **overrides) -> GPTNeoXForCausalLM:
    """Save a random tiny GPT-NeoX checkpoint (fp32 safetensors) at `path` and return it."""
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(tiny_pythia_config(num_layers, **overrides)).eval()
    # Random LayerNorm parameters too, so that tying and averaging them is really tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return model


def make_tiny_llama(path: Path, num_layers: int = 8, seed: int = 0, arch: str = "llama"):
    """Save a random tiny Llama-style checkpoint (grouped KV heads, tied embeddings, as SmolLM2);
    `arch="qwen2"` gives the Qwen2 variant (biases on q/k/v only). Norms and biases are perturbed
    from their zero/one init so that a misplaced one shows in the logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_class(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return model


@pytest.fixture
def tiny_pythia(tmp_path) -> Path:
    """Directory of a random 8-layer GPT-NeoX checkpoint."""
    path = tmp_path / "tiny-pythia"
    make_tiny_pythia(path)
    return path


@pytest.fixture
def tiny_mesh_model() -> MeshForCausalLM:
    """A random MeSH model (1+3R2+1, 8 unrolled layers), not converted from anything."""
    torch.manual_seed(0)
    config = MeshConfig(
        num_prelude_layers=1,
        num_core_layers=3,
        num_loops=2,
        num_coda_layers=1,
        num_hidden_layers=8,
        vocab_size=128,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return MeshForCausalLM(config).eval()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (it exists only in the project's own checkouts and CI)")
    return SHARED


def assert_loads_as_remote_code(model_dir: Path, x: torch.Tensor, expected: torch.Tensor, workdir: Path) -> None:
    """Load `model_dir` with trust_remote_code in a fresh process where `import mesh_convert` fails,
    and check its logits on `x`."""
    torch.save({"x": x, "logits": expected}, workdir / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["mesh_convert"] = None  # any import of the package now fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True, dtype=torch.float32)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(workdir / "expected.pt")!r}, weights_only=True)
        assert torch.allclose(model(expected["x"]).logits, expected["logits"], atol=1e-4)
        print("REMOTE-OK")
        """
    )
    env = {"HF_MODULES_CACHE": str(workdir / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]
    assert "not a valid Python identifier" not in result.stderr, result.stderr[-3000:]

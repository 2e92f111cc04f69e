"""Tests of the representation probes (`diagnose`) and the model report (`inspect`)."""

import errno
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import pytest
import torch
from conftest import make_tiny_pythia
from transformers import GPTNeoXForCausalLM

from helpers import SUBPROCESS_ENV, char_tokenizer_fast, drop_file_permission_override, invoke, leftovers
from mesh_convert import MeshConfig, MeshForCausalLM
from mesh_convert.analysis.diagnose import (
    DiagnosticsResult,
    Layout,
    cka_matrix,
    collect_states,
    normalized_spectrum,
    parse_layout,
    rbf_cka,
    relative_update,
    resolve_layout,
    run_diagnostics,
    token_windows,
    tokenize_file,
)
from mesh_convert.analysis.plots import (
    MAX_FIGURE_INCHES,
    MAX_LABELS,
    PLOT_DPI,
    plot_cka,
    plot_spectra,
    plot_updates,
    save_figure,
)
from mesh_convert.analysis import inspect as inspect_module
from mesh_convert.artifacts import output as output_module
from mesh_convert.errors import UserError
from mesh_convert.analysis.inspect import (
    RouterStats,
    parameter_counts,
    plot_router_heatmap,
    router_statistics,
    step_names,
)

D = 32  # hidden size of the conftest models


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures.
# ---------------------------------------------------------------------------------------------


def sample_text(words: int = 400) -> str:
    rng = random.Random(0)
    vocabulary = [
        "the",
        "a",
        "memory",
        "loop",
        "state",
        "router",
        "layer",
        "token",
        "model",
        "prelude",
        "coda",
        "core",
        "slot",
        "read",
        "write",
    ]
    return " ".join(rng.choice(vocabulary) for _ in range(words)) + "\n"


# The saved checkpoints are only read by the tests, so each module builds them once.


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sample.txt"
    path.write_text(sample_text())  # about 2,400 characters = tokens
    return path


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh")
    torch.manual_seed(0)
    model = MeshForCausalLM(tiny_mesh_config(provenance={"source": "tiny-pythia", "tie": "average"}))
    model.save_pretrained(path)
    char_tokenizer_fast().save_pretrained(path)
    (path / "conversion.json").write_text(json.dumps({"router_gap": 8.0}))
    return path


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    make_tiny_pythia(path, num_layers=8)
    char_tokenizer_fast().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bare_mesh_dir(tmp_path_factory):
    """A MeSH checkpoint without a tokenizer."""
    path = tmp_path_factory.mktemp("bare-mesh")
    torch.manual_seed(0)
    MeshForCausalLM(tiny_mesh_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bare_plain_dir(tmp_path_factory):
    """A checkpoint without a tokenizer."""
    path = tmp_path_factory.mktemp("bare")
    make_tiny_pythia(path, num_layers=8)
    return path


def tiny_mesh_config(prelude=1, core=3, loops=2, coda=1, **overrides) -> MeshConfig:
    """Like conftest's `tiny_mesh_model`, with another layout or options."""
    sizes = dict(
        vocab_size=128, hidden_size=D, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64
    )
    return MeshConfig(
        num_prelude_layers=prelude, num_core_layers=core, num_loops=loops, num_coda_layers=coda,
        num_hidden_layers=prelude + core * loops + coda, **(sizes | overrides),
    )  # fmt: skip


def set_identity_routers(model, gap: float = 12.0) -> None:
    """The converter's function-preserving init: router pair s writes and reads slot s + 1."""
    memory = model.model.memory
    with torch.no_grad():
        for step in range(len(memory.write_routers)):
            for router in (memory.write_routers[step], memory.read_routers[step]):
                router.weight.zero_()
                router.bias.zero_()
                router.bias[step + 1] = gap


# ---------------------------------------------------------------------------------------------
# The probes on known tensors.
# ---------------------------------------------------------------------------------------------


def test_relative_update_on_hand_computed_values():
    h = torch.tensor([[3.0, 4.0]])  # ||h|| = 5
    assert relative_update(h, torch.zeros_like(h)) == pytest.approx(2.0)  # 2*5 / (0 + 5)
    assert relative_update(h, 2 * h) == pytest.approx(2 / 3)  # 2*5 / (10 + 5)
    assert relative_update(h, h) == 0.0
    assert relative_update(h, -h) == pytest.approx(2.0)  # 2*10 / (5 + 5)
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert relative_update(e1, e2) == pytest.approx(math.sqrt(2))  # 2*sqrt(2) / 2
    assert relative_update(torch.zeros(2, 2), torch.zeros(2, 2)) == 0.0


def test_relative_update_uses_the_whole_matrix_frobenius_norm():
    h_in = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    h_out = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # ||h_out - h_in|| = 2, ||h_out|| = sqrt(5), ||h_in|| = 1
    assert relative_update(h_in, h_out) == pytest.approx(4 / (math.sqrt(5) + 1))


def test_cka_of_identical_states_is_one():
    x = torch.randn(60, 16, generator=torch.Generator().manual_seed(1))
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(x, x, threshold=0.5) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_rotation_and_isotropic_scaling():
    generator = torch.Generator().manual_seed(2)
    # float64 throughout, so that only the maths, not input rounding, is compared.
    x = torch.randn(80, 16, generator=generator, dtype=torch.float64)
    noise = torch.randn(80, 8, generator=generator, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(16, 8, generator=generator, dtype=torch.float64)) + 0.5 * noise
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    reference = rbf_cka(x, y)
    assert 0.2 < reference < 0.99  # a non-trivial pair, so the invariances mean something
    assert rbf_cka(x @ rotation, y) == pytest.approx(reference, abs=1e-9)
    assert rbf_cka(3.7 * x, y) == pytest.approx(reference, abs=1e-9)
    assert rbf_cka(x, 0.01 * y) == pytest.approx(reference, abs=1e-9)


def test_cka_of_independent_states_is_well_below_one():
    generator = torch.Generator().manual_seed(3)
    values = [
        rbf_cka(torch.randn(200, 16, generator=generator), torch.randn(200, 16, generator=generator)) for _ in range(3)
    ]
    assert max(values) < 0.25


def test_cka_depends_on_the_bandwidth_threshold():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(50, 8, generator=generator)
    y = x**2 + 0.1 * torch.randn(50, 8, generator=generator)
    assert rbf_cka(x, y, threshold=0.5) != pytest.approx(rbf_cka(x, y, threshold=2.0), abs=1e-3)


def test_cka_matrix_is_symmetric_with_unit_diagonal_and_matches_pairs():
    generator = torch.Generator().manual_seed(5)
    states = [torch.randn(30, 8, generator=generator) for _ in range(3)]
    states.append(states[0] + 0.1 * torch.randn(30, 8, generator=generator))
    matrix = cka_matrix(states)
    assert torch.allclose(matrix, matrix.T)
    assert torch.allclose(matrix.diagonal(), torch.ones(4, dtype=torch.float64))
    assert matrix[1, 2].item() == pytest.approx(rbf_cka(states[1], states[2]))
    assert matrix[0, 3] > matrix[0, 1]  # a perturbed copy is more similar than an unrelated state


def test_normalized_spectrum_on_known_singular_values():
    h = torch.zeros(6, 4)
    h[0, 0], h[1, 1], h[2, 2] = 4.0, -2.0, 1.0
    assert torch.allclose(normalized_spectrum(h, top=3), torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))


def test_normalized_spectrum_starts_at_one_and_never_increases():
    h = torch.randn(70, 40, generator=torch.Generator().manual_seed(6))
    spectrum = normalized_spectrum(h, top=50)
    assert spectrum.shape == (40,)  # only min(L, D) singular values exist
    assert spectrum[0].item() == pytest.approx(1.0)
    assert bool((spectrum[1:] <= spectrum[:-1] + 1e-12).all())
    assert normalized_spectrum(h, top=10).shape == (10,)


# ---------------------------------------------------------------------------------------------
# Layouts and state collection.
# ---------------------------------------------------------------------------------------------


def test_parse_layout_and_boundaries():
    layout = parse_layout("4+8R2+4")
    assert layout == Layout(4, 8, 2, 4)
    assert str(layout) == "4+8R2+4" and layout.unrolled_layers == 24
    assert [layout.boundary_index(t) for t in range(3)] == [4, 12, 20]
    assert layout.state_names == ["h_emb", "h^(0)", "h^(1)", "h^(2)", "h_out"]
    assert layout.block_names == ["prelude", "loop 1", "loop 2", "coda"]
    for bad in ("4+8+4", "4+0R2+4", "x", "4+8R0+4"):
        with pytest.raises(UserError):
            parse_layout(bad)


def test_collect_states_of_a_plain_model_match_its_layers(tmp_path):
    model = make_tiny_pythia(tmp_path / "p", num_layers=8)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    outputs = {}
    hooks = [model.gpt_neox.embed_in.register_forward_hook(lambda _m, _i, out: outputs.__setitem__("emb", out))]
    for index, layer in enumerate(model.gpt_neox.layers):
        hooks.append(layer.register_forward_hook(lambda _m, _i, out, index=index: outputs.__setitem__(index, out)))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()

    states = collect_states(model, ids, parse_layout("2+2R2+2"))
    assert list(states) == ["h_emb", "h^(0)", "h^(1)", "h^(2)", "h_out"]
    expected = {
        "h_emb": outputs["emb"],
        "h^(0)": outputs[1],
        "h^(1)": outputs[3],
        "h^(2)": outputs[5],
        "h_out": outputs[7],
    }
    for name, tensor in expected.items():
        assert torch.allclose(states[name], tensor, atol=1e-6), name

    # Without prelude and coda, h^(0) is the embedding and h^(K) the (pre-norm) last layer output.
    states = collect_states(model, ids, parse_layout("0+4R2+0"))
    assert torch.allclose(states["h^(0)"], outputs["emb"], atol=1e-6)
    assert torch.allclose(states["h^(1)"], outputs[3], atol=1e-6)
    assert torch.allclose(states["h^(2)"], outputs[7], atol=1e-6)
    assert torch.allclose(states["h_out"], outputs[7], atol=1e-6)


def _mesh_calls(model, ids):
    """Inputs of every core call, of the coda and of the final norm, and the prelude's raw output."""
    seen = {"core": []}
    inner = model.model
    hooks = [
        inner.core[0].register_forward_pre_hook(lambda _m, args: seen["core"].append(args[0])),
        inner.final_norm.register_forward_pre_hook(lambda _m, args: seen.__setitem__("norm", args[0])),
    ]
    if len(inner.coda):
        hooks.append(inner.coda[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__("coda", args[0])))
    if len(inner.prelude):
        hooks.append(inner.prelude[-1].register_forward_hook(lambda _m, _i, out: seen.__setitem__("pre", out[0])))
    with torch.no_grad():
        model(ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return seen


def test_collect_states_of_a_mesh_model_are_the_recurrence_states(tiny_mesh_model):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(8))
    seen = _mesh_calls(tiny_mesh_model, ids)
    states = collect_states(tiny_mesh_model, ids)
    assert torch.allclose(states["h^(0)"], seen["core"][0])  # after the transitional read
    assert not torch.allclose(states["h^(0)"], seen["pre"])  # ... not the raw prelude output
    assert torch.allclose(states["h^(1)"], seen["core"][1])
    assert torch.allclose(states["h^(2)"], seen["coda"])
    assert torch.allclose(states["h_out"], seen["norm"])  # pre-norm coda output


def test_collect_states_of_a_mesh_model_without_prelude_or_coda():
    torch.manual_seed(0)
    model = MeshForCausalLM(tiny_mesh_config(0, 2, 2, 0)).eval()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(9))
    seen = _mesh_calls(model, ids)
    states = collect_states(model, ids)
    assert torch.allclose(states["h^(0)"], seen["core"][0])
    assert torch.allclose(states["h^(1)"], seen["core"][1])
    assert torch.allclose(states["h^(2)"], seen["norm"])
    assert torch.allclose(states["h_out"], seen["norm"])


def test_a_lossless_conversion_has_the_plain_models_states(tmp_path):
    """Full-rank relaxation and near one-hot routers reproduce the plain model (spec section 5),
    so the plain model read with the MeSH layout must give the same states: both index schemes agree."""
    from mesh_convert.convert.conversion import convert_model

    plain = make_tiny_pythia(tmp_path / "p", num_layers=8)
    mesh = convert_model(plain, loops=2, prelude=2, coda=2, relax_rank="full", router_gap=40.0, dtype="float32")
    layout = resolve_layout(mesh)
    assert layout == Layout(2, 2, 2, 2)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(11))
    mesh_states, plain_states = collect_states(mesh, ids), collect_states(plain, ids, layout)
    for name in layout.state_names:
        assert torch.allclose(mesh_states[name], plain_states[name], atol=1e-4), name


def test_resolve_layout(tiny_mesh_model, tmp_path):
    assert resolve_layout(tiny_mesh_model) == Layout(1, 3, 2, 1)
    assert resolve_layout(tiny_mesh_model, "1+3R2+1") == Layout(1, 3, 2, 1)
    with pytest.raises(UserError, match="laid out as 1\\+3R2\\+1"):
        resolve_layout(tiny_mesh_model, "2+2R2+2")
    plain = GPTNeoXForCausalLM(make_tiny_pythia(tmp_path / "p", num_layers=8).config)
    assert resolve_layout(plain, "2+2R2+2") == Layout(2, 2, 2, 2)
    with pytest.raises(UserError, match="covers 9 layers, but the model has 8"):
        resolve_layout(plain, "3+2R2+2")
    with pytest.raises(UserError, match="needs --layout"):
        resolve_layout(plain)
    # --loops follows the converter's rule: whatever layout.default_layout says.
    from mesh_convert.layout import default_layout

    assert resolve_layout(plain, loops=2) == default_layout(8, 2) == Layout(1, 3, 2, 1)


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------


def test_token_windows_are_consecutive_and_checked():
    windows = token_windows(list(range(20)), samples=3, seq_len=5)
    assert windows.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    with pytest.raises(UserError, match="has 20 tokens, fewer than 3 samples x 8 = 24"):
        token_windows(list(range(20)), samples=3, seq_len=8)


def test_tokenize_file_reads_jsonl_documents_with_eos_between(tmp_path):
    tokenizer = char_tokenizer_fast()
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ab"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    a, b, c = (tokenizer.convert_tokens_to_ids(char) for char in "abc")
    eos = tokenizer.eos_token_id
    assert tokenize_file(path, tokenizer) == [a, b, eos, c, eos]
    path.write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"body": "c"}) + "\n")
    with pytest.raises(UserError, match="docs.jsonl line 2 has no 'text' field"):
        tokenize_file(path, tokenizer)


# ---------------------------------------------------------------------------------------------
# Running the probes, and the plots.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def mesh_result(tiny_mesh_model):
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(10))
    return run_diagnostics(tiny_mesh_model, ids, batch_size=2, name="tiny")


def test_run_diagnostics_shapes_and_values(mesh_result, tiny_mesh_model):
    result = mesh_result
    assert result.samples == 3 and result.variant == "mesh" and str(result.layout) == "1+3R2+1"
    assert result.updates.shape == (3, 4)
    assert result.cka.shape == (3, 5, 5)
    assert result.spectra.shape == (3, 5, 20)  # min(50, L=20, D=32)
    assert torch.allclose(result.cka.diagonal(dim1=1, dim2=2), torch.ones(3, 5, dtype=torch.float64))
    assert torch.allclose(result.spectra[:, :, 0], torch.ones(3, 5, dtype=torch.float64))
    # Per-sample values are those of the sample's own states (batching mixes nothing).
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(10))
    states = list(collect_states(tiny_mesh_model, ids[2:3]).values())
    assert result.updates[2, 1].item() == pytest.approx(relative_update(states[1][0], states[2][0]))
    record = json.loads(json.dumps(result.to_dict()))
    assert record["relative_update"]["loop 1"]["mean"] == pytest.approx(result.updates[:, 1].mean().item())
    assert len(record["relative_update"]["coda"]["per_sample"]) == 3
    assert record["states"] == ["h_emb", "h^(0)", "h^(1)", "h^(2)", "h_out"]


def _png_shape(path):
    return matplotlib.image.imread(path).shape


def test_plots_have_their_panels_and_size(mesh_result, tmp_path):
    fig = plot_updates(mesh_result)
    assert len(fig.axes) == 1
    assert [tick.get_text() for tick in fig.axes[0].get_xticklabels()] == ["prelude", "loop 1", "loop 2", "coda"]
    assert len(fig.axes[0].patches) == 4  # one bar per block
    width, height = fig.get_size_inches() * PLOT_DPI
    assert _png_shape(save_figure(fig, tmp_path / "u.png"))[:2] == (round(height), round(width))

    fig = plot_cka(mesh_result)
    assert len(fig.axes) == 2  # heatmap and colour bar
    assert len(fig.axes[0].texts) == 25  # one annotated cell per pair of the 5 states
    assert fig.axes[0].get_images()[0].get_array().shape == (5, 5)
    plt.close(fig)

    fig = plot_spectra(mesh_result)
    assert len(fig.axes) == 1
    assert [line.get_label() for line in fig.axes[0].get_lines()] == mesh_result.state_names
    plt.close(fig)


def test_router_statistics_follow_the_steps(tiny_mesh_model):
    set_identity_routers(tiny_mesh_model)
    sequences = [torch.arange(12), torch.arange(5, 25)]
    stats = router_statistics(tiny_mesh_model, sequences, "test")
    assert stats.steps == ["transitional", "loop 1", "loop 2"]
    assert stats.tokens == 32
    assert stats.write.shape == stats.read.shape == (3, 5)
    for step in range(3):  # pair s puts its mass on slot s + 1
        assert stats.write[step].argmax().item() == step + 1
        assert stats.read[step, step + 1].item() > 0.99
    assert torch.allclose(stats.write.sum(1), torch.ones(3, dtype=torch.float64))

    fig = plot_router_heatmap(stats, "tiny")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["mean write weight", "mean read weight"] and len(fig.axes) == 3  # + colour bar
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == stats.steps
    plt.close(fig)


def test_parameter_counts(tiny_mesh_model, tmp_path):
    layer = 12 * D * D + 13 * D  # spec section 1
    counts = parameter_counts(tiny_mesh_model)
    assert counts["routers"] == 2 * 3 * (D * 5 + 5)  # 2 (K+1) (D B + B)
    assert counts["core layers (unique)"] == 3 * layer
    assert counts["prelude layers"] == counts["coda layers"] == layer
    assert counts["non-embedding (layers + final norm)"] == 5 * layer + 2 * D
    assert counts["relax deltas"] == 0
    assert counts["total"] == sum(p.numel() for p in tiny_mesh_model.parameters())

    plain = make_tiny_pythia(tmp_path / "p", num_layers=8)
    counts = parameter_counts(plain)
    assert counts["layers"] == 8 * layer and counts["final norm"] == 2 * D
    assert counts["embedding (input)"] == counts["output head"] == 128 * D
    assert counts["routers"] == 0

    relaxed = MeshForCausalLM(tiny_mesh_config(relax_rank=2))
    counts = parameter_counts(relaxed)
    deltas = sum(p.numel() for name, p in relaxed.named_parameters() if "_delta" in name)
    assert counts["relax deltas"] == deltas > 0
    assert counts["core layers (unique)"] == 3 * layer  # deltas are not counted twice
    assert counts["total"] == sum(p.numel() for p in relaxed.parameters())


# ---------------------------------------------------------------------------------------------
# The commands.
# ---------------------------------------------------------------------------------------------


def test_diagnose_cli_on_a_mesh_model(capsys, mesh_dir, text_file, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = invoke(
        capsys, "diagnose", str(mesh_dir), "--data", str(text_file), "--samples", "3", "--seq-len", "24",
        "--output", str(out), "--json", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stderr
    record = json.loads(stdout)
    assert record["layout"] == "1+3R2+1" and record["variant"] == "mesh" and record["samples"] == 3
    assert json.loads((out / "diagnostics.json").read_text()) == record
    for name in ("update_magnitude.png", "cka.png", "spectra.png"):
        assert _png_shape(out / name)[0] > 200


def test_diagnose_cli_on_a_plain_model_prints_tables(capsys, plain_dir, text_file, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = invoke(
        capsys, "diagnose", str(plain_dir), "--data", str(text_file), "--samples", "2", "--seq-len", "16",
        "--layout", "2+2R2+2", "--output", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    assert "Relative update" in stdout and "loop 2" in stdout and "h^(2)" in stdout
    record = json.loads((out / "diagnostics.json").read_text())
    assert record["variant"] == "plain" and record["layout"] == "2+2R2+2"
    assert (out / "cka.png").is_file() and (out / "spectra.png").is_file()


def test_inspect_cli_on_a_mesh_model_with_data(capsys, mesh_dir, text_file, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = invoke(
        capsys, "inspect", str(mesh_dir), "--data", str(text_file), "--samples", "2", "--seq-len", "30",
        "--output", str(out), "--json",
    )  # fmt: skip
    assert code == 0, stderr
    record = json.loads(stdout)
    assert record["layout"] == "1+3R2+1" and record["variant"] == "mesh" and record["num_slots"] == 5
    assert record["provenance"]["config"]["source"] == "tiny-pythia"
    assert record["provenance"]["conversion.json"] == {"router_gap": 8.0}
    assert record["parameters"]["routers"] == 990
    routers = record["routers"]
    assert routers["steps"] == ["transitional", "loop 1", "loop 2"]
    assert routers["tokens"] == 60 and "2 x 30 tokens" in routers["source"]
    assert all(sum(row) == pytest.approx(1.0) for row in routers["mean_write"] + routers["mean_read"])
    assert json.loads((out / "inspect.json").read_text()) == record
    assert _png_shape(out / "routers.png")[1] > 400


def test_inspect_cli_tables_on_built_in_sentences(capsys, mesh_dir, tmp_path):
    code, stdout, stderr = invoke(capsys, "inspect", str(mesh_dir), "--output", str(tmp_path / "o"))
    assert code == 0, stderr
    for text in ("1+3R2+1", "Provenance", "tiny-pythia", "routers", "transitional", "loop 2", "slot 4"):
        assert text in stdout, text
    assert "built-in sample sentences" in stderr


def test_inspect_cli_on_a_plain_model_says_there_are_no_routers(capsys, plain_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = invoke(capsys, "inspect", str(plain_dir), "--output", str(out))
    assert code == 0, stderr
    assert "no routers" in stderr and "layers" in stdout
    assert (out / "inspect.json").is_file() and not (out / "routers.png").exists()


def test_inspect_without_tokenizer_uses_random_ids_or_the_one_given(
    capsys, bare_mesh_dir, mesh_dir, text_file, tmp_path
):
    bare = bare_mesh_dir
    code, stdout, stderr = invoke(capsys, "inspect", str(bare), "--output", str(tmp_path / "o"), "--json")
    assert code == 0, stderr
    assert "random token ids" in json.loads(stdout)["routers"]["source"]
    code, stdout, stderr = invoke(
        capsys, "inspect", str(bare), "--tokenizer", str(mesh_dir), "--data", str(text_file), "--seq-len", "40",
        "--output", str(tmp_path / "o"), "--json",
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads(stdout)["routers"]["tokens"] == 8 * 40


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing model", "does not exist"),
        ("missing data", "data file"),
        ("too few tokens", "fewer than 50 samples x 60"),
        ("layout depth", "covers 9 layers, but the model has 8"),
        ("no layout", "needs --layout"),
        ("mesh layout", "laid out as 1+3R2+1"),
        ("context", "exceeds the model's context"),
        ("inspect missing", "does not exist"),
        ("no tokenizer", "no tokenizer files"),
        ("zero samples", "--samples must be at least 1, not 0"),
        ("inspect data, no tokenizer", "no tokenizer files"),
        ("too many loops", "cannot split 8 layers into 7 loops"),
    ],
)
def test_user_errors_are_one_line(
    capsys, case, message, mesh_dir, plain_dir, bare_plain_dir, bare_mesh_dir, text_file, tmp_path
):
    data = ["--data", str(text_file)]
    bare = bare_plain_dir
    args = {
        "missing model": ["diagnose", str(tmp_path / "nope"), *data],
        "missing data": ["diagnose", str(mesh_dir), "--data", str(tmp_path / "nope.txt")],
        "too few tokens": ["diagnose", str(mesh_dir), *data, "--samples", "50", "--seq-len", "60"],
        "layout depth": ["diagnose", str(plain_dir), *data, "--layout", "3+2R2+2"],
        "no layout": ["diagnose", str(plain_dir), *data],
        "mesh layout": ["diagnose", str(mesh_dir), *data, "--layout", "2+2R2+2"],
        "context": ["diagnose", str(mesh_dir), *data, "--seq-len", "100"],
        "inspect missing": ["inspect", str(tmp_path / "nope")],
        "no tokenizer": ["diagnose", str(bare), *data, "--layout", "2+2R2+2"],
        "zero samples": ["inspect", str(mesh_dir), "--samples", "0"],
        "inspect data, no tokenizer": ["inspect", str(bare_mesh_dir), *data],
        "too many loops": ["diagnose", str(plain_dir), *data, "--loops", "7"],
    }[case]
    code, stdout, stderr = invoke(capsys, *args, "--output", str(tmp_path / "o"))
    assert code == 1
    assert stderr.startswith("error:") and message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "o").exists()  # nothing half-written
    assert "Traceback" not in stderr + stdout


def test_diagnose_and_inspect_take_evals_built_in_data_names(capsys, mesh_dir, tmp_path, monkeypatch):
    """`--data wikitext2` works wherever `eval` takes it (here from a data folder in MESH_CONVERT_DATA)."""
    folder = tmp_path / "data" / "wikitext-2-raw"
    folder.mkdir(parents=True)
    (folder / "wiki.test.raw").write_text(sample_text(2000))
    monkeypatch.setenv("MESH_CONVERT_DATA", str(tmp_path / "data"))
    for command in ("diagnose", "inspect"):
        code, _, stderr = invoke(capsys, command, str(mesh_dir), "--data", "wikitext2", "--samples", "2",
                                 "--seq-len", "16", "--output", str(tmp_path / command))
        assert code == 0, stderr
        assert any((tmp_path / command).iterdir())


# ---------------------------------------------------------------------------------------------
# Where the results go: staged and published whole, never written through a planted link.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("export", ["model", "merged", "adapter"])
def test_the_default_output_of_a_runs_export_carries_the_runs_name(tmp_path, export):
    """Each folder that `train` exports names its run in the default output, so two runs' results do not meet."""
    from mesh_convert.cli.diagnose import _default_output

    (tmp_path / "run-a" / export).mkdir(parents=True)
    assert _default_output("diagnostics", str(tmp_path / "run-a" / export)) == Path(f"diagnostics-run-a-{export}")


@pytest.mark.parametrize("command, written", [("inspect", "inspect.json"), ("diagnose", "diagnostics.json")])
def test_a_link_planted_in_the_default_output_folder_is_not_written_through(
    capsys, mesh_dir, text_file, tmp_path, monkeypatch, command, written
):
    """The default folder (`./inspect-<model>`) may sit in a shared directory where someone else
    made it first: a link in it is replaced, never followed, and only with --overwrite."""
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file")
    folder = tmp_path / f"{'diagnostics' if command == 'diagnose' else 'inspect'}-{mesh_dir.name}"
    folder.mkdir()
    (folder / written).symlink_to(victim)
    data = ["--data", str(text_file), "--samples", "2", "--seq-len", "16"] if command == "diagnose" else []
    args = [command, str(mesh_dir), *data]
    code, _, stderr = invoke(capsys, *args)
    assert code == 1 and "--overwrite" in stderr and (folder / written).is_symlink(), stderr
    code, _, stderr = invoke(capsys, *args, "--overwrite")
    assert code == 0, stderr
    assert victim.read_text() == "the user's own file"
    assert (folder / written).is_file() and not (folder / written).is_symlink()
    code, _, stderr = invoke(capsys, *args)  # a folder of its own earlier results is replaced without --overwrite
    assert code == 0 and not leftovers(tmp_path), stderr


@pytest.mark.parametrize("command, written", [("inspect", "inspect.json"), ("diagnose", "diagnostics.json")])
def test_a_users_folder_holding_a_file_of_the_reports_name_is_not_an_earlier_result(
    capsys, mesh_dir, text_file, tmp_path, monkeypatch, command, written
):
    """Only a report mesh-convert wrote makes a folder an earlier result, replaced without
    --overwrite: the default folder may be a link someone planted to a folder of the user's that
    holds a file of that name."""
    monkeypatch.chdir(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / written).write_text("the user's own notes\n")
    (tmp_path / f"{'diagnostics' if command == 'diagnose' else 'inspect'}-{mesh_dir.name}").symlink_to(precious)
    data = ["--data", str(text_file), "--samples", "2", "--seq-len", "16"] if command == "diagnose" else []
    code, _, stderr = invoke(capsys, command, str(mesh_dir), *data)
    assert code == 1 and "exists and is not empty (use --overwrite" in stderr, stderr
    assert [p.name for p in precious.iterdir()] == [written] and (precious / written).read_text() == "the user's own notes\n"
    out = tmp_path / "out"
    assert invoke(capsys, command, str(mesh_dir), *data, "--output", str(out))[0] == 0
    assert json.loads((out / written).read_text())["written_by"].startswith("mesh-convert ")


@pytest.mark.filterwarnings("error:Glyph")  # pytest holds warnings back from stderr: make one fail the command
@pytest.mark.parametrize("command", ["inspect", "diagnose"])
def test_a_model_named_with_escapes_and_dollars_draws_without_a_raw_escape(capsys, mesh_dir, text_file, tmp_path, command):
    """The model's folder name goes into the figures' titles: matplotlib warned of each missing
    glyph (ESC printed raw on the terminal), and `$...$` would be parsed as mathtext."""
    named = tmp_path / "m\x1b]0;pwned\x07\x1b[2J $\\frac$"
    shutil.copytree(mesh_dir, named)
    data = ["--data", str(text_file), "--samples", "2", "--seq-len", "16"] if command == "diagnose" else []
    code, stdout, stderr = invoke(capsys, command, str(named), *data, "--output", str(tmp_path / "out"))
    assert code == 0, stderr
    assert "\x1b" not in stdout + stderr and "Glyph" not in stderr, stderr


@pytest.mark.parametrize("command", ["inspect", "diagnose"])
def test_a_read_only_output_location_is_one_line(capsys, mesh_dir, text_file, tmp_path, monkeypatch, command):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mkdir = os.mkdir

    def on_a_read_only_file_system(path, *args, **kwargs):
        if read_only in Path(path).parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", on_a_read_only_file_system)
    data = ["--data", str(text_file), "--samples", "2", "--seq-len", "16"] if command == "diagnose" else []
    code, stdout, stderr = invoke(capsys, command, str(mesh_dir), *data, "--output", str(read_only / "out"))
    assert code == 1 and stderr.startswith("error:") and "Read-only file system" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not any(read_only.iterdir())


def test_an_unwritable_output_location_is_refused_before_the_model_loads(mesh_dir, tmp_path):
    """A real permission problem, in a process without root's right to write anywhere."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    preexec = drop_file_permission_override if os.geteuid() == 0 else None
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mesh_convert.cli", "inspect", str(mesh_dir), "--output", str(locked / "out")],
            capture_output=True, text=True, timeout=300, preexec_fn=preexec, env={**os.environ, **SUBPROCESS_ENV},
        )  # fmt: skip
    except subprocess.SubprocessError as error:
        pytest.skip(f"cannot run the CLI without root's file-permission override here: {error}")
    assert result.returncode == 1 and result.stderr.startswith("error:"), result.stderr
    assert f"{locked} is not writable (permission denied)" in " ".join(result.stderr.split())
    assert not any(locked.iterdir())


def test_inspect_refuses_to_replace_its_model(capsys, mesh_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(mesh_dir, model)
    code, _, stderr = invoke(capsys, "inspect", str(model), "--output", str(model), "--overwrite")
    assert code == 1 and "would replace (part of) the input" in stderr, stderr
    assert (model / "config.json").is_file()


def test_weights_linked_from_outside_the_model_folder_are_refused(capsys, mesh_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(mesh_dir, model)
    (model / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (model / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    code, _, stderr = invoke(capsys, "inspect", str(model), "--output", str(tmp_path / "o"))
    assert code == 1 and "model.safetensors is a link to" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_deeply_nested_conversion_record_is_shown_as_unreadable(capsys, mesh_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(mesh_dir, model)
    for depth in (900, 100_000):  # pydantic, then json itself, would recurse too deep
        (model / "conversion.json").write_text('{"router_gap": 8.0, "x": ' + "[" * depth + "]" * depth + "}")
        code, stdout, stderr = invoke(capsys, "inspect", str(model), "--output", str(tmp_path / "o"), "--json")
        assert code == 0, stderr
        assert "nested more than 64 levels deep" in json.loads(stdout)["provenance"]["conversion.json"]


# ---------------------------------------------------------------------------------------------
# Many loops and slots: figures and tables stay a readable, bounded size.
# ---------------------------------------------------------------------------------------------


def test_inspect_of_many_loops_and_slots_stays_within_a_size_cap(capsys, tmp_path):
    """64 loops and 1024 slots once drew a 1,335-inch router plot in 16 GB."""
    path = tmp_path / "wide"
    config = tiny_mesh_config(prelude=0, core=1, loops=64, coda=0, num_slots=1024, hidden_size=8, num_attention_heads=2,
                              intermediate_size=16)  # fmt: skip
    torch.manual_seed(0)
    MeshForCausalLM(config).save_pretrained(path)
    code, stdout, stderr = invoke(capsys, "inspect", str(path), "--output", str(tmp_path / "o"))
    assert code == 0, stderr
    height, width = _png_shape(tmp_path / "o" / "routers.png")[:2]
    assert width <= MAX_FIGURE_INCHES[0] * PLOT_DPI and height <= MAX_FIGURE_INCHES[1] * PLOT_DPI
    assert max(len(line) for line in stdout.splitlines()) <= 200  # the tables: no column per slot


def test_plots_of_many_loops_and_slots_are_capped_and_sparsely_labelled():
    layout = Layout(1, 1, 64, 1)
    states, blocks = len(layout.state_names), len(layout.block_names)
    generator = torch.Generator().manual_seed(0)
    result = DiagnosticsResult(
        model="wide", model_type="mesh", variant="mesh", layout=layout, seq_len=8, threshold=1.0,
        updates=torch.rand(2, blocks, generator=generator, dtype=torch.float64),
        cka=torch.rand(2, states, states, generator=generator, dtype=torch.float64),
        spectra=torch.rand(2, states, 5, generator=generator, dtype=torch.float64),
    )  # fmt: skip
    stats = RouterStats(step_names(64), torch.rand(65, 1024), torch.rand(65, 1024), tokens=10, source="test")
    for fig in (plot_updates(result), plot_cka(result), plot_spectra(result), plot_router_heatmap(stats)):
        width, height = fig.get_size_inches()
        assert width <= MAX_FIGURE_INCHES[0] and height <= MAX_FIGURE_INCHES[1]
        for ax in fig.axes:
            assert len(ax.texts) == 0  # no number in each of thousands of cells
            assert len(ax.get_xticklabels()) <= MAX_LABELS + 1 and len(ax.get_yticklabels()) <= MAX_LABELS + 1
        legend = fig.axes[0].get_legend()
        assert legend is None or len(legend.get_texts()) <= 12
        plt.close(fig)


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic exchange", "two renames"])
def test_a_file_put_into_an_earlier_results_folder_meanwhile_is_kept(capsys, mesh_dir, tmp_path, monkeypatch, exchange):
    """A rerun replaces its earlier results without --overwrite, but not what arrived beside them
    while it ran: that is swapped back, whole."""
    out = tmp_path / "out"
    code, _, stderr = invoke(capsys, "inspect", str(mesh_dir), "--output", str(out))
    assert code == 0, stderr
    earlier = (out / "inspect.json").read_bytes()
    write = inspect_module.write_inspect_outputs

    def someone_writes_into_the_folder(*args):
        (out / "theirs.txt").write_text("written by another program meanwhile")
        return write(*args)

    monkeypatch.setattr(inspect_module, "write_inspect_outputs", someone_writes_into_the_folder)
    if not exchange:
        monkeypatch.setattr(output_module, "_exchange", lambda first, second: False)
    code, _, stderr = invoke(capsys, "inspect", str(mesh_dir), "--output", str(out))
    assert code == 1 and "filled by something else" in stderr, stderr
    assert sorted(p.name for p in out.iterdir()) == ["inspect.json", "routers.png", "theirs.txt"]
    assert (out / "inspect.json").read_bytes() == earlier and not leftovers(tmp_path)

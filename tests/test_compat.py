"""Checkpoints written before the package moved into subpackages (by the converter at commit
5a59481, kept in tests/fixtures/checkpoint-5a59481.tar.gz with the logits it gave then) still
load: with this package, and with plain transformers + trust_remote_code from their own copy of
the remote code. New checkpoints carry the same remote-code file and class names.

The fixture is an archive so that its copy of the old remote code stays what it was: as loose
files, identical to the package's, git could take them for the package's own when merging."""

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import assert_loads_as_remote_code, make_tiny_pythia
from mesh_convert.cli import main
from mesh_convert.artifacts.record import ConversionRecord
from mesh_convert.artifacts.card import build_model_card
from mesh_convert.loading import load_model

ARCHIVE = Path(__file__).parent / "fixtures" / "checkpoint-5a59481.tar.gz"


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    """The old checkpoint, unpacked."""
    target = tmp_path_factory.mktemp("old")
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(target, filter="data")
    return target / "checkpoint-5a59481"


def expected_logits(old: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    expected = json.loads((old / "expected.json").read_text())
    return torch.tensor(expected["input_ids"]), torch.tensor(expected["logits_last"]), expected["logits_sum"]


def test_an_old_checkpoint_loads_with_the_package(old):
    ids, last, total = expected_logits(old)
    for model in (load_model(old), AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32)):
        assert type(model).__module__ == "mesh_convert.modeling.modeling_mesh"
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.allclose(logits[0, -1], last, atol=1e-5)
        assert abs(float(logits.sum()) - total) < 1e-2


def test_an_old_checkpoint_loads_with_plain_transformers(old, tmp_path):
    ids, _, _ = expected_logits(old)
    model = AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits
    assert_loads_as_remote_code(old, ids, logits, tmp_path)


def test_an_old_record_reads_and_makes_its_card(old):
    record = ConversionRecord.read(old)
    assert record.layout == "1+1R2+1" and record.params.routers == 990 and record.relax_rank == 2
    assert "| MeSH routers | 990 |" in build_model_card(record).text


def test_new_checkpoints_keep_the_remote_code_file_and_class_names(old, tmp_path):
    source = tmp_path / "src"
    make_tiny_pythia(source, num_layers=4, seed=3)
    out = tmp_path / "new"
    # --relax-init svd: the old converter's only start (a rank N now starts at zero by default)
    args = ["--loops", "2", "--relax-rank", "2", "--relax-init", "svd", "--dtype", "float32", "-o", str(out)]
    assert main([str(source), *args]) == 0
    new_config, old_config = (json.loads((d / "config.json").read_text()) for d in (out, old))
    assert new_config["auto_map"] == old_config["auto_map"]
    assert new_config["architectures"] == old_config["architectures"] == ["MeshForCausalLM"]
    for name in ("configuration_mesh.py", "modeling_mesh.py"):
        assert (out / name).is_file()
    # The same source and options give the same weights as the old converter wrote.
    ids, last, _ = expected_logits(old)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert torch.allclose(logits[0, -1], last, atol=1e-5)


# ----------------------------------------------------------------------------- the transformers they need

REMOTE_CONFIG = Path(__file__).resolve().parents[1] / "mesh_convert" / "modeling" / "configuration_mesh.py"


def import_remote_config():
    """configuration_mesh.py imported from its file as transformers imports remote code (the
    version it checks is the one that `transformers.__version__` says)."""
    spec = importlib.util.spec_from_file_location("remote_configuration_mesh", REMOTE_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("installed", ["4.57.6", "5.0.0", "5.8.1"])
def test_the_remote_code_names_the_transformers_it_needs_in_one_line(monkeypatch, installed):
    """Measured: 4.57 fails on `PreTrainedConfig`, 5.0-5.8 deep inside `forward` (README)."""
    monkeypatch.setattr(transformers, "__version__", installed)
    with pytest.raises(ImportError) as info:
        import_remote_config()
    message = str(info.value)
    assert "\n" not in message and f"transformers {installed} is installed" in message
    assert "pip install -U 'transformers>=5.9'" in message


@pytest.mark.parametrize("installed", ["5.9.0", "5.10.0.dev0", "6.0.0"])
def test_the_remote_code_loads_on_the_transformers_it_needs(monkeypatch, installed):
    monkeypatch.setattr(transformers, "__version__", installed)
    assert import_remote_config().REQUIRES_TRANSFORMERS == ">=5.9"


def test_config_and_card_state_the_transformers_the_remote_code_needs(old, tmp_path):
    """config.json's `transformers_version` is the saving one's; `requires_transformers` is the
    code's, also when an older checkpoint's config (without it) is saved again."""
    source = tmp_path / "src"
    make_tiny_pythia(source, num_layers=4)
    out = tmp_path / "new"
    assert main([str(source), "--loops", "2", "-o", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["requires_transformers"] == ">=5.9"
    assert "and transformers >=5.9 (`pip install -U \"transformers>=5.9\"`" in (out / "README.md").read_text()
    resaved = tmp_path / "resaved"
    AutoConfig.from_pretrained(old).save_pretrained(resaved)
    assert "requires_transformers" not in json.loads((old / "config.json").read_text())
    assert json.loads((resaved / "config.json").read_text())["requires_transformers"] == ">=5.9"

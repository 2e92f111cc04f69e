"""Checkpoints written before the package moved into subpackages (by the converter at commit
5a59481, kept in tests/fixtures/checkpoint-5a59481.tar.gz with the logits it gave then) still
load: with this package, and with plain transformers + trust_remote_code from their own copy of
the remote code. New checkpoints carry the same remote-code file and class names.

The fixture is an archive so that its copy of the old remote code stays what it was: as loose
files, identical to the package's, git could take them for the package's own when merging."""

import json
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_loads_as_remote_code, make_tiny_pythia
from mesh_convert.cli import main
from mesh_convert.convert.record import ConversionRecord
from mesh_convert.convert.card import build_model_card
from mesh_convert.io import load_model

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

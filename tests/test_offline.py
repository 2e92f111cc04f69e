"""Converting a Hub model that is already in the local Hugging Face cache, without the Hub: with
HF_HUB_OFFLINE set, or with no network at all (an endpoint where nothing listens), as
transformers loads such a model. The cache is laid out as huggingface_hub lays it out
(`models--ORG--NAME/blobs`, `snapshots/<commit>` of links into the blobs, `refs/main`), in a
temporary HF_HUB_CACHE."""

import hashlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants
from transformers import AutoModelForCausalLM

from conftest import make_tiny_pythia
from helpers import ROOT, SUBPROCESS_ENV, char_tokenizer, invoke
from hub_standin import HubStandin, User
from mesh_convert.errors import UserError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# A conversion that keeps the source's function (dense deltas, routers near one-hot), so that the
# logits tell which weights it converted.
EXACT = ("--loops", "2", "--relax-rank", "full", "--router-gap", "40")


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str = COMMIT, only: tuple[str, ...] = ()) -> Path:
    """Lay `source`'s files (or those named in `only`) into `cache` as huggingface_hub's download
    does, with refs/main at `commit`; the snapshot's directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in sorted(source.iterdir()):
        if only and file.name not in only:
            continue
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()  # an LFS file's blob is named by its sha256
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def closed_endpoint() -> str:
    """A loopback address where nothing listens: every connection is refused, as without network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty HF_HUB_CACHE, online mode and no network by default: each test says which it tests."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    endpoint = closed_endpoint()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    # huggingface_hub read these when it was imported; the functions consult the constants.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return cache


@pytest.fixture
def cached_model(cache, tmp_path):
    source = tmp_path / "source"
    model = make_tiny_pythia(source)
    char_tokenizer(source)
    cache_repo(cache, "alice/tiny", source)
    return model


def assert_same_logits(converted_dir: Path, model) -> None:
    x = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    converted = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, model(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("offline_flag", [True, False], ids=["HF_HUB_OFFLINE", "no-network"])
@pytest.mark.parametrize("revision", [None, COMMIT], ids=["main", "commit"])
def test_a_cached_model_converts_without_the_hub(cached_model, tmp_path, monkeypatch, capfd, offline_flag, revision):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_flag)
    out = tmp_path / "converted"
    revision_args = ["--revision", revision] if revision else []
    code, _, err = invoke(capfd, "alice/tiny", *revision_args, *EXACT, "-o", out)
    assert code == 0, err
    assert "Retrying" not in err
    assert (out / "tokenizer.json").is_file()
    assert_same_logits(out, cached_model)


def test_a_cached_model_without_its_weights_is_one_line(cache, tmp_path, monkeypatch, capfd):
    """A plan (--dry-run) fetched only config.json: the plan works offline, a conversion says what is missing."""
    source = tmp_path / "source"
    make_tiny_pythia(source)
    cache_repo(cache, "alice/tiny", source, only=("config.json",))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, out, err = invoke(capfd, "alice/tiny", "--loops", "2", "--dry-run", "--json")
    assert code == 0, err
    code, _, err = invoke(capfd, "alice/tiny", "--loops", "2", "-o", tmp_path / "converted")
    assert code == 1 and err.count("error:") == 1 and "Traceback" not in err
    assert "alice/tiny without its weights" in err
    assert not (tmp_path / "converted").exists()


def test_a_model_the_hub_answers_for_is_fetched_from_it_not_from_the_cache(cache, tmp_path, monkeypatch, capfd):
    """Online, the Hub's current files count, not an older copy in the cache; and what the
    conversion downloaded then converts offline from the cache, where transformers finds it too."""
    old, new = tmp_path / "old", tmp_path / "new"
    make_tiny_pythia(old, seed=1)
    model = make_tiny_pythia(new, seed=2)
    cache_repo(cache, "alice/tiny", old)
    token = "hf_aliceWrites0123456789"
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks LFS, not Xet
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login"))
    with HubStandin(tmp_path / "standin", {token: User("alice", write=True)}) as standin:
        for name, value in (("ENDPOINT", standin.endpoint),
                            ("HUGGINGFACE_CO_URL_TEMPLATE", standin.endpoint + "/{repo_id}/resolve/{revision}/{filename}")):
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        api = HfApi(endpoint=standin.endpoint, token=token)
        api.create_repo("alice/tiny")
        api.upload_folder(repo_id="alice/tiny", folder_path=new)
        code, _, err = invoke(capfd, "alice/tiny", *EXACT, "-o", tmp_path / "online")
        assert code == 0, err
        assert standin.unhandled == []
    assert_same_logits(tmp_path / "online", model)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = invoke(capfd, "alice/tiny", *EXACT, "-o", tmp_path / "offline")
    assert code == 0, err
    assert_same_logits(tmp_path / "offline", model)


def test_without_network_or_cache_the_error_comes_at_once(tmp_path):
    """No retries (huggingface_hub's take some 23 s and print ten lines): one error line. A fresh
    process, as a user runs it: huggingface_hub reads HF_ENDPOINT when it is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(SUBPROCESS_ENV, HF_ENDPOINT=closed_endpoint(), HF_HUB_CACHE=str(tmp_path / "empty-cache"),
               HF_HUB_DISABLE_TELEMETRY="1")
    done = subprocess.run([sys.executable, "-m", "mesh_convert.cli", "pythia-14m", "--loops", "2", "-o", str(tmp_path / "x")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr
    errors = re.findall(r"error: [^\n]*", done.stderr)
    assert len(errors) == 1 and done.stderr.strip() == errors[0], done.stderr
    assert "cannot reach the Hub" in errors[0] and "not in the local cache" in errors[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("offline_flag", [True, False], ids=["HF_HUB_OFFLINE", "no-network"])
def test_a_cached_model_and_tokenizer_load_by_hub_id_without_the_hub(cached_model, monkeypatch, capfd, offline_flag):
    """eval, train and inspect load a Hub id's model and tokenizer through transformers, which
    retried a refused connection for some 25 s per file (56 s for a tokenizer) before it turned to
    the cache: the Hub is asked once, and without an answer the cache is used at once."""
    from mesh_convert.loading import load_model, load_tokenizer

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_flag)
    tokenizer = load_tokenizer("alice/tiny")
    model = load_model("alice/tiny")
    ids = torch.tensor([tokenizer("the king")["input_ids"]])
    assert torch.allclose(model(ids).logits, cached_model(ids).logits, atol=1e-5)
    assert "Retrying" not in capfd.readouterr().err


def test_a_hub_id_neither_reachable_nor_cached_is_one_line_at_once(cache):
    from mesh_convert.loading import load_model, load_tokenizer

    for load in (load_tokenizer, load_model):
        with pytest.raises(UserError, match=r"cannot reach the Hub at .* \(and it is not in the local cache\)"):
            load("alice/elsewhere")


def test_the_hubs_answer_about_a_tokenizer_is_not_called_an_unusable_tokenizer(cache, tmp_path, monkeypatch):
    """A refused token or a missing repo is what the Hub said, not "no usable tokenizer"."""
    from mesh_convert.loading import load_tokenizer

    with HubStandin(tmp_path / "standin", {}) as standin:
        monkeypatch.setattr(constants, "ENDPOINT", standin.endpoint)
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_unknownToken012345")
        with pytest.raises(UserError, match="401") as refused:
            load_tokenizer("alice/tiny")
    assert "no usable tokenizer" not in str(refused.value) and "hf_unknownToken012345" not in str(refused.value)

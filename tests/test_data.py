"""Token stores: `prepare-data` (parallel, resumable, published whole), the cache that recipes
listing files train from, Megatron stores written by an outside writer (megatron-core) and read in
Pythia's order with GPT-NeoX's loss, and one clear line for each kind of bad data."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mesh_convert.errors import UserError
from mesh_convert.train.data import BatchPlan, model_inputs, read_documents
from mesh_convert.train.sources import build_data
from mesh_convert.train.loop import train
from mesh_convert.train.prepare import cached_store, plan_file_chunks, prepare_store, source_fingerprint
from mesh_convert.train.recipe import DataSection, Recipe
from mesh_convert.train.store import open_store, tokenizer_identity
from helpers import SUBPROCESS_ENV, char_tokenizer, corpus, invoke, metrics, recipe, tiny_converted, write_recipe, write_text


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tokenizer = char_tokenizer(root / "tokenizer")
    docs = corpus(3, 60)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"root": root, "tokenizer": tokenizer, "docs": docs, "jsonl": root / "docs.jsonl",
            "text": write_text(root / "train.txt"), "model": tiny_converted(root / "mesh", tokenizer)}


def loaded(work):
    return AutoTokenizer.from_pretrained(work["tokenizer"])


def prepare(work, paths, target, chunk_bytes=1 << 22, workers=None):
    tokenizer = loaded(work)
    paths = [str(p) for p in paths]
    return prepare_store(plan_file_chunks(paths, chunk_bytes), source_fingerprint(paths), target, tokenizer,
                         tokenizer_identity(tokenizer), workers=workers, chunk_bytes=chunk_bytes)


def test_prepare_data_writes_the_documents_with_eos_in_two_bytes_a_token(work, tmp_path, capsys):
    out = tmp_path / "store"
    code, stdout, err = invoke(capsys, "prepare-data", work["jsonl"], work["text"], "-t", work["tokenizer"], "-o", out,
                               "--json")
    assert code == 0, err
    result = json.loads(stdout)
    tokenizer = loaded(work)
    expected = [i for d in work["docs"] for i in [*tokenizer(d, add_special_tokens=False)["input_ids"], 0]]
    expected += [*tokenizer(work["text"].read_text(), add_special_tokens=False)["input_ids"], 0]
    store = open_store(out, tokenizer_identity(tokenizer))
    assert store.indexed.tokens.dtype == np.uint16 and store.indexed.tokens.tolist() == expected
    assert result["tokens"] == len(expected) and result["documents"] == len(work["docs"]) + 1
    assert result["bytes_per_token"] < 2.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no parts or staging left beside it
    code, _, err = invoke(capsys, "prepare-data", work["jsonl"], "-t", work["tokenizer"], "-o", out)
    assert code == 1 and "exists and is not empty (use --overwrite" in err


def test_parallel_workers_make_the_same_store_as_one_process(work, tmp_path):
    """Small chunks (many parts) across 2 spawned workers, against a single in-process chunk."""
    paths = [work["text"], work["jsonl"]]
    one = prepare(work, paths, tmp_path / "one")
    many = prepare(work, paths, tmp_path / "many", chunk_bytes=2048, workers=2)
    assert one["parts"] == 2 and many["parts"] > 8 and many["workers"] == 2
    a, b = (open_store(tmp_path / name, None).indexed for name in ("one", "many"))
    assert a.tokens.tolist() == b.tokens.tolist()
    # The .txt file is one document, of one sequence per chunk there; each record is one.
    assert len(a.documents) == len(b.documents) == len(work["docs"]) + 2
    assert b.documents[1] == len(plan_file_chunks([str(work["text"])], 2048)) and a.lengths[1:].tolist() == b.lengths[b.documents[1]:].tolist()


def test_good_records_never_count_lines(work, tmp_path, monkeypatch):
    """A record's line number is for a message only: counting it reads the file up to the record,
    and asking it of every record made preparing a 1 GB file quadratic (hours instead of minutes)."""
    import mesh_convert.train.prepare as preparing

    counted = []
    monkeypatch.setattr(preparing, "_line_number", lambda path, offset: counted.append(offset) or 1)
    result = prepare(work, [work["jsonl"]], tmp_path / "store", workers=1)  # one chunk: in this process
    assert result["documents"] == len(work["docs"]) and counted == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_an_interrupted_preparation_goes_on_from_its_parts(work, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(5, 20_000)))
    target = tmp_path / "store"
    code = textwrap.dedent("""
        import sys
        from transformers import AutoTokenizer
        from mesh_convert.train.prepare import plan_file_chunks, prepare_store, source_fingerprint
        from mesh_convert.train.store import tokenizer_identity
        tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
        paths = [sys.argv[2]]
        try:
            prepare_store(plan_file_chunks(paths, 512), source_fingerprint(paths), sys.argv[3], tokenizer,
                          tokenizer_identity(tokenizer), workers=1, chunk_bytes=512)
        except Exception as error:
            print(type(error).__name__, error, flush=True)
            sys.exit(error.exit_code)
    """)
    process = subprocess.Popen([sys.executable, "-c", code, str(work["tokenizer"]), str(big), str(target)],
                               env={**os.environ, **SUBPROCESS_ENV}, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp_path.glob(".store.parts-*/*.json"))) < 20:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    kept = int(re.search(r"interrupted: (\d+) of (\d+) parts are kept", output)[1])
    assert kept >= 20 and not target.exists()
    assert [p.name.startswith(".store.parts-") for p in tmp_path.iterdir() if p.name != "big.jsonl"] == [True]
    with pytest.raises(UserError, match="was not finished: its preparation was interrupted"):
        open_store(target, None)
    resumed = prepare(work, [big], target, chunk_bytes=512, workers=1)
    assert resumed["parts_reused"] >= kept
    whole = prepare(work, [big], tmp_path / "whole", chunk_bytes=512, workers=1)
    assert open_store(target, None).indexed.tokens.tolist() == open_store(tmp_path / "whole", None).indexed.tokens.tolist()
    assert whole["parts_reused"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "store", "whole"]


def test_recipes_listing_files_prepare_once_and_reuse_the_store(work, tmp_path):
    tokenizer = loaded(work)
    identity = tokenizer_identity(tokenizer)
    data = tmp_path / "d.txt"
    data.write_text(work["text"].read_text())
    first = cached_store([str(data)], tokenizer, identity, "text")
    made = (first / "store.json").stat().st_mtime_ns
    assert cached_store([str(data)], tokenizer, identity, "text") == first
    assert (first / "store.json").stat().st_mtime_ns == made
    os.utime(data, ns=(made + 10**9, made + 10**9))  # the file changed (its time): another store
    assert cached_store([str(data)], tokenizer, identity, "text") != first


def test_a_megatron_store_from_an_outside_writer_is_read_in_its_stored_order(work, tmp_path):
    """megatron-core's IndexedDatasetBuilder writes Pythia-shaped data (uint16, sequences of
    block_size + 1 tokens); step s of order: stored is sequences [s G, (s + 1) G) from start_step,
    and each process reads its own rows of them."""
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset",
                                  reason="megatron-core (a test-only dependency: pip install 'mesh-convert[dev]')")
    prefix = tmp_path / "document"
    builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    rows = torch.randint(0, 98, (40, 17), generator=torch.Generator().manual_seed(0))
    for row in rows:
        builder.add_item(row)
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    section = DataSection(store=str(prefix), order="stored", start_step=3, block_size=16, eval_blocks=4)
    for rank in range(2):
        plan = BatchPlan(global_batch=4, micro_batch=1, steps=5, rank=rank, world=2)
        data = build_data(section, loaded(work), 0, plan)
        for micro in range(2):
            position = (3 + 2) * 4 + micro * 2 + rank
            assert torch.equal(data.train.rows(2, micro), rows[position : position + 1])
    assert torch.equal(data.eval.stack(range(4)), rows[36:])  # held out: the last sequences
    with pytest.raises(UserError, match=r"holds 40 sequences \(4 of them held out .*: steps 3 to 9 of 4 need 40"):
        build_data(section, loaded(work), 0, BatchPlan(4, 1, 7))


def test_a_2049_token_sample_gets_gpt_neox_loss(work):
    """Pythia's 2049 tokens: 2048 inputs predict the 2048 tokens after the first (scaled down here)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work["model"]).eval()
    ids = torch.randint(0, 98, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(**model_inputs(ids, 16)).loss
        logits = model(input_ids=ids[:, :16]).logits
    gpt_neox = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(gpt_neox.item(), rel=1e-6)
    with torch.no_grad():  # a block of block_size tokens: the loss of its own next tokens
        assert model(**model_inputs(ids[:, :16], 16)).loss.item() == pytest.approx(
            torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:16].reshape(-1)).item(),
            rel=1e-6)


def test_training_from_a_prepared_store_equals_training_from_its_files(work, tmp_path, capsys):
    store = tmp_path / "store"
    assert invoke(capsys, "prepare-data", work["text"], "-t", work["tokenizer"], "-o", store)[0] == 0
    settings = dict(train={"max_steps": 3, "eval_every": 3})
    train(Recipe.model_validate(recipe(work["model"], work["text"], tmp_path / "files", **settings)))
    stored = recipe(work["model"], work["text"], tmp_path / "store-run", **settings)
    stored["data"] = {**stored["data"], "train": [], "store": str(store)}
    train(Recipe.model_validate(stored))
    def losses(out):
        return [(r["loss"], r.get("eval_loss")) for r in metrics(out)]

    assert losses(tmp_path / "files") == losses(tmp_path / "store-run")


def _megatron_pair(prefix, rows: int, length: int):
    from mesh_convert.train.store import write_index

    np.arange(rows * length, dtype=np.uint16).tofile(f"{prefix}.bin")
    write_index(f"{prefix}.idx", np.dtype(np.uint16), np.full(rows, length), np.arange(rows + 1))


@pytest.mark.parametrize(
    "case, wanted",
    [
        ("truncated bin", r"does not match .*\.bin \(the \.bin holds 6,000 bytes, the \.idx describes 6,600\)"),
        ("damaged idx", "is truncated or damaged"),
        ("not an index", "is not a Megatron index"),
        ("another tokenizer", "was made with the tokenizer .* not the recipe's"),
        ("another block size", "does not hold sequences of block_size \\+ 1 = 33 tokens .* set data.block_size to 29"),
        ("too small", "holds 20 sequences: steps 0 to 7 of 4 need 32"),
        ("too few blocks", "too few for one global batch of 4"),
        ("interrupted", "was not finished: its preparation was interrupted"),
        ("missing", "does not exist \\(give a folder made by `mesh-convert prepare-data`"),
        ("fifo", "is a pipe, not a file"),
        ("device", "/dev/zero is a device, not a data file"),
        ("directory", "is a directory: list the data files in it"),
        ("big record", "line 2 is a record of more than 64 MiB"),
        ("unpaired surrogate", "line 2: the text holds an unpaired surrogate \\('\\\\ud800'\\)"),
        ("nested record", "line 2 is not valid JSON: nested more than 64 levels deep"),
        ("endless number", "line 2 is not valid JSON: Exceeds the limit \\(4300 digits\\)"),
    ],
)
def test_bad_data_is_one_line(work, tmp_path, capsys, case, wanted):
    out = tmp_path / "run"
    data = recipe(work["model"], work["text"], out)
    store = tmp_path / "document"
    if case in ("truncated bin", "damaged idx", "not an index", "another block size", "too small"):
        _megatron_pair(store, 100 if case != "too small" else 20, 33)
        data["data"].update(train=[], store=str(store), order="stored", eval_blocks=0)
        if case == "truncated bin":
            with open(f"{store}.bin", "r+b") as handle:
                handle.truncate(6000)
        elif case == "damaged idx":
            with open(f"{store}.idx", "r+b") as handle:
                handle.truncate(500)
        elif case == "not an index":
            (tmp_path / "document.idx").write_bytes(b"PK\x03\x04" + bytes(100))
        elif case == "another block size":
            data["data"]["block_size"] = 32
            _megatron_pair(store, 100, 30)
    elif case == "another tokenizer":
        other = tmp_path / "other-tokenizer"
        AutoTokenizer.from_pretrained(work["tokenizer"]).save_pretrained(other)
        definition = json.loads((other / "tokenizer.json").read_text())
        definition["model"]["vocab"]["\u00e9"] = 98  # one more token: another tokenizer
        (other / "tokenizer.json").write_text(json.dumps(definition))
        assert invoke(capsys, "prepare-data", work["text"], "-t", other, "-o", tmp_path / "s")[0] == 0
        data["data"].update(train=[], store=str(tmp_path / "s"))
    elif case == "too few blocks":
        data["data"]["train"] = [str(write_text(tmp_path / "small.txt", lines=5))]
    elif case == "interrupted":
        (tmp_path / ".s.parts-0123456789abcdef").mkdir()
        data["data"].update(train=[], store=str(tmp_path / "s"))
    elif case == "missing":
        data["data"].update(train=[], store=str(tmp_path / "nowhere"))
    elif case == "fifo":
        os.mkfifo(tmp_path / "pipe.txt")
        data["data"]["train"] = [str(tmp_path / "pipe.txt")]
    elif case == "device":
        data["data"]["train"] = ["/dev/zero"]
    elif case == "directory":
        (tmp_path / "folder.txt").mkdir()
        data["data"]["train"] = [str(tmp_path / "folder.txt")]
    elif case in ("unpaired surrogate", "nested record", "endless number"):
        second = {"unpaired surrogate": '{"text": "a \\ud800 b"}', "nested record": '{"text": "a", "b": ' + "[" * 100_000 + "]" * 100_000 + "}",
                  "endless number": '{"text": "a", "b": ' + "9" * 100_000 + "}"}[case]
        (tmp_path / "records.jsonl").write_text('{"text": "a"}\n' + second + "\n")
        data["data"]["train"] = [str(tmp_path / "records.jsonl")]
    elif case == "big record":
        # The real limit on a record of 200 MB, cheaply: the file is sparse, and reading stops at the limit.
        big = tmp_path / "big.jsonl"
        with open(big, "wb") as handle:
            handle.write(b'{"text": "a"}\n{"text": "')
            handle.seek(200 << 20)
            handle.write(b'"}\n')
        data["data"]["train"] = [str(big)]
    code, _, err = invoke(capsys, "train", write_recipe(tmp_path / "r.yaml", data))
    lines = err.strip().splitlines()
    assert code == 1 and lines and lines[-1].startswith("error:") and sum(line.startswith("error") for line in lines) == 1, err
    assert re.search(wanted, lines[-1]), lines[-1]
    assert not (out / "model").exists()


def test_dictionary_encoded_parquet_text_is_text(tmp_path, work):
    """Parquet writers store a column of repeated texts as a dictionary: it was refused as not text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["the king said", "to my lord", "the king said"]
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), tmp_path / "d.parquet")
    assert list(read_documents(tmp_path / "d.parquet")) == texts


def test_a_long_record_is_refused_below_a_lower_limit_and_read_whole_within_it(tmp_path, capsys, work):
    records = tmp_path / "r.jsonl"
    long = "word " * 300_000  # 1.5 MB
    records.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": long}) + "\n")
    code, _, err = invoke(capsys, "prepare-data", records, "-t", work["tokenizer"], "-o", tmp_path / "s",
                          "--max-record-mb", "1")
    assert code == 1 and "line 2 is a record of more than 1 MiB" in err and not (tmp_path / "s").exists()
    assert list(read_documents(records, max_record_mb=2)) == ["short", long]

"""Data at scale (issue 22, item 5), with the real GPT-NeoX tokenizer on real text (../shared/data,
repeated to size), each case in fresh processes:

1. tokenizing: `mesh-convert prepare-data --workers 1` and `--workers 2` against the bare fast
   tokenizer (one thread, the same documents, 256 a call), interleaved; per worker ratio; and two
   bare tokenizers at once, what two cores of this machine give;
2. time to the first step and peak RSS of `mesh-convert train recipes/cpu-smoke.yaml` with
   data.train=CORPUS (the cached store, prepared by a run before) for a small and a big corpus;
3. a resume at a late step against one at an early step (the checkpoint's step set to each);
4. bytes on disk per token;
5. the tokens each of 2 processes reads of a store's global batches and of a streamed dataset;
6. the stores compared: the Megatron indexed format (ours), litdata's chunks and the `datasets`
   Arrow cache, on the same tokens: writing, size, opening, random blocks read (litdata is
   optional: pip install --no-deps litdata==0.2.76 lightning-utilities boto3).

    python scripts/bench_data.py --small-mb 8 --big-mb 1024 --repeats 3 --json benchmarks/data-cpu.json
    python scripts/bench_data.py --cases tokenizing --tokenize-mb 128 --json benchmarks/data-tokenize-128mb-cpu.json
    python scripts/bench_data.py --small-mb 1 --big-mb 4 --repeats 1   # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

SHARED = bc.REPO.parent / "shared"  # --shared sets these
TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b"
TEXTS: list[Path] = []
BARE = r"""
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
begun = time.perf_counter()
tokens = sum(len(e.ids) for i in range(0, len(texts), 256) for e in tokenizer.encode_batch(texts[i:i + 256], add_special_tokens=False))
seconds = time.perf_counter() - begun
print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}))
"""


def articles(text: str) -> list[str]:
    """WikiText's articles (each begins with a ` = Title = ` line), or the whole text if it has none."""
    found, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith(" = ") and not line.startswith(" = = ") and current:
            found.append("".join(current).strip())
            current = []
        current.append(line)
    return [a for a in [*found, "".join(current).strip()] if a]


def corpus(path: Path, megabytes: float) -> Path:
    """A JSONL corpus of `megabytes`: the shared texts as documents (WikiText's articles, Tiny
    Shakespeare whole), repeated to size."""
    if path.is_file():
        return path
    lines = [json.dumps({"text": a}) + "\n" for text in TEXTS for a in articles(text.read_text(encoding="utf-8"))]
    wanted, written = int(megabytes * 2**20), 0
    with open(path, "w", encoding="utf-8") as out:
        while written < wanted:
            for line in lines:
                out.write(line)
                written += len(line.encode())
                if written >= wanted:
                    break
    return path


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "mesh_convert", *map(str, args)]


def checked(result: dict, what: str) -> dict:
    if result["returncode"] != 0:
        raise SystemExit(f"{what} failed: {result['stderr'][-1500:]}")
    return result


def tokenizing(work: Path, env: dict, megabytes: float, repeats: int) -> dict:
    text = corpus(work / f"tokenize-{megabytes:g}mb.jsonl", megabytes)
    from concurrent.futures import ThreadPoolExecutor

    bare_command = [sys.executable, "-c", BARE, TOKENIZER / "tokenizer.json", text]
    runs = {"bare": [], "bare_pair": [], "workers_1": [], "workers_2": []}
    for _ in range(repeats):
        result = checked(bc.run_child(bare_command, env=env), "bare")
        runs["bare"].append(json.loads(result["stdout"]))
        # two bare tokenizers at once: what the machine's cores give two processes (the ceiling
        # for two workers; on shared virtual cores it can be well under twice one)
        with ThreadPoolExecutor(2) as pool:
            pair = list(pool.map(lambda _: checked(bc.run_child(bare_command, env=env, sample=False), "bare"), range(2)))
        runs["bare_pair"].append(sum(json.loads(r["stdout"])["tokens_per_s"] for r in pair))
        for workers in (1, 2):
            out = work / f"tokenize-store-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            result = checked(bc.run_child(cli("prepare-data", text, "-t", TOKENIZER, "-o", out, "--workers", workers,
                                              "--json"), env=env), "prepare-data")
            runs[f"workers_{workers}"].append(json.loads(result["stdout"]))
    bare = bc.median(r["tokens_per_s"] for r in runs["bare"])
    pair = bc.median(runs["bare_pair"])
    summary = {"corpus_mb": megabytes, "bare_tokens_per_s": bare, "bare_pair_tokens_per_s": pair,
               "bare_pair_vs_twice_bare": bc.ratio(pair, 2 * bare), "runs": runs}
    for workers in (1, 2):
        rate = bc.median(r["tokens_per_s"] for r in runs[f"workers_{workers}"])
        summary[f"workers_{workers}"] = {"tokens_per_s": rate, "per_worker_vs_bare": bc.ratio(rate / workers, bare)}
    summary["workers_2"]["vs_bare_pair"] = bc.ratio(summary["workers_2"]["tokens_per_s"], pair)
    last = runs["workers_1"][-1]
    summary["bytes_per_token"] = last["bytes_per_token"]
    return summary


def smoke(output: Path, *overrides) -> list[str]:
    return cli("train", bc.REPO / "recipes" / "cpu-smoke.yaml", f"output_dir={output}", f"tokenizer={TOKENIZER}", "train.max_steps=1",
               "train.eval_every=0", *overrides, "--overwrite")


def first_step(work: Path, env: dict, sizes: dict, repeats: int) -> dict:
    """The second run on each corpus (the first prepares its cached store, timed apart)."""
    results = {}
    for name, megabytes in sizes.items():
        text = corpus(work / f"{name}-{megabytes:g}mb.jsonl", megabytes)
        prepared = checked(bc.run_child(smoke(work / "run", f"data.train=[{text}]"), env=env), "preparing run")
        results[name] = {"corpus_mb": megabytes, "preparing_run_s": prepared["wall_s"], "runs": []}
    for _ in range(repeats):
        for name, megabytes in sizes.items():
            text = work / f"{name}-{megabytes:g}mb.jsonl"
            result = checked(bc.run_child(smoke(work / "run", f"data.train=[{text}]"), env=env), "run")
            results[name]["runs"].append({k: result[k] for k in ("wall_s", "maxrss_bytes")})
    for name in sizes:
        results[name]["wall_s"] = bc.median(r["wall_s"] for r in results[name]["runs"])
        results[name]["maxrss_bytes"] = max(r["maxrss_bytes"] for r in results[name]["runs"])
    small, big = (results[name] for name in sizes)
    return {"corpora": results, "wall_ratio": bc.ratio(big["wall_s"], small["wall_s"]),
            "rss_ratio": bc.ratio(big["maxrss_bytes"], small["maxrss_bytes"])}


def resume(work: Path, env: dict, megabytes: float, steps: dict, repeats: int) -> dict:
    """A checkpoint after step 1, its recorded step set to each of `steps`, resumed for one step."""
    from mesh_convert.train.checkpoint import TrainState

    text = corpus(work / f"big-{megabytes:g}mb.jsonl", megabytes)
    base = work / "resume-base"
    checked(bc.run_child(cli("train", bc.REPO / "recipes" / "cpu-smoke.yaml", f"output_dir={base}", f"tokenizer={TOKENIZER}", "train.max_steps=2",
                             "train.eval_every=0", "checkpoint.every=1", f"data.train=[{text}]", "--overwrite"),
                         env=env), "checkpointing run")
    for name, step in steps.items():
        folder = work / f"resume-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(base, folder)
        shutil.rmtree(folder / "model")
        TrainState(step, step * 4 * 64).write(folder / "checkpoints" / "step-00000001")
    runs = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            folder = work / f"resume-{name}"
            for later in (folder / "checkpoints").iterdir():
                if later.name != "step-00000001":
                    shutil.rmtree(later)
            (folder / "model").exists() and shutil.rmtree(folder / "model")
            command = cli("train", bc.REPO / "recipes" / "cpu-smoke.yaml", f"output_dir={folder}", f"tokenizer={TOKENIZER}",
                          f"train.max_steps={step + 1}", "train.eval_every=0", "checkpoint.every=0",
                          f"data.train=[{text}]")
            result = checked(bc.run_child(command, env=env), f"resume at {step}")
            runs[name].append(result["wall_s"])
    walls = {name: bc.median(values) for name, values in runs.items()}
    early, late = walls.values()
    return {"steps": steps, "wall_s": walls, "late_vs_early": bc.ratio(late, early), "runs": runs}


def shares(work: Path) -> dict:
    """Tokens each of 2 processes reads: of a store's global batches, and of a streamed dataset."""
    from transformers import AutoTokenizer

    from mesh_convert.train.data import BatchPlan
    from mesh_convert.train.sources import build_data
    from mesh_convert.train.recipe import DataSection

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    text = corpus(work / "shares.jsonl", 2)
    section = DataSection(train=[str(text)], block_size=64, eval_blocks=0)
    store = {}
    for rank in range(2):
        data = build_data(section, tokenizer, 0, BatchPlan(8, 2, 10, rank, 2))
        store[rank] = sum(data.train.rows(step, micro).numel() for step in range(10) for micro in range(2))
    folder = work / "shares-dataset"
    if not folder.is_dir():
        folder.mkdir()
        lines = text.read_text().splitlines(keepends=True)
        for shard in range(4):
            (folder / f"part-{shard}.jsonl").write_text("".join(lines[shard::4]))
    import datasets
    from datasets.distributed import split_dataset_by_node

    stream = {}
    for rank in range(2):
        mine = split_dataset_by_node(datasets.load_dataset(str(folder), split="train", streaming=True), rank, 2)
        stream[rank] = sum(len(tokenizer(row["text"])["input_ids"]) for row in mine)
    return {"store_tokens_per_process": store, "store_share": {r: v / sum(store.values()) for r, v in store.items()},
            "stream_tokens_per_process": stream, "stream_share": {r: v / sum(stream.values()) for r, v in stream.items()}}


def formats(work: Path, megabytes: float, block: int = 2048, reads: int = 256) -> dict:
    """The same documents' tokens in three stores: write time, bytes a token, open time, and the
    time to read `reads` random blocks of `block` tokens (median of 5)."""
    import numpy as np

    from mesh_convert.train.store import open_store, write_index

    text = corpus(work / f"formats-{megabytes:g}mb.jsonl", megabytes)
    prepared = work / "formats-prepared"
    if not prepared.is_dir():
        checked(bc.run_child(cli("prepare-data", text, "-t", TOKENIZER, "-o", prepared, "--json")), "prepare")
    indexed = open_store(prepared, None).indexed
    documents = [np.array(indexed.sequence(i)) for i in range(indexed.sequences)]
    tokens = len(indexed.tokens)
    ours = work / "formats-megatron"  # written again from the tokens, as the others are
    shutil.rmtree(ours, ignore_errors=True)
    ours.mkdir()
    begun = time.perf_counter()
    np.concatenate(documents).tofile(ours / "tokens.bin")
    write_index(ours / "tokens.idx", np.dtype(np.uint16), np.array([len(d) for d in documents]),
                np.arange(len(documents) + 1))
    results = {"megatron": {"write_s": time.perf_counter() - begun}}
    rng = np.random.default_rng(0)
    starts = rng.integers(0, tokens - block, reads)

    def timed(read) -> float:
        times = []
        for _ in range(5):
            begun = time.perf_counter()
            read()
            times.append(time.perf_counter() - begun)
        return bc.median(times)

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    begun = time.perf_counter()
    reopened = open_store(ours / "tokens", None).indexed
    results["megatron"].update(open_s=time.perf_counter() - begun, bytes_per_token=size(ours) / tokens,
                               read_s=timed(lambda: [np.array(reopened.tokens[s : s + block]) for s in starts]))

    import datasets

    arrow = work / "formats-arrow"
    shutil.rmtree(arrow, ignore_errors=True)
    begun = time.perf_counter()
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("uint16"))})
    datasets.Dataset.from_generator(lambda: ({"input_ids": d} for d in documents), features=features,
                                    cache_dir=str(work / "formats-arrow-cache")).save_to_disk(arrow)
    results["arrow"] = {"write_s": time.perf_counter() - begun, "bytes_per_token": size(arrow) / tokens}
    begun = time.perf_counter()
    loaded = datasets.load_from_disk(str(arrow))
    values = [chunk.values.to_numpy(zero_copy_only=True) for chunk in loaded.data.column("input_ids").chunks]
    ends = np.cumsum([len(v) for v in values])
    results["arrow"]["open_s"] = time.perf_counter() - begun

    def arrow_block(start: int):
        piece, out, left = int(np.searchsorted(ends, start, side="right")), [], block
        offset = start - (ends[piece - 1] if piece else 0)
        while left:
            taken = values[piece][offset : offset + left]
            out.append(taken)
            left -= len(taken)
            piece, offset = piece + 1, 0
        return np.concatenate(out)

    results["arrow"]["read_s"] = timed(lambda: [arrow_block(int(s)) for s in starts])

    try:
        import litdata
        import torch
    except ImportError:
        results["litdata"] = {"skipped": "not installed (pip install --no-deps litdata==0.2.76 lightning-utilities boto3)"}
        return {"tokens": tokens, "block": block, "reads": reads, "stores": results}
    chunks = work / "formats-litdata"
    shutil.rmtree(chunks, ignore_errors=True)
    begun = time.perf_counter()
    litdata.optimize(fn=_litdata_item, inputs=[(str(prepared), i) for i in range(indexed.sequences)], output_dir=str(chunks),
                     chunk_bytes="64MB", item_loader=litdata.TokensLoader(), num_workers=2, start_method="spawn")
    results["litdata"] = {"write_s": time.perf_counter() - begun, "bytes_per_token": size(chunks) / tokens}
    begun = time.perf_counter()
    streaming = litdata.StreamingDataset(str(chunks), item_loader=litdata.TokensLoader(block_size=block), shuffle=False)
    count = len(streaming)
    results["litdata"]["open_s"] = time.perf_counter() - begun
    picks = rng.integers(0, count, reads)
    results["litdata"]["read_s"] = timed(lambda: [streaming[int(i)] for i in picks])
    del torch
    return {"tokens": tokens, "block": block, "reads": reads, "stores": results}


def _litdata_item(item):
    import torch

    from mesh_convert.train.store import open_store

    path, index = item
    # torch.uint16: 2 bytes a token, as in the other stores
    yield torch.from_numpy(open_store(path, None).indexed.sequence(index).astype("int64")).to(torch.uint16)


CASES = ("tokenizing", "first_step", "resume", "two_processes", "formats")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mb", type=float, default=8)
    parser.add_argument("--big-mb", type=float, default=1024)
    parser.add_argument("--tokenize-mb", type=float, default=32)
    parser.add_argument("--formats-mb", type=float, default=32)
    parser.add_argument("--late-step", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=bc.BENCH_CACHE / "data", help="corpora, stores and runs (kept)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"which cases, comma-separated (of {', '.join(CASES)})")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared folder (tokenizer and texts)")
    args = parser.parse_args()
    global TOKENIZER
    TOKENIZER = args.shared / "tokenizers" / "gpt-neox-20b"
    TEXTS[:] = [args.shared / "data" / "wikitext-2-raw" / "wiki.test.raw",
                args.shared / "data" / "wikitext-2-raw" / "wiki.valid.raw",
                args.shared / "data" / "tinyshakespeare" / "input.txt"]
    if not TOKENIZER.is_dir():
        raise SystemExit(f"{TOKENIZER} is absent: the benchmark needs the shared folder (--shared)")
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(bc.REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MESH_CONVERT_CACHE": str(args.work / "cache")}
    os.environ["MESH_CONVERT_CACHE"] = env["MESH_CONVERT_CACHE"]
    info = bc.environment()
    cases = {
        "tokenizing": lambda: tokenizing(args.work, env, args.tokenize_mb, args.repeats),
        "first_step": lambda: first_step(args.work, env, {"small": args.small_mb, "big": args.big_mb}, args.repeats),
        "resume": lambda: resume(args.work, env, args.big_mb, {"early": 1, "late": args.late_step}, args.repeats),
        "two_processes": lambda: shares(args.work),
        "formats": lambda: formats(args.work, args.formats_mb),
    }
    chosen = [name for name in args.cases.split(",") if name]
    if unknown := set(chosen) - set(CASES):
        raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))} (the cases: {', '.join(CASES)})")
    results = {name: cases[name]() for name in CASES if name in chosen}
    rows = []
    if t := results.get("tokenizing"):
        rows += [
            [f"tokenizing {args.tokenize_mb:g} MB, 1 worker / bare, per worker", bc.fmt(t["workers_1"]["per_worker_vs_bare"], ".2f", "x"), ">= 0.8x"],
            [f"tokenizing {args.tokenize_mb:g} MB, 2 workers / bare, per worker", bc.fmt(t["workers_2"]["per_worker_vs_bare"], ".2f", "x"), ">= 0.8x"],
            ["tokenizing, 2 workers / two bare at once", bc.fmt(t["workers_2"]["vs_bare_pair"], ".2f", "x"), ""],
            ["the machine: two bare at once / twice one", bc.fmt(t["bare_pair_vs_twice_bare"], ".2f", "x"), ""],
            ["bytes on disk a token", bc.fmt(t["bytes_per_token"], ".3f"), "<= 2.1"],
        ]
    if f := results.get("first_step"):
        rows += [[f"first step, {args.big_mb:g} MB / {args.small_mb:g} MB corpus", bc.fmt(f["wall_ratio"], ".2f", "x"), "<= 1.2x"],
                 [f"peak RSS, {args.big_mb:g} MB / {args.small_mb:g} MB corpus", bc.fmt(f["rss_ratio"], ".2f", "x"), "<= 1.2x"]]
    if r := results.get("resume"):
        rows.append([f"resume at step {args.late_step:,} / at step 1", bc.fmt(r["late_vs_early"], ".2f", "x"), "<= 1.5x"])
    if shared := results.get("two_processes"):
        rows.append(["share of each of 2 processes (store; stream)", " / ".join(
            f"{shared[k][0]:.2f}" for k in ("store_share", "stream_share")), "about 0.5"])
    for name, store in results.get("formats", {}).get("stores", {}).items():
        if "skipped" not in store:
            rows.append([f"store {name}: write / open / {results['formats']['reads']} random blocks; bytes a token",
                         f"{store['write_s']:.1f} s / {store['open_s'] * 1e3:.1f} ms / {store['read_s'] * 1e3:.1f} ms; "
                         f"{store['bytes_per_token']:.3f}", ""])
    bc.print_table("data at scale", ["measure", "value", "target"], rows)
    bc.write_json(args.json, {"environment": bc.finish_environment(info), "arguments": {
        k: str(v) for k, v in vars(args).items()}, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

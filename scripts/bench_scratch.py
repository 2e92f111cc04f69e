"""From-scratch recurrences compared with the project's own `init` + `train` (issue 12, item 1).

A tiny Pythia-style model (12 unrolled layers as 2+4R2+2, D=128, 4 heads) with a 4,096-token
byte-level BPE tokenizer trained on the training text (WikiText-2 valid + Tiny Shakespeare from
../shared/data), 5% warm-up, `--steps` x 8 x 256 tokens; the held-out loss is taken on the first
65,536 tokens of WikiText-2 test, which is never trained on. Variants: base, anchor, residual,
mesh (with each `--router-init` x `--router-lr-mult`) and vanilla (12 layers, `--loops 1`, base).

Every run is a `python -m mesh_convert.cli train RECIPE` child process with one thread under
`nice`; `--lanes` of them run at once. Results are appended to the JSON as they finish.

    python scripts/bench_scratch.py --lrs 1e-3 2e-3 --seeds 0 1 --output benchmarks/scratch-cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_common import BENCH_CACHE, REPO, environment, finish_environment, print_table, write_json

SHARED_DATA = REPO.parent / "shared" / "data"
TRAIN_FILES = [SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw", SHARED_DATA / "tinyshakespeare" / "input.txt"]
HELD_OUT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
VOCAB = 4096
BLOCK = 256
BATCH = 8
HELD_OUT_TOKENS = 65_536
VARIANTS = ("vanilla", "base", "anchor", "residual", "mesh")


def train_tokenizer(directory: Path) -> Path:
    """A byte-level BPE of VOCAB tokens trained on the training files (cached in `directory`)."""
    if (directory / "tokenizer.json").is_file():
        return directory
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train([str(f) for f in TRAIN_FILES], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    wrapped.save_pretrained(directory)
    return directory


def recipe_for(run: dict, tokenizer: Path, output_dir: Path, steps: int) -> dict:
    vanilla = run["variant"] == "vanilla"
    init = {
        "size": "custom", "num_layers": 12, "hidden_size": 128, "num_heads": 4, "vocab_size": VOCAB,
        "max_position_embeddings": BLOCK, "loops": 1 if vanilla else 2,
        "variant": "base" if vanilla else run["variant"],
    }
    if not vanilla:
        init.update(prelude=2, coda=2)
    optim = {"lr": run["lr"], "warmup": 0.05}
    if run["variant"] == "mesh":
        init.update(router_init=run["router_init"], router_gap=run["router_gap"])
        optim["router_lr_mult"] = run["router_lr_mult"]
    return {
        "init": init,
        "tokenizer": str(tokenizer),
        "output_dir": str(output_dir),
        "seed": run["seed"],
        "data": {"train": [str(f) for f in TRAIN_FILES], "block_size": BLOCK, "eval_files": [str(HELD_OUT)]},
        "optim": optim,
        "train": {
            "global_batch_size": BATCH, "micro_batch_size": BATCH, "max_steps": steps,
            "eval_every": 0, "eval_batches": HELD_OUT_TOKENS // (BLOCK * BATCH), "log_every": 20,
        },
        "checkpoint": {"every": 0},
    }


def label(run: dict) -> str:
    if run["variant"] != "mesh":
        return run["variant"]
    init = "random" if run["router_init"] == "random" else f"base{run['router_gap']:g}"
    mult = f" x{run['router_lr_mult']:g}" if run["router_lr_mult"] != 1 else ""
    return f"mesh/{init}{mult}"


def run_dir(run: dict, work: Path) -> Path:
    name = f"{label(run)}-lr{run['lr']:g}-s{run['seed']}-{run['steps']}steps"
    return work / "runs" / name.replace(" ", "_").replace("/", "_")


def execute(run: dict, work: Path, tokenizer: Path, steps: int) -> dict:
    import yaml

    output_dir = run_dir(run, work)
    name = output_dir.name
    recipe_path = work / "recipes" / f"{name}.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe_for(run, tokenizer, output_dir, steps)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(
        ["nice", "-n", "19", sys.executable, "-m", "mesh_convert.cli", "train", str(recipe_path), "--overwrite"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - start
    result = {**run, "label": label(run), "seconds": round(seconds, 1), "returncode": proc.returncode}
    if proc.returncode != 0:
        result["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return result
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if "eval_loss" in r][-1]
    result.update(heldout_loss=final["eval_loss"], heldout_ppl=final["eval_ppl"], final_train_loss=records[-1]["loss"])
    if run["variant"] == "mesh":
        result["coda_input_mix"] = coda_input_mix(output_dir / "model")
    return result


def coda_input_mix(model_dir: Path) -> dict[str, dict[str, float]]:
    """What the coda reads, per held-out token: h^(K) = sum_j c_j v_j over the vectors written
    (h_emb, h_pre, the core outputs h_m0..), c_j = <last read weights, v_j's write weights>.
    Returns each c_j's mean and sd over 1,024 held-out tokens."""
    import torch
    from transformers import AutoTokenizer

    from mesh_convert.modeling import MeshForCausalLM

    torch.set_num_threads(1)
    model = MeshForCausalLM.from_pretrained(model_dir).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(HELD_OUT.read_text()[:20_000], return_tensors="pt").input_ids
    memory, weights = model.model.memory, {}
    hooks = [
        router.register_forward_hook(lambda _m, _i, out, key=(kind, step): weights.__setitem__(key, out.float().softmax(-1)))
        for kind in ("write", "read")
        for step, router in enumerate(getattr(memory, f"{kind}_routers"))
    ]
    with torch.no_grad():
        model(ids[:, : 4 * BLOCK].view(4, BLOCK))
    for hook in hooks:
        hook.remove()
    steps = len(memory.read_routers)
    slot0 = torch.nn.functional.one_hot(torch.tensor(0), memory.num_slots).float()
    written = [slot0, *(weights[("write", t)] for t in range(steps))]
    read = weights[("read", steps - 1)]
    names = ["h_emb", "h_pre", *(f"h_m{t}" for t in range(steps - 1))]
    return {
        name: {"mean": round((c := (read * w).sum(-1)).mean().item(), 3), "sd": round(c.std().item(), 3)}
        for name, w in zip(names, written)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 1e-3, 2e-3, 4e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--router-init", nargs="+", default=["random"], choices=["random", "base"], help="mesh only")
    parser.add_argument("--router-gap", nargs="+", type=float, default=[8.0], help="mesh with --router-init base only")
    parser.add_argument("--router-lr-mult", nargs="+", type=float, default=[1.0], help="mesh only")
    parser.add_argument("--lanes", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "scratch-cpu.json")
    parser.add_argument("--append", action="store_true", help="keep the runs already in --output")
    parser.add_argument("--table-only", action="store_true", help="print the table of --output; run nothing")
    parser.add_argument("--fill-coda-mix", action="store_true",
                        help="add coda_input_mix to the mesh runs of --output that lack it (their models must still exist)")
    args = parser.parse_args()
    if args.table_only or args.fill_coda_mix:
        payload = json.loads(args.output.read_text())
        if args.fill_coda_mix:
            for run in payload["runs"]:
                if run["variant"] == "mesh" and "coda_input_mix" not in run and "heldout_loss" in run:
                    run["coda_input_mix"] = coda_input_mix(run_dir(run, BENCH_CACHE / "scratch") / "model")
            write_json(args.output, payload)
        show(payload["runs"])
        return 0

    missing = [str(f) for f in (*TRAIN_FILES, HELD_OUT) if not f.is_file()]
    if missing:
        print(f"skipped: the shared data is absent ({', '.join(missing)})")
        return 0
    work = BENCH_CACHE / "scratch"
    tokenizer = train_tokenizer(work / "tokenizer")

    runs = []
    for seed, lr, variant in itertools.product(args.seeds, args.lrs, args.variants):
        base = {"variant": variant, "lr": lr, "seed": seed, "steps": args.steps}
        if variant != "mesh":
            runs.append(base)
            continue
        for init, mult in itertools.product(args.router_init, args.router_lr_mult):
            for gap in args.router_gap if init == "base" else [8.0]:
                runs.append({**base, "router_init": init, "router_gap": gap, "router_lr_mult": mult})

    payload = {"benchmark": "scratch", "environment": environment(), "runs": []}
    if args.append and args.output.is_file():
        payload["runs"] = json.loads(args.output.read_text())["runs"]
    with ThreadPoolExecutor(args.lanes) as pool:
        for result in pool.map(lambda run: execute(run, work, tokenizer, args.steps), runs):
            payload["runs"].append(result)
            loss = result.get("heldout_loss")
            print(f"{result['label']:28} lr {result['lr']:g} seed {result['seed']}: "
                  f"{'failed ' + str(result.get('error')) if loss is None else f'{loss:.4f}'} ({result['seconds']:.0f} s)",
                  flush=True)
            write_json(args.output, {**payload, "environment": finish_environment(payload["environment"])})

    show(payload["runs"])
    return 0


def show(runs: list[dict]) -> None:
    table = summarise(runs)
    lrs = sorted({r["lr"] for r in runs})
    print_table(
        "held-out loss, mean ± sd over seeds",
        ["variant", *[f"lr {lr:g}" for lr in lrs]],
        [[name, *[table[name].get(lr, "-") for lr in lrs]] for name in table],
        caption=f"first {HELD_OUT_TOKENS:,} tokens of WikiText-2 test, never trained on",
    )


def summarise(runs: list[dict]) -> dict[str, dict[float, str]]:
    cells: dict[str, dict[float, list[float]]] = {}
    for run in runs:
        if run.get("heldout_loss") is not None:
            cells.setdefault(run["label"], {}).setdefault(run["lr"], []).append(run["heldout_loss"])
    return {
        name: {
            lr: f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f} (n={len(v)})" if len(v) > 1 else "")
            for lr, v in by_lr.items()
        }
        for name, by_lr in cells.items()
    }


if __name__ == "__main__":
    sys.exit(main())

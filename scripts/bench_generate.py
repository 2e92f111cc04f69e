"""Benchmark generation with the KV cache: tokens/s of a converted MeSH model against the original
Hugging Face model (greedy, a fixed prompt, exactly N new tokens).

    python scripts/bench_generate.py --output benchmarks/generate-cpu.json
    python scripts/bench_generate.py --variants mesh base original --new-tokens 128
    python scripts/bench_generate.py --device cuda --dtype bfloat16      # untested here

Models: `smollm2` (SmolLM2-135M from scripts/get_smollm2.py; converted in memory to
5+10R2+5 with `convert_model(..., loops=K, relax_rank=0)`, default tie), `pythia-<size>` (random
weights, seed --seed; the prompt is then --prompt-len random token ids), or a checkpoint directory.
All variants live in this one process and are timed in turn: after one warm-up call each,
--repeats rounds of `generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)` per variant,
interleaved (mesh, original, mesh, original, ...). Reported: tokens/s = N / wall time of the call
(prefill included) and its median ratio to the original (also with process CPU time, which other
load on a shared machine disturbs less); and a decode-only rate from the same
rounds, (N - 1) / (t(N) - t(1)), where t(1) is an interleaved call with max_new_tokens=1.
Threads: --threads (default 1: on a shared 2-core machine two OpenMP threads stall whenever
another process holds a core).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    SMOLLM2_DIR,
    environment,
    finish_environment,
    fmt,
    median,
    print_table,
    ratio,
    summary,
    verdict,
    write_json,
)

TARGET = 0.9  # converted tokens/s >= 0.9x the original's
PROMPT = (
    "Recursive transformers reuse one block of layers several times. Converting a pretrained model "
    "into this form keeps its compute and saves parameters. Here is a short explanation of how it works:"
)


def load(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2":
        path = SMOLLM2_DIR
    elif args.model.startswith("pythia-"):
        from mesh_convert.convert.pythia import pythia_config

        torch.manual_seed(args.seed)
        return GPTNeoXForCausalLM(pythia_config(args.model.removeprefix("pythia-"))).to(dtype), None
    else:
        path = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path) if (Path(path) / "tokenizer_config.json").is_file() else None
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 | pythia-<size> (random) | checkpoint directory")
    parser.add_argument("--loops", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["mesh", "original"], choices=["mesh", "base", "residual", "anchor", "anchor_emb", "original"])
    parser.add_argument("--new-tokens", type=int, default=64, help="N: tokens generated per call (min = max)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt length when the model has no tokenizer")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the cuda path is untested on the CPU-only machine)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    import torch

    import mesh_convert.modeling  # noqa: F401  (registers MeSH with the Auto classes)
    from mesh_convert.convert.conversion import convert_model

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    env = environment(args.device)

    source, tokenizer = load(args)
    models = {}
    for variant in args.variants:
        if variant == "original":
            continue
        models[variant] = convert_model(source, loops=args.loops, variant=variant, relax_rank=0).to(source.dtype)
    if "original" in args.variants:
        models["original"] = source
    models = {v: models[v].to(args.device).eval() for v in args.variants}

    if tokenizer is not None:
        ids = tokenizer([PROMPT] * args.batch, return_tensors="pt").input_ids
    else:
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, source.config.vocab_size, (args.batch, args.prompt_len), generator=generator)
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)
    pad = source.generation_config.pad_token_id
    if pad is None:
        eos = source.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    cuda = args.device.startswith("cuda")

    def generate(model, n):
        if cuda:
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                pad_token_id=pad, use_cache=True,
            )  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        assert out.shape[1] - ids.shape[1] == n, f"generated {out.shape[1] - ids.shape[1]} tokens, not {n}"
        return seconds, cpu_seconds, out[0, ids.shape[1] :].tolist()

    N = args.new_tokens
    for model in models.values():  # warm-up
        generate(model, N)
    full = {v: [] for v in models}
    full_cpu = {v: [] for v in models}
    one = {v: [] for v in models}
    tokens = {}
    for rep in range(args.repeats):
        for variant, model in models.items():
            seconds, cpu_seconds, tokens[variant] = generate(model, N)
            full[variant].append(seconds)
            full_cpu[variant].append(cpu_seconds)
            one[variant].append(generate(model, 1)[0])
        print(f"  round {rep + 1}/{args.repeats}: " + ", ".join(f"{v} {full[v][-1]:.2f}s" for v in models), flush=True)

    reference = "original" if "original" in models else args.variants[-1]
    results = {}
    for variant, model in models.items():
        t_full = median(full[variant])
        paired = [f / r for f, r in zip(full[reference], full[variant])]  # >1: this variant is faster
        decode = [(N - 1) / (f - o) for f, o in zip(full[variant], one[variant])]
        decode_ref = [(N - 1) / (f - o) for f, o in zip(full[reference], one[reference])]
        results[variant] = {
            "class": type(model).__name__,
            "layout": getattr(model.config, "layout", None),
            "unrolled_layers": model.config.num_hidden_layers,
            "attn_implementation": model.config._attn_implementation,
            "call_s": summary(full[variant]),
            "one_token_call_s": summary(one[variant]),
            "tokens_per_s": args.batch * N / t_full,
            "decode_tokens_per_s": args.batch * median(decode),
            "speed_ratio_vs_" + reference: ratio(median(full[reference]), t_full),
            "call_cpu_s": summary(full_cpu[variant]),
            "cpu_speed_ratio_vs_" + reference: ratio(median(full_cpu[reference]), median(full_cpu[variant])),
            "paired_speed_ratio_median": median(paired),
            "decode_speed_ratio_vs_" + reference: ratio(median(decode), median(decode_ref)),
            "generated_first_16": tokens[variant][:16],
        }
    targets = {}
    for variant in models:
        if variant != reference:
            r = results[variant]["speed_ratio_vs_" + reference]
            targets[f"{variant}_vs_{reference}"] = {"ratio": r, "min": TARGET, "ok": r >= TARGET}

    payload = {
        "benchmark": "generate",
        "environment": finish_environment(env),
        "settings": {
            k: getattr(args, k) for k in ("model", "loops", "new_tokens", "batch", "dtype", "device", "threads", "repeats", "seed")
        }
        | {"prompt_tokens": ids.shape[1], "prompt": PROMPT if tokenizer is not None else f"{args.prompt_len} random ids"},
        "method": "one process; warm-up call per model, then interleaved rounds of generate(greedy, "
        "min_new_tokens=max_new_tokens=N) and generate(max_new_tokens=1); tokens/s = N / call time (prefill included); "
        "CPU-time ratio: the same with time.process_time (less disturbed by other load); "
        "decode tokens/s = (N-1) / (t(N) - t(1))",
        "results": results,
        "targets": targets,
    }
    write_json(args.output, payload)

    print_table(
        f"generation, {args.model}, prompt {ids.shape[1]} tokens, {N} new, batch {args.batch}, {args.dtype}, "
        f"{args.device}, {args.repeats} interleaved rounds (medians)",
        ["variant", "layout", "call", "tokens/s", f"vs {reference}", f"CPU-time vs {reference}", "decode tok/s", f"decode vs {reference}"],
        [
            [
                v,
                r["layout"] or f"{r['unrolled_layers']} layers",
                fmt(r["call_s"]["median"], ".2f", " s"),
                fmt(r["tokens_per_s"], ".1f"),
                fmt(r["speed_ratio_vs_" + reference], ".3f"),
                fmt(r["cpu_speed_ratio_vs_" + reference], ".3f"),
                fmt(r["decode_tokens_per_s"], ".1f"),
                fmt(r["decode_speed_ratio_vs_" + reference], ".3f"),
            ]
            for v, r in results.items()
        ],
        caption="; ".join(f"{k}: {t['ratio']:.3f} (≥{t['min']}) {verdict(t['ok'])}" for k, t in targets.items()) or None,
    )


if __name__ == "__main__":
    main()

"""Benchmark one training step (forward + backward) of a converted MeSH model against the `base`
recurrence of the same layout and the unconverted model of the same unrolled depth.

    python scripts/bench_train_step.py --output benchmarks/train-step-cpu.json
    python scripts/bench_train_step.py --model pythia-160m --batch 4 --seq 256
    python scripts/bench_train_step.py --device cuda --dtype bfloat16 --batch 8 --seq 2048   # untested here

Models: `smollm2` (SmolLM2-135M from scripts/get_smollm2.py, converted in memory to 5+10R2+5),
`pythia-160m` (a random pythia-160m-shaped GPT-NeoX, seed --seed, converted to 2+4R2+2), or a
local checkpoint directory. Variants: `mesh` and `base` come from `convert_model(..., loops=K,
relax_rank=0)` with the default tie; `original` is the source model itself.

Each variant lives in its own worker process (this script with --worker), so memory is not
shared and the variants do not warm each other's caches. The parent drives them in turn:
  time phase    --sets times: fresh workers, --warmup untimed steps each, then --repeats rounds
                of one timed step per variant, interleaved (mesh, base, original, mesh, base,
                original, ...; each set starts with the next variant); medians and ratios
                of the wall time, and of the worker's CPU time (time.process_time), which other
                load on a shared machine disturbs less.
  memory phase  fresh workers, one at a time, with glibc's mmap threshold pinned
                (MALLOC_MMAP_THRESHOLD_) so freed tensors go back to the OS: after a warm-up step,
                (a) the step's tensor-allocation peak above the memory held before it, from
                torch.profiler's memory events (on CUDA: torch.cuda.max_memory_allocated), and
                (b) the step's RSS peak above the RSS before it (VmHWM reset via /proc/self/clear_refs).
A step: zero_grad(set_to_none=True), forward with labels=input_ids (use_cache=False), loss.backward();
no optimizer step. Gradients are allocated inside the step, so they are part of its peak.
Inputs: uniform random token ids from torch.Generator(seed). Threads: --threads (default 1:
on a shared 2-core machine two OpenMP threads stall whenever another process holds a core).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    SMOLLM2_DIR,
    environment,
    finish_environment,
    fmt,
    median,
    mib,
    print_table,
    proc_status,
    ratio,
    reset_peak_rss,
    summary,
    verdict,
    write_json,
)

TIME_TARGET = 0.03  # mesh within 3% of base
MEMORY_TARGET = 0.10  # and within 10% in memory
PROTOCOL = "@@bench "

# ---------------------------------------------------------------------------------------------
# Worker side.
# ---------------------------------------------------------------------------------------------


def load_source(args):
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2":
        return AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=dtype)
    if args.model.startswith("pythia-"):
        from mesh_convert.convert.pythia import pythia_config

        torch.manual_seed(args.seed)
        return GPTNeoXForCausalLM(pythia_config(args.model.removeprefix("pythia-"))).to(dtype)
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)


def build_model(args, variant: str):
    import gc

    import torch

    import mesh_convert.modeling  # noqa: F401  (registers MeSH with the Auto classes)
    from mesh_convert.convert.conversion import convert_model

    source = load_source(args)
    if variant == "original":
        model = source
    else:
        options = {"variant": variant, "relax_rank": 0}
        if args.prelude is not None:
            options.update(prelude=args.prelude, coda=args.coda)
        model = convert_model(source, loops=args.loops, **options).to(getattr(torch, args.dtype))
        del source
        gc.collect()
    if args.attn:
        model.set_attn_implementation(args.attn)
    return model.to(args.device).train()


def describe(model) -> dict:
    config = model.config
    unique = {id(p): p for p in model.parameters()}
    return {
        "class": type(model).__name__,
        "layout": getattr(config, "layout", None),
        "unrolled_layers": config.num_hidden_layers,
        "parameters": sum(p.numel() for p in unique.values()),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in unique.values()),
        "attn_implementation": config._attn_implementation,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def worker(args) -> None:
    import torch

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args, args.worker)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator).to(args.device)
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        return float(loss.detach())

    def reply(payload):
        sys.stdout.write(PROTOCOL + json.dumps(payload) + "\n")
        sys.stdout.flush()

    for _ in range(args.warmup):
        step()
    sync()
    reply({"ready": True, "info": describe(model), "threads": torch.get_num_threads()})
    for line in sys.stdin:
        command = line.strip()
        if command == "time":
            sync()
            started, cpu_started = time.perf_counter(), time.process_time()
            loss = step()
            sync()
            reply({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started, "loss": loss})
        elif command == "memory":
            reply(measure_memory(model, step, cuda))
        elif command == "quit":
            break


def allocation_peak_cpu(step) -> int:
    """Largest amount of tensor memory allocated during `step` above what was allocated before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def measure_memory(model, step, cuda: bool) -> dict:
    import gc

    import torch

    model.zero_grad(set_to_none=True)
    gc.collect()
    out = {}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        out["allocation_peak_bytes"] = torch.cuda.max_memory_allocated() - before
        out["allocated_before_bytes"] = before
    else:
        out["allocation_peak_bytes"] = allocation_peak_cpu(step)
        model.zero_grad(set_to_none=True)
        gc.collect()
        before = proc_status()
        out["hwm_reset"] = reset_peak_rss()
        step()
        after = proc_status()
        out["rss_before_bytes"] = before.get("VmRSS")
        out["rss_step_peak_bytes"] = after.get("VmHWM", 0) - before.get("VmRSS", 0)
    return out


# ---------------------------------------------------------------------------------------------
# Parent side.
# ---------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, args, variant: str, extra_env: dict | None = None):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, *worker_args(args)]
        env = os.environ | {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"} | (extra_env or {})
        self.variant = variant
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = self.read()
        self.info, self.threads = ready["info"], ready["threads"]

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])
        raise SystemExit(f"error: the {self.variant} worker exited ({self.proc.wait()})")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)


def worker_args(args) -> list[str]:
    out = [
        "--model", args.model, "--loops", str(args.loops), "--batch", str(args.batch), "--seq", str(args.seq),
        "--dtype", args.dtype, "--device", args.device, "--seed", str(args.seed), "--warmup", str(args.warmup),
        "--threads", str(args.threads),
    ]  # fmt: skip
    if args.prelude is not None:
        out += ["--prelude", str(args.prelude), "--coda", str(args.coda)]
    if args.attn:
        out += ["--attn", args.attn]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 | pythia-<size> (random) | checkpoint directory")
    parser.add_argument("--loops", type=int, default=2)
    parser.add_argument("--prelude", type=int, default=None, help="with --coda: a non-default layout")
    parser.add_argument("--coda", type=int, default=None)
    parser.add_argument("--variants", nargs="+", default=["mesh", "base", "original"], choices=["mesh", "base", "residual", "anchor", "anchor_emb", "original"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the cuda path is untested on the CPU-only machine)")
    parser.add_argument("--attn", default=None, help="attention implementation for every variant (default: transformers' choice, sdpa)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (0 = torch's default)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per worker before timing")
    parser.add_argument("--sets", type=int, default=2, help="fresh sets of worker processes for the time phase")
    parser.add_argument("--repeats", type=int, default=6, help="interleaved timed rounds per set")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (args.prelude is None) != (args.coda is None):
        parser.error("--prelude and --coda go together")
    if args.worker:
        return worker(args)

    env = environment(args.device)
    tokens = args.batch * args.seq
    times = {v: [] for v in args.variants}
    cpu_times = {v: [] for v in args.variants}
    losses, info, threads = {}, {}, {}
    for worker_set in range(args.sets):
        # Fresh processes per set: a bias of one process (heap layout, the core it runs on) then
        # does not repeat in every round.
        print(f"timing: set {worker_set + 1}/{args.sets}, starting {len(args.variants)} workers "
              f"({args.model}, batch {args.batch} x seq {args.seq})", flush=True)  # fmt: skip
        shift = worker_set % len(args.variants)  # each set starts its rounds with another variant
        workers = [Worker(args, v) for v in args.variants[shift:] + args.variants[:shift]]
        try:
            for rep in range(args.repeats):
                for w in workers:
                    answer = w.ask("time")
                    times[w.variant].append(answer["seconds"])
                    cpu_times[w.variant].append(answer["cpu_seconds"])
                    losses[w.variant] = answer["loss"]
                print(f"  round {rep + 1}/{args.repeats}: " + ", ".join(f"{w.variant} {times[w.variant][-1]:.2f}s" for w in workers), flush=True)
        finally:
            for w in workers:
                w.close()
        info.update({w.variant: w.info for w in workers})
        threads.update({w.variant: w.threads for w in workers})

    memory = {}
    if not args.no_memory:
        print("memory: one fresh worker at a time", flush=True)
        for variant in args.variants:
            w = Worker(args, variant, {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
            try:
                memory[variant] = w.ask("memory")
            finally:
                w.close()

    reference = "base" if "base" in args.variants else args.variants[0]
    results = {}
    for variant in args.variants:
        step_s = median(times[variant])
        entry = {
            "model": info[variant],
            "step_s": summary(times[variant]),
            "tokens_per_s": tokens / step_s,
            "time_ratio_vs_" + reference: ratio(step_s, median(times[reference])),
            "paired_time_ratio_median": median(a / b for a, b in zip(times[variant], times[reference])),
            "step_cpu_s": summary(cpu_times[variant]),
            "cpu_time_ratio_vs_" + reference: ratio(median(cpu_times[variant]), median(cpu_times[reference])),
            "loss": losses.get(variant),
        }
        if variant in memory:
            entry["memory"] = memory[variant]
            entry["allocation_peak_ratio_vs_" + reference] = ratio(
                memory[variant]["allocation_peak_bytes"], memory[reference]["allocation_peak_bytes"]
            )
            if "rss_step_peak_bytes" in memory[variant]:
                entry["rss_step_peak_ratio_vs_" + reference] = ratio(
                    memory[variant]["rss_step_peak_bytes"], memory[reference]["rss_step_peak_bytes"]
                )
        results[variant] = entry
    targets = {}
    if "mesh" in results and "base" in results:
        time_ratio = results["mesh"]["time_ratio_vs_base"]
        targets["mesh_vs_base_time"] = {"ratio": time_ratio, "max": 1 + TIME_TARGET, "ok": time_ratio <= 1 + TIME_TARGET}
        cpu_ratio = results["mesh"]["cpu_time_ratio_vs_base"]
        if args.device == "cpu":
            targets["mesh_vs_base_cpu_time"] = {"ratio": cpu_ratio, "max": 1 + TIME_TARGET, "ok": cpu_ratio <= 1 + TIME_TARGET}
        if memory:
            mem_ratio = results["mesh"]["allocation_peak_ratio_vs_base"]
            targets["mesh_vs_base_memory"] = {"ratio": mem_ratio, "max": 1 + MEMORY_TARGET, "ok": mem_ratio <= 1 + MEMORY_TARGET}

    payload = {
        "benchmark": "train_step",
        "environment": finish_environment(env),
        "settings": {
            k: getattr(args, k)
            for k in ("model", "loops", "prelude", "coda", "batch", "seq", "dtype", "device", "attn", "threads", "warmup", "repeats", "seed")
        }
        | {"tokens_per_step": tokens, "worker_threads": threads, "sets": args.sets},
        "method": "one process per variant; interleaved timed steps (zero_grad, forward with labels, backward), "
        "wall time (perf_counter) and process CPU time (process_time, less sensitive to other load on a shared machine); "
        "memory: torch.profiler allocation peak of one step above the memory held before it (CUDA: max_memory_allocated), "
        "and the step's RSS high-water mark above the RSS before it, with MALLOC_MMAP_THRESHOLD_=65536",
        "results": results,
        "targets": targets,
    }
    write_json(args.output, payload)

    rows = []
    for variant, r in results.items():
        m = r.get("memory", {})
        rows.append(
            [
                variant,
                r["model"]["layout"] or f"{r['model']['unrolled_layers']} layers",
                f"{r['model']['parameters'] / 1e6:.1f}M",
                fmt(r["step_s"]["median"], ".2f", " s"),
                fmt(r["tokens_per_s"], ",.0f"),
                fmt(r["time_ratio_vs_" + reference], ".3f"),
                fmt(r["cpu_time_ratio_vs_" + reference], ".3f"),
                mib(m.get("allocation_peak_bytes")),
                fmt(r.get("allocation_peak_ratio_vs_" + reference), ".3f"),
                mib(m.get("rss_step_peak_bytes")),
            ]
        )
    caption = "; ".join(
        f"{name}: {t['ratio']:.3f} (≤{t['max']:.2f}) {verdict(t['ok'])}" for name, t in targets.items()
    )
    print_table(
        f"training step, {args.model}, batch {args.batch} x seq {args.seq}, {args.dtype}, {args.device}, "
        f"{args.sets} x {args.repeats} interleaved rounds (medians)",
        ["variant", "layout", "params", "step", "tokens/s", f"time/{reference}", f"CPU time/{reference}", "alloc peak", f"alloc/{reference}", "RSS peak"],
        rows,
        caption=caption or None,
    )


if __name__ == "__main__":
    main()

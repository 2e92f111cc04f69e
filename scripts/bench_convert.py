"""Benchmark the converter: wall time against copying the same checkpoint bytes, and peak RSS
against the process baseline and the output shard size.

    python scripts/bench_convert.py --output benchmarks/convert-cpu.json
    python scripts/bench_convert.py --cases smollm2 --loops 2 --repeats 1      # quick

Cases: `pythia-1b` (a random pythia-1b-shaped float16 checkpoint, written once with
scripts/make_demo_checkpoint.py into $MESH_CONVERT_CACHE/bench) and `smollm2` (SmolLM2-135M,
float32, from scripts/get_smollm2.py), or any local checkpoint directory given as NAME=PATH.

Each repetition runs, one after another and each in its own process:
  baseline  `python -c "import torch, transformers, mesh_convert.convert.conversion, mesh_convert.cli"`
            (peak RSS and wall time of a process that only imports what the CLI imports);
  copy      `shutil.copyfile` of the source weight files into the work directory (in this process),
            and a user-space read/write copy of them;
  rewrite   a child that loads every tensor with safe_open and writes it back with save_file: what
            the safetensors library itself costs to pass the bytes through (context for the target);
  convert   `python -m mesh_convert.cli SRC --loops K --max-shard-size S --relax-rank 0 --json`
            for every K, with the default tie unless --convert-arg says otherwise (BENCHMARKS.md uses
            --convert-arg=--tie=average, the slowest tie: it reads K layers per core layer).
The source files are read once before every copy and every conversion (not timed), so both
read from the page cache (caches cannot be dropped without root on this kind of machine);
written data is flushed with sync() after each step (not timed) and the outputs deleted.
Peak RSS is wait4()'s ru_maxrss of that one child; a 5 ms /proc sampler adds the split into
anonymous memory and file-backed (memory-mapped) pages. The "shard" unit of the memory target
is the larger of --max-shard-size and the largest shard actually written (a tensor larger than
the limit gets a shard of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    BENCH_CACHE,
    REPO,
    SMOLLM2_DIR,
    drop_dirty_pages,
    environment,
    finish_environment,
    fmt,
    median,
    mib,
    print_table,
    ratio,
    run_child,
    summary,
    verdict,
    warm_read,
    write_json,
)

TIME_TARGET = 2.0  # conversion time <= 2x the copy time
SHARD_TARGET = 2.0  # peak RSS <= baseline + 2 shards
BASELINE_IMPORTS = "import torch, transformers, mesh_convert, mesh_convert.convert.conversion, mesh_convert.cli"
# ... and then print its own /proc status, for the anonymous / file-backed split of the baseline.
BASELINE_CODE = BASELINE_IMPORTS + "; print(open('/proc/self/status').read())"


def status_split(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def parse_size(text: str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    return parse_size_to_int(text)


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise SystemExit(f"error: no weight files in {directory}")
    return files


def resolve_case(spec: str, args) -> dict:
    """`pythia-1b`, `smollm2` or NAME=PATH -> name, source directory, shard size."""
    if spec == "pythia-1b":
        path = BENCH_CACHE / "pythia-1b-float16"
        if not (path / "config.json").is_file():
            print(f"writing a random pythia-1b-shaped float16 checkpoint to {path} (once)")
            subprocess.run(
                [sys.executable, str(REPO / "scripts" / "make_demo_checkpoint.py"), str(path), "--size", "1b", "--dtype", "float16"],
                check=True,
            )
        return {"name": "pythia-1b fp16", "path": path, "shard": args.pythia_shard_size}
    if spec == "smollm2":
        if not (SMOLLM2_DIR / "config.json").is_file():
            raise SystemExit(f"error: {SMOLLM2_DIR} is missing; run `python scripts/get_smollm2.py` first")
        return {"name": "SmolLM2 fp32", "path": SMOLLM2_DIR, "shard": args.smollm2_shard_size}
    name, sep, path = spec.partition("=")
    if not sep or not Path(path).is_dir():
        raise SystemExit(f"error: a case is pythia-1b, smollm2 or NAME=DIR, not {spec!r}")
    return {"name": name, "path": Path(path), "shard": args.pythia_shard_size}


def measure_copy(files: list[Path], workdir: Path, userspace: bool = False) -> float:
    """shutil.copyfile (an in-kernel sendfile copy on Linux), or with userspace=True a read/write
    loop through a 1 MiB buffer: what any converter that touches the bytes must at least do."""
    import time

    target = workdir / "copy"
    target.mkdir()
    warm_read(files)
    started = time.perf_counter()
    for file in files:
        if userspace:
            with open(file, "rb", buffering=0) as src, open(target / file.name, "wb", buffering=0) as dst:
                buffer = bytearray(1 << 20)
                view = memoryview(buffer)
                while n := src.readinto(buffer):
                    dst.write(view[:n])
        else:
            shutil.copyfile(file, target / file.name)
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    drop_dirty_pages()
    return seconds


# Read every tensor of each source file and write it back with safetensors.save_file: the floor for
# a converter that writes through the safetensors library (ours copies unchanged tensors in the
# kernel instead), timed in the child.
REWRITE_CODE = """
import sys, time
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
started = time.perf_counter()
for name in sys.argv[2:]:
    with safe_open(name, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, Path(sys.argv[1]) / Path(name).name, metadata={"format": "pt"})
    del tensors
print(time.perf_counter() - started)
"""


def measure_rewrite(files: list[Path], workdir: Path) -> float | None:
    """Seconds of a safetensors load-and-save of the source files (None for .bin sources)."""
    if any(f.suffix != ".safetensors" for f in files):
        return None
    target = workdir / "rewrite"
    target.mkdir()
    warm_read(files)
    run = run_child([sys.executable, "-c", REWRITE_CODE, str(target), *map(str, files)], sample=False)
    shutil.rmtree(target)
    drop_dirty_pages()
    if run["returncode"] != 0:
        raise SystemExit(f"error: the safetensors rewrite failed:\n{run['stderr'][-3000:]}")
    return float(run["stdout"].split()[-1])


def measure_convert(case: dict, files: list[Path], loops: int, workdir: Path, args) -> dict:
    out = workdir / f"out-k{loops}"
    cmd = [
        sys.executable, "-m", "mesh_convert.cli", str(case["path"]),
        "--loops", str(loops),
        "--max-shard-size", case["shard"],
        "--relax-rank", "0",
        "-o", str(out),
        "--json",
        *args.convert_arg,
    ]  # fmt: skip
    warm_read(files)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    run = run_child(cmd, env=env)
    if run["returncode"] != 0:
        raise SystemExit(f"error: conversion failed ({run['returncode']}):\n{run['stderr'][-3000:]}")
    info = json.loads(run["stdout"])
    shard_sizes = [(out / name).stat().st_size for name in info["shards"]]
    shutil.rmtree(out)
    drop_dirty_pages()
    return {
        "wall_s": run["wall_s"],
        "self_s": info["seconds"],
        "maxrss_bytes": run["maxrss_bytes"],
        "sampled_peak_bytes": run["sampled_peak_bytes"],
        "layout": info["layout"],
        "output_bytes": info["bytes"],
        "shard_sizes": shard_sizes,
        "user_s": run["user_s"],
        "sys_s": run["sys_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["pythia-1b", "smollm2"], help="pythia-1b, smollm2 or NAME=DIR")
    parser.add_argument("--loops", nargs="+", type=int, default=[2, 3], help="K values to convert with")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (medians are reported)")
    parser.add_argument("--pythia-shard-size", default="500MB", help="--max-shard-size for pythia-1b and NAME=DIR cases")
    parser.add_argument("--smollm2-shard-size", default="200MB", help="--max-shard-size for SmolLM2 (its output is ~400 MB)")
    parser.add_argument("--convert-arg", action="append", default=[], help="extra converter argument (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the conversions (0: not set, torch's default)")
    parser.add_argument("--workdir", type=Path, default=None, help="where copies and outputs go (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    env = environment()
    cases = [resolve_case(spec, args) for spec in args.cases]
    workdir = Path(tempfile.mkdtemp(prefix="mesh-bench-convert-", dir=args.workdir))
    results = []
    try:
        for case in cases:
            files = weight_files(case["path"])
            source_bytes = sum(f.stat().st_size for f in files)
            runs = {"baseline": [], "copy": [], "copy_userspace": [], "rewrite": [], **{k: [] for k in args.loops}}
            for rep in range(args.repeats):
                print(f"{case['name']}: repetition {rep + 1}/{args.repeats}", flush=True)
                base = run_child([sys.executable, "-c", BASELINE_CODE])
                base["status_at_exit"] = status_split(base.pop("stdout"))
                runs["baseline"].append(base)
                runs["copy"].append(measure_copy(files, workdir))
                runs["copy_userspace"].append(measure_copy(files, workdir, userspace=True))
                runs["rewrite"].append(measure_rewrite(files, workdir))
                for loops in args.loops:
                    runs[loops].append(measure_convert(case, files, loops, workdir, args))
            baseline_rss = median(r["maxrss_bytes"] for r in runs["baseline"])
            baseline_wall = median(r["wall_s"] for r in runs["baseline"])
            copy_s = median(runs["copy"])
            rewrite_s = None if None in runs["rewrite"] else median(runs["rewrite"])
            for loops in args.loops:
                conv = runs[loops]
                shard_limit = parse_size(case["shard"])
                largest = max(max(r["shard_sizes"]) for r in conv)
                unit = max(shard_limit, largest)
                peak = median(r["maxrss_bytes"] for r in conv)
                self_s = median(r["self_s"] for r in conv)
                wall_s = median(r["wall_s"] for r in conv)
                shards_over = (peak - baseline_rss) / unit
                results.append(
                    {
                        "case": case["name"],
                        "source": str(case["path"]),
                        "source_files": [f.name for f in files],
                        "source_bytes": source_bytes,
                        "loops": loops,
                        "layout": conv[0]["layout"],
                        "max_shard_size": case["shard"],
                        "shard_unit_bytes": unit,
                        "output_bytes": conv[0]["output_bytes"],
                        "output_shards": conv[0]["shard_sizes"],
                        "copy_s": summary(runs["copy"]),
                        "convert_self_s": summary(r["self_s"] for r in conv),
                        "convert_wall_s": summary(r["wall_s"] for r in conv),
                        "copy_userspace_s": summary(runs["copy_userspace"]),
                        "safetensors_rewrite_s": None if rewrite_s is None else summary(runs["rewrite"]),
                        "time_ratio_vs_safetensors_rewrite": None if rewrite_s is None else ratio(self_s, rewrite_s),
                        "baseline_wall_s": summary(r["wall_s"] for r in runs["baseline"]),
                        "time_ratio": ratio(self_s, copy_s),
                        "time_ratio_wall_minus_startup": ratio(wall_s - baseline_wall, copy_s),
                        "time_ratio_wall": ratio(wall_s, copy_s),
                        "time_ratio_vs_userspace_copy": ratio(self_s, median(runs["copy_userspace"])),
                        "time_target": TIME_TARGET,
                        "time_ok": self_s <= TIME_TARGET * copy_s,
                        "peak_rss_bytes": peak,
                        "baseline_rss_bytes": baseline_rss,
                        "peak_minus_baseline_in_shards": shards_over,
                        "peak_rss_over_source_bytes": peak / source_bytes,
                        "memory_target_shards": SHARD_TARGET,
                        "memory_ok": peak <= baseline_rss + SHARD_TARGET * unit,
                        "sampled_peak_anon_bytes": max(r["sampled_peak_bytes"]["RssAnon"] for r in conv),
                        "sampled_peak_file_bytes": max(r["sampled_peak_bytes"]["RssFile"] for r in conv),
                        "baseline_anon_bytes": median(r["status_at_exit"].get("RssAnon", 0) for r in runs["baseline"]),
                        "baseline_file_bytes": median(r["status_at_exit"].get("RssFile", 0) for r in runs["baseline"]),
                        "convert_user_s": median(r["user_s"] for r in conv),
                        "convert_sys_s": median(r["sys_s"] for r in conv),
                        "runs": [{k: v for k, v in r.items() if k != "shard_sizes"} for r in conv],
                    }
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    # K=2 vs K=3 (or whichever two K came first) per case.
    comparisons = []
    for case in cases:
        rows = [r for r in results if r["case"] == case["name"]]
        for other in rows[1:]:
            first = rows[0]
            comparisons.append(
                {
                    "case": case["name"],
                    "a": first["layout"],
                    "b": other["layout"],
                    "time_b_over_a": ratio(other["convert_self_s"]["median"], first["convert_self_s"]["median"]),
                    "peak_rss_b_over_a": ratio(other["peak_rss_bytes"], first["peak_rss_bytes"]),
                    "output_bytes_b_over_a": ratio(other["output_bytes"], first["output_bytes"]),
                }
            )

    payload = {
        "benchmark": "convert",
        "environment": finish_environment(env),
        "method": {
            "repeats": args.repeats,
            "baseline_process": BASELINE_IMPORTS,
            "copy": "shutil.copyfile of the source weight files, after a warm-up read (page cache)",
            "copy_userspace": "read/write loop with a 1 MiB buffer, same files (context only; the target is against copyfile)",
            "safetensors_rewrite": "safe_open + get_tensor of every tensor, then save_file, per source file, timed in a child",
            "convert_threads": args.threads or "torch default",
            "convert": "python -m mesh_convert.cli SRC --loops K --max-shard-size S --relax-rank 0 -o OUT --json "
            + " ".join(args.convert_arg),
            "time_ratio": "converter's own seconds (from --json: open source .. rename output) / copy seconds",
            "peak_rss": "wait4 ru_maxrss of the conversion process; anon/file split from a 5 ms /proc sampler",
            "page_cache": "source files warm-read before each copy and conversion; sync() after each, not timed",
        },
        "targets": {"time_ratio_max": TIME_TARGET, "peak_rss_max": "baseline + 2 shards"},
        "results": results,
        "k_comparison": comparisons,
    }
    write_json(args.output, payload)

    print_table(
        f"conversion time ({args.repeats} repetitions, medians)",
        ["case", "layout", "source", "output", "copy", "convert", "convert/copy (≤2)", "user-space copy",
         "safetensors rewrite", "CLI wall"],
        [
            [
                r["case"],
                r["layout"],
                mib(r["source_bytes"]),
                mib(r["output_bytes"]),
                fmt(r["copy_s"]["median"], ".2f", " s"),
                fmt(r["convert_self_s"]["median"], ".2f", " s"),
                fmt(r["time_ratio"], ".2f", "x ") + verdict(r["time_ok"]),
                fmt(r["copy_userspace_s"]["median"], ".2f", " s"),
                fmt((r["safetensors_rewrite_s"] or {}).get("median"), ".2f", " s"),
                fmt(r["convert_wall_s"]["median"], ".1f", " s"),
            ]
            for r in results
        ],
        caption="convert: the converter's own seconds (--json); copy: shutil.copyfile (in-kernel); user-space copy: "
        "read/write, 1 MiB buffer; safetensors rewrite: load every tensor and save_file it (the library's floor); "
        "CLI wall adds interpreter start and imports",
    )
    print_table(
        "conversion peak RSS",
        ["case", "layout", "shard (n)", "peak RSS", "baseline", "(peak-base)/shard (≤2)", "anon / file peak"],
        [
            [
                r["case"],
                r["layout"],
                f"{r['max_shard_size']} ({len(r['output_shards'])})",
                mib(r["peak_rss_bytes"]),
                mib(r["baseline_rss_bytes"]),
                fmt(r["peak_minus_baseline_in_shards"], ".2f", " ") + verdict(r["memory_ok"]),
                f"{mib(r['sampled_peak_anon_bytes'])} / {mib(r['sampled_peak_file_bytes'])}",
            ]
            for r in results
        ],
        caption="anon / file: sampled peaks of anonymous and file-backed (mmap) RSS; baseline = imports only",
    )
    if comparisons:
        print_table(
            "K comparison",
            ["case", "a", "b", "time b/a", "peak RSS b/a", "output b/a"],
            [
                [c["case"], c["a"], c["b"], fmt(c["time_b_over_a"], ".2f"), fmt(c["peak_rss_b_over_a"], ".2f"), fmt(c["output_bytes_b_over_a"], ".2f")]
                for c in comparisons
            ],
        )


if __name__ == "__main__":
    main()

"""The stages of `scripts/gpu_check` (run that wrapper: it installs the carried wheels first).

    python scripts/gpu_check.py --device cuda --results DIR [--only STAGE,...] [--no-compile]

Each stage is timed and recorded in DIR/gpu_check.json as it ends (status ok / failed /
unavailable / skipped, its numbers, and the end of its output when it failed), so a run cut
short still leaves what it did. Launched runs log to DIR/gpu_check.log. On cuda the shapes are
the real ones (pythia-410m and -1.4b, sequence 2048); `--device cpu` runs the same code with
tiny shapes. Stages that would start after --budget-s are skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, median  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 peak of the GPUs this check is meant for (NVIDIA's data sheets), for MFU.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
# Most telling first: a run cut by the time budget has still checked the paths users take first.
STAGES = ["environment", "gpu_tests", "convert", "train_fsdp2", "train_ddp", "train_speed", "generate",
          "train_speed_compiled", "train_deepspeed"]


def shapes(device: str) -> dict:
    """What each stage runs at: the real sizes on a GPU, tiny ones for the CPU rehearsal."""
    if device == "cuda":
        return {"convert": ["410m", "1.4b"], "train_model": "1.4b", "layout": (4, 2, 4), "block": 512, "micro": 4,
                "steps": 4, "bench_seq": 2048, "bench_batch": 4, "bench_steps": (3, 5), "prompt": 128,
                "new_tokens": 128, "dtype": "bfloat16"}
    return {"convert": ["tiny-a", "tiny-b"], "train_model": "tiny-b", "layout": (1, 2, 1), "block": 32, "micro": 2,
            "steps": 4, "bench_seq": 64, "bench_batch": 2, "bench_steps": (1, 2), "prompt": 16, "new_tokens": 8,
            "dtype": "bfloat16"}


def source_config(size: str):
    """A Pythia-shaped GPT-NeoX config: the real one, or a tiny stand-in for the rehearsal."""
    from transformers import GPTNeoXConfig

    from mesh_convert.convert.pythia import pythia_config

    if not size.startswith("tiny"):
        return pythia_config(size)
    layers = {"tiny-a": 4, "tiny-b": 6}[size]
    return GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=256, rotary_pct=0.25,
                         use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


class Check:
    def __init__(self, args):
        self.device = args.device
        self.shape = shapes(args.device)
        self.compile = not args.no_compile
        self.results_dir = Path(args.results)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.log = self.results_dir / "gpu_check.log"
        self.log.write_text("")
        self.deadline = time.monotonic() + args.budget_s
        budget = args.budget_s if math.isfinite(args.budget_s) else None
        self.results = {"device": args.device, "shapes": self.shape, "budget_s": budget, "stages": {}}
        self.sources: dict[str, Path] = {}
        self.converted: dict[str, Path] = {}

    # -- bookkeeping -----------------------------------------------------------------------------

    def run(self, stages: list[str]) -> int:
        started = time.monotonic()
        for name in stages:
            if time.monotonic() > self.deadline:
                self.record(name, {"status": "skipped",
                                   "reason": f"over the time budget (--budget-s); rerun with --only {name}"})
                continue
            print(f"== {name}", flush=True)
            stage_start = time.monotonic()
            try:
                result = getattr(self, f"stage_{name}")()
            except Exception as error:  # a stage's failure is a result; the next stages still run
                result = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc()[-3000:]}
            result.setdefault("status", "ok")
            result["seconds"] = round(time.monotonic() - stage_start, 2)
            self.record(name, result)
            print(f"   {result['status']} in {result['seconds']} s", flush=True)
        self.results["seconds"] = round(time.monotonic() - started, 2)
        self.write()
        shutil.rmtree(self.work, ignore_errors=True)
        failed = [name for name, r in self.results["stages"].items() if r["status"] == "failed"]
        print(f"results: {self.results_dir / 'gpu_check.json'}; failed: {', '.join(failed) or 'none'}")
        return 1 if failed else 0

    def record(self, name: str, result: dict) -> None:
        self.results["stages"][name] = result
        self.write()

    def write(self) -> None:
        path = self.results_dir / "gpu_check.json"
        path.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def command(self, argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a child, its output appended to the log; raise with the output's end on failure."""
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **(env or {})})
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(argv)}\n{result.stdout}{result.stderr}")
        if result.returncode != 0:
            raise RuntimeError(f"exit {result.returncode}: {(result.stdout + result.stderr)[-2000:]}")
        return result

    # -- stages ----------------------------------------------------------------------------------

    def stage_environment(self) -> dict:
        import importlib.metadata

        import torch

        info = environment(self.device)
        for name in ("transformers", "huggingface_hub", "accelerate", "peft", "safetensors", "pydantic", "deepspeed"):
            try:
                info[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                info[name] = None
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda, but torch sees no CUDA device")
            info["cuda"] = torch.version.cuda
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        return info

    def stage_gpu_tests(self) -> dict:
        report = self.work / "gpu-tests.xml"
        argv = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                f"--junitxml={report}"]
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240,
                                env={**os.environ, "GPU_CHECK_DEVICE": self.device})
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(argv)}\n{result.stdout}{result.stderr}")
        if not report.is_file():
            raise RuntimeError(f"pytest wrote no report: {(result.stdout + result.stderr)[-2000:]}")
        cases = []
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            message = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
            cases.append({"test": case.get("name"), "outcome": outcome, "message": message[:500]})
        counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failure", "error", "skipped")}
        status = "ok" if result.returncode == 0 and counts["passed"] else "failed"
        return {"status": status, "counts": counts, "tests": cases}

    def stage_convert(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

        import mesh_convert.modeling  # noqa: F401  (registers MeSH with the Auto classes)

        out = {}
        prelude, loops, coda = self.shape["layout"]
        for size in self.shape["convert"]:
            source = self.work / f"pythia-{size}"
            started = time.monotonic()
            torch.manual_seed(0)
            with torch.device(self.device):  # random init on the GPU: seconds instead of a minute on CPU
                model = GPTNeoXForCausalLM(source_config(size)).to(torch.float16)
            model.save_pretrained(source)
            del model
            made = time.monotonic() - started
            target = self.work / f"pythia-{size}-mesh"
            started = time.monotonic()
            self.command([sys.executable, "-m", "mesh_convert.cli", "convert", str(source), "--loops", str(loops),
                          "--prelude", str(prelude), "--coda", str(coda), "-o", str(target)], timeout=300)
            converted = time.monotonic() - started
            mesh = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16).to(self.device).eval()
            ids = torch.randint(0, 512, (1, 32), device=self.device)
            with torch.no_grad():
                finite = bool(torch.isfinite(mesh(ids).logits).all())
            out[size] = {"random_source_s": round(made, 2), "convert_s": round(converted, 2),
                         "layout": mesh.config.layout, "parameters": mesh.num_parameters(), "logits_finite": finite,
                         "bytes": sum(f.stat().st_size for f in target.glob("*.safetensors"))}
            del mesh
            self.sources[size], self.converted[size] = source, target
            if not finite:
                return {"status": "failed", "error": f"non-finite logits from the converted {size}", "models": out}
        return {"models": out}

    def _tokenizer_and_text(self) -> tuple[Path, Path]:
        """A character tokenizer (ids < 128) and a text of random words: no network needed."""
        tokenizer_dir, text = self.work / "tokenizer", self.work / "train.txt"
        if not tokenizer_dir.is_dir():
            from tokenizers import Tokenizer, decoders, models
            from transformers import PreTrainedTokenizerFast

            vocab = {"<eos>": 0, "\n": 1, "<unk>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
            tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
            tokenizer.decoder = decoders.Fuse()
            PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(tokenizer_dir)
            rng = random.Random(0)
            words = "the a king queen said to of and my lord good sir come go now here there love death".split()
            text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(20000)))
        return tokenizer_dir, text

    def _train(self, config: str) -> dict:
        """A few steps of the converted model through `accelerate launch` with one of the
        project's configs (one process), a checkpoint, then a second launch that resumes from it
        and must give the same later losses."""
        model = self.converted.get(self.shape["train_model"])
        if model is None:
            return {"status": "skipped", "reason": "the convert stage made no model"}
        tokenizer, text = self._tokenizer_and_text()
        output = self.work / f"train-{Path(config).stem}"
        steps = self.shape["steps"]
        recipe = {
            "model": str(model), "tokenizer": str(tokenizer), "output_dir": str(output), "seed": 1,
            "data": {"train": [str(text)], "block_size": self.shape["block"], "eval_blocks": 2},
            "optim": {"lr": 1e-4, "warmup": 0.0},
            "train": {"global_batch_size": self.shape["micro"], "micro_batch_size": self.shape["micro"],
                      "max_steps": steps, "mixed_precision": "bf16", "eval_every": 0},
            "checkpoint": {"every": steps // 2, "keep_last": 1},
        }
        path = self.work / f"{output.name}.yaml"
        path.write_text(json.dumps(recipe))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "1",
                  "--main_process_port", "0", "-m", "mesh_convert.train", str(path)]
        started = time.monotonic()
        self.command(launch, timeout=600)
        first_s = time.monotonic() - started
        first = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        info = json.loads((output / "model" / "conversion.json").read_text())["training"]
        started = time.monotonic()
        self.command([*launch, "checkpoint.resume=auto"], timeout=600)
        resumed_s = time.monotonic() - started
        second = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        # GPU kernels with atomics make the step after the resume differ in the last digits; a
        # resume that lost the optimizer state or the data position differs by far more.
        later = [r["loss"] for r in first if r["step"] > steps // 2]
        again = [r["loss"] for r in second if r["step"] > steps // 2]
        resumed_equal = len(later) == len(again) > 0 and all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(later, again))
        shutil.rmtree(output)  # at 1.4b a run's checkpoint and model are ~16 GB: the next launch needs the disk
        return {
            "status": "ok" if resumed_equal else "failed",
            "config": config, "distributed": info["distributed"], "processes": info["processes"],
            "losses": [r["loss"] for r in first], "eval_loss": first[-1].get("eval_loss"),
            "tokens_per_s": first[-1].get("tokens_per_s"), "resumed_losses": again, "resume_matches": resumed_equal,
            "launch_s": round(first_s, 2), "resume_launch_s": round(resumed_s, 2),
        }

    def stage_train_fsdp2(self) -> dict:
        return self._train("recipes/accelerate/fsdp2.yaml")

    def stage_train_ddp(self) -> dict:
        return self._train("recipes/accelerate/ddp.yaml")

    def stage_train_deepspeed(self) -> dict:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return {"status": "unavailable",
                    "reason": "DeepSpeed is not installed (PyPI has only its source; `scripts/gpu_check --prepare` "
                              "carries it and the wrapper builds it offline, which failed or was not carried)"}
        if self.device != "cuda":
            return {"status": "unavailable", "reason": "DeepSpeed ZeRO needs a CUDA device"}
        return self._train("recipes/accelerate/deepspeed-zero2.yaml")

    # -- speed -----------------------------------------------------------------------------------

    def _variants(self, size: str, variants=("mesh", "base", "original")):
        """mesh and base conversions of a random source of this shape, and the source itself,
        all built on the device (a 1.4b init takes seconds there, most of a minute on CPU)."""
        import torch
        from transformers import GPTNeoXForCausalLM

        from mesh_convert.convert.conversion import convert_model

        prelude, loops, coda = self.shape["layout"]
        torch.manual_seed(0)
        with torch.device(self.device):
            source = GPTNeoXForCausalLM(source_config(size))
        for variant in variants:
            if variant == "original":
                continue
            with torch.device(self.device):  # not held across the yield: the caller's tensors are its own
                model = convert_model(source.to(self.device), loops=loops, prelude=prelude, coda=coda,
                                      variant=variant, relax_rank=0)
            source.to("cpu")  # off the device while the variant is measured: its peak memory is its own
            if self.device == "cuda":
                torch.cuda.empty_cache()
            yield variant, model
            del model
        if "original" in variants:
            yield "original", source.to(self.device)

    def _flops_per_token(self, config, seq: int) -> float:
        """6 N + 12 L s d (PaLM's count): N the parameters a token passes through (the unrolled
        stack and the head, not the input embedding), L the unrolled layers."""
        d, layers = config.hidden_size, config.num_hidden_layers
        per_layer = 4 * d * d + 2 * d * config.intermediate_size
        return 6 * (layers * per_layer + d * config.vocab_size) + 12 * layers * seq * d

    def _train_speed(self, compiled: bool) -> dict:
        import torch

        seq, batch = self.shape["bench_seq"], self.shape["bench_batch"]
        warmup, timed = self.shape["bench_steps"]
        size = self.shape["train_model"]
        flops = self._flops_per_token(source_config(size), seq)
        cuda = self.device == "cuda"
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if cuda and k in torch.cuda.get_device_name()), None)
        out = {"shape": size, "seq": seq, "batch": batch, "flops_per_token": flops, "peak_flops": peak, "models": {}}
        ids = torch.randint(0, 512, (batch, seq), device=self.device)

        def sync():
            if cuda:
                torch.cuda.synchronize()

        for variant, model in self._variants(size):
            model.to(self.device).train()
            if compiled:
                model.compile()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
            if cuda:
                torch.cuda.reset_peak_memory_stats()

            def step():
                with torch.autocast(self.device, dtype=torch.bfloat16):  # as Accelerate's bf16
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for _ in range(warmup):
                step()
            times = []
            for _ in range(timed):
                sync()
                started = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - started)
            tokens_per_s = batch * seq / median(times)
            out["models"][variant] = {
                "tokens_per_s": round(tokens_per_s, 1),
                "mfu": round(flops * tokens_per_s / peak, 4) if peak else None,
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                "step_s": [round(t, 4) for t in times],
            }
            del model, optimizer
            if cuda:
                torch.cuda.empty_cache()
            torch._dynamo.reset()
        speeds = {k: v["tokens_per_s"] for k, v in out["models"].items()}
        out["mesh_vs_base"] = round(speeds["mesh"] / speeds["base"], 4)
        out["mesh_vs_original"] = round(speeds["mesh"] / speeds["original"], 4)
        return out

    def stage_train_speed(self) -> dict:
        return self._train_speed(compiled=False)

    def stage_train_speed_compiled(self) -> dict:
        if not self.compile:
            return {"status": "skipped", "reason": "--no-compile"}
        return self._train_speed(compiled=True)

    def stage_generate(self) -> dict:
        """Cached greedy generation, exactly N new tokens: mesh against the original."""
        import torch

        size = self.shape["train_model"]
        prompt, new = self.shape["prompt"], self.shape["new_tokens"]
        ids = torch.randint(0, 512, (1, prompt), device=self.device)
        out = {"shape": size, "prompt": prompt, "new_tokens": new, "models": {}}
        for variant, model in self._variants(size, ("mesh", "original")):
            model = model.to(self.device, torch.bfloat16).eval()

            def generate():
                if self.device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                model.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
                if self.device == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - started

            generate()  # warm-up
            times = [generate() for _ in range(3)]
            out["models"][variant] = {"tokens_per_s": round(new / median(times), 1), "seconds": [round(t, 4) for t in times]}
            del model
        out["mesh_vs_original"] = round(out["models"]["mesh"]["tokens_per_s"] / out["models"]["original"]["tokens_per_s"], 4)
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--results", default="gpu-check-results")
    parser.add_argument("--only", help=f"comma-separated stages, of: {', '.join(STAGES)}")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled training speed")
    parser.add_argument("--budget-s", type=float,
                        help="start no stage after this many seconds (default: 450 on cuda, to end within 8 minutes; "
                             "none on cpu)")
    args = parser.parse_args()
    if args.budget_s is None:
        args.budget_s = 450.0 if args.device == "cuda" else math.inf
    stages = STAGES if not args.only else args.only.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        print(f"error: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 1
    check = Check(args)
    if "convert" not in stages and any(s.startswith("train_") and "speed" not in s for s in stages):
        stages = ["convert", *stages]  # the launches train the converted model
    return check.run(stages)


if __name__ == "__main__":
    raise SystemExit(main())

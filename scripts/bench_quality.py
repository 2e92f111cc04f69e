"""Quality of conversions of a real pretrained model (SmolLM2-135M, Llama architecture, 30
layers) on WikiText-2 test: perplexity at step 0 for every conversion choice, and after short
healing runs at an equal token budget. Writes JSON; BENCHMARKS.md summarises it.

    python scripts/bench_quality.py --output benchmarks/quality-smollm2.json            # CPU, about an hour
    python scripts/bench_quality.py --heal-steps 2000 --device cuda --output ...        # a real healing run

Perplexity: sliding windows (context = stride = --context) over the first --eval-tokens tokens of
../shared/data/wikitext-2-raw/wiki.test.raw. Healing trains on wiki.valid.raw (another split of
the same corpus), so the test text is never trained on.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

import mesh_convert.modeling  # noqa: F401  (registers MeSH with the Auto classes)
from mesh_convert.convert.conversion import convert_model
from mesh_convert.eval.perplexity import perplexity
from mesh_convert.train.recipe import Recipe
from mesh_convert.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
console = Console(stderr=True)


def unique_parameters(model) -> dict:
    """Non-embedding unique parameters, routers and relax deltas (embedding and head excluded)."""
    embedding = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    counts = {"nonembedding": 0, "routers": 0, "relax": 0}
    for name, param in model.named_parameters():
        if id(param) in embedding:
            continue
        key = "routers" if ".memory." in name else "relax" if "_delta" in name else "nonembedding"
        counts[key] += param.numel()
    return counts


class Evaluator:
    def __init__(self, tokenizer, text: str, context: int, tokens: int, device: str):
        self.tokenizer, self.text, self.context, self.tokens, self.device = tokenizer, text, context, tokens, device

    def __call__(self, model) -> float:
        model = model.to(self.device).eval()
        with torch.no_grad():
            result = perplexity(
                model, self.tokenizer, self.text, context=self.context, stride=self.context, max_tokens=self.tokens
            )
        return result.perplexity


def best_tie(rows: list[dict]) -> str:
    return min((r for r in rows if r["group"] == "tie" and r["options"]["loops"] == 2), key=lambda r: r["ppl"])["options"]["tie"]


def step0_rows(source, evaluate) -> list[dict]:
    """Perplexity right after conversion, for each choice the converter offers."""
    rows = [{"group": "original", "config": "original (30 layers)", "ppl": evaluate(source), **unique_parameters(source)}]
    console.print(f"{'original':10s} {'30 layers':34s} ppl {rows[0]['ppl']:12.2f}")

    def add(group: str, label: str, **options):
        started = time.perf_counter()
        model = convert_model(source, **options)
        ppl = evaluate(model)
        rows.append({"group": group, "config": label, "layout": model.config.layout, "options": options, "ppl": ppl,
                     **unique_parameters(model)})
        console.print(f"{group:10s} {label:34s} ppl {ppl:12.2f}  ({time.perf_counter() - started:.0f} s)")

    for loops in (2, 3):
        for tie in ("average", "stepwise", "lower", "upper"):
            add("tie", f"K={loops} tie={tie}", loops=loops, tie=tie)
    tie = best_tie(rows)
    for relax_tie in sorted({tie, "average"}):
        for rank in (0, 32, 128, 320, "full"):
            svd = {"relax_init": "svd"} if rank else {}  # the step-0 function of the SVD start, by rank
            add("relax", f"K=2 {relax_tie} relax={rank}", loops=2, tie=relax_tie, relax_rank=rank, **svd)
    for variant in ("base", "residual", "anchor", "anchor_emb", "mesh"):
        add("variant", f"K=2 {tie} variant={variant}", loops=2, tie=tie, variant=variant)
    # The router gap only matters where the rest is exact: at full relaxation, a gap that leaks
    # mass off the target slot is the only thing that separates the model from the original.
    for gap in (2, 4, 6, 8, 12, 16):
        add("gap", f"K=2 relax=full gap={gap}", loops=2, tie=tie, relax_rank="full", router_gap=gap)
    for prelude in (8, 12):
        add("layout", f"K=2 {tie} P=Q={prelude}", loops=2, tie=tie, prelude=prelude, coda=prelude)
    return rows


def trained_row(group, label, source, tokenizer, evaluate, args, workdir: Path, convert_options, recipe_extra) -> dict:
    """Convert, train with `recipe_extra` for --heal-steps on wiki.valid.raw, evaluate the result."""
    run = workdir / f"{group}-{len(list(workdir.iterdir()))}"
    convert_options = {"tie": args.tie, "loops": args.heal_loops, **convert_options}
    converted = convert_model(source, **convert_options)
    converted.save_pretrained(run / "start")
    tokenizer.save_pretrained(run / "start")
    before = evaluate(converted)
    recipe = {
        "model": str(run / "start"),
        "output_dir": str(run / "train"),
        "seed": 0,
        "data": {"train": [str(SHARED / "data/wikitext-2-raw/wiki.valid.raw")], "block_size": args.block_size,
                 "eval_blocks": 4},
        "optim": {"lr": args.heal_lr, "router_lr_mult": 1},  # x1 unless a run says otherwise
        "train": {"global_batch_size": args.batch_size, "micro_batch_size": args.batch_size,
                  "max_steps": args.heal_steps, "eval_every": 0},
    }
    for key, value in recipe_extra.items():  # sections merge, so an `optim` extra keeps the lr
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    recipe = Recipe.model_validate(recipe)
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = train(recipe, console=console)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    trained = AutoModelForCausalLM.from_pretrained(run / "train" / "model", dtype=torch.float32)
    row = {"group": group, "config": label, "layout": trained.config.layout, "variant": trained.config.variant,
           "options": convert_options, "recipe_extra": recipe_extra,
           "ppl_before": before, "ppl": evaluate(trained), "tokens": summary["tokens"], "steps": summary["steps"],
           "seconds": seconds, "cpu_seconds": cpu_seconds, "relax_rank_after": trained.config.relax_rank,
           **unique_parameters(trained)}
    console.print(f"{group:10s} {label:34s} ppl {before:12.2f} -> {row['ppl']:10.2f}  ({seconds:.0f} s)")
    return row


HEAL_RUNS = ("lm", "distill", "anneal", "ties", "gap-learn", "variants", "router-lr", "relax", "relax-zero", "layouts",
             "core", "distill-t", "original")


def heal_rows(source, source_dir: Path, tokenizer, evaluate, args, workdir: Path):
    """Short runs at one token budget (--heal-steps x --batch-size x --block-size), chosen by --heal-runs:
    lm / distill / anneal compare healing methods after the --tie conversion; `ties` heals every
    other tie strategy with LM loss (the `lm` row is the --tie one); `gap-learn` trains only the
    routers from each router gap, to see how fast they move away from the function-preserving init;
    `variants` heals the --tie conversion as each recurrence (MeSH also with a 10x router learning rate),
    so MeSH's trained routers meet plain recursion at an equal budget (`router-lr`: the routers at an
    absolute peak rate of 1e-2, the best rate from scratch at every model rate); `relax` keeps low-rank deltas and
    trains them with the model (`relax-zero`: deltas that start at zero, LoRA-style), `layouts` ties fewer layers (more parameters for the same compute):
    parameters against healed quality; `core` trains only the looped core and the routers, `distill-t`
    distils at temperatures 2 and 4: the healing recipe's knobs (its learning rate is --heal-lr);
    `original` trains the unconverted model alike (K=1, base: every layer its own), the reference
    that separates what healing repairs from what the training text alone teaches."""
    anneal = {"target_rank": 0, "steps": max(1, int(args.heal_steps * 0.8)), "every": max(1, args.heal_steps // 10)}
    runs = {
        "lm": [("heal", f"tie-then-heal (LM loss), {args.tie}", {"relax_rank": 0}, {})],
        "distill": [("heal", f"tie-then-heal + distillation, {args.tie}", {"relax_rank": 0},
                     {"distill": {"teacher": str(source_dir)}})],
        "anneal": [("heal", f"annealed tying (full -> 0), {args.tie}", {"relax_rank": "full"}, {"anneal": anneal})],
        "ties": [("tie-heal", f"tie-then-heal (LM loss), {tie}", {"relax_rank": 0, "tie": tie}, {})
                 for tie in ("average", "stepwise", "lower", "upper") if tie != args.tie],
        "gap-learn": [("gap-learn", f"routers only, gap={gap}", {"router_gap": gap}, {"trainable": "routers"})
                      for gap in (4, 8, 16)],
        "variants": [("variant", f"{args.tie}, variant {variant}{label}", {"relax_rank": 0, "variant": variant}, extra)
                     for variant, label, extra in (("mesh", "", {}), ("base", "", {}),
                                                   ("mesh", ", router lr x10", {"optim": {"router_lr_mult": 10}}),
                                                   ("anchor", "", {}), ("residual", "", {}))],
        "relax": [("relax", f"{args.tie}, relax rank {rank} (deltas trained)", {"relax_rank": rank, "relax_init": "svd"}, {})
                  for rank in (16, 64, 128)],
        "router-lr": [("variant", f"{args.tie}, variant mesh, routers at lr 0.01", {"relax_rank": 0, "variant": "mesh"},
                       {"optim": {"router_lr_mult": 1e-2 / args.heal_lr}})],
        "relax-zero": [("relax", f"{args.tie}, relax rank {rank} zero start", {"relax_rank": rank, "relax_init": "zero"}, {})
                       for rank in (16, 64)],
        "layouts": [("layout", f"{args.tie}, P=Q={outer}", {"relax_rank": 0, "prelude": outer, "coda": outer}, {})
                    for outer in args.outer_layers],
        "core": [("knob", f"{args.tie}, core+routers train", {"relax_rank": 0}, {"trainable": "core+routers"})],
        "distill-t": [("knob", f"{args.tie}, distillation T={t}", {"relax_rank": 0},
                       {"distill": {"teacher": str(source_dir), "temperature": t}}) for t in (2.0, 4.0)],
        "original": [("reference", "untied (K=1, base): the original", {"relax_rank": 0, "loops": 1, "variant": "base"},
                      {})],
    }
    for name in args.heal_runs:  # a generator, so each row is saved as soon as it exists
        for group, label, convert, extra in runs[name]:
            if args.only and not label.endswith(tuple(args.only)):
                continue
            yield trained_row(group, label, source, tokenizer, evaluate, args, workdir, convert, extra)


def print_table(rows: list[dict]) -> None:
    table = Table(title="SmolLM2-135M on WikiText-2 test")
    for column in ("group", "config", "layout", "unique params", "ppl before", "ppl"):
        table.add_column(column, justify="left" if column in ("group", "config", "layout") else "right")
    for row in rows:
        unique = row["nonembedding"] + row["routers"] + row["relax"]
        before = f"{row['ppl_before']:,.2f}" if row.get("ppl_before") else ""
        table.add_row(row["group"], row["config"], row.get("layout", ""), f"{unique / 1e6:.1f}M", before, f"{row['ppl']:,.2f}")
    Console().print(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: scripts/get_smollm2.py's)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "quality-smollm2.json")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--tie", default=None, help="tie strategy for relax/variant/heal rows (default: best at step 0)")
    parser.add_argument("--heal-steps", type=int, default=60, help="0 skips healing")
    parser.add_argument("--heal-lr", type=float, default=3e-4)
    parser.add_argument("--heal-loops", type=int, default=2, help="K of the healed conversions")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-step0", action="store_true", help="only the healing runs (needs --tie)")
    parser.add_argument("--heal-runs", nargs="+", choices=HEAL_RUNS, default=list(HEAL_RUNS),
                        help="which healing runs (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--only", nargs="+", metavar="END",
                        help="only the healing runs whose label ends with one of these (e.g. 'variant anchor')")
    parser.add_argument("--outer-layers", nargs="+", type=int, default=[8, 12],
                        help="prelude = coda sizes of the `layouts` healing runs")
    args = parser.parse_args()

    if args.model is None:
        import subprocess
        import sys

        args.model = Path(subprocess.run([sys.executable, str(ROOT / "scripts/get_smollm2.py")], check=True,
                                         capture_output=True, text=True).stdout.strip().splitlines()[-1])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    source = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    text = (SHARED / "data/wikitext-2-raw/wiki.test.raw").read_text()
    evaluate = Evaluator(tokenizer, text, args.context, args.eval_tokens, args.device)

    rows = Rows(args)
    if not args.skip_step0:
        rows.extend(step0_rows(source, evaluate))
    elif args.tie is None:
        parser.error("--skip-step0 needs --tie")
    args.tie = args.tie or best_tie(rows)
    if args.heal_steps:
        with tempfile.TemporaryDirectory() as workdir:
            rows.extend(heal_rows(source, args.model, tokenizer, evaluate, args, Path(workdir)))
    print_table(rows)


class Rows(list):
    """The result rows, rewritten to --output as each batch arrives (long runs keep what they did)."""

    def __init__(self, args):
        super().__init__()
        self.args = args

    def extend(self, rows):
        for row in rows:
            self.append(row)
            self.args.output.parent.mkdir(parents=True, exist_ok=True)
            settings = {k: str(v) for k, v in vars(self.args).items()}
            self.args.output.write_text(json.dumps({"settings": settings, "rows": list(self)}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

"""Write a Pythia-architecture checkpoint with random weights, for demos and benchmarks that
must run offline (no real Pythia weights are reachable here; users convert the real ones).

    python scripts/make_demo_checkpoint.py OUT [--size 14m] [--dtype float16] [--seed 0]

The tokenizer is the real GPT-NeoX one from ../shared/tokenizers/gpt-neox-20b when present.
"""

import argparse
import shutil
from pathlib import Path

import torch
from transformers import GPTNeoXForCausalLM

from mesh_convert.convert.pythia import PYTHIA_SUITE, pythia_config

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt-neox-20b"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", default="14m", choices=list(PYTHIA_SUITE))
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.output / "config.json").is_file():
        print(f"{args.output} exists; keeping it")
        return
    torch.manual_seed(args.seed)
    config = pythia_config(args.size)
    with torch.device("cpu"):
        model = GPTNeoXForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.output)
    if SHARED_TOKENIZER.is_dir():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(SHARED_TOKENIZER / name, args.output / name)
    print(f"wrote a random pythia-{args.size}-shaped checkpoint to {args.output}")


if __name__ == "__main__":
    main()

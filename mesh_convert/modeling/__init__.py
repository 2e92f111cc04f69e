"""The MeSH model, registered with transformers' Auto classes on import.

`configuration_mesh.py` and `modeling_mesh.py` are self-contained: they are copied next to every
checkpoint as remote code, under these file and class names, so they import only torch,
transformers and each other. The registration also marks the classes for remote code, so
`save_pretrained` writes `auto_map` and copies the two files next to the weights.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_mesh import MeshConfig
from .modeling_mesh import MeshForCausalLM, MeshModel

AutoConfig.register(MeshConfig.model_type, MeshConfig, exist_ok=True)
AutoModel.register(MeshConfig, MeshModel, exist_ok=True)
AutoModelForCausalLM.register(MeshConfig, MeshForCausalLM, exist_ok=True)
MeshConfig.register_for_auto_class()
MeshModel.register_for_auto_class("AutoModel")
MeshForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MeshConfig", "MeshForCausalLM", "MeshModel"]

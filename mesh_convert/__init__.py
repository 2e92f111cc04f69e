"""mesh-convert: pretrained GPT-NeoX and Llama-family checkpoints -> MeSH recursive transformers.

Importing the package registers `MeshConfig` / `MeshForCausalLM` with transformers' Auto
classes, and marks them for remote code, so `save_pretrained` writes `auto_map` and copies the
modeling files next to the weights.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_mesh import MeshConfig
from .modeling_mesh import MeshForCausalLM, MeshModel

__version__ = "0.1.0"

AutoConfig.register(MeshConfig.model_type, MeshConfig, exist_ok=True)
AutoModel.register(MeshConfig, MeshModel, exist_ok=True)
AutoModelForCausalLM.register(MeshConfig, MeshForCausalLM, exist_ok=True)
MeshConfig.register_for_auto_class()
MeshModel.register_for_auto_class("AutoModel")
MeshForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MeshConfig", "MeshForCausalLM", "MeshModel", "__version__"]

"""The MeSH model: `configuration_mesh.py` and `modeling_mesh.py` are self-contained (they are
copied next to every checkpoint as remote code, under these file and class names)."""

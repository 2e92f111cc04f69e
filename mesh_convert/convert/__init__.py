"""Conversion: source checkpoint -> plan -> tensors -> safetensors shards, plus the conversion
record (`record`) and the model card (`card`) written next to them."""

"""Conversion: source checkpoint -> plan -> tensors -> safetensors shards."""

"""Conversion: source checkpoint -> plan -> tensors -> safetensors shards; the record and the
model card written next to them are `artifacts`'."""

"""CPU rehearsal of what a GPU user runs: bf16 and compiled training, the tensorboard tracker,
`data.hub` through the datasets library, packed (padding-free) batches as flash attention sees
them, and `scripts/gpu_check --device cpu` end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from conftest import make_tiny_llama
from mesh_convert.convert import convert_model
from mesh_convert.recipe import Recipe
from mesh_convert.train import train
from test_train_support import ROOT, SUBPROCESS_ENV, char_tokenizer, corpus, metrics, recipe, tiny_converted, write_text

# ---------------------------------------------------------------------------------------------
# Packed batches: documents concatenated in one row, positions restarting at each document.
# ---------------------------------------------------------------------------------------------


def varlen_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, position_ids=None, **kwargs):
    """Attention as flash attention's varlen path does it: no mask, documents found where the
    position ids restart."""
    assert attention_mask is None
    if position_ids is None:
        raise AssertionError("the model did not pass position_ids to the attention")
    document = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1) != 1).cumsum(1)
    same = document[:, :, None] == document[:, None, :]
    causal = torch.ones(same.shape[-2:], dtype=torch.bool).tril()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=(same & causal)[:, None], scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("test_varlen", varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("test_varlen", flash_attention_mask)


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def mesh(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"packed-{request.param}")
    if request.param == "gpt_neox":
        tokenizer = char_tokenizer(root / "tokenizer")
        path = tiny_converted(root / "mesh", tokenizer, relax_rank=2)
    else:
        source = make_tiny_llama(root / "llama")
        path = root / "mesh"
        convert_model(source, loops=2, relax_rank=2, dtype="float32").save_pretrained(path)
    return path


def test_explicit_position_ids_equal_the_default(mesh):
    model = AutoModelForCausalLM.from_pretrained(mesh, dtype=torch.float32).eval()
    ids = torch.randint(0, 98, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        default = model(ids, use_cache=False).logits
        explicit = model(ids, position_ids=torch.arange(20).expand(2, 20), use_cache=False).logits
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("attention", ["eager", "sdpa", "test_varlen"])
def test_a_packed_batch_gives_each_document_its_logits_alone(mesh, attention):
    model = AutoModelForCausalLM.from_pretrained(mesh, dtype=torch.float32, attn_implementation=attention).eval()
    generator = torch.Generator().manual_seed(1)
    documents = [torch.randint(0, 98, (1, n), generator=generator) for n in (9, 14, 6)]
    packed = torch.cat(documents, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in documents])[None]
    with torch.no_grad():
        together = model(packed, position_ids=positions, use_cache=False).logits
        alone = torch.cat([model(d, use_cache=False).logits for d in documents], 1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)

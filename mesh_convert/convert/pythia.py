"""Built-in facts about the Pythia suite (spec section 1), so that plans for the `pythia-<size>`
aliases work offline, without downloading a config."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import GPTNeoXConfig

# size -> (layers, hidden size, heads, pretraining learning rate)
PYTHIA_SUITE = {
    "14m": (6, 128, 4, 1.0e-3),
    "31m": (6, 256, 8, 1.0e-3),
    "70m": (6, 512, 8, 1.0e-3),
    "160m": (12, 768, 12, 6.0e-4),
    "410m": (24, 1024, 16, 3.0e-4),
    "1b": (16, 2048, 8, 3.0e-4),
    "1.4b": (24, 2048, 16, 2.0e-4),
    "2.8b": (32, 2560, 32, 1.6e-4),
    "6.9b": (32, 4096, 32, 1.2e-4),
    "12b": (36, 5120, 40, 1.2e-4),
}
PYTHIA_LR = {size: facts[3] for size, facts in PYTHIA_SUITE.items()}
DEDUPED_FROM = "70m"  # the deduplicated runs exist from 70m up
_SIZES = list(PYTHIA_SUITE)
_ALIAS = re.compile(r"^(?:EleutherAI/)?pythia-(?P<size>[0-9.]+[mb])(?P<deduped>-deduped)?$", re.IGNORECASE)


@dataclass(frozen=True)
class PythiaAlias:
    size: str
    deduped: bool

    @property
    def repo_id(self) -> str:
        return f"EleutherAI/pythia-{self.size}{'-deduped' if self.deduped else ''}"


def parse_alias(name: str) -> PythiaAlias | None:
    """`pythia-1.4b`, `pythia-410m-deduped` or `EleutherAI/pythia-160m` -> the alias; other names -> None.

    Raises ValueError for a name that looks like Pythia but is not in the suite."""
    match = _ALIAS.match(name)
    if not match:
        return None
    size, deduped = match["size"].lower(), bool(match["deduped"])
    if size not in PYTHIA_SUITE:
        raise ValueError(f"unknown Pythia size {size!r}; the suite has {', '.join(_SIZES)}")
    if deduped and _SIZES.index(size) < _SIZES.index(DEDUPED_FROM):
        raise ValueError(f"pythia-{size} has no deduplicated run (those exist from {DEDUPED_FROM} up)")
    return PythiaAlias(size, deduped)


def pythia_config_fields(size: str) -> dict:
    """The architecture of `EleutherAI/pythia-<size>` as config.json fields (weights are fp16)."""
    layers, hidden, heads, _ = PYTHIA_SUITE[size]
    return dict(
        model_type="gpt_neox",
        vocab_size=50304,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        hidden_act="gelu",
        max_position_embeddings=2048,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        dtype="float16",
    )


def pythia_config(size: str) -> GPTNeoXConfig:
    """The `GPTNeoXConfig` of `EleutherAI/pythia-<size>`."""
    from transformers import GPTNeoXConfig

    fields = pythia_config_fields(size)
    del fields["model_type"]
    return GPTNeoXConfig(**fields)

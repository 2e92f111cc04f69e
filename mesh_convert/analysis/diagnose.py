"""The paper's three representation probes (spec section 6), for MeSH and plain models; their
figures are `plots`'.

A model is read as a chain of states, each an (L x D) matrix per sample:

    h_emb -> h^(0) -> h^(1) -> ... -> h^(K) -> h_out
      prelude    loop 1    ...   loop K    coda

For a MeSH model the states are the ones the recurrence passes on: h^(0) is the state after
the transitional read (not the raw prelude output), h^(t+1) the state after loop t's
recurrence (memory read, residual or anchor), and h_out the coda's output *before* the final
norm (spec section 1: logits = lm_head(final_norm(h_out))). A plain decoder (e.g. an
unconverted Pythia) is "split the same way" by a layout P+CRK+Q: h^(t) is the state after
plain layer P + t*C - 1, so both kinds of model can be compared state for state.

The probes, per sample:
- relative update magnitude of each block f (the arrows above):
  2 * ||f(h) - h||_F / (||f(h)||_F + ||h||_F);
- RBF-kernel CKA (Kornblith et al. 2019) between every pair of states, tokens as examples:
  k(x, y) = exp(-||x - y||^2 / (2 sigma^2)), sigma^2 = threshold^2 * median squared distance
  between distinct tokens of that state, so threshold = 1 (the spec's value) makes sigma^2 the
  median squared distance itself. The median runs over distinct pairs (i < j): Kornblith's
  reference notebook also counts the zero diagonal, a difference of order 1/L. HSIC is the
  biased estimator tr(K H L H); its normalisation cancels in CKA. With this bandwidth CKA is
  invariant to rotations, translations and isotropic scaling of either state;
- the top singular values of the (uncentred) state matrix divided by the largest one.

Numbers are averaged over samples as mean and population standard deviation (numpy's default
std), which is what a "mean +- std" band over the sample set shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch

from ..artifacts.output import report_mark
from ..train.data import read_documents, tokenize_stream
from ..errors import UserError
from ..layout import Layout, default_layout

# ---------------------------------------------------------------------------------------------
# Layouts: which hidden states are the loop boundaries.
# ---------------------------------------------------------------------------------------------

def parse_layout(text: str) -> Layout:
    """Parse "P+CRK+Q" (e.g. "4+8R2+4"), as a user error if it is malformed."""
    try:
        return Layout.parse(text)
    except ValueError as error:
        raise UserError(str(error)) from None


def is_mesh(model) -> bool:
    # By model_type, not isinstance: a checkpoint loaded as remote code has its own class object.
    return getattr(model.config, "model_type", None) == "mesh"


def model_layout(model) -> Layout:
    """The layout a MeSH model was built with."""
    return Layout.of(model.config)


def resolve_layout(model, layout: str | None = None, loops: int | None = None) -> Layout:
    """The layout to read the model with: a MeSH model's own, or the one given for a plain model.

    For a plain model, `loops` alone picks the converter's default split (`layout.default_layout`).
    """
    depth = model.config.num_hidden_layers
    if is_mesh(model):
        own = model_layout(model)
        if layout is not None and parse_layout(layout) != own:
            raise UserError(f"the model is laid out as {own}, not {layout}; drop --layout for MeSH models")
        if loops is not None and loops != own.loops:
            raise UserError(f"the model loops its core {own.loops} times, not {loops}; drop --loops for MeSH models")
        return own
    if layout is not None:
        chosen = parse_layout(layout)
        if loops is not None and loops != chosen.loops:
            raise UserError(f"--loops {loops} contradicts --layout {layout}")
    elif loops is not None:
        chosen = _default_layout(depth, loops)
    else:
        raise UserError("a plain (unconverted) model needs --layout P+CRK+Q or --loops K to split it into blocks")
    if chosen.unrolled_layers != depth:
        raise UserError(f"layout {chosen} covers {chosen.unrolled_layers} layers, but the model has {depth}")
    return chosen


def _default_layout(num_layers: int, loops: int) -> Layout:
    """The converter's default split of a `num_layers`-deep model into K loops."""
    try:
        return default_layout(num_layers, loops)
    except ValueError as error:
        raise UserError(f"cannot split {num_layers} layers into {loops} loops: {error}") from None


# ---------------------------------------------------------------------------------------------
# The probes, on one sample's state matrices (L x D).
# ---------------------------------------------------------------------------------------------


def relative_update(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """2 * ||h_out - h_in||_F / (||h_out||_F + ||h_in||_F): 0 = no change, 2 = opposite vectors."""
    a, b = h_in.double(), h_out.double()
    denominator = torch.linalg.norm(b) + torch.linalg.norm(a)
    if denominator == 0:
        return 0.0
    return float(2 * torch.linalg.norm(b - a) / denominator)


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of x (n x d), in float64."""
    x = x.double().reshape(x.shape[0], -1)
    # Centring first changes no distance but avoids cancellation when the rows share a big mean.
    x = x - x.mean(0, keepdim=True)
    sq_norms = (x * x).sum(1)
    return (sq_norms[:, None] + sq_norms[None, :] - 2 * x @ x.T).clamp_min(0)


# Outside it the RBF kernel is, in float64, the identity (too narrow) or a constant (too wide):
# CKA is then meaningless or NaN.
THRESHOLD_RANGE = (0.01, 100.0)


def check_threshold(threshold: float) -> None:
    low, high = THRESHOLD_RANGE
    if not low <= threshold <= high:  # NaN fails both comparisons
        raise UserError(f"the CKA threshold (--threshold) must be between {low:g} and {high:g}, not {threshold:g}")


def rbf_gram(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """RBF Gram matrix with sigma^2 = threshold^2 * median squared distance of distinct rows."""
    d2 = squared_distances(x)
    n = d2.shape[0]
    pairs = d2[torch.triu(torch.ones(n, n, dtype=torch.bool, device=d2.device), diagonal=1)]
    median = pairs.median() if pairs.numel() else d2.new_zeros(())
    if median <= 0:
        # More than half the tokens coincide: fall back to the mean distance so the kernel
        # still separates the distinct ones (all equal -> constant kernel -> CKA undefined).
        positive = pairs[pairs > 0]
        median = positive.mean() if positive.numel() else d2.new_ones(())
    return torch.exp(-d2 / (2 * threshold**2 * median))


def center_gram(gram: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n, without building H."""
    return gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()


def _cka_from_centered(kc: torch.Tensor, lc: torch.Tensor) -> float:
    denominator = torch.linalg.norm(kc) * torch.linalg.norm(lc)
    if denominator == 0:
        return math.nan
    return float((kc * lc).sum() / denominator)


def rbf_cka(x: torch.Tensor, y: torch.Tensor, threshold: float = 1.0) -> float:
    """RBF-kernel CKA between two state matrices with the same rows (tokens)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    return _cka_from_centered(center_gram(rbf_gram(x, threshold)), center_gram(rbf_gram(y, threshold)))


def cka_matrix(states: Sequence[torch.Tensor], threshold: float = 1.0) -> torch.Tensor:
    """CKA between every pair of states; each Gram matrix is built once."""
    centered = [center_gram(rbf_gram(state, threshold)) for state in states]
    size = len(states)
    matrix = torch.ones(size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(i, size):
            value = _cka_from_centered(centered[i], centered[j])
            matrix[i, j] = matrix[j, i] = value
    return matrix


def normalized_spectrum(h: torch.Tensor, top: int = 50) -> torch.Tensor:
    """The `top` largest singular values of h, divided by the largest (fewer if h is smaller)."""
    values = torch.linalg.svdvals(h.double().reshape(h.shape[0], -1))[:top]
    if values[0] == 0:
        return torch.zeros_like(values)
    return values / values[0]


# ---------------------------------------------------------------------------------------------
# Collecting the states from a forward pass.
# ---------------------------------------------------------------------------------------------

# Where decoders keep the final norm, whose input is h_out (pre-norm) in every family.
_FINAL_NORM_PATHS = ("model.final_norm", "gpt_neox.final_layer_norm", "model.norm", "transformer.ln_f")


def final_norm_module(model) -> torch.nn.Module:
    for path in _FINAL_NORM_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None:
            return module
    raise UserError(f"cannot find the final norm of a {type(model).__name__}; only decoder LMs are supported")


def collect_states(model, input_ids: torch.Tensor, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """Run the model once and return {state name: batch x L x D} in chain order.

    Boundary states come from `hidden_states` (the model's own convention, spec notes in the
    module docstring); h_out comes from the final norm's input, because the last
    `hidden_states` entry is already normalised.
    """
    layout = layout or model_layout(model)
    if layout.unrolled_layers != model.config.num_hidden_layers:
        raise UserError(
            f"layout {layout} covers {layout.unrolled_layers} layers, but the model has {model.config.num_hidden_layers}"
        )
    captured: dict[str, torch.Tensor] = {}
    core_inputs: list[torch.Tensor] = []
    hooks = [final_norm_module(model).register_forward_pre_hook(lambda _m, args: captured.setdefault("h_out", args[0]))]
    if is_mesh(model) and layout.prelude == 0:
        # Without a prelude, hidden_states[0] must stay h_emb, so h^(0) (after the transitional
        # read) has no entry there: take it from the first core call's input.
        hooks.append(model.model.core[0].register_forward_pre_hook(lambda _m, args: core_inputs.append(args[0])))
    try:
        with torch.no_grad():
            output = model(input_ids.to(model.device), output_hidden_states=True, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    hidden = output.hidden_states
    states = {"h_emb": hidden[0]}
    for t in range(layout.loops + 1):
        index = layout.boundary_index(t)
        if index == layout.unrolled_layers:  # no coda: the last entry is normalised, h^(K) = h_out
            states[f"h^({t})"] = captured["h_out"]
        elif index == 0 and core_inputs:
            states[f"h^({t})"] = core_inputs[0]
        else:
            states[f"h^({t})"] = hidden[index]
    states["h_out"] = captured["h_out"]
    return states


# ---------------------------------------------------------------------------------------------
# Data: N windows of L consecutive tokens from a text file.
# ---------------------------------------------------------------------------------------------

def tokenize_file(path: Path, tokenizer, limit: int | None = None) -> list[int]:
    """Token ids of a data file read as training reads it (.txt/.raw whole, EOS after each .jsonl or
    .parquet document), stopping soon after `limit` tokens."""
    tokens: list[int] = []
    # Small batches, so a large file is read and tokenised only as far as the limit needs.
    for ids in tokenize_stream(read_documents(path), tokenizer, batch_docs=8):
        tokens.extend(ids)
        if limit is not None and len(tokens) >= limit:
            break
    return tokens


def token_windows(tokens: Sequence[int], samples: int, seq_len: int, source: str = "the data") -> torch.Tensor:
    """`samples` consecutive, non-overlapping windows of `seq_len` tokens from the start."""
    if samples < 1 or seq_len < 2:
        raise UserError("need at least 1 sample of at least 2 tokens")
    needed = samples * seq_len
    if len(tokens) < needed:
        raise UserError(
            f"{source} has {len(tokens)} tokens, fewer than {samples} samples x {seq_len} = {needed}; "
            "lower --samples or --seq-len"
        )
    return torch.tensor(list(tokens[:needed]), dtype=torch.long).view(samples, seq_len)


def load_samples(path: Path, tokenizer, samples: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """N x L token ids from a text/jsonl file, checked against the model's vocabulary."""
    ids = token_windows(tokenize_file(path, tokenizer, samples * seq_len), samples, seq_len, str(path))
    if int(ids.max()) >= vocab_size:
        raise UserError(f"the tokenizer produced id {int(ids.max())}, outside the model's vocabulary of {vocab_size}")
    return ids


# ---------------------------------------------------------------------------------------------
# Running the probes over samples.
# ---------------------------------------------------------------------------------------------


@dataclass
class DiagnosticsResult:
    """Per-sample probe values; `summary()` / `to_dict()` give mean and std over samples."""

    model: str
    model_type: str
    variant: str
    layout: Layout
    seq_len: int
    threshold: float
    updates: torch.Tensor  # samples x blocks
    cka: torch.Tensor  # samples x states x states
    spectra: torch.Tensor  # samples x states x top
    data: str | None = None

    @property
    def samples(self) -> int:
        return self.updates.shape[0]

    @property
    def state_names(self) -> list[str]:
        return self.layout.state_names

    @property
    def block_names(self) -> list[str]:
        return self.layout.block_names

    @staticmethod
    def mean_std(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and population std over the sample axis (0), ignoring undefined (NaN) values."""
        mean = values.nanmean(0)
        std = ((values - mean).pow(2)).nanmean(0).sqrt()
        return mean, std

    def to_dict(self) -> dict:
        update_mean, update_std = self.mean_std(self.updates)
        cka_mean, cka_std = self.mean_std(self.cka)
        spectra_mean, spectra_std = self.mean_std(self.spectra)
        return json_safe(
            {
                **report_mark(),
                "model": self.model,
                "model_type": self.model_type,
                "variant": self.variant,
                "layout": str(self.layout),
                "data": self.data,
                "samples": self.samples,
                "seq_len": self.seq_len,
                "states": self.state_names,
                "blocks": self.block_names,
                "relative_update": {
                    name: {
                        "mean": update_mean[i].item(),
                        "std": update_std[i].item(),
                        "per_sample": self.updates[:, i].tolist(),
                    }
                    for i, name in enumerate(self.block_names)
                },
                "cka": {"threshold": self.threshold, "mean": cka_mean.tolist(), "std": cka_std.tolist()},
                "spectra": {
                    name: {"mean": spectra_mean[i].tolist(), "std": spectra_std[i].tolist()}
                    for i, name in enumerate(self.state_names)
                },
                "definitions": {
                    "relative_update": "2*||f(h)-h||_F / (||f(h)||_F + ||h||_F) per sample, f = block between consecutive states",
                    "cka": "RBF-kernel CKA, tokens as examples, sigma^2 = threshold^2 * median squared distance (distinct pairs), biased HSIC",
                    "spectra": "top singular values of the uncentred L x D state, divided by the largest",
                    "h_out": "coda output before the final norm",
                    "std": "population std over samples",
                },
            }
        )


def json_safe(value):
    """JSON has no NaN: undefined values (e.g. CKA of a constant state) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def probe_sample(
    states: Sequence[torch.Tensor], threshold: float, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All three probes on one sample's chain of states (each L x D)."""
    updates = torch.tensor([relative_update(a, b) for a, b in pairwise(states)], dtype=torch.float64)
    cka = cka_matrix(states, threshold)
    spectra = torch.stack([normalized_spectrum(state, top).cpu() for state in states])
    return updates, cka, spectra


def run_diagnostics(
    model,
    input_ids: torch.Tensor,
    layout: Layout | None = None,
    *,
    threshold: float = 1.0,
    top: int = 50,
    batch_size: int = 1,
    name: str | None = None,
    data: str | None = None,
    on_sample: Callable[[int, int], None] | None = None,
) -> DiagnosticsResult:
    """The three probes on every row of `input_ids` (samples x L)."""
    layout = layout or model_layout(model)
    check_threshold(threshold)
    if top < 1:
        raise UserError("the number of singular values must be at least 1")
    per_sample = []
    for start in range(0, input_ids.shape[0], batch_size):
        states = collect_states(model, input_ids[start : start + batch_size], layout)
        chain = list(states.values())
        for row in range(chain[0].shape[0]):
            per_sample.append(probe_sample([state[row] for state in chain], threshold, top))
            if on_sample is not None:
                on_sample(len(per_sample), input_ids.shape[0])
    updates, cka, spectra = (torch.stack(parts) for parts in zip(*per_sample))
    return DiagnosticsResult(
        model=name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        model_type=model.config.model_type,
        variant=model.config.variant if is_mesh(model) else "plain",
        layout=layout,
        seq_len=input_ids.shape[1],
        threshold=threshold,
        updates=updates,
        cka=cka,
        spectra=spectra,
        data=data,
    )


__all__ = [
    "DiagnosticsResult",
    "Layout",
    "cka_matrix",
    "collect_states",
    "load_samples",
    "normalized_spectrum",
    "parse_layout",
    "rbf_cka",
    "relative_update",
    "resolve_layout",
    "run_diagnostics",
]

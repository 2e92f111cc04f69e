"""The layout of a MeSH model, `P+CRK+Q`: P unshared prelude layers, a core of C shared layers
looped K times, Q unshared coda layers; the paper's default for a depth and a loop count, the one
that --prelude/--coda pin down; and which original layer each loop step stands in for.

Pure bookkeeping without torch, for planning, records, cards and the probes alike. The model's own
configuration (`modeling/configuration_mesh.py`, self-contained remote code) keeps its own copy of
the format and of the index rule; tests/test_layout.py checks that the two agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYOUT_TEXT = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*[Rr]\s*(\d+)\s*\+\s*(\d+)\s*$")


@dataclass(frozen=True)
class Layout:
    """P prelude layers, C core layers looped K times, Q coda layers: `P+CRK+Q`."""

    prelude: int
    core: int
    loops: int
    coda: int

    @classmethod
    def of(cls, config) -> "Layout":
        """The layout of a MeSH config (or anything with its `num_*_layers` and `num_loops`)."""
        return cls(config.num_prelude_layers, config.num_core_layers, config.num_loops, config.num_coda_layers)

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """`"4+8R2+4"` -> Layout(4, 8, 2, 4); ValueError for anything else."""
        match = _LAYOUT_TEXT.match(text)
        if match is None:
            raise ValueError(f"layout {text!r} is not of the form P+CRK+Q (e.g. 4+8R2+4)")
        layout = cls(*(int(group) for group in match.groups()))
        if layout.core < 1 or layout.loops < 1:
            raise ValueError(f"layout {text!r} needs at least one core layer and one loop")
        return layout

    @property
    def text(self) -> str:
        return f"{self.prelude}+{self.core}R{self.loops}+{self.coda}"

    @property
    def name(self) -> str:
        """The layout as it stands in folder and model names, `P_CRK_Q`: a Hub repository name
        allows no `+`, and transformers warns on every load of remote code from a folder with one."""
        return self.text.replace("+", "_")

    @property
    def unrolled_layers(self) -> int:
        return self.prelude + self.core * self.loops + self.coda

    @property
    def stored_layers(self) -> int:
        """The unique layers, each stored once: the prelude, the core and the coda."""
        return self.prelude + self.core + self.coda

    def layer_index(self, loop: int, position: int) -> int:
        """Where loop step `loop` of core position `position` stands in the unrolled stack, which is
        also the original layer it stands in for: P + loop*C + position."""
        return self.prelude + loop * self.core + position

    def loop_sources(self) -> list[list[int]]:
        """sources[t][i]: the original layer that loop t of core position i stands in for."""
        return [[self.layer_index(t, i) for i in range(self.core)] for t in range(self.loops)]

    def boundary_index(self, t: int) -> int:
        """Index of h^(t) in a model's `hidden_states` (entry 0 is the embeddings): the output of
        the layer before loop t's first (for t = K, before the coda's)."""
        return self.layer_index(t, 0)

    @property
    def state_names(self) -> list[str]:
        return ["h_emb", *(f"h^({t})" for t in range(self.loops + 1)), "h_out"]

    @property
    def block_names(self) -> list[str]:
        return ["prelude", *(f"loop {t + 1}" for t in range(self.loops)), "coda"]

    def __str__(self) -> str:
        return self.text


def _layouts(num_layers: int, loops: int, min_outer: int = 1) -> list[Layout]:
    """Every compute-matched layout P + C*K + Q = num_layers with C >= 1 and P, Q >= min_outer: the
    layouts of a loop count come from here, which refuses a count below 1 for all of them."""
    if loops < 1:
        raise ValueError("--loops must be at least 1")
    layouts = []
    for core in range(1, num_layers // loops + 1):
        rest = num_layers - core * loops
        for prelude in range(min_outer, rest - min_outer + 1):
            layouts.append(Layout(prelude, core, loops, rest - prelude))
    return layouts


def default_layout(num_layers: int, loops: int) -> Layout:
    """The paper's rule: prelude = coda ~ C/2, i.e. C ~ N/(K+1), with the outer layers split evenly.

    Reproduces 2+4R2+2 (12 layers), 4+8R2+4 and 3+6R3+3 (24), 3+5R2+3 (16). Among the layouts
    closest to C = N/(K+1), an even split of the outer layers wins; an odd extra layer goes to the coda.
    """
    # Per core size, the one split of the rest with coda - prelude in {0, 1}, both at least 1.
    balanced = [layout for layout in _layouts(num_layers, loops) if layout.coda - layout.prelude in (0, 1)]
    if not balanced:
        raise ValueError(
            f"{num_layers} layers are too few for {loops} loops with the default layout's prelude and coda layer "
            "(set --prelude and --coda, 0 allowed, for another layout)"
        )
    target = num_layers / (loops + 1)
    return min(balanced, key=lambda l: (abs(l.core - target), l.coda != l.prelude, -l.core))


def resolve_layout(num_layers: int, loops: int, prelude: int | None = None, coda: int | None = None) -> Layout:
    """The default layout, or the one the user's --prelude/--coda (>= 0, as `mesh_convert.options`
    declares them) pin down, or a ValueError that names layouts that would work."""
    if prelude is None and coda is None:
        return default_layout(num_layers, loops)
    options = [
        layout
        for layout in _layouts(num_layers, loops, min_outer=0)
        if (prelude is None or layout.prelude == prelude) and (coda is None or layout.coda == coda)
    ]
    if options:
        # With one of the two given, the other follows as close to it as the layer count allows.
        given = prelude if prelude is not None else coda
        return min(options, key=lambda l: (abs(l.prelude - l.coda), -l.core, abs(l.prelude - given)))
    asked = " ".join(f"{flag} {value}" for flag, value in (("--prelude", prelude), ("--coda", coda)) if value is not None)
    rest = num_layers - (prelude or 0) - (coda or 0)
    message = f"{asked} does not fit {num_layers} layers with {loops} loops"
    if coda is not None and prelude is not None:
        message += f" ({rest} layers are left for the core, not a positive multiple of {loops})"
    valid = _layouts(num_layers, loops)
    if not valid:
        raise ValueError(f"{message}; no layout of {num_layers} layers fits {loops} loops")
    near = sorted(valid, key=lambda l: abs(l.prelude - (prelude or l.prelude)) + abs(l.coda - (coda or l.coda)))[:4]
    raise ValueError(f"{message}; these would: " + "; ".join(f"--prelude {l.prelude} --coda {l.coda} ({l.text})" for l in near))

"""The figures of the analysis commands (matplotlib, Agg: files only, never a display): the probes'
three (`diagnose`), written with their numbers by `write_outputs`, and what every figure here
uses, inspect's router heatmap too: sizes that grow with the model up to a cap, and labels thinned
to a readable number. Each plot function returns its Figure, so callers and tests can inspect it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import printable
from .diagnose import DiagnosticsResult

PLOT_DPI = 120
# Figures grow with the model's loops and slots up to this size (inches at PLOT_DPI) and no more:
# uncapped, the router plot of 64 loops and 1024 slots was 1,335 inches wide and took 16 GB to draw.
MAX_FIGURE_INCHES = (20.0, 14.0)
# At most this many labelled ticks (or legend entries) per axis; the others stay unlabelled.
MAX_LABELS = 32


def pyplot_agg():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def figure_size(width: float, height: float) -> tuple[tuple[float, float], bool]:
    """The size for a figure that would like to be `width` x `height` inches, capped, and whether
    it got its full size (only then is there room to print a number in every cell)."""
    capped = (min(width, MAX_FIGURE_INCHES[0]), min(height, MAX_FIGURE_INCHES[1]))
    return capped, capped == (width, height)


def labelled(count: int, limit: int = MAX_LABELS) -> range:
    """The positions, out of `count`, that get a label: all of them, or evenly spaced `limit` or fewer."""
    return range(0, count, math.ceil(count / limit) if count > limit else 1)


def figure_text(value: object) -> str:
    """A name for a figure: control characters written out (matplotlib would warn of each
    missing glyph, ESC included, on the terminal), and `$` kept from starting mathtext."""
    return printable(value).replace("$", r"\$")


def _title(result: DiagnosticsResult) -> str:
    name = figure_text(Path(result.model).name or result.model)
    return f"{name} ({result.variant}, {result.layout}, {result.samples} x {result.seq_len} tokens)"


def plot_updates(result: DiagnosticsResult):
    """Bar per block: mean relative update magnitude with a +-std error bar."""
    plt = pyplot_agg()
    mean, std = DiagnosticsResult.mean_std(result.updates)
    names = result.block_names
    size, roomy = figure_size(max(5.0, 1.1 * len(names) + 2), 4.2)
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    ax.bar(range(len(names)), mean.tolist(), yerr=std.tolist(), capsize=5 if roomy else 0, color="tab:blue", alpha=0.8)
    for x, (m, s) in enumerate(zip(mean.tolist(), std.tolist()) if roomy else ()):
        ax.annotate(f"{m:.3f}", (x, m + s), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    positions = labelled(len(names))
    slanted = {} if roomy else {"rotation": 45, "ha": "right"}  # many names side by side
    ax.set_xticks(positions, [names[i] for i in positions], **slanted)
    ax.set_ylabel("2||f(h) - h|| / (||f(h)|| + ||h||)")
    ax.set_ylim(0, max(1e-6, float((mean + std).nan_to_num().max())) * 1.18)
    ax.set_title(f"Relative update magnitude\n{_title(result)}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_cka(result: DiagnosticsResult):
    """Heatmap of the mean CKA between states, each cell annotated with mean and std."""
    plt = pyplot_agg()
    mean, std = DiagnosticsResult.mean_std(result.cka)
    names = result.state_names
    side = max(4.5, 0.85 * len(names) + 2.5)
    size, roomy = figure_size(side + 0.8, side)
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    image = ax.imshow(mean.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(len(names)) if roomy else ():
        for j in range(len(names)):
            value = mean[i, j].item()
            colour = "black" if value > 0.6 else "white"
            ax.text(j, i, f"{value:.2f}\n±{std[i, j].item():.2f}", ha="center", va="center", fontsize=7, color=colour)
    positions = labelled(len(names))
    ax.set_xticks(positions, [names[i] for i in positions], rotation=45, ha="right")
    ax.set_yticks(positions, [names[i] for i in positions])
    ax.set_title(f"RBF CKA (threshold {result.threshold:g})\n{_title(result)}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="CKA")
    return fig


def plot_spectra(result: DiagnosticsResult):
    """One line per state: normalised singular values (log scale) with a +-std band."""
    plt = pyplot_agg()
    mean, std = DiagnosticsResult.mean_std(result.spectra)
    fig, ax = plt.subplots(figsize=(7.0, 4.5), layout="constrained")
    ranks = list(range(1, mean.shape[1] + 1))
    colours = plt.get_cmap("viridis")
    # Rank-deficient states (fewer distinct tokens than singular values) have values at
    # round-off level; a floor keeps them from stretching the axis over 15 decades.
    floor = 1e-4
    in_legend = set(labelled(len(result.state_names), limit=12))  # a legend of a dozen fits the figure
    for i, name in enumerate(result.state_names):
        colour = colours(i / max(1, len(result.state_names) - 1))
        label = name if i in in_legend else "_" + name  # matplotlib leaves names with "_" out of the legend
        ax.plot(ranks, mean[i].clamp_min(floor).tolist(), label=label, color=colour, linewidth=1.5)
        low = (mean[i] - std[i]).clamp_min(floor).tolist()
        ax.fill_between(ranks, low, (mean[i] + std[i]).clamp_min(floor).tolist(), color=colour, alpha=0.15)
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(floor, float(mean.nan_to_num(1.0).min()) * 0.5), top=1.5)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("sigma_i / sigma_1")
    ax.set_title(f"Singular value spectra (top {mean.shape[1]})\n{_title(result)}", fontsize=9)
    ax.legend(fontsize=8, ncols=2)
    ax.grid(alpha=0.3, which="both")
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write a PNG and free the figure (pyplot keeps every open figure alive otherwise)."""
    plt = pyplot_agg()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


DIAGNOSTICS_FILES = {
    "json": "diagnostics.json",
    "updates": "update_magnitude.png",
    "cka": "cka.png",
    "spectra": "spectra.png",
}


def write_outputs(result: DiagnosticsResult, output_dir: Path) -> dict[str, Path]:
    """The JSON of all numbers and the three plots, in `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: output_dir / name for key, name in DIAGNOSTICS_FILES.items()}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    save_figure(plot_updates(result), paths["updates"])
    save_figure(plot_cka(result), paths["cka"])
    save_figure(plot_spectra(result), paths["spectra"])
    return paths

"""Figures of expert utilization, router comparison and scaling fits (matplotlib, Agg backend).

Every function returns a Figure with a title, labelled axes (units where there are any), legends and
colour bars; save(fig, path) writes it as PNG and closes it.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis.comparison import VAL_UNITS  # noqa: E402
from analysis.metrics import coactivation_conditional, relative_load  # noqa: E402
from analysis.scaling import X_LABELS, FamilyFit  # noqa: E402

History = Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]  # layer -> stat -> (steps, values)


def save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure as PNG (creating folders) and close it; in a notebook, also show the PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    ipython = sys.modules.get("IPython")
    if ipython is not None and ipython.get_ipython() is not None:
        ipython.display.display(ipython.display.Image(filename=str(path)))
    return path


def _annotate(ax, values: np.ndarray, fmt: str, image) -> None:
    """Write each value on its cell, in white on dark colours and black on light ones."""
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            r, g, b, _ = image.cmap(image.norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8, color="white" if dark else "black")


def load_heatmap(counts_LE: np.ndarray, layers: list[str], title: str) -> Figure:
    """Layer x expert load over the uniform load: 1 (white) = balanced, red = overloaded, blue = starved."""
    rel = relative_load(counts_LE)
    L, E = rel.shape
    fig, ax = plt.subplots(figsize=(min(16, max(6.5, 0.6 * E + 3)), max(3, 0.45 * L + 1.5)))
    vmax = max(2.0, float(np.nanmax(rel)) if np.isfinite(rel).any() else 2.0)
    im = ax.imshow(rel, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax), aspect="auto")
    if L * E <= 256:
        _annotate(ax, rel, ".2f", im)
    ax.set_xticks(range(0, E, max(1, E // 16)))
    ax.set_yticks(range(L), layers)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / uniform load\n(1 = balanced)")
    return fig


UTILIZATION_PANELS = (
    ("load_cv", "load CV (std / mean)", "load coefficient of variation"),
    ("max_over_mean_load", "max / mean load", "busiest expert"),
    ("load_entropy", "normalised entropy", "entropy of the aggregate load"),
    ("router_entropy", "normalised entropy", "router entropy per token (mean)"),
    ("drop_rate", "dropped slots (fraction)", "dropped-token rate"),
    ("aux", "loss (as weighted in training)", "auxiliary losses"),
)


def utilization_over_training(history: History, title: str) -> Figure:
    """Six panels over training steps, one line per layer: load CV, max/mean, load entropy, router entropy,
    drop rate and the auxiliary losses (balance solid, z dashed)."""
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(history))))
    for ax, (stat, ylabel, panel_title) in zip(axes.flat, UTILIZATION_PANELS):
        for color, (layer, stats) in zip(colors, history.items()):
            if stat == "aux":
                for name, style, marker in (("aux_balance", "-", "o"), ("aux_z", "--", "s")):
                    if name in stats:
                        ax.plot(*stats[name], style, marker=marker, ms=3, color=color, label=f"{layer} {name[4:]}")
            elif stat in stats:
                ax.plot(*stats[stat], marker="o", ms=3, color=color, label=layer)
        ax.set_title(panel_title)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if stat == "drop_rate":
            ax.set_ylim(bottom=0, top=max(0.05, ax.get_ylim()[1]))
        if ax.lines:
            ax.legend(fontsize=7, ncol=2 if len(ax.lines) > 6 else 1)
        else:
            ax.text(0.5, 0.5, "not logged for this run", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def coactivation_heatmaps(co_by_layer: Mapping[str, np.ndarray], title: str) -> Figure:
    """Per layer, P(expert j active | expert i active) from the co-activation counts. The diagonal (always 1)
    is masked in grey so that the colour scale, shared by all layers, spans the off-diagonal values."""
    n = len(co_by_layer)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    E = next(iter(co_by_layer.values())).shape[0]
    conds = {layer: np.where(np.eye(E, dtype=bool), np.nan, coactivation_conditional(co)) for layer, co in co_by_layer.items()}
    vmax = max([float(np.nanmax(c)) for c in conds.values() if np.isfinite(c).any()] + [0.05])
    cmap = plt.get_cmap("magma").with_extremes(bad="lightgrey")
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1.2, 3.8 * rows + 0.4), squeeze=False, layout="constrained")
    im = None
    for ax, (layer, cond) in zip(axes.flat, conds.items()):
        im = ax.imshow(cond, cmap=cmap, vmin=0, vmax=vmax)
        if E <= 12:
            _annotate(ax, cond, ".2f", im)
        ax.set_title(layer)
        ticks = range(0, E, max(1, E // 16))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xlabel("expert j (also active)")
        ax.set_ylabel("expert i (given active)")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="P(j active | i active)  (diagonal = 1, grey)")
    return fig


def saturation_curves(steps: np.ndarray, agreement: Mapping[str, np.ndarray], title: str,
                      chance: float | None = None) -> Figure:
    """Agreement of each layer's routing with the final routing over training (1 = same experts)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(agreement))))
    for color, (layer, values) in zip(colors, agreement.items()):
        ax.plot(steps, 100 * np.asarray(values), marker="o", ms=4, color=color, label=layer)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", ls=":", label=f"chance (k/E = {chance:.2f})")
    ax.set_ylim(0, 105)
    ax.set_xlabel("training step")
    ax.set_ylabel("agreement with final routing (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def router_comparison(rows: list[dict], title: str) -> Figure:
    """Runs side by side (rows from analysis.comparison.router_rows): mean load CV over training, final load
    CV per layer, entropies, validation loss, dropped slots and tokens, and training throughput."""
    fig, axes = plt.subplots(2, 3, figsize=(19, 8))
    labels = [r["label"] for r in rows]
    colors = plt.cm.tab10(np.arange(len(rows)) % 10)
    ax = axes[0, 0]
    for color, r in zip(colors, rows):
        ax.plot(r["cv_steps"], r["cv_mean"], marker="o", ms=3, color=color, label=r["label"])
    ax.set(xlabel="training step", ylabel="load CV (std / mean), mean over layers", title="load imbalance over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    layers = sorted({layer for r in rows for layer in r["final_cv"]}, key=lambda n: (len(n), n))
    width = 0.8 / max(1, len(rows))
    for i, (color, r) in enumerate(zip(colors, rows)):
        xs = np.arange(len(layers)) + (i - (len(rows) - 1) / 2) * width
        bars = ax.bar(xs, [r["final_cv"].get(layer, np.nan) for layer in layers], width, color=color, label=r["label"])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(layers)), layers)
    top = max([v for r in rows for v in r["final_cv"].values() if np.isfinite(v)], default=0.0)
    ax.set_ylim(0, max(top, 0.05) * 1.45)  # room for the legend above the bars
    ax.set(xlabel="MoE layer", ylabel="load CV (std / mean)", title="final load CV per layer")
    ax.legend(fontsize=8, loc="upper center", ncol=2)

    ax = axes[1, 0]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["router_entropy"] for r in rows], 0.4, label="router entropy per token", color="tab:blue")
    ax.bar(x + 0.2, [r["load_entropy"] for r in rows], 0.4, label="entropy of aggregate load", color="tab:orange")
    ax.set_xticks(x, labels, rotation=15)
    ax.set_ylim(0, 1.3)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set(ylabel="normalised entropy (1 = uniform)", title="final entropies, mean over layers")
    ax.legend(fontsize=8, loc="upper center", ncol=2)

    ax = axes[0, 2]
    ax.bar(x - 0.2, [100 * r.get("drop_rate", np.nan) for r in rows], 0.4, label="slots dropped (capacity)",
           color="tab:red")
    ax.bar(x + 0.2, [100 * r.get("no_expert_rate", np.nan) for r in rows], 0.4, label="tokens no expert processed",
           color="tab:purple")
    ax.set_xticks(x, labels, rotation=15)
    ax.set(ylabel="% of slots / of tokens", title="dropped, final validation interval, mean over layers")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.set_ylim(0, max([100 * r.get(k, 0.0) for r in rows for k in ("drop_rate", "no_expert_rate")
                        if np.isfinite(r.get(k, np.nan))] + [1.0]) * 1.3)

    ax = axes[1, 2]
    tps = [r.get("tokens_per_s", np.nan) for r in rows]
    ax.bar(x, tps, 0.6, color=colors)
    for xi, v in zip(x, tps):
        ax.text(xi, v, f"{v:,.0f}" if np.isfinite(v) else "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, rotation=15)
    ax.set(ylabel="training tokens / s", title="throughput, mean over training")

    ax = axes[1, 1]
    values = [r["val"] for r in rows]
    ax.bar(x, values, 0.6, color=colors)
    for xi, v in zip(x, values):
        ax.text(xi, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    finite = [v for v in values if np.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.98, max(finite) * 1.01)
    ax.set_xticks(x, labels, rotation=15)
    key = rows[0]["val_key"] if rows else "val/loss"
    ax.set(ylabel=f"{key} ({VAL_UNITS[key]})", title=f"final {key} (axis zoomed to the values)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def scaling_fits(fits: list[FamilyFit], title: str, loss_label: str = "validation loss (nats/token)") -> Figure:
    """Points and fitted L(x) = a x^-b + c per group, log x axis; the legend gives b ± its standard error."""
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.cm.tab10(np.arange(len(fits)) % 10)
    for color, fam in zip(colors, fits):
        xs, ys = fam.xs(), fam.ys()
        if fam.fit is None:
            label = f"{fam.group}: not fitted ({fam.note})"
        else:
            err = f" ± {fam.fit.se_b:.2g}" if np.isfinite(fam.fit.se_b) else ""
            label = f"{fam.group}: b = {fam.fit.b:.3g}{err}, c = {fam.fit.c:.3g}{' (pinned)' if fam.fit.c_fixed else ''}, n = {fam.fit.n}"
        ax.scatter(xs, ys, color=color, zorder=3, label=label)
        if fam.fit is not None:
            grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 200)
            ax.plot(grid, fam.fit.predict(grid), color=color, alpha=0.8)
    ax.set_xscale("log")
    x_name = fits[0].x if fits else "flops"
    ax.set_xlabel(X_LABELS[x_name] + ", log scale")
    ax.set_ylabel(loss_label)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="fit L = a·x^(-b) + c, b ± standard error", title_fontsize=8,
              loc="upper center", bbox_to_anchor=(0.5, -0.14))
    return fig

"""The report's PNG plots: global and per-site validation AUC and loss per round.

Up to `SITE_LINES` sites each get a line. Beyond that a line per site is unreadable (and slow to draw), so the
sites are summarized per round as quantile bands (min–max, 25–75 %, median) and only the `WORST` sites at the last
round (lowest AUC, highest loss) are drawn and named: the ones an operator would look into.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

SITE_LINES = 12
WORST = 5


def site_series(summary: dict[str, Any], key: str) -> dict[str, list[tuple[int, float]]]:
    """Each site's (round, value) points of one metric, from the summary's history."""
    out: dict[str, list[tuple[int, float]]] = {}
    for h in summary["history"]:
        for site, m in h["sites"].items():
            if m.get(key) is not None:
                out.setdefault(site, []).append((h["round"], float(m[key])))
    return out


def worst_sites(series: dict[str, list[tuple[int, float]]], higher_is_worse: bool, k: int = WORST) -> list[str]:
    """The `k` sites whose last value is worst."""
    last = {s: pts[-1][1] for s, pts in series.items() if pts}
    return sorted(last, key=lambda s: (-last[s] if higher_is_worse else last[s], s))[:k]


def quantiles(series: dict[str, list[tuple[int, float]]]) -> dict[int, tuple[float, float, float, float, float]]:
    """Per round: min, 25 %, median, 75 %, max over the sites that reported it."""
    by_round: dict[int, list[float]] = {}
    for pts in series.values():
        for r, v in pts:
            by_round.setdefault(r, []).append(v)
    out = {}
    for r, values in sorted(by_round.items()):
        q = np.quantile(np.asarray(values), [0.0, 0.25, 0.5, 0.75, 1.0])
        out[r] = (float(q[0]), float(q[1]), float(q[2]), float(q[3]), float(q[4]))
    return out


def _figure(ncols: int, nrows: int = 1, width: float = 5.5, height: float = 3.8) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def _png(fig: Any, axes: Any) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _draw_sites(ax: Any, summary: dict[str, Any], key: str, alpha: float = 1.0, marker: str = "-o") -> None:
    series = site_series(summary, key)
    if len(series) <= SITE_LINES:
        for site in sorted(series):
            pts = series[site]
            ax.plot([r for r, _ in pts], [v for _, v in pts], marker, ms=3, alpha=alpha, label=site)
        return
    q = quantiles(series)
    rounds = list(q)
    col = list(zip(*q.values(), strict=True))
    ax.fill_between(rounds, col[0], col[4], color="tab:blue", alpha=0.12, label=f"{len(series)} sites: min–max")
    ax.fill_between(rounds, col[1], col[3], color="tab:blue", alpha=0.3, label="25–75 %")
    ax.plot(rounds, col[2], color="tab:blue", lw=1.5, label="median site")
    for site in worst_sites(series, higher_is_worse=key == "loss"):
        pts = series[site]
        ax.plot([r for r, _ in pts], [v for _, v in pts], "--", lw=1, label=f"{site} (worst)")


def plot_global(summary: dict[str, Any]) -> bytes:
    hist = [h for h in summary["history"] if h["global"]]
    fig, axes = _figure(2)
    rounds = [h["round"] for h in hist]
    for ax, key, label in ((axes[0][0], "auc", "AUC"), (axes[0][1], "loss", "BCE loss")):
        ax.plot(rounds, [h["global"][key] for h in hist], "k-o", lw=2, label="global (weighted mean)")
        ax.set(title=f"Global validation {label}", xlabel="round (global model version)", ylabel=label)
    train = [(h["round"], h["train_loss"]) for h in summary["history"] if h["train_loss"] is not None]
    if train:
        axes[0][1].plot([r for r, _ in train], [v for _, v in train], "--", color="grey",
                        label="local training loss (weighted)")
    return _png(fig, axes)


def plot_sites(summary: dict[str, Any]) -> bytes:
    fig, axes = _figure(2)
    for ax, key, label in ((axes[0][0], "auc", "AUC"), (axes[0][1], "loss", "BCE loss")):
        _draw_sites(ax, summary, key)
        ax.set(title=f"Validation {label} at each site", xlabel="round (global model version)", ylabel=label)
    return _png(fig, axes)


def plot_combined(summary: dict[str, Any]) -> bytes:
    """`metrics.png`: per-site and global validation AUC and loss in one figure."""
    hist = [h for h in summary["history"] if h["global"]]
    fig, axes = _figure(2, width=5.5, height=4.0)
    for ax, key, label in ((axes[0][0], "auc", "AUC"), (axes[0][1], "loss", "BCE loss")):
        _draw_sites(ax, summary, key, alpha=0.5, marker="-")
        ax.plot([h["round"] for h in hist], [h["global"][key] for h in hist], "k-o", lw=2,
                label="global (weighted mean)")
        ax.set(title=f"Validation {label} per round", xlabel="round (global model version)", ylabel=label)
    fig.suptitle(f"{summary['name']} ({summary['job_id']})")
    return _png(fig, axes)

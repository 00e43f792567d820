"""Plots (matplotlib, imported lazily so the rest of psvi stays NumPy-only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_curves(ax, curves, xlabel: str, ylabel: str, title: str, logy: bool) -> None:
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: str,
    logy: bool = False,
) -> None:
    """Write a PNG with one line per entry of ``curves`` (``name -> (x, y)``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    _draw_curves(ax, curves, xlabel, ylabel, title, logy)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curve_grid(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    xlabel: str,
    ylabel: str,
    path: str,
    columns: int = 3,
) -> None:
    """Write a PNG with one panel per entry of ``panels`` (``title -> curves``, each as in
    :func:`plot_curves`), ``columns`` panels a row."""
    plt = _pyplot()
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    axes = list(axes.flat)
    for ax, (title, curves) in zip(axes, panels.items(), strict=False):
        _draw_curves(ax, curves, xlabel, ylabel, title, logy=False)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(bins: Mapping[str, Sequence], title: str, path: str) -> None:
    """Write a reliability diagram (accuracy against confidence per bin, with the
    diagonal of perfect calibration) from :func:`psvi.metrics.reliability_bins`."""
    plt = _pyplot()
    edges = bins["edges"]
    centers = 0.5 * (edges[1:] + edges[:-1])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(
        centers, bins["accuracy"], width=edges[1:] - edges[:-1], edgecolor="k", alpha=0.7, label="accuracy"
    )
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

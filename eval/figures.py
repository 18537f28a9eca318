"""The recall command's two pictures: recall at every K, and the top-10 images of a few text queries
with the ground truth framed (the LightningDOT paper's Figure 4)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_recall_curve(curve: dict, path: str | Path, *, title: str, chance: dict | None = None) -> Path:
    """curve: {"k": [1..K], "tr": recall per k, "ir": ...} (eval.metrics.recall_curve)."""
    plt = _plt()
    k = np.asarray(curve["k"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label, colour in (("ir", "image retrieval (text → image)", "tab:blue"),
                               ("tr", "text retrieval (image → text)", "tab:orange")):
        y = 100 * np.asarray(curve[key])
        ax.plot(k, y, color=colour, label=label, lw=2)
        for mark in (1, 5, 10):
            if mark <= len(k):
                ax.plot(mark, y[mark - 1], "o", color=colour, ms=4)
                ax.annotate(f"{y[mark - 1]:.1f}", (mark, y[mark - 1]), textcoords="offset points",
                            xytext=(4, -11 if key == "tr" else 5), fontsize=7, color=colour)
        if chance is not None:
            ax.plot(k, 100 * np.asarray(chance[key]), ls=":", color=colour, lw=1)
    if chance is not None:
        ax.plot([], [], ls=":", color="grey", label="chance")
    ax.set_xscale("log")
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= k[-1]]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 101)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_topk_grid(queries: list[str], ids: np.ndarray, scores: np.ndarray, ground_truth: list[int],
                   pictures: dict[int, np.ndarray], path: str | Path, *, labels: dict[int, str] | None = None,
                   title: str = "") -> Path:
    """One row per text query: its top candidates left to right, the ground-truth image framed in
    green (and its rank written beside the query when it is not among them)."""
    plt = _plt()
    n_q, top = ids.shape
    fig, axes = plt.subplots(n_q, top + 1, figsize=(1.25 * (top + 1) + 1.2, 1.45 * n_q + 0.4), dpi=110,
                             gridspec_kw={"width_ratios": [2.2] + [1] * top}, squeeze=False)
    for q in range(n_q):
        found = [j for j in range(top) if ids[q, j] == ground_truth[q]]
        text = textwrap.fill(queries[q], 26)
        note = f"\n(ground truth: rank {found[0] + 1})" if found else f"\n(ground truth not in top {top})"
        axes[q, 0].text(0.0, 0.5, f"“{text}”{note}", fontsize=7, va="center", ha="left", wrap=True)
        axes[q, 0].axis("off")
        for j in range(top):
            ax = axes[q, j + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            row = int(ids[q, j])
            if row < 0:
                ax.axis("off")
                continue
            ax.imshow(pictures[row])
            hit = row == ground_truth[q]
            for spine in ax.spines.values():
                spine.set_edgecolor("#1a9e1a" if hit else "#bbbbbb")
                spine.set_linewidth(4 if hit else 0.8)
            caption = f"{j + 1}. {scores[q, j]:.2f}"
            if labels and row in labels:
                lab = labels[row]
                caption += "\n" + (lab if len(lab) <= 14 else "…" + lab[-13:])
            ax.set_title(caption, fontsize=6, color="#1a9e1a" if hit else "black", pad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

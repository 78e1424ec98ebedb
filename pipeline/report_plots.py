"""The plots of `gist report` (pipeline.report): guide-similarity histograms per block and
false-negative rates per epoch and per task, rendered with matplotlib's Agg backend (no pyplot, no
display) into PNG files written atomically."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from pipeline.artifacts import atomic_path
from pipeline.masks import BLOCKS

PLOTS = {"similarity": "similarity.png", "epoch": "fn_rate_by_epoch.png", "task": "fn_rate_by_task.png"}
COLORS = {"ap": "tab:blue", "aa": "tab:orange", "pp": "tab:green", "an": "tab:red"}
BLOCK_TITLES = {"ap": "ap: a_i vs p_j (j≠i)", "aa": "aa: a_i vs a_j (j≠i)", "pp": "pp: p_i vs p_j (j≠i)", "an": "an: a_i vs every negative"}


def write_plots(report: dict, out_dir: Path) -> None:
    """The three PNG plots of PLOTS of a report's numbers (`pipeline.report._summarize`) into `out_dir`."""
    _plot_similarity(report, out_dir / PLOTS["similarity"])
    _plot_epochs(report, out_dir / PLOTS["epoch"])
    _plot_tasks(report, out_dir / PLOTS["task"])


def save_figure(fig, path: Path) -> None:
    """Render `fig` with the Agg backend (no pyplot, no display) to a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _plot_similarity(report: dict, path: Path) -> None:
    """One panel per block: kept negatives, masked candidates, and the true pairs' t_i; log counts."""
    from matplotlib.figure import Figure

    hist = report["similarity_histograms"]
    edges = np.asarray(hist["bin_edges"])
    nbins = len(edges) - 1
    shown = [b for b in BLOCKS if report["blocks"][b]["enabled"]]
    every = np.asarray(hist["positive"]) + sum(np.asarray(hist[k][b]) for k in ("masked", "kept") for b in shown)
    nonzero = np.flatnonzero(every)
    lo, hi = edges[max(nonzero[0] - 2, 0)], edges[min(nonzero[-1] + 3, nbins)] + 0.01
    fig = Figure(figsize=(11, 3.2 * ((len(shown) + 1) // 2)), layout="constrained")
    axes = fig.subplots((len(shown) + 1) // 2, 2, squeeze=False, sharex=True).ravel()
    for ax, b in zip(axes, shown):
        for counts, label, style in (
            (hist["kept"][b], "kept in-batch negatives", {"color": "tab:blue", "fill": True, "alpha": 0.35}),
            (hist["masked"][b], "masked (false negatives)", {"color": "tab:red", "fill": True, "alpha": 0.5}),
            (hist["positive"], "true pairs t_i = g(a_i, p_i)", {"color": "black", "linestyle": "--", "linewidth": 1.3}),
        ):
            ax.stairs(counts, edges, label=f"{label} ({sum(counts):,})", **style)
        ax.set_yscale("log")
        ax.set_title(BLOCK_TITLES[b])
        ax.set_xlim(lo, hi)
        ax.set_ylabel("count (log)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    for ax in axes[-2:]:
        ax.set_xlabel("guide cosine similarity")
    p = report["plan"]
    fig.suptitle(f"Guide similarity of in-batch candidates: {report['counts']['batches']:,} planned batches, "
                 f"{p['margin_strategy']} margin {p['margin']}, bins of {2 / nbins:g}")
    save_figure(fig, path)


def _self_pair_note(fig, report: dict) -> None:
    """Caption: how much of the aa/pp rates the always-similar self-pairs make up."""
    parts = [f"{b} {100 * report['blocks'][b]['self_masked'] / report['blocks'][b]['candidates']:.1f}"
             for b in ("aa", "pp") if report["blocks"][b]["enabled"]]
    if parts:
        note = ("aa and pp count the self-pair (a_i, a_i) as a candidate, as GISTEmbedLoss does; "
                f"masked self-pairs make up {' and '.join(parts)} points of their rates.")
        fig.text(0.01, 0.0, textwrap.fill(note, int(fig.get_figwidth() * 14)), fontsize=8, ha="left", va="top")


def _plot_rates(ax, labels: list[str], rates: list[dict], horizontal: bool) -> None:
    """Grouped bars of false-negative rate (%) per block for each label."""
    blocks = [b for b in BLOCKS if any(r[b] is not None for r in rates)]
    width = 0.8 / max(len(blocks), 1)
    pos = np.arange(len(labels))
    for n, b in enumerate(blocks):
        values = [100 * (r[b] or 0.0) for r in rates]
        offset = pos - 0.4 + width * (n + 0.5)
        bar = ax.barh if horizontal else ax.bar
        bar(offset, values, width, label=b, color=COLORS[b])
    (ax.set_yticks if horizontal else ax.set_xticks)(pos, labels)
    (ax.set_xlabel if horizontal else ax.set_ylabel)("false-negative rate (% of candidates masked)")
    ax.grid(alpha=0.3, axis="x" if horizontal else "y")
    ax.legend(title="block", fontsize=8)


def _plot_epochs(report: dict, path: Path) -> None:
    """Rate per block per epoch: bars for a few epochs, lines for many."""
    from matplotlib.figure import Figure

    rows = report["by_epoch"]
    fig = Figure(figsize=(min(4 + 0.6 * len(rows), 12), 4), layout="constrained")
    ax = fig.subplots()
    if len(rows) <= 12:
        _plot_rates(ax, [str(r["epoch"]) for r in rows], [r["rate"] for r in rows], horizontal=False)
    else:
        for b in BLOCKS:
            if rows[0]["rate"][b] is not None:
                ax.plot([r["epoch"] for r in rows], [100 * r["rate"][b] for r in rows], marker=".", label=b, color=COLORS[b])
        ax.set_ylim(bottom=0)
        ax.set_ylabel("false-negative rate (% of candidates masked)")
        ax.grid(alpha=0.3)
        ax.legend(title="block", fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_title(f"False-negative rate per epoch (strategy {report['plan']['strategy']}, margin {report['plan']['margin']})")
    _self_pair_note(fig, report)
    save_figure(fig, path)


def _plot_tasks(report: dict, path: Path) -> None:
    """Rate per block per task of the anchor row, horizontal bars; tasks labelled with their row counts."""
    from matplotlib.figure import Figure

    tasks = sorted(report["by_task"].items(), key=lambda item: -item[1]["anchor_rows"])
    fig = Figure(figsize=(9, 1.5 + 0.25 * len(tasks) * (1 + sum(report["blocks"][b]["enabled"] for b in BLOCKS) / 2)), layout="constrained")
    ax = fig.subplots()
    labels = [f"{name}\n({v['anchor_rows']:,} anchor rows)" for name, v in tasks]
    _plot_rates(ax, labels, [v["rate"] for _, v in tasks], horizontal=True)
    ax.invert_yaxis()
    ax.set_title("False-negative rate per task of the anchor row (all epochs)")
    _self_pair_note(fig, report)
    save_figure(fig, path)

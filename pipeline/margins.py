"""Margin sweeps from a stored guide pass: what each margin would mask, before any training.

`gist report GUIDE_DIR --margins 0,0.02,0.05,0.1` replays the planned batches of a precompute-guide
or plan directory from the stored guide embeddings (no model) and applies the one mask rule
(`pipeline.masks.plan_masks`: the guide rule, plus duplicate masking when the plan has it) at every margin: the
masked fraction of each block, and histograms of the guide similarity of masked and kept candidates
beside the true pairs' t_i. A user picks a margin in seconds instead of training runs, then plans
it with `gist plan --margin M`.

Counts are the manifest's: candidates per row are `ap` all p_j (j != i), `aa`/`pp` all a_j / p_j
including the self-pair, `an` every negative of the batch; at the plan's own margin the masked
counts equal the manifest's `masked_entries`. Histograms leave the `aa`/`pp` self-pairs out (their
similarity is 1 by construction), as `gist report` does. Writes OUT/margins.json, margins.md and
margins.png.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from pipeline import GistError
from pipeline.artifacts import guide_dir_of, write_json
from pipeline.masks import BLOCKS, chunk_batches, duplicate_masks, guide_similarities, plan_masks
from pipeline.outputs import Kind, Output
from pipeline.plan import check_rule
from pipeline.report import NBINS, histogram, load_planned
from pipeline.report_plots import save_figure

MARGINS = "margins.json", "margins.md", "margins.png"


def parse_margins(text: str) -> list[float]:
    """'0,0.02,0.05' -> [0.0, 0.02, 0.05]: numbers, each once, in the given order. Their range is the
    plan's (pipeline.plan.check_rule), checked by margin_sweep once the margin strategy is known."""
    try:
        margins = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GistError(f"--margins {text!r}: comma-separated numbers, e.g. 0,0.02,0.05,0.1") from None
    if not margins or len(set(margins)) != len(margins):
        raise GistError(f"--margins {text!r}: distinct margins, e.g. 0,0.02,0.05,0.1")
    return margins


def margin_sweep(run_dir: Path, margins: list[float], margin_strategy: str | None = None) -> dict:
    """Masked entries and similarity histograms of every block at each margin, over every planned batch.

    `margin_strategy`: absolute or relative (default: the plan's own). The plan's contrast flags and
    duplicate masking apply as planned.
    """
    manifest, _, masks, data, embeddings = load_planned(run_dir)
    params = masks.params.without_doc_blocks()
    strategy = margin_strategy or params.margin_strategy
    for margin in margins:  # the plan's own check: a margin the plan would refuse is not swept
        check_rule(dataclasses.replace(params, margin_strategy=strategy, margin=margin), option="--margins")
    g, k = params.batch_size, data.num_negatives
    enabled = {block: block in params.planned_blocks(k) for block in BLOCKS}
    per_batch = {"ap": g * (g - 1), "aa": g * g, "pp": g * g, "an": g * g * k}
    masked = np.zeros((len(margins), len(BLOCKS)), dtype=np.int64)
    hist = {"masked": np.zeros((len(margins), len(BLOCKS), NBINS), np.int64), "kept": np.zeros((len(margins), len(BLOCKS), NBINS), np.int64)}
    positive = np.zeros(NBINS, dtype=np.int64)
    off_diagonal = ~torch.eye(g, dtype=torch.bool)
    per_chunk = chunk_batches(g, k)
    for start in range(0, masks.num_batches, per_chunk):
        rows = masks.batch_rows(start, min(start + per_chunk, masks.num_batches))
        sims = guide_similarities(embeddings, data, rows, params)
        duplicates = duplicate_masks(data, rows, params) if params.mask_duplicates else None
        positive += histogram(sims["threshold"].numpy())
        candidate = {b: off_diagonal.expand(len(rows), g, g) if b != "an" else torch.ones_like(sims["an"], dtype=torch.bool) for b in BLOCKS}
        for m, margin in enumerate(margins):
            swept, _ = plan_masks(sims, dataclasses.replace(params, margin_strategy=strategy, margin=margin), duplicates)
            for b, block in enumerate(BLOCKS):
                if not enabled[block]:
                    continue
                mask = swept[block]
                masked[m, b] += int(mask.sum())
                sim, shown = sims[block].numpy(), candidate[block]
                hist["masked"][m, b] += histogram(sim, (mask & shown).numpy())
                hist["kept"][m, b] += histogram(sim, (~mask & shown).numpy())
    totals = {block: per_batch[block] * masks.num_batches for block in BLOCKS}
    rows_out = []
    for m, margin in enumerate(margins):
        rows_out.append({
            "margin": margin,
            "masked_entries": {block: int(masked[m, b]) if enabled[block] else None for b, block in enumerate(BLOCKS)},
            "masked_fraction": {block: masked[m, b] / totals[block] if enabled[block] and totals[block] else None for b, block in enumerate(BLOCKS)},
            "histograms": {kind: {block: hist[kind][m, b].tolist() for b, block in enumerate(BLOCKS) if enabled[block]} for kind in hist},
        })
    return {
        "run_dir": str(Path(run_dir).resolve()), "run_kind": manifest["kind"], "plan": masks.meta["plan"], "margin_strategy": strategy,
        "batches": masks.num_batches, "candidates": {block: totals[block] if enabled[block] else None for block in BLOCKS},
        "bin_edges": [round(x, 4) for x in np.linspace(-1.0, 1.0, NBINS + 1).tolist()],
        "positive_histogram": positive.tolist(), "margins": rows_out,
    }


def _markdown(sweep: dict) -> str:
    plan = sweep["plan"]
    lines = [
        f"# Margin sweep: {sweep['run_dir']}", "",
        f"{sweep['batches']:,} planned batches of {plan['batch_size']}, {sweep['margin_strategy']} margin "
        f"(planned: {plan['margin_strategy']} {plan['margin']}), duplicates masked: {plan['mask_duplicates']}. "
        "Masked fraction of each block's candidates:", "",
        "| margin | " + " | ".join(BLOCKS) + " |", "|---|" + "---|" * len(BLOCKS),
    ]
    for row in sweep["margins"]:
        cells = [f"{f:.2%}" if f is not None else "–" for f in row["masked_fraction"].values()]
        lines.append(f"| {row['margin']:g} | " + " | ".join(cells) + " |")
    lines += ["", "![guide similarity of masked and kept candidates per margin](margins.png)", ""]
    return "\n".join(lines)


def _plot(sweep: dict, path: Path) -> None:
    """One panel per margin: kept and masked candidates of every enabled block pooled, and the true pairs."""
    from matplotlib.figure import Figure

    edges = np.asarray(sweep["bin_edges"])
    fig = Figure(figsize=(11, 2.6 * len(sweep["margins"])), layout="constrained")
    axes = fig.subplots(len(sweep["margins"]), 1, squeeze=False, sharex=True)[:, 0]
    for ax, row in zip(axes, sweep["margins"]):
        for kind, color in (("kept", "tab:blue"), ("masked", "tab:red")):
            counts = np.sum([row["histograms"][kind][b] for b in row["histograms"][kind]], axis=0)
            ax.stairs(counts, edges, fill=True, alpha=0.4, color=color, label=f"{kind} candidates ({int(counts.sum()):,})")
        ax.stairs(sweep["positive_histogram"], edges, color="black", linestyle="--", label="true pairs t_i")
        ax.set_yscale("log")
        ax.set_title(f"{sweep['margin_strategy']} margin {row['margin']:g}")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("guide cosine similarity")
    save_figure(fig, path)


MARGIN_SWEEP = Kind("margins", directory=True, record=MARGINS[0], owned=MARGINS)


def write_margin_sweep(run_dir: Path, out_dir: Path, margins: list[float], margin_strategy: str | None = None, overwrite: bool = False) -> dict:
    """`margin_sweep`, written to OUT as margins.json, margins.md and margins.png: one output (pipeline.outputs)."""
    run_dir = Path(run_dir)
    output = Output(out_dir, MARGIN_SWEEP, inputs={"GUIDE_DIR": run_dir, "its guide pass": guide_dir_of(run_dir)}, overwrite=overwrite)
    output.check()  # before the sweep: a refused OUT costs nothing
    sweep = {"kind": MARGIN_SWEEP.name, **margin_sweep(run_dir, margins, margin_strategy)}
    with output.stage() as stage:
        _plot(sweep, stage.dir / MARGINS[2])
        (stage.dir / MARGINS[1]).write_text(_markdown(sweep))
        write_json(stage.dir / MARGINS[0], sweep)
    return sweep

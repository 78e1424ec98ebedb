"""Data-quality report of a stage-1 (`precompute-guide`) or `gist plan` directory, without any model.

`write_report` replays every planned batch from the stored guide embeddings: it reads the stored
masks (what stage 2 trains with), recomputes the guide similarities of each block with the mask
kernel's own products (`pipeline.masks.guide_similarities`), checks that the one mask rule
(`pipeline.masks.plan_masks`) reproduces the stored masks from them (differences within
float32 rounding of a threshold, as masks made on a GPU have, are counted apart:
`pipeline.mask_check`), and writes to OUT:

- `report.json`: false-negative rates (masked / candidate entries) per block, per epoch and per
  task of the anchor row; self-pair and identical-text counts; similarity histograms; the most
  similar masked pairs.
- `similarity.png`, `fn_rate_by_epoch.png`, `fn_rate_by_task.png`: the plots.
- `report.md`: the numbers as tables, the plots, and the pairs, for a person to judge the guide's
  vetoes and spot duplicated or mislabeled data.

Candidates per row i: `ap` all p_j with j != i (the true pair is no candidate), `aa` all a_j and
`pp` all p_j including the self-pair (as in `GISTEmbedLoss`, and as the manifest's masked
fractions count them), `an` every negative of the batch. Histograms and pair lists leave the
`aa`/`pp` self-pairs out: their guide similarity is 1 by construction. A pair is "identical"
when the candidate's text is the row's own anchor or positive text (a repeated anchor, a
duplicated example, or a negative that equals a positive). "Own negatives" are the `an` entries
of a row's own mined negatives: a guide that masks many of them cannot tell them from positives.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline import GistError
from pipeline.artifacts import guide_dir_of, read_manifest, verify_checksum, write_json
from pipeline.data import NO_TASK, TrainingData
from pipeline.guide import load_guide_pass
from pipeline.mask_check import differences, rounding_band
from pipeline.outputs import Kind, Output
from pipeline.masks import BLOCKS, MASKS, PlannedMasks, check_planned_from, chunk_batches, duplicate_masks, guide_similarities, negative_columns, plan_masks
from pipeline.report_plots import PLOTS, write_plots
from pipeline.views import GuideViews

NBINS = 200  # similarity histogram bins over [-1, 1]
MAX_TEXT = 200  # characters of a text shown in report.md
ROW_TEXT = {"ap": "anchor", "aa": "anchor", "pp": "positive", "an": "anchor"}


def _enabled(masks: PlannedMasks, data: TrainingData) -> dict[str, bool]:
    """Blocks that have candidates in this plan."""
    planned = masks.params.planned_blocks(data.num_negatives)
    return {block: block in planned for block in BLOCKS}


def load_planned(run_dir: Path) -> tuple[dict, Path, PlannedMasks, TrainingData, np.ndarray]:
    """Manifest, guide directory, stored masks, data and embeddings, every file checked against its checksum."""
    manifest = read_manifest(run_dir)
    guide_dir = guide_dir_of(run_dir, manifest)
    masks = PlannedMasks(verify_checksum(run_dir, MASKS, manifest))
    guide_manifest, data, embeddings = load_guide_pass(guide_dir)
    if masks.meta["dataset_fingerprint"] != data.fingerprint:
        raise GistError(f"{run_dir}/{MASKS} was planned for other data than {guide_dir} holds (fingerprint mismatch)")
    check_planned_from(masks, guide_manifest, guide_dir)
    return manifest, guide_dir, masks, data, embeddings


def histogram(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Histogram counts of `values` (where `mask`) over NBINS equal bins of [-1, 1]."""
    if mask is not None:
        values = values[mask]
    index = np.clip(((values.ravel().astype(np.float64) + 1.0) * (NBINS / 2)).astype(np.int64), 0, NBINS - 1)
    return np.bincount(index, minlength=NBINS)


def _top_unique(pool: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The n most similar entries of `pool`, one per unordered text pair (its most similar occurrence)."""
    order = np.lexsort((pool["col"], pool["i"], pool["block"], pool["row"], -pool["sim"]))
    _, first = np.unique(pool["key"][order], return_index=True)
    keep = order[np.sort(first)][:n]
    return {k: v[keep] for k, v in pool.items()}


def _merge(top: dict | None, new: dict, n: int) -> dict:
    return _top_unique(new if top is None else {k: np.concatenate([top[k], new[k]]) for k in new}, n)


def _cutoff(top: dict | None, n: int) -> float:
    """Similarity an entry needs to enter a full top-n list."""
    return -np.inf if top is None or len(top["sim"]) < n else float(top["sim"][-1])


def _entries(select, sim, threshold, identical, row_ids, col_ids, start: int, code: int, num_texts: int) -> dict[str, np.ndarray]:
    """The selected (batch, row, column) entries of one block of a chunk, as candidates for a top list."""
    b, i, c = np.nonzero(select)
    left, right = row_ids[b, i], col_ids[b, c]
    return {
        "sim": sim[b, i, c], "t": threshold[b, i], "row": b + start, "i": i, "col": c,
        "block": np.full(len(b), code, dtype=np.int8), "identical": identical[b, i, c],
        "key": np.minimum(left, right) * num_texts + np.maximum(left, right),  # the unordered text pair
    }


def _scan(masks: PlannedMasks, data: TrainingData, embeddings: np.ndarray, task_of: np.ndarray, ntasks: int, examples: int) -> dict:
    """One pass over every planned batch: counts per block/epoch/task, histograms, mask check, top pairs."""
    params, epochs, steps, g = masks.params.without_doc_blocks(), masks.params.epochs, masks.steps_per_epoch, masks.params.batch_size
    k = data.num_negatives
    cols = {"ap": g, "aa": g, "pp": g, "an": g * k}
    enabled = _enabled(masks, data)

    def zeros(*shape: int) -> dict[str, np.ndarray]:
        return {b: np.zeros(shape, dtype=np.int64) for b in BLOCKS}

    acc = {
        "masked_epoch": zeros(epochs), "masked_task": zeros(ntasks), "self_masked": zeros(),
        "identical_masked": zeros(), "identical_kept": zeros(), "mismatched": zeros(), "near_threshold": zeros(),
        "hist_masked": zeros(NBINS), "hist_kept": zeros(NBINS), "hist_positive": np.zeros(NBINS, dtype=np.int64),
        "threshold_sum": np.zeros(ntasks), "rows_task": np.zeros(ntasks, dtype=np.int64),
    }
    top = {"all": None, "distinct": None}
    per_chunk = chunk_batches(g, k)
    diagonal = np.eye(g, dtype=bool)
    band = rounding_band(embeddings.shape[1], params)
    # Tiny per-batch products: one BLAS thread is fastest (see masks.write_masks) and leaves cores to others.
    with threadpool_limits(1):
        for start in range(0, masks.num_batches, per_chunk):
            stop = min(start + per_chunk, masks.num_batches)
            rows = masks.batch_rows(start, stop)
            epoch_of = np.arange(start, stop) // steps
            tasks = task_of[rows]  # (nb, G)
            # The similarities once, in the mask kernel's own products; the rule recomputed from them.
            sims = guide_similarities(embeddings, data, rows, params)
            duplicates = duplicate_masks(data, rows, params)  # "identical" pairs, and the plan's duplicate masks
            recomputed = plan_masks(sims, params, duplicates)[0]
            a_ids, p_ids, n_ids = data.anchor_ids[rows], data.positive_ids[rows], negative_columns(data.negative_ids, rows)
            ids = {"ap": (a_ids, p_ids), "aa": (a_ids, a_ids), "pp": (p_ids, p_ids), "an": (a_ids, n_ids)}
            threshold = sims["threshold"][..., 0].numpy()  # t_i, (nb, G)
            acc["hist_positive"] += histogram(threshold)
            acc["threshold_sum"] += np.bincount(tasks.ravel(), weights=threshold.ravel(), minlength=ntasks)
            acc["rows_task"] += np.bincount(tasks.ravel(), minlength=ntasks)
            pool = {"all": [], "distinct": []}
            for code, block in enumerate(BLOCKS):
                if not enabled[block]:
                    continue
                sim, (row_ids, col_ids) = sims[block].numpy(), ids[block]
                stored = masks.dense(block, start, stop, g, cols[block])
                real, near = differences(stored, recomputed[block].numpy(), sim, threshold[..., None], params, band)
                acc["mismatched"][block] += real
                acc["near_threshold"][block] += near
                acc["masked_epoch"][block] += np.bincount(epoch_of, weights=stored.sum(axis=(1, 2)), minlength=epochs).astype(np.int64)
                acc["masked_task"][block] += np.bincount(tasks.ravel(), weights=stored.sum(axis=2).ravel(), minlength=ntasks).astype(np.int64)
                candidate = np.ones(stored.shape, dtype=bool)
                if block != "an":  # ap's true pair is no candidate; aa/pp self-pairs stay out of histograms and pairs
                    candidate &= ~diagonal
                    acc["self_masked"][block] += int(stored[:, diagonal].sum())
                else:  # the row's own (mined) negatives: columns c * G + i
                    acc["self_masked"][block] += int(stored.reshape(len(rows), g, k, g).transpose(0, 2, 1, 3)[:, :, diagonal].sum())
                identical = duplicates[block].numpy()  # the candidate's text is the row's own anchor or positive
                masked, kept = stored & candidate, ~stored & candidate
                acc["identical_masked"][block] += int((identical & masked).sum())
                acc["identical_kept"][block] += int((identical & kept).sum())
                acc["hist_masked"][block] += histogram(sim, masked)
                acc["hist_kept"][block] += histogram(sim, kept)
                if examples > 0:
                    for name, select in (("all", masked), ("distinct", masked & ~identical)):
                        select = select & (sim >= _cutoff(top[name], examples))
                        pool[name].append(_entries(select, sim, threshold, identical, row_ids, col_ids, start, code, len(data.texts)))
            for name, parts in pool.items():
                if parts:
                    top[name] = _merge(top[name], {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}, examples)
    return {**acc, "top": top, "cols": cols, "band": band}


def _pairs(top: dict | None, masks: PlannedMasks, data: TrainingData) -> list[dict]:
    """Materialize top entries as readable records: texts, block, threshold, epoch."""
    if top is None:
        return []
    steps, g = masks.steps_per_epoch, masks.params.batch_size
    records = []
    for sim, t, row, i, col, code, identical in zip(*(top[k].tolist() for k in ("sim", "t", "row", "i", "col", "block", "identical"))):
        block = BLOCKS[code]
        batch = masks.batch_rows(row, row + 1)[0]
        anchor_ex, cand_ex = int(batch[i]), int(batch[col % g])
        if block == "an":
            role, cand_text = f"negative_{col // g + 1}", data.negative_ids[cand_ex, col // g]
        else:
            role = "positive" if block in ("ap", "pp") else "anchor"
            cand_text = data.positive_ids[cand_ex] if role == "positive" else data.anchor_ids[cand_ex]
        records.append({
            "block": block, "similarity": round(sim, 6), "threshold": round(t, 6), "similarity_minus_threshold": round(sim - t, 6),
            "identical_text": bool(identical), "epoch": row // steps, "batch": row, "row_text": ROW_TEXT[block],
            "anchor_example": anchor_ex, "task": data.tasks[anchor_ex] if data.tasks is not None else None,
            "anchor": data.text(data.anchor_ids[anchor_ex]), "positive": data.text(data.positive_ids[anchor_ex]),
            "candidate_example": cand_ex, "candidate_role": role, "candidate": data.text(cand_text),
        })
    return records


def _rates(masked: dict, candidates: dict) -> dict:
    return {b: (masked[b] / candidates[b] if candidates[b] else None) for b in BLOCKS}


def _summarize(run_dir: Path, manifest: dict, guide_dir: Path, masks: PlannedMasks, data: TrainingData, scan: dict, task_names: list[str]) -> dict:
    """The report's numbers as a JSON-ready dict."""
    epochs, steps, g = masks.params.epochs, masks.steps_per_epoch, masks.params.batch_size
    enabled = _enabled(masks, data)
    per_row = {b: (scan["cols"][b] - (b == "ap")) * enabled[b] for b in BLOCKS}  # candidates of one anchor row
    batches = epochs * steps
    blocks = {}
    for b in BLOCKS:
        masked, candidates = int(scan["masked_epoch"][b].sum()), per_row[b] * g * batches
        blocks[b] = {
            "enabled": enabled[b], "masked": masked, "candidates": candidates, "rate": masked / candidates if candidates else None,
            "identical_text_masked": int(scan["identical_masked"][b]), "identical_text_kept": int(scan["identical_kept"][b]),
            "mismatched_vs_rule": int(scan["mismatched"][b]), "near_threshold_vs_rule": int(scan["near_threshold"][b]),
        }
        if b in ("aa", "pp"):
            self_candidates = g * batches if enabled[b] else 0
            blocks[b].update(self_masked=int(scan["self_masked"][b]), self_candidates=self_candidates)
            rest = candidates - self_candidates
            blocks[b]["rate_without_self"] = (masked - blocks[b]["self_masked"]) / rest if rest else None
        elif b == "an":
            own = g * batches * data.num_negatives
            blocks[b].update(own_negative_masked=int(scan["self_masked"][b]), own_negative_candidates=own)
            blocks[b]["own_negative_rate"] = blocks[b]["own_negative_masked"] / own if own else None
    by_epoch = [
        {"epoch": e, "masked": {b: int(scan["masked_epoch"][b][e]) for b in BLOCKS},
         "rate": _rates({b: int(scan["masked_epoch"][b][e]) for b in BLOCKS}, {b: per_row[b] * g * steps for b in BLOCKS})}
        for e in range(epochs)
    ]
    by_task = {}
    for t, name in enumerate(task_names):
        rows = int(scan["rows_task"][t])
        masked = {b: int(scan["masked_task"][b][t]) for b in BLOCKS}
        by_task[name] = {
            "anchor_rows": rows, "mean_threshold": float(scan["threshold_sum"][t] / rows) if rows else None,
            "masked": masked, "rate": _rates(masked, {b: per_row[b] * rows for b in BLOCKS}),
        }
    edges = np.linspace(-1.0, 1.0, NBINS + 1)
    return {
        "run_dir": str(Path(run_dir).resolve()), "run_kind": manifest["kind"], "guide_dir": str(guide_dir.resolve()),
        "guide": manifest.get("guide", {}).get("name"), "guide_views": masks.meta["guide_views"], "dataset_fingerprint": data.fingerprint, "plan": masks.meta["plan"],
        "counts": {
            "batches": batches, "epochs": epochs, "steps_per_epoch": steps, "batch_size": g, "examples": data.num_examples,
            "examples_per_epoch": steps * g, "texts": len(data.texts), "negatives_per_example": data.num_negatives, "tasks": len(task_names),
        },
        "blocks": blocks, "by_epoch": by_epoch, "by_task": by_task,
        "mask_check": {"mismatched_entries": sum(int(scan["mismatched"][b]) for b in BLOCKS),
                       "near_threshold_entries": sum(int(scan["near_threshold"][b]) for b in BLOCKS), "rounding_band": scan["band"]},
        "similarity_histograms": {
            "bin_edges": [round(x, 4) for x in edges.tolist()], "positive": scan["hist_positive"].tolist(),
            "masked": {b: scan["hist_masked"][b].tolist() for b in BLOCKS}, "kept": {b: scan["hist_kept"][b].tolist() for b in BLOCKS},
        },
        "top_masked_pairs": _pairs(scan["top"]["all"], masks, data),
        "top_masked_distinct_pairs": _pairs(scan["top"]["distinct"], masks, data),
        "plots": dict(PLOTS),
    }


def _cell(value, digits: int = 2) -> str:
    """A Markdown table cell: percentages for rates, escaped and shortened text."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{100 * value:.{digits}f}%"
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(map(str, r)) + " |" for r in rows), ""]


def _pair_table(pairs: list[dict]) -> list[str]:
    rows = [
        [n + 1, p["block"], f"{p['similarity']:.4f}", f"{p['threshold']:.4f}", "**yes**" if p["identical_text"] else "",
         _cell(p["task"] or NO_TASK), f"{p['anchor_example']} / {p['candidate_example']} ({p['candidate_role']})",
         _cell(p["anchor"]), _cell(p["positive"]), _cell(p["candidate"])]
        for n, p in enumerate(pairs)
    ]
    header = ["#", "block", "g", "t_i", "identical", "task", "examples i / j", "anchor a_i", "positive p_i", "candidate"]
    return _table(header, rows) if rows else ["(no masked pairs)", ""]


def _markdown(report: dict) -> str:
    """report.md: overview, rate tables, plots (relative links) and the most similar masked pairs."""
    c, p, blocks = report["counts"], report["plan"], report["blocks"]
    shown = [b for b in BLOCKS if blocks[b]["enabled"]]
    lines = [
        f"# gist data-quality report: `{report['run_dir']}`", "",
        f"Guide `{report['guide']}` (embeddings from `{report['guide_dir']}`; {GuideViews.from_record(report['guide_views']).describe()}), {report['run_kind']} directory. "
        f"{c['examples']:,} examples, {c['texts']:,} unique texts, {c['negatives_per_example']} negative(s) per example, {c['tasks']} task(s). "
        f"{c['batches']:,} planned batches = {c['epochs']} epoch(s) × {c['steps_per_epoch']:,} steps of {c['batch_size']} "
        f"({c['examples_per_epoch']:,} examples per epoch). Plan: strategy `{p['strategy']}`, seed {p['seed']}, "
        f"{p['margin_strategy']} margin {p['margin']}, contrast anchors {p['contrast_anchors']}, contrast positives {p['contrast_positives']}.", "",
        "A candidate x of anchor row i is masked (a false negative) iff g(·, x) > t_i − m (absolute) or "
        "> t_i − |t_i|·m (relative), with t_i = g(a_i, p_i). Rates are masked / candidate entries; `aa` and `pp` "
        "count the self-pair (a_i, a_i) as a candidate, as `GISTEmbedLoss` does; the column without it shows genuine in-batch negatives.", "",
    ]
    lines += [
        _mask_check_line(report["mask_check"]), "",
        "## False-negative rate per block", "",
        *_table(
            ["block", "masked", "candidates", "rate", "self-pairs / own negatives masked", "rate without self-pairs", "identical texts masked", "identical texts kept as negatives"],
            [[b, f"{blocks[b]['masked']:,}", f"{blocks[b]['candidates']:,}", _cell(blocks[b]["rate"]),
              f"{blocks[b]['self_masked']:,} / {blocks[b]['self_candidates']:,}" if b in ("aa", "pp")
              else f"{blocks[b]['own_negative_masked']:,} / {blocks[b]['own_negative_candidates']:,}" if b == "an" else "–",
              _cell(blocks[b].get("rate_without_self", blocks[b]["rate"])), f"{blocks[b]['identical_text_masked']:,}", f"{blocks[b]['identical_text_kept']:,}"]
             for b in shown],
        ),
        "Own negatives: the `an` entries of a row's own (mined) negatives; the guide vetoing many of them means it "
        "cannot tell the hard negatives from the positives. \"Identical texts\": the candidate's text equals the row's own "
        "anchor or positive — one anchor with several positives, a duplicated example, or a negative that is another row's "
        "positive. Kept as negatives, identical texts are pushed apart; with margin 0 a duplicated positive has g = t_i "
        "exactly and is not masked (the rule is strict).", "",
        f"![guide similarity histograms]({PLOTS['similarity']})", "",
        "Kept negatives (blue) and masked candidates (red) per block; the dashed line is the distribution of the "
        "thresholds t_i. Self-pairs of `aa`/`pp` are left out.", "",
        "## Per epoch", "",
        *_table(["epoch", *shown], [[r["epoch"], *(_cell(r["rate"][b]) for b in shown)] for r in report["by_epoch"]]),
        f"![false-negative rate per epoch]({PLOTS['epoch']})", "",
        "## Per task (task of the anchor row)", "",
        *_table(
            ["task", "anchor rows", "mean t_i", *shown],
            [[_cell(name), f"{v['anchor_rows']:,}", "–" if v["mean_threshold"] is None else f"{v['mean_threshold']:.3f}", *(_cell(v["rate"][b]) for b in shown)]
             for name, v in sorted(report["by_task"].items(), key=lambda item: -item[1]["anchor_rows"])],
        ),
        f"![false-negative rate per task]({PLOTS['task']})", "",
        "## Most similar masked pairs", "",
        "The guide's strongest vetoes, one row per pair of texts (its most similar occurrence). g is the guide similarity of "
        "the row text (a_i, or p_i for `pp`) and the candidate; t_i the row's threshold. Pairs with identical texts are "
        "the same text in two examples of the batch; pairs with g far above t_i that are not paraphrases may be mislabeled "
        "examples or guide errors.", "",
        *_pair_table(report["top_masked_pairs"]),
        "## Most similar masked pairs with different texts", "",
        *_pair_table(report["top_masked_distinct_pairs"]),
    ]
    if "filter" in report:
        lines += _filter_section(report["filter"])
    return "\n".join(lines)


def _mask_check_line(check: dict) -> str:
    """The mask check's verdict: differences beyond the rounding band are an integrity alarm, those within it are not."""
    real, near, band = check["mismatched_entries"], check["near_threshold_entries"], check["rounding_band"]
    rounding = (f"{near:,} entries within ±{band:.1e} of their threshold, where float32 rounding decides (masks "
                "computed on another device, e.g. a GPU, sum the products in another order)")
    if real:
        return (f"Mask check: the stored masks **differ in {real:,} entries from** the mask rule applied to the stored "
                f"embeddings, beyond float32 rounding of the threshold" + (f" (and in {rounding})" if near else "") + ".")
    return ("Mask check: the stored masks equal the mask rule applied to the stored embeddings"
            + (f", but for {rounding}: not an integrity problem." if near else "."))


def _filter_section(f: dict) -> list[str]:
    """The `gist filter` summary: what the consistency filter dropped, per task, and its worst pairs."""
    rule = " and ".join(([f"rank <= {f['params']['top_k']}"] if f["params"]["top_k"] else [])
                        + ([f"g(a_i, p_i) >= {f['params']['min_score']}"] if f["params"]["min_score"] is not None else []))
    return [
        "## Consistency filter (`gist filter`)", "",
        f"Kept {f['kept']:,} of {f['examples']:,} examples ({f['dropped']:,} dropped) into `{f['out']}`: keep iff {rule}, the "
        f"positive's rank among the {f['params']['among']} for its anchor (other positives of the same anchor text not counted). "
        f"Rank quantiles: median {f['rank_quantiles']['p50']}, p90 {f['rank_quantiles']['p90']}, p99 {f['rank_quantiles']['p99']}.", "",
        *_table(["task", "examples", "dropped", "share dropped"],
                [[_cell(t), f"{v['examples']:,}", f"{v['dropped']:,}", _cell(v["dropped"] / max(1, v["examples"]))] for t, v in f["per_task"].items()]),
        "Lowest-scored pairs (g = the guide's similarity of anchor and positive):", "",
        *_table(["example", "task", "g", "rank", "kept", "anchor", "positive"],
                [[w["example_id"], _cell(w["task"]), f"{w['score']:.4f}", f"{w['rank']}" + ("" if w["rank_exact"] else "+"),
                  "yes" if w["kept"] else "**no**", _cell(w["anchor"]), _cell(w["positive"])] for w in f["worst"]]),
    ]


def _read_filter_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GistError(f"--filter {path}: cannot read ({e})") from None
    if not isinstance(summary, dict) or summary.get("kind") != "filter":
        raise GistError(f"--filter {path}: not a `gist filter` summary (*.filter.json)")
    return summary


REPORT = Kind("report", directory=True, record="report.json", owned=("report.json", "report.md", *PLOTS.values()))


def write_report(run_dir: Path, out_dir: Path, examples: int = 20, filter_summary: Path | None = None, overwrite: bool = False) -> dict:
    """Write a data-quality report of a stage-1 or plan directory to `out_dir`; returns its numbers.

    Loads no model: similarities come from the stored guide embeddings, masks from `masks.parquet`
    (checked against `pipeline.masks.plan_masks`). Writes `report.json`, `report.md` and three PNG
    plots as one output (pipeline.outputs). `examples` is the length of each list of most similar
    masked pairs; `filter_summary` (a `gist filter` summary, `*.filter.json`) adds its section.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    manifest, guide_dir, masks, data, embeddings = load_planned(run_dir)
    output = Output(out_dir, REPORT, inputs={"GUIDE_DIR": run_dir, "its guide pass": guide_dir, "--filter": filter_summary}, overwrite=overwrite)
    output.check()  # before the scan: a refused OUT costs nothing
    task_names, task_of = np.unique(data.task_labels().astype(str), return_inverse=True)
    scan = _scan(masks, data, embeddings, task_of.astype(np.int64), len(task_names), examples)
    report = {"kind": REPORT.name, **_summarize(run_dir, manifest, guide_dir, masks, data, scan, task_names.tolist())}
    if filter_summary is not None:
        report["filter"] = _read_filter_summary(Path(filter_summary))
    with output.stage() as stage:
        write_plots(report, stage.dir)
        (stage.dir / "report.md").write_text(_markdown(report) + "\n")
        write_json(stage.dir / "report.json", report)
    return report

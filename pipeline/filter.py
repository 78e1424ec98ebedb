"""Consistency filtering from a stored guide pass (`gist filter`): drop the pairs the guide disowns.

E5, GTE and Nomic Embed clean their training pairs by asking a large model where it ranks each
pair's positive for its anchor, and keeping the pair only if the positive is near the top. That
normally costs another pass of the large model; a gist guide pass already holds its view of every
text, so the ranks come from the stored embeddings, no model loaded.

The rank of example i's positive p_i for its anchor a_i is 1 + the number of candidates c with
g(a_i, c) > g(a_i, p_i) (strict, as the mask rule), where the candidates are every distinct
positive text (`among="positives"`) or every text stored in the positives' view (`among="all"`: every
text of a pass without prompts; pipeline.views), leaving out the anchor's
own text and every positive of an example with the same anchor text (another correct answer is no
evidence against this one). Ranks are searched with an exact FAISS inner-product index over the
candidates, `top_k` + (the most positives one anchor text has) neighbours deep: exact up to that
depth, reported as a lower bound past it.

Kept rows are written in the input's format with its original columns, in their original order,
so `precompute-guide --reuse GUIDE_DIR` on them encodes nothing; `<out stem>.filter.json` beside
them records the parameters, counts per task and the worst examples (`gist report --filter`). Both
are one output (pipeline.outputs): staged together and swapped in together; `--overwrite` replaces
only an earlier output of gist filter (its summary names it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import GistError, artifacts, data as data_mod, guide as guide_mod
from pipeline.conflicts import RADIUS_SLACK, pair_dots
from pipeline.outputs import Kind, Output

AMONG = ("positives", "all")
WORST_SHOWN = 20
SEARCH_ROWS = 8192  # anchors searched at once: bounds the (rows, depth) result arrays


@dataclass(frozen=True)
class FilterParams:
    """Keep an example when its positive ranks within `top_k` and/or scores at least `min_score`."""

    top_k: int | None = None
    min_score: float | None = None
    among: str = "positives"

    def check(self) -> None:
        if self.top_k is None and self.min_score is None:
            raise GistError("give --top-k and/or --min-score: with neither, every example would be kept")
        if self.top_k is not None and self.top_k < 1:
            raise GistError(f"--top-k {self.top_k}: must be at least 1")
        if self.among not in AMONG:
            raise GistError(f"--among {self.among}: use one of {', '.join(AMONG)}")


@dataclass(frozen=True)
class PositiveRanks:
    """Per example: the guide's score of its pair, and its positive's rank (exact where `exact`)."""

    scores: np.ndarray  # (N,) float32 g(a_i, p_i)
    ranks: np.ndarray  # (N,) int64, 1 = the guide's top candidate
    exact: np.ndarray  # (N,) bool; False: the rank is a lower bound (the positive lies deeper than searched)


def summary_path(out: Path) -> Path:
    """Where `gist filter --out OUT` writes its summary: OUT's stem + `.filter.json`, beside it."""
    name = out.name
    for suffix in (".gz", ".parquet", ".jsonl", ".json", ".csv"):
        name = name.removesuffix(suffix)
    return out.with_name(name + ".filter.json")


# The kept rows (OUT) and their summary beside it, one output; the summary records the kind and names OUT.
FILTER = Kind("filter", directory=False, record=summary_path, companions=lambda out: [summary_path(out)])


def _same_anchor_positives(data: data_mod.TrainingData) -> dict[int, np.ndarray]:
    """anchor text id -> the positive text ids of every example with that anchor."""
    order = np.argsort(data.anchor_ids, kind="stable")
    anchors, starts = np.unique(data.anchor_ids[order], return_index=True)
    groups = np.split(data.positive_ids[order], starts[1:])
    return {int(a): np.unique(g) for a, g in zip(anchors, groups)}


def positive_ranks(embeddings: np.ndarray, data: data_mod.TrainingData, depth: int, among: str = "positives") -> PositiveRanks:
    """Rank of every example's positive among the candidates, searched `depth` deep past the excluded texts.

    FAISS only proposes candidates: every score compared is `pair_dots`, the expression that scores
    the positive (as in pipeline.conflicts), so bit-identical vectors tie and the strict ">" holds.
    A rank within `depth` is exact: where the positive scores within RADIUS_SLACK of the deepest
    result (FAISS rounding could hide a candidate above it), its anchor is searched by range.
    """
    import faiss

    # Anchors are read in their query view, candidates in the positives' document view (pipeline.views);
    # "all" candidates: every text stored in that view.
    rows = data.rows
    query, document = (lambda texts: rows.of("anchor", texts)), (lambda texts: rows.of("positive", texts))
    candidates = np.unique(data.positive_ids) if among == "positives" else np.flatnonzero(document(np.arange(len(data.texts))) >= 0)
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(guide_mod.gather(embeddings, document(candidates)))
    groups = _same_anchor_positives(data)
    anchors = np.unique(data.anchor_ids)
    # Excluded texts (the anchor itself, its positives) can fill the top of a search: search past them.
    k = int(min(len(candidates), depth + 1 + max(len(g) for g in groups.values())))
    scores = pair_dots(embeddings, rows.anchor, rows.positive)
    ranks = np.empty(data.num_examples, dtype=np.int64)
    exact = np.empty(data.num_examples, dtype=bool)
    example_order = np.argsort(data.anchor_ids, kind="stable")
    first = np.searchsorted(data.anchor_ids[example_order], anchors)
    last = np.append(first[1:], data.num_examples)

    def rank(anchor: int, texts: np.ndarray, texts_scores: np.ndarray, members: np.ndarray) -> None:
        others = texts_scores[(texts != anchor) & ~np.isin(texts, groups[anchor])]
        ranks[members] = 1 + (others[None, :] > scores[members, None]).sum(axis=1)

    with guide_mod.faiss_single_thread():  # the same results on any thread count
        for start in range(0, len(anchors), SEARCH_ROWS):
            block = anchors[start : start + SEARCH_ROWS]
            found_scores, found = index.search(guide_mod.gather(embeddings, query(block)), k)
            texts = candidates[found]
            texts_scores = pair_dots(embeddings, np.repeat(query(block), k), document(texts.reshape(-1))).reshape(texts.shape)
            for row, anchor in enumerate(block.tolist()):
                members = example_order[first[start + row] : last[start + row]]
                rank(anchor, texts[row], texts_scores[row], members)
                # Sorted results: every candidate above the positive was found once the search passed its score.
                exact[members] = (k == len(candidates)) | (found_scores[row][-1] < scores[members] - RADIUS_SLACK)
                unsure = members[~exact[members] & (ranks[members] <= depth)]
                if len(unsure):  # within the depth but near the deepest result: every candidate near or above, by range
                    _, _, near = index.range_search(guide_mod.gather(embeddings, query([anchor])), float(scores[unsure].min()) - RADIUS_SLACK)
                    rank(anchor, candidates[near], pair_dots(embeddings, np.repeat(query([anchor]), len(near)), document(candidates[near])), unsure)
                    exact[unsure] = True
    return PositiveRanks(scores, ranks, exact)


def filter_pass(guide_dir: str | Path, out: str | Path, params: FilterParams, *, data: str | Path | None = None, overwrite: bool = False) -> dict:
    """Write DATA's examples whose positive the stored guide pass ranks well to OUT; return the summary.

    Args:
        guide_dir: a finished `precompute-guide` directory.
        out: the filtered data, in DATA's format (.parquet, .jsonl, .csv, or a save_to_disk directory).
        params: the keep rule (top_k and/or min_score) and the candidate pool.
        data: the pass's training data, if it moved (default: the path its manifest records);
            it must have the pass's fingerprint.
        overwrite: replace an earlier output of gist filter at OUT (the summary beside it names
            it); nothing else is ever replaced, and an OUT that overlaps DATA or GUIDE_DIR is refused.
    """
    guide_dir, out = Path(guide_dir), Path(out)
    params.check()
    manifest, training, embeddings = guide_mod.load_guide_pass(guide_dir)
    recorded = manifest["dataset"].get("path") if not manifest["dataset"].get("hub_id") else None
    source = data if data is not None else recorded
    # The kept rows are written as DATA's own rows in its format: one local file or save_to_disk directory.
    if source is None or not isinstance(data_mod.data_source(source), Path):
        raise GistError(f"{data if data is not None else guide_dir}: gist filter writes DATA's own rows in its format, so it needs DATA as one local file "
                        "(a Hub dataset or a mixture is not; pass one file of the same rows, a mixture's with its task column, with --data)")
    source = Path(source)
    output = Output(out, FILTER, inputs={"GUIDE_DIR": guide_dir, "DATA": source}, overwrite=overwrite)
    output.check()
    columns = manifest["dataset"]["columns"]
    if data_mod.load_training_data(source, ",".join(f"{k}={v}" for k, v in columns.items())).fingerprint != training.fingerprint:
        raise GistError(f"{source}: not the data of the guide pass {guide_dir} (fingerprints differ); pass its data with --data")
    ranks = positive_ranks(embeddings, training, params.top_k or WORST_SHOWN, params.among)
    keep = np.ones(training.num_examples, dtype=bool)
    if params.top_k is not None:
        keep &= ranks.ranks <= params.top_k
    if params.min_score is not None:
        keep &= ranks.scores >= params.min_score
    summary = _summary(guide_dir, manifest["guide"], source, out, params, training, ranks, keep)
    with output.stage() as stage:  # data and summary are one output: both appear, or neither
        data_mod.write_table(data_mod.read_table(source).filter(pa.array(keep)), out, into=stage.path(out))
        artifacts.write_json(stage.path(summary_path(out)), summary)
    return summary


def _summary(guide_dir: Path, guide: dict, source: Path, out: Path, params: FilterParams, training, ranks: PositiveRanks, keep: np.ndarray) -> dict:
    """Counts overall and per task, the rank distribution, and the worst examples (lowest pair score)."""
    tasks = training.task_labels()  # null tasks, or no task column, count as "(none)", as in the report
    per_task = {
        str(t): {"examples": int((tasks == t).sum()), "dropped": int(((tasks == t) & ~keep).sum())} for t in sorted(set(tasks.tolist()))
    }
    worst = np.argsort(ranks.scores, kind="stable")[:WORST_SHOWN]
    return {
        "kind": "filter",
        "guide_dir": str(guide_dir.resolve()),
        "guide": guide,
        "data": str(source.resolve()),
        "out": str(out.resolve()),
        "params": asdict(params),
        "examples": training.num_examples,
        "kept": int(keep.sum()),
        "dropped": int((~keep).sum()),
        "per_task": per_task,
        "rank_quantiles": {f"p{q}": int(np.percentile(ranks.ranks, q, method="higher")) for q in (50, 90, 99)},
        "ranks_exact": bool(ranks.exact.all()),
        "worst": [
            {"example_id": int(i), "task": str(tasks[i]), "score": round(float(ranks.scores[i]), 4), "rank": int(ranks.ranks[i]),
             "rank_exact": bool(ranks.exact[i]), "kept": bool(keep[i]),
             "anchor": training.text(training.anchor_ids[i]), "positive": training.text(training.positive_ids[i])}
            for i in worst
        ],
    }

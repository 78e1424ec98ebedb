"""fn_aware_recall: how many exact conflict edges fn-aware's bounded search finds.

`sampled_recall` (what `bench scale` reports beside each fn-aware plan) estimates it on a seeded
sample of examples: their searches (the anchor's; the positive's, for pp) run exhaustively over the
full vectors give a sample of the exact conflict edges (i, j), i sampled; recall = the share of them
in the graph `gist plan` builds (the bounded search above EXACT_SEARCH_MADDS), where an edge also
enters from j's search. `per_search_recall`: the share the sampled examples' own bounded searches
find (a lower bound).

`python -m bench.fn_aware_recall` encodes the 10156-triplet training set with the static tiny
guide (its similarities are meaningful and it is fast; dim 64, so nothing is projected), builds
the conflict graph exhaustively, then with the bounded search forced (EXACT_SEARCH_MADDS = 0) at
several PROBES values: recall of the whole graph's edges and seconds, written to
bench/results/fn_aware_recall.json with the machine record.
"""

from __future__ import annotations

import json
import time

import numpy as np

from bench.common import FULL_TRAIN, RESULTS, SHARED, machine_info
from pipeline import conflicts
from pipeline.data import TrainingData, load_training_data
from pipeline.guide import load_model, training_sample


def edges(data, graph) -> np.ndarray:
    """The graph's edges as sorted i * n + j (both directions)."""
    indptr, neighbours = graph
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)) * data.num_examples + neighbours


def _sample_edges(data: TrainingData, embeddings: np.ndarray, rows: np.ndarray, thresholds: np.ndarray, found: list, space, rule: dict) -> np.ndarray:
    """Sorted unique i * n + j over the conflict edges the searches of examples `rows` find in `space`."""
    keys = []
    for query_ids, own_ids, (indptr, holders) in found:
        candidates = np.flatnonzero(np.diff(indptr))
        local, texts = conflicts.flagged_texts(embeddings, space, query_ids[rows], own_ids[rows], thresholds[rows], candidates, **rule)
        left, right = conflicts._expand(rows[local], texts, indptr, holders)
        keys.append(left[left != right] * data.num_examples + right[left != right])
    return np.unique(np.concatenate(keys))


def sampled_recall(data: TrainingData, embeddings: np.ndarray, samples: int, seed: int = 0, margin_strategy: str = "absolute", margin: float = 0.0) -> dict:
    """Recall of the conflict edges of `samples` seeded examples (default rule: contrast anchors and positives)."""
    rule = {"margin_strategy": margin_strategy, "margin": margin}
    start = time.perf_counter()
    rows = training_sample(data.num_examples, samples, seed)
    thresholds = conflicts.pair_dots(embeddings, data.anchor_ids, data.positive_ids)
    found = conflicts.searches(data, len(embeddings))
    bounded = conflicts.search_space(embeddings, data, found)
    graph = edges(data, conflicts.conflict_graph(data, embeddings, **rule, space=bounded))
    searched = _sample_edges(data, embeddings, rows, thresholds, found, bounded, rule)
    truth = _sample_edges(data, embeddings, rows, thresholds, found, conflicts.SearchSpace(embeddings, bounded.text_ids, exact=True), rule)
    assert np.isin(searched, truth).all(), "the bounded search invented a conflict"
    hits = int(np.isin(truth, graph).sum())
    share = lambda count: round(count / len(truth), 4) if len(truth) else None  # noqa: E731
    return {"sampled_examples": len(rows), "search": "exhaustive" if bounded.exact else "bounded", "exact_edges": len(truth), "found_edges": hits,
            "recall": share(hits), "per_search_recall": share(int(np.isin(truth, searched).sum())), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    data = load_training_data(FULL_TRAIN)
    model = load_model(str(SHARED / "models" / "tiny-guide-static"), "cpu")
    embeddings = model.encode(data.texts.to_pylist(), batch_size=256, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    result = {"machine": machine_info(), "data": str(FULL_TRAIN), "guide": "tiny-guide-static", "examples": data.num_examples}
    start = time.perf_counter()
    exact = edges(data, conflicts.conflict_graph(data, embeddings))
    result["exhaustive"] = {"edges": len(exact), "seconds": round(time.perf_counter() - start, 2)}
    print(f"exhaustive: {len(exact)} edges, {result['exhaustive']['seconds']}s")
    conflicts.EXACT_SEARCH_MADDS = 0
    result["bounded"] = {}
    for probes in (4, 8, 16, 32):
        conflicts.PROBES = probes
        start = time.perf_counter()
        found = edges(data, conflicts.conflict_graph(data, embeddings))
        result["bounded"][probes] = {"recall": round(np.isin(exact, found).mean(), 3), "seconds": round(time.perf_counter() - start, 2)}
        print(f"bounded, {probes} probes: recall {result['bounded'][probes]['recall']}, {result['bounded'][probes]['seconds']}s")
    (RESULTS / "fn_aware_recall.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

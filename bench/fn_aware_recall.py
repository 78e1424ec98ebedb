"""fn_aware_recall: how many exact conflict edges fn-aware's bounded search finds.

`sampled_recall` (what `bench scale` reports beside each fn-aware plan) estimates it on a seeded
sample of examples: their searches (the anchor's; the positive's, for pp) run exhaustively over the
full vectors give a sample of the exact conflict edges (i, j), i sampled; recall = the share of them
in the graph `gist plan` builds (the bounded search above EXACT_SEARCH_MADDS), where an edge also
enters from j's search. `per_search_recall`: the share the sampled examples' own bounded searches
find (a lower bound).

`python -m bench.fn_aware_recall` encodes the shipped 2000-triplet sample (data/train.parquet; with
--full the 10156-triplet training set) with the static tiny guide (meaningful similarities, fast;
dim 64, so nothing is projected) and, for several rules, compares with `brute_force_edges` (the
rule over every pair of examples and every block, plain numpy in float64, no search): the graph
gist builds exhaustively (edges, disagreements, how many of them lie within NEAR of a bound,
seconds, peak memory), and the bounded search forced (EXACT_SEARCH_MADDS = 0) at several PROBES
values (recall against the brute force, invented edges, seconds). Written to
bench/results/fn_aware_recall-sample.json (--full: fn_aware_recall.json) with the machine record.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from bench.common import FULL_TRAIN, RESULTS, SAMPLE, SHARED, PeakMemory, machine_info
from pipeline import conflicts
from pipeline.data import TrainingData, load_training_data
from pipeline.guide import load_model, training_sample
from pipeline.masks import false_negative_mask

NEAR = 1e-6  # a float32 similarity may fall on the other side of a bound only this close to it
BRUTE_ROWS = 1024  # rows of each float64 block at a time
RULES = {  # name: conflict_graph's rule options
    "absolute 0": {},
    "absolute 0, duplicates": {"mask_duplicates": True},
    "absolute 0, no pp, duplicates": {"contrast_positives": False, "mask_duplicates": True},
    "absolute 0.05": {"margin": 0.05},
    "absolute -1": {"margin": -1.0},
    "relative 0.1": {"margin_strategy": "relative", "margin": 0.1},
    "relative -0.1": {"margin_strategy": "relative", "margin": -0.1},
}


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
    thresholds = conflicts.pair_dots(embeddings, data.rows.anchor, data.rows.positive)
    found = conflicts.searches(data)
    bounded = conflicts.search_space(embeddings, data, found)
    graph = edges(data, conflicts.conflict_graph(data, embeddings, **rule, space=bounded))
    searched = _sample_edges(data, embeddings, rows, thresholds, found, bounded, rule)
    truth = _sample_edges(data, embeddings, rows, thresholds, found, conflicts.SearchSpace(embeddings, bounded.text_ids, exact=True), rule)
    assert np.isin(searched, truth).all(), "the bounded search invented a conflict"
    hits = int(np.isin(truth, graph).sum())
    share = lambda count: round(count / len(truth), 4) if len(truth) else None  # noqa: E731
    return {"sampled_examples": len(rows), "search": "exhaustive" if bounded.exact else "bounded", "exact_edges": len(truth), "found_edges": hits,
            "recall": share(hits), "per_search_recall": share(int(np.isin(truth, searched).sum())), "seconds": round(time.perf_counter() - start, 1)}


def brute_force_edges(data: TrainingData, embeddings: np.ndarray, margin_strategy: str = "absolute", margin: float = 0.0,
                      contrast_anchors: bool = True, contrast_positives: bool = True, mask_duplicates: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(edges, near): sorted i * n + j (both directions) where the rule flags a candidate of j for
    row i or one of i for row j, every block of every pair in float64 (no search, no cap); `near`:
    the pairs with some block within NEAR of its bound (where float32 may decide either way)."""
    n, emb, stored = data.num_examples, np.asarray(embeddings, dtype=np.float64), data.rows  # vectors by stored row, duplicates by text id
    a, p = emb[stored.anchor], emb[stored.positive]
    t = np.einsum("ij,ij->i", a, p)
    bound = t - margin if margin_strategy == "absolute" else t - np.abs(t) * margin
    columns = ([(stored.positive, data.positive_ids)] + [(stored.negative[:, c], data.negative_ids[:, c]) for c in range(data.num_negatives)]
               + ([(stored.anchor, data.anchor_ids)] if contrast_anchors else []))
    blocks = [(a, *column) for column in columns] + ([(p, stored.positive, data.positive_ids)] if contrast_positives else [])
    found, near = [], []
    for start in range(0, n, BRUTE_ROWS):
        rows = slice(start, start + BRUTE_ROWS)
        hit, close = np.zeros((len(t[rows]), n), bool), np.zeros((len(t[rows]), n), bool)
        for queries, vector_rows, ids in blocks:
            sims = queries[rows] @ emb[vector_rows].T
            hit |= false_negative_mask(sims, t[rows, None], margin_strategy, margin)
            close |= np.abs(sims - bound[rows, None]) < NEAR
            if mask_duplicates:
                hit |= (ids[None, :] == data.anchor_ids[rows, None]) | (ids[None, :] == data.positive_ids[rows, None])
        i = np.arange(start, start + len(hit))
        hit[i - start, i] = close[i - start, i] = False
        for out, mask in ((found, hit), (near, close)):
            r, c = np.nonzero(mask)
            out.append(np.concatenate([(r + start) * n + c, c * n + r + start]))
    return np.unique(np.concatenate(found)), np.unique(np.concatenate(near))


def compare(truth: np.ndarray, near: np.ndarray, graph: np.ndarray) -> dict:
    """Edges of `graph` against the brute force `truth`: missed and invented, and how many of them are near a bound."""
    missed, invented = np.setdiff1d(truth, graph), np.setdiff1d(graph, truth)
    return {"edges": len(graph), "recall": round(1 - len(missed) / len(truth), 6) if len(truth) else None,
            "missed": len(missed), "missed_not_near": int((~np.isin(missed, near)).sum()),
            "invented": len(invented), "invented_not_near": int((~np.isin(invented, near)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the 10156-triplet training set instead of the shipped sample (rule: absolute 0 only)")
    args = parser.parse_args()
    path = FULL_TRAIN if args.full else SAMPLE
    data = load_training_data(path)
    model = load_model(str(SHARED / "models" / "tiny-guide-static"), "cpu")
    embeddings = model.encode(data.texts.to_pylist(), batch_size=256, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    result = {"machine": {**machine_info(), "load_avg_1m_before": round(os.getloadavg()[0], 2)}, "data": str(path), "guide": "tiny-guide-static",
              "examples": data.num_examples, "texts": len(embeddings), "near": NEAR, "rules": {}}
    exact_madds = conflicts.EXACT_SEARCH_MADDS
    for name, rule in RULES.items() if not args.full else [("absolute 0", RULES["absolute 0"])]:  # --full: the rule of the earlier record
        start = time.perf_counter()
        truth, near = brute_force_edges(data, embeddings, **rule)
        record = {"rule": rule, "brute_force": {"edges": len(truth), "near_pairs": len(near), "seconds": round(time.perf_counter() - start, 2)}}
        if rule.get("mask_duplicates"):  # the pairs only a shared text puts in conflict
            shared = np.setdiff1d(truth, brute_force_edges(data, embeddings, **{**rule, "mask_duplicates": False})[0])
            record["brute_force"]["shared_text_only_edges"] = len(shared)
        conflicts.EXACT_SEARCH_MADDS = exact_madds
        with PeakMemory(cuda=False) as memory:
            start = time.perf_counter()
            graph = edges(data, conflicts.conflict_graph(data, embeddings, **rule))
            seconds = time.perf_counter() - start
        record["exhaustive"] = {**compare(truth, near, graph), "seconds": round(seconds, 2), "peak_rss_increase_mb": memory.report()["increase_mb"]}
        if rule.get("mask_duplicates"):
            record["exhaustive"]["shared_text_only_edges_found"] = int(np.isin(shared, graph).sum())
        print(f"{name}: brute force {len(truth)} edges; gist exhaustive {record['exhaustive']}")
        if name in ("absolute 0", "absolute 0, duplicates"):
            conflicts.EXACT_SEARCH_MADDS = 0
            record["bounded"] = {}
            for probes in (4, 8, 16, 32):
                conflicts.PROBES = probes
                start = time.perf_counter()
                graph = edges(data, conflicts.conflict_graph(data, embeddings, **rule))
                record["bounded"][probes] = {**compare(truth, near, graph), "seconds": round(time.perf_counter() - start, 2)}
                print(f"  bounded, {probes} probes: {record['bounded'][probes]}")
            conflicts.PROBES = 16
        result["rules"][name] = record
    conflicts.EXACT_SEARCH_MADDS = exact_madds
    result["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    (RESULTS / ("fn_aware_recall.json" if args.full else "fn_aware_recall-sample.json")).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

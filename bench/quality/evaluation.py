"""Evaluation with per-item scores: what sentence-transformers' evaluators computed, item by item.

The paired comparisons (`bench.quality.stats`) resample test items, so each evaluation keeps the
per-query nDCG@10 of SciFact and the per-pair cosines of STS-B, captured from the evaluators' own
computation while `pipeline.evaluate.evaluate_model` runs, and checked against its numbers.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def capture_evaluation():
    """Record what sentence-transformers' evaluators score, item by item, while evaluate_model runs.

    - retrieval: the ranked hits of every query, as `InformationRetrievalEvaluator.compute_metrics`
      receives them (its own retrieval, nothing re-encoded);
    - STS: the gold scores and cosine scores `EmbeddingSimilarityEvaluator` passes to `spearmanr`.

    From them, per-query nDCG@10 (sentence-transformers' formula) and per-pair cosines, for paired
    bootstrap comparisons of two models; their means are checked against the evaluators' numbers.
    """
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.sentence_transformer.evaluation import embedding_similarity

    captured: dict = {}
    compute_metrics = InformationRetrievalEvaluator.compute_metrics
    spearmanr = embedding_similarity.spearmanr

    def recording_compute_metrics(self, queries_result_list):
        captured["ir"] = (self, queries_result_list)
        return compute_metrics(self, queries_result_list)

    def recording_spearmanr(labels, scores, *args, **kwargs):
        captured["sts"] = (np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64))
        return spearmanr(labels, scores, *args, **kwargs)

    InformationRetrievalEvaluator.compute_metrics = recording_compute_metrics
    embedding_similarity.spearmanr = recording_spearmanr
    try:
        yield captured
    finally:
        InformationRetrievalEvaluator.compute_metrics = compute_metrics
        embedding_similarity.spearmanr = spearmanr


def per_query_ndcg(evaluator, queries_result_list, k: int = 10) -> dict[str, float]:
    """nDCG@k of each query, exactly as InformationRetrievalEvaluator.compute_metrics averages it."""
    out = {}
    for itr, hits in enumerate(queries_result_list):
        qid = evaluator.queries_ids[itr]
        relevant = evaluator.relevant_docs[qid]
        top = sorted(hits, key=lambda x: (-x["score"], x["corpus_id"]))[:k]
        dcg = sum((1.0 if h["corpus_id"] in relevant else 0.0) / np.log2(i + 2) for i, h in enumerate(top))
        idcg = sum(1.0 / np.log2(i + 2) for i in range(min(len(relevant), k)))
        out[str(qid)] = dcg / idcg
    return out


def evaluate(sts: Path, beir: Path, model) -> tuple[dict, float, dict]:
    """evaluate_model on STS and BEIR; returns metrics, seconds, and per-item details."""
    from pipeline.evaluate import evaluate_model

    t0 = time.perf_counter()
    with capture_evaluation() as captured:
        metrics = evaluate_model(model, sts=Path(sts), beir=Path(beir))
    eval_s = round(time.perf_counter() - t0, 1)
    ndcg = per_query_ndcg(*captured["ir"])
    labels, cosines = captured["sts"]
    # The details must reproduce the evaluators' numbers, or the bootstrap would compare other things.
    assert abs(np.mean(list(ndcg.values())) - metrics["beir_ndcg@10"]) < 1e-9, "per-query nDCG does not match the evaluator"
    assert abs(spearman(labels, cosines) - metrics["sts_spearman"]) < 1e-9, "STS cosines do not match the evaluator"
    details = {"ndcg@10": ndcg, "sts_gold": labels.tolist(), "sts_cosine": cosines.tolist()}
    return {k: round(float(v), 5) for k, v in metrics.items()}, eval_s, details


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])



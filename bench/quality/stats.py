"""Statistics over seeds and test items: spreads, and paired differences with honest intervals.

A configuration is trained with n seeds and evaluated on the same test items. For B minus A:

- delta: mean over B's seeds of its metric minus the same for A;
- se_items: the bootstrap standard error of that delta over test items (queries for SciFact
  nDCG@10, pairs for STS-B, Spearman recomputed on each resample), resampling the same items for
  every seed of both configurations (a paired bootstrap);
- se_seeds: the standard error over seeds of the per-seed deltas (seed k of B minus seed k of A,
  or minus A's one evaluation for the untrained base), i.e. the training variance;
- ci95: delta +- sqrt((1.96 se_items)^2 + (t_{0.975, n-1} se_seeds)^2): test sampling and seed
  variance both covered, the seed part with Student's t (with 3 seeds t = 4.30, so a difference
  must be large against the seed spread to count). With one seed only the item part is known and
  the interval says so.
"""

from __future__ import annotations

import numpy as np

METRICS = ("beir_ndcg@10", "sts_spearman")
RESAMPLES = {"beir_ndcg@10": 10_000, "sts_spearman": 2_000}


def spread(results: list[dict]) -> dict:
    """Mean, standard deviation (ddof 1) and the values over seeds, per metric."""
    out = {}
    for metric in results[0]["metrics"]:
        values = np.array([r["metrics"][metric] for r in results], dtype=np.float64)
        out[metric] = {"mean": round(float(values.mean()), 5), "sd": round(float(values.std(ddof=1)), 5) if len(values) > 1 else None,
                       "values": [round(float(v), 5) for v in values]}
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _spearman_rows(gold: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Spearman of each row (Pearson of average ranks): gold (R, P), scores (R, P) -> (R,)."""
    rg, rs = _ranks(gold), _ranks(scores)
    rg = rg - rg.mean(axis=-1, keepdims=True)
    rs = rs - rs.mean(axis=-1, keepdims=True)
    return (rg * rs).sum(axis=-1) / np.sqrt((rg**2).sum(axis=-1) * (rs**2).sum(axis=-1))


def _per_item(details: list[dict], metric: str) -> np.ndarray:
    """(seeds, items): per-query nDCG@10 (queries sorted by id) or per-pair STS cosines."""
    if metric == "beir_ndcg@10":
        queries = sorted(details[0]["ndcg@10"])
        return np.array([[d["ndcg@10"][q] for q in queries] for d in details])
    return np.array([d["sts_cosine"] for d in details])


def _metric(values: np.ndarray, metric: str, gold: np.ndarray | None) -> np.ndarray:
    """The metric of each seed's items (..., seeds, items) -> (..., seeds)."""
    if metric == "beir_ndcg@10":
        return values.mean(axis=-1)
    return _spearman_rows(np.broadcast_to(gold, values.shape), values)


def compare(a: list[dict], b: list[dict], seed: int = 0) -> dict:
    """B minus A on each metric: delta, per-seed deltas, the two standard errors and the 95% interval."""
    from scipy.stats import t as student_t

    rng = np.random.default_rng(seed)
    out = {}
    for metric in METRICS:
        xa, xb = _per_item(a, metric), _per_item(b, metric)
        gold = np.asarray(a[0]["sts_gold"]) if metric == "sts_spearman" else None
        ma, mb = _metric(xa, metric, gold), _metric(xb, metric, gold)
        per_seed = mb - (ma if len(ma) == len(mb) else ma.mean())
        n_items = xa.shape[1]
        idx = rng.integers(0, n_items, size=(RESAMPLES[metric], n_items))
        if metric == "beir_ndcg@10":  # the mean is linear: resample the seed-averaged per-item differences
            boot = (xb.mean(axis=0) - xa.mean(axis=0))[idx].mean(axis=1)
        else:
            g = gold[idx]
            boot = (np.mean([_spearman_rows(g, s[idx]) for s in xb], axis=0) - np.mean([_spearman_rows(g, s[idx]) for s in xa], axis=0))
        delta = float(mb.mean() - ma.mean())
        se_items = float(boot.std(ddof=1))
        n = len(per_seed)
        se_seeds = float(per_seed.std(ddof=1) / np.sqrt(n)) if n > 1 else None
        half = np.hypot(1.96 * se_items, student_t.ppf(0.975, n - 1) * se_seeds if n > 1 else 0.0)
        out[metric] = {
            "delta": round(delta, 5), "per_seed_deltas": [round(float(d), 5) for d in per_seed], "seeds": n,
            "se_items": round(se_items, 5), "se_seeds": None if se_seeds is None else round(se_seeds, 5),
            "ci95": [round(delta - half, 5), round(delta + half, 5)],
            "seeds_better": int((per_seed > 0).sum()),
            "interval_covers": "test items and seeds" if n > 1 else "test items only (one seed)",
        }
    return out


def judgement(comparison: dict) -> str:
    """'better', 'worse' or 'not distinguishable' from the 95% interval."""
    lo, hi = comparison["ci95"]
    return "better" if lo > 0 else "worse" if hi < 0 else "not distinguishable"

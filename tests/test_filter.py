"""`gist filter`: positive ranks against a brute-force ranking over the stored embeddings, the
kept rows in the input's format, and a `--reuse` pass over them that encodes nothing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import read_manifest
from pipeline.data import load_training_data, read_table
from pipeline.filter import positive_ranks, summary_path
from pipeline.guide import load_guide_pass
from tests.conftest import GUIDE_STATIC, gist


@pytest.fixture(scope="module")
def stored(static_run):
    _, data, embeddings = load_guide_pass(static_run)
    return data, embeddings


def brute_force_ranks(data, embeddings, among: str) -> np.ndarray:
    """1 + the candidates scoring strictly above the positive, every candidate scored (no index)."""
    pool = np.unique(data.positive_ids) if among == "positives" else np.arange(len(data.texts))
    ranks = []
    for a, p in zip(data.anchor_ids, data.positive_ids):
        same_anchor = set(data.positive_ids[data.anchor_ids == a].tolist()) | {int(a)}
        others = np.array([c for c in pool if c not in same_anchor])
        score = embeddings[a] @ embeddings[p]
        ranks.append(1 + int((embeddings[others] @ embeddings[a] > score).sum()))
    return np.array(ranks)


@pytest.mark.parametrize("among", ["positives", "all"])
def test_ranks_equal_brute_force(stored, among):
    data, embeddings = stored
    assert len(np.unique(data.anchor_ids)) < data.num_examples  # anchors with several positives: the exclusion is exercised
    expected = brute_force_ranks(data, embeddings, among)
    deep = positive_ranks(embeddings, data, depth=len(data.texts), among=among)
    assert deep.exact.all()
    np.testing.assert_array_equal(deep.ranks, expected)
    shallow = positive_ranks(embeddings, data, depth=5, among=among)
    # Exact where flagged; a lower bound past the searched depth, and then always beyond the depth.
    np.testing.assert_array_equal(shallow.ranks[shallow.exact], expected[shallow.exact])
    assert (shallow.ranks[~shallow.exact] <= expected[~shallow.exact]).all()
    assert (shallow.ranks[~shallow.exact] > 5).all() and (~shallow.exact).any()
    np.testing.assert_array_equal(shallow.ranks <= 5, expected <= 5)


def test_filter_writes_kept_rows_and_reuse_encodes_nothing(static_run, stored, triplets, tmp_path):
    data, embeddings = stored
    clean = tmp_path / "clean.parquet"
    proc = gist("filter", static_run, "--out", clean, "--top-k", "3", "--min-score", "0.2")
    keep = (brute_force_ranks(data, embeddings, "positives") <= 3) & (np.einsum("ij,ij->i", embeddings[data.anchor_ids], embeddings[data.positive_ids]) >= 0.2)
    assert 0 < keep.sum() < data.num_examples
    original = pq.read_table(triplets)
    assert pq.read_table(clean).equals(original.filter(keep))  # original columns and order, kept rows only
    summary = json.loads(summary_path(clean).read_text())
    assert summary["kept"] == keep.sum() and summary["dropped"] == (~keep).sum()
    assert sum(v["dropped"] for v in summary["per_task"].values()) == (~keep).sum()
    assert f"kept {keep.sum()} of {data.num_examples}" in proc.stderr

    again = tmp_path / "again"
    gist("precompute-guide", clean, "--guide", GUIDE_STATIC, "--out", again, "--batch-size", "16", "--reuse", static_run)
    encoding = read_manifest(again)["encoding"]
    assert encoding["encoded_texts"] == 0 and encoding["reused_texts"] > 0

    report = tmp_path / "report"
    gist("report", static_run, "--out", report, "--filter", summary_path(clean))
    assert "## Consistency filter" in (report / "report.md").read_text()


def test_filter_formats_and_errors(static_run, tmp_path):
    jsonl = tmp_path / "clean.jsonl"
    gist("filter", static_run, "--out", jsonl, "--top-k", "1", "--among", "all")
    kept = read_table(jsonl)
    assert kept.num_rows == json.loads(summary_path(jsonl).read_text())["kept"]
    assert set(kept.column_names) == {"anchor", "positive", "negative", "task"}

    proc = gist("filter", static_run, "--out", tmp_path / "none.parquet", check=False)
    assert proc.returncode == 1 and "--top-k and/or --min-score" in proc.stderr
    proc = gist("filter", static_run, "--out", jsonl, "--top-k", "1", check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    proc = gist("filter", static_run, "--out", tmp_path / "x.parquet", "--top-k", "1", "--among", "texts", check=False)
    assert proc.returncode == 1 and "--among texts" in proc.stderr


def test_bit_identical_candidates_tie_with_the_positive(tmp_path):
    """A candidate whose vector is bit-identical to the positive's (case variants under an uncased
    guide) ties with it: it does not count against the positive (strict ">"), however it is found,
    and the rank stays exact when more twins tie than the search is deep."""
    rng = np.random.default_rng(0)
    n, dim, twins = 128, 64, 3  # anchors 0..7 get `twins` more copies of their positive
    anchors = rng.standard_normal((2 * n + 8 * twins, dim))
    positives = anchors[:n] + 0.3 * rng.standard_normal((n, dim))  # each positive near its anchor: rank 1
    copies = [(i, j) for i in range(8) for j in range(twins)]
    rows = {"anchor": [f"a{i}" for i in range(len(anchors))],
            "positive": [f"p{i}" for i in range(n)] + [f"P{i}" for i in range(n)] + [f"P{i}-{j}" for i, j in copies]}
    pq.write_table(pa.table(rows), tmp_path / "twins.parquet")
    data = load_training_data(tmp_path / "twins.parquet")
    vectors = {f"a{i}": v for i, v in enumerate(anchors)}
    vectors |= {f"p{i}": v for i, v in enumerate(positives)} | {f"P{i}": v for i, v in enumerate(positives)}
    vectors |= {f"P{i}-{j}": positives[i] for i, j in copies}
    embeddings = np.stack([vectors[t] for t in data.texts.to_pylist()]).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    for depth in (1, len(data.texts)):
        ranks = positive_ranks(embeddings, data, depth=depth)
        # "p{i}" for anchor i: its twins tie, every other candidate is far below
        assert ranks.ranks[:n].tolist() == [1] * n and ranks.exact[:n].all()

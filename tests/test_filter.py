"""`gist filter`: positive ranks against a brute-force ranking over the stored embeddings, the
kept rows in the input's format, and a `--reuse` pass over them that encodes nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import artifacts
from pipeline.artifacts import read_manifest
from pipeline.data import load_training_data, read_table
from pipeline.filter import positive_ranks, summary_path
from pipeline.guide import load_guide_pass
from tests.conftest import GUIDE_STATIC, SAMPLE, gist


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


def test_overwrite_replaces_only_an_earlier_filter_output(static_run, triplets, tmp_path):
    """--overwrite never removes DATA, GUIDE_DIR, a folder holding them or the user's own files:
    only what an earlier gist filter wrote (its summary names it)."""
    guide = tmp_path / "guide"
    shutil.copytree(static_run, guide)
    data = tmp_path / "data" / "triplets.parquet"
    data.parent.mkdir()
    shutil.copy(triplets, data)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")

    def run(out, *extra):
        return gist("filter", guide, "--data", data, "--out", out, "--top-k", "2", "--overwrite", *extra, check=False)

    for out in (data, data.parent, guide, tmp_path, guide / "texts.parquet"):
        proc = run(out)
        assert proc.returncode == 1 and "choose another --out" in proc.stderr, out
    proc = run(tmp_path / "mine")
    assert proc.returncode == 1 and "is not written by gist" in proc.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"
    assert read_table(data).equals(pq.read_table(triplets)) and read_manifest(guide)

    clean = tmp_path / "clean"  # a save_to_disk directory, replaced whole by a second run
    run(clean)
    run(clean, "--top-k", "1", "--among", "all")
    summary = json.loads(summary_path(clean).read_text())
    assert read_table(clean).num_rows == summary["kept"] and summary["params"]["top_k"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "clean.filter.json", "data", "guide", "mine"]  # no temporary left


def test_null_tasks_count_as_none_and_a_failed_filter_writes_nothing(tmp_path, monkeypatch):
    """Rows without a task are counted under "(none)", as in the report; data and summary are one
    unit: a failure while writing them leaves neither."""
    table = pq.read_table(SAMPLE).slice(0, 64)
    tasks = [None if i % 3 == 0 else task for i, task in enumerate(table.column("task").to_pylist())]
    pq.write_table(table.set_column(table.column_names.index("task"), "task", pa.array(tasks, pa.string())), tmp_path / "data.parquet")
    gist("precompute-guide", tmp_path / "data.parquet", "--guide", GUIDE_STATIC, "--out", tmp_path / "run", "--batch-size", "16")

    gist("filter", tmp_path / "run", "--out", tmp_path / "clean.jsonl", "--top-k", "3")
    per_task = json.loads(summary_path(tmp_path / "clean.jsonl").read_text())["per_task"]
    assert per_task["(none)"]["examples"] == tasks.count(None)
    assert sum(v["examples"] for v in per_task.values()) == 64

    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(artifacts, "write_json", disk_full)
    proc = gist("filter", tmp_path / "run", "--out", tmp_path / "again.parquet", "--top-k", "3", check=False)
    assert proc.returncode == 1 and "No space left" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.filter.json", "clean.jsonl", "data.parquet", "run"]

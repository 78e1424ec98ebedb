"""fn-aware planning: the conflict graph against the mask rule, the greedy batcher, fewer masks than
random, and `gist precompute-guide` / `gist plan` with --strategy fn-aware end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline import GistError, conflicts
from pipeline.artifacts import read_manifest
from pipeline.guide import load_guide_pass
from pipeline.masks import PlannedMasks, PlanParams, batch_masks, false_negative_mask, write_plan_masks
from pipeline.conflicts import conflict_graph
from pipeline.plan import _ConflictBatcher, plan_batches
from tests.conftest import gist

NEAR = 1e-6  # the graph may differ from a float64 recomputation only this close to a threshold
BATCH = 16


def stored(run):
    _, data, embeddings = load_guide_pass(run)
    return data, embeddings


def dense(graph) -> np.ndarray:
    indptr, neighbours = graph
    n = len(indptr) - 1
    adjacency = np.zeros((n, n), dtype=bool)
    adjacency[np.repeat(np.arange(n), np.diff(indptr)), neighbours] = True
    return adjacency


def brute_force_conflicts(emb, data, margin_strategy, margin, contrast_anchors, contrast_positives):
    """(conflicts, near): every block of every pair of examples, in float64, through the mask rule."""
    a, p = emb[data.anchor_ids].astype(np.float64), emb[data.positive_ids].astype(np.float64)
    t = (a * p).sum(1)[:, None]
    bound = t - margin if margin_strategy == "absolute" else t - np.abs(t) * margin
    blocks = [a @ p.T] + [a @ emb[data.negative_ids[:, c]].astype(np.float64).T for c in range(data.num_negatives)]
    blocks += [a @ a.T] if contrast_anchors else []
    blocks += [p @ p.T] if contrast_positives else []
    conflicts = np.any([false_negative_mask(s, t, margin_strategy, margin) for s in blocks], axis=0)
    near = np.any([np.abs(s - bound) < NEAR for s in blocks], axis=0)
    np.fill_diagonal(conflicts, False)
    return conflicts | conflicts.T, near | near.T


@pytest.mark.parametrize("rule", [("absolute", 0.05, True, True), ("relative", 0.1, False, False), ("absolute", 0.0, True, False)])
def test_conflict_graph_is_the_mask_rule(guide_run, rule):
    data, emb = stored(guide_run)
    graph = dense(conflict_graph(data, emb, *rule))
    expected, near = brute_force_conflicts(emb, data, *rule)
    assert not ((graph != expected) & ~near).any()
    assert 0 < expected.sum() < expected.size - len(expected)  # neither empty nor complete
    assert np.array_equal(graph, graph.T) and not graph.diagonal().any()


def test_bounded_search_proposes_a_subset_deterministically(static_run, monkeypatch):
    """Above EXACT_SEARCH_MADDS the search is bounded (k-means lists, PROBES of them per query): it
    may miss conflicts, never invent one, same result twice."""
    data, emb = stored(static_run)
    exact = dense(conflict_graph(data, emb))
    monkeypatch.setattr(conflicts, "EXACT_SEARCH_MADDS", 0)
    approximate = conflict_graph(data, emb)
    assert all(np.array_equal(x, y) for x, y in zip(approximate, conflict_graph(data, emb)))
    approximate = dense(approximate)
    assert not (approximate & ~exact).any()
    assert approximate.sum() > 0.8 * exact.sum()  # measured 0.91 (16 of 44 lists)


def test_bounded_search_projects_wide_vectors_and_keeps_the_rule(static_run, monkeypatch):
    """Vectors wider than SEARCH_DIM are compared in their projection, at a lower bound; every
    proposal is still scored on the stored vectors, so no conflict is invented."""
    data, emb = stored(static_run)
    exact = dense(conflict_graph(data, emb))
    monkeypatch.setattr(conflicts, "EXACT_SEARCH_MADDS", 0)
    monkeypatch.setattr(conflicts, "SEARCH_DIM", 16)  # the 64-dim guide, projected to 16 dims
    projected = dense(conflict_graph(data, emb))
    assert not (projected & ~exact).any()
    assert projected.sum() > 0.7 * exact.sum()  # measured 0.86


def test_shared_texts_conflict_whatever_the_search_misses(static_run, monkeypatch):
    """An example whose negative is another's positive conflicts with it under a positive margin
    (the text is as similar to that anchor as its own positive), even where the bounded search
    probes one list: every row's own texts are always proposed."""
    data, emb = stored(static_run)
    rng = np.random.default_rng(0)
    holders, owners = rng.choice(data.num_examples, 64, replace=False).reshape(2, 32)
    negatives = data.negative_ids.copy()
    negatives[holders, 0] = data.positive_ids[owners]
    shared = dataclasses.replace(data, negative_ids=negatives)
    monkeypatch.setattr(conflicts, "EXACT_SEARCH_MADDS", 0)
    monkeypatch.setattr(conflicts, "PROBES", 1)
    graph = dense(conflict_graph(shared, emb, margin=0.01))
    assert graph[owners, holders].all() and graph[holders, owners].all()


@pytest.mark.parametrize("run", ["guide_run", "static_run"])
def test_batcher_puts_conflicts_together_only_when_nothing_else_fits(request, run):
    """In formation order, a batch's members up to its first conflicting one conflict with no one
    before them, and then every example still unplanned conflicts with one of those members."""
    data, emb = stored(request.getfixturevalue(run))
    margin = 0.05 if run == "guide_run" else 0.0
    graph = conflict_graph(data, emb, margin=margin)
    adjacency = dense(graph)
    members = np.random.default_rng(0).permutation(data.num_examples)
    batches, leftover = _ConflictBatcher(*graph, data.num_examples)(members, BATCH)
    assert sorted(np.concatenate([batches.ravel(), leftover]).tolist()) == list(range(data.num_examples))
    fallbacks = 0
    for k, batch in enumerate(batches):
        clash = [adjacency[x, batch[:i]].any() for i, x in enumerate(batch)]
        if not any(clash):
            continue
        fallbacks += 1
        greedy = batch[: clash.index(True)]
        remaining = np.setdiff1d(np.concatenate([batches[k:].ravel(), leftover]), greedy)
        assert adjacency[np.ix_(remaining, greedy)].any(axis=1).all(), (k, batch)
    assert fallbacks < len(batches)  # measured guide_run 22 of 32 (dense guide), static_run 3 of 32
    if run == "guide_run":
        assert fallbacks > 0  # the fallback branch was exercised


def off_diagonal_masked(emb, data, batch_plan, params) -> dict:
    masks = batch_masks(emb, data, batch_plan.reshape(-1, params.batch_size), params)
    counts = {block: int(m.sum()) for block, m in masks.items()}
    counts["aa"] -= batch_plan.size if params.contrast_anchors else 0  # self-pairs: always masked
    counts["pp"] -= batch_plan.size if params.contrast_positives else 0
    return counts


@pytest.mark.parametrize("tasks", [True, False])
def test_fn_aware_batches_carry_fewer_false_negatives(static_run, tasks):
    data, emb = stored(static_run)
    if not tasks:
        data = dataclasses.replace(data, tasks=None)
    counts = {}
    for strategy in ("random", "fn-aware") + (("by-task",) if tasks else ()):
        batch_plan = plan_batches(data, BATCH, 2, 0, strategy, emb)
        counts[strategy] = off_diagonal_masked(emb, data, batch_plan, PlanParams(BATCH, 2, 0, strategy))
    total = {strategy: sum(c.values()) for strategy, c in counts.items()}
    assert total["fn-aware"] < 0.8 * total["random"], counts  # measured 762 vs 1332 (tasks), 796 vs 1332
    assert counts["fn-aware"]["ap"] < counts["random"]["ap"], counts
    if tasks:
        assert total["fn-aware"] < total["by-task"], counts  # the same one-task batches: 762 vs 1932


def test_gist_plan_fn_aware_end_to_end(static_run, tmp_path):
    """precompute-guide and `gist plan` pass the rule's options: the stored plans are plan_batches' with
    them, PlannedMasks reads the masks, and the same inputs write byte-identical masks."""
    data, emb = stored(static_run)
    stored_masks = PlannedMasks(static_run / "masks.parquet")
    assert stored_masks.params.strategy == "fn-aware"
    assert np.array_equal(stored_masks.plan, plan_batches(data, BATCH, 2, 0, "fn-aware", emb))

    gist("plan", static_run, "--out", tmp_path / "plan", "--strategy", "fn-aware", "--batch-size", BATCH, "--epochs", "2",
         "--margin", "0.05", "--no-contrast-anchors")
    replanned = PlannedMasks(tmp_path / "plan" / "masks.parquet")
    expected = plan_batches(data, BATCH, 2, 0, "fn-aware", emb, margin=0.05, contrast_anchors=False)
    assert np.array_equal(replanned.plan, expected)
    assert not np.array_equal(expected, stored_masks.plan)  # the options change the plan
    assert replanned.dense("ap", 0, 1, BATCH, BATCH).shape == (1, BATCH, BATCH)

    params = PlanParams(BATCH, 2, 0, "fn-aware", "absolute", 0.05, contrast_anchors=False)
    write_plan_masks(tmp_path, emb, data, expected, params, read_manifest(static_run)["guide"])
    assert (tmp_path / "masks.parquet").read_bytes() == (tmp_path / "plan" / "masks.parquet").read_bytes()


def test_fn_aware_needs_the_embeddings(guide_run):
    data, _ = stored(guide_run)
    with pytest.raises(GistError, match="needs the guide embeddings"):
        plan_batches(data, BATCH, 1, 0, "fn-aware")

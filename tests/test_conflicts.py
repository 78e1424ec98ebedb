"""The conflict graph (pipeline.conflicts) against a brute force of the one mask rule: complete on
rows that flag many texts, shared texts always conflicting, a search bound that negative margins
do not widen, margins refused where the rule masks everything or nothing, and the bounded search
on wide vectors of low rank."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline import GistError, conflicts
from pipeline.conflicts import conflict_graph
from pipeline.masks import PlanParams, false_negative_mask
from pipeline.plan import check_rule, plan_batches
from tests.conftest import gist
from tests.test_plan import dense, stored

NEAR = 1e-6  # the graph may differ from a float64 recomputation only this close to a threshold


def brute_force(emb, data, margin_strategy="absolute", margin=0.0, contrast_anchors=True, contrast_positives=True, mask_duplicates=False):
    """(conflicts, near): every block of every pair of examples in float64 through the mask rule,
    plus, with `mask_duplicates`, every candidate that is the row's own anchor or positive text."""
    a, p = emb[data.anchor_ids].astype(np.float64), emb[data.positive_ids].astype(np.float64)
    t = (a * p).sum(1)[:, None]
    bound = t - margin if margin_strategy == "absolute" else t - np.abs(t) * margin
    columns = [data.positive_ids] + [data.negative_ids[:, c] for c in range(data.num_negatives)]
    columns += [data.anchor_ids] if contrast_anchors else []
    found, near = np.zeros((len(t), len(t)), bool), np.zeros((len(t), len(t)), bool)
    for rows, ids in [(a, c) for c in columns] + ([(p, data.positive_ids)] if contrast_positives else []):
        sims = rows @ emb[ids].astype(np.float64).T
        found |= false_negative_mask(sims, t, margin_strategy, margin)
        near |= np.abs(sims - bound) < NEAR
        if mask_duplicates:
            found |= (ids[None, :] == data.anchor_ids[:, None]) | (ids[None, :] == data.positive_ids[:, None])
    np.fill_diagonal(found, False)
    return found | found.T, near | near.T


def flagged_per_row(emb, data, margin) -> np.ndarray:
    """Texts the anchor search flags per example (exhaustive), to show rows past the old 256 cap."""
    found = conflicts.searches(data)
    query_ids, own_ids, (indptr, _) = found[0]
    space = conflicts.search_space(emb, data, found, exact=True)
    thresholds = conflicts.pair_dots(emb, data.anchor_ids, data.positive_ids)
    rows, _ = conflicts.flagged_texts(emb, space, query_ids, own_ids, thresholds, np.flatnonzero(np.diff(indptr)), "absolute", margin)
    return np.bincount(rows, minlength=data.num_examples)


@pytest.mark.parametrize("rule", [
    dict(margin=0.05), dict(margin=0.0, contrast_positives=False, mask_duplicates=True),
    dict(margin_strategy="relative", margin=0.1, contrast_anchors=False), dict(margin=-0.05), dict(margin_strategy="relative", margin=-0.1),
])
def test_exhaustive_graph_is_complete(guide_run, rule):
    """Every conflict the rule makes is an edge, on rows that flag hundreds of texts (the dense guide:
    rows past 256 flagged texts, where a per-row cap used to drop conflicts)."""
    data, emb = stored(guide_run)
    assert flagged_per_row(emb, data, 0.05).max() > 256
    graph = dense(conflict_graph(data, emb, **rule))
    expected, near = brute_force(emb, data, **rule)
    assert not ((graph != expected) & ~near).any(), int(((graph != expected) & ~near).sum())
    assert 0 < expected.sum() < expected.size - len(expected)
    assert np.array_equal(graph, graph.T) and not graph.diagonal().any()


def test_rows_searched_in_blocks_give_the_same_graph(guide_run, monkeypatch):
    """ROWS_PER_BLOCK bounds memory only: blocks of 100 rows (and their merges) give the one-block graph."""
    data, emb = stored(guide_run)
    whole = conflict_graph(data, emb, margin=0.05, mask_duplicates=True)
    monkeypatch.setattr(conflicts, "ROWS_PER_BLOCK", 100)
    blocks = conflict_graph(data, emb, margin=0.05, mask_duplicates=True)
    assert all(np.array_equal(x, y) for x, y in zip(whole, blocks))


@pytest.mark.parametrize("bounded", [False, True])
def test_shared_texts_always_conflict(static_run, monkeypatch, bounded):
    """With duplicate masking, an example holding another's positive as its negative, or its anchor as
    its positive, conflicts with it at margin 0 without contrasting positives, even for the examples
    whose anchors flag the most texts, and even where the bounded search probes one list."""
    data, emb = stored(static_run)
    owners = np.argsort(-flagged_per_row(emb, data, 0.0), kind="stable")[:16]  # the densest rows
    rest = np.setdiff1d(np.arange(data.num_examples), owners)
    holders = np.random.default_rng(0).choice(rest, 32, replace=False).reshape(2, 16)
    negatives, positives = data.negative_ids.copy(), data.positive_ids.copy()
    negatives[holders[0], 0] = data.positive_ids[owners]
    positives[holders[1]] = data.anchor_ids[owners]
    shared = dataclasses.replace(data, negative_ids=negatives, positive_ids=positives)
    if bounded:
        monkeypatch.setattr(conflicts, "EXACT_SEARCH_MADDS", 0)
        monkeypatch.setattr(conflicts, "PROBES", 1)
    graph = dense(conflict_graph(shared, emb, margin=0.0, contrast_positives=False, mask_duplicates=True))
    for side in holders:
        assert graph[owners, side].all() and graph[side, owners].all()


@pytest.mark.parametrize("margin_strategy", ["absolute", "relative"])
def test_negative_margins_do_not_widen_the_search(static_run, monkeypatch, margin_strategy):
    """A negative margin masks less than margin 0, so its search proposes no more (the bound is
    t - max(m, 0), not t - |m|)."""
    data, emb = stored(static_run)
    proposed = []
    search = conflicts.SearchSpace.proposals

    def counting(self, *args):
        rows, texts = search(self, *args)
        proposed[-1] += len(rows)
        return rows, texts

    monkeypatch.setattr(conflicts.SearchSpace, "proposals", counting)
    for margin in (0.0, -0.5, 0.05):
        proposed.append(0)
        conflict_graph(data, emb, margin_strategy, margin)
    zero, negative, positive = proposed
    assert negative <= zero < positive, proposed


@pytest.mark.parametrize("margin_strategy, margin", [
    ("absolute", 2.0), ("absolute", -2.0), ("absolute", 2.5), ("absolute", -3.0), ("absolute", float("nan")),
    ("relative", float("inf")), ("relative", float("nan")),
])
def test_margins_outside_the_rule_are_refused(margin_strategy, margin):
    with pytest.raises(GistError, match=r"^--margin .*\(-2, 2\)|^--margin .*finite") as refused:
        check_rule(PlanParams(margin_strategy=margin_strategy, margin=margin))
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("margin_strategy, margin", [("absolute", 1.99), ("absolute", -1.99), ("absolute", 0.0), ("relative", 5.0), ("relative", -5.0)])
def test_margins_inside_the_rule_are_accepted(margin_strategy, margin):
    check_rule(PlanParams(margin_strategy=margin_strategy, margin=margin))


def test_commands_refuse_a_margin_that_masks_everything(static_run, triplets, tmp_path):
    """precompute-guide, plan and the report's margin sweep share check_rule: one-line errors naming the option."""
    runs = [
        ("precompute-guide", triplets, "--guide", "unused", "--out", tmp_path / "pass", "--margin", "2"),
        ("plan", static_run, "--out", tmp_path / "plan", "--margin", "-2"),
        ("report", static_run, "--out", tmp_path / "sweep", "--margins", "0,2.5"),
    ]
    for args in runs:
        proc = gist(*args, check=False)
        option = "--margins" if args[0] == "report" else "--margin"
        assert proc.returncode != 0 and f"{option} " in proc.stderr and "(-2, 2)" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / args[args.index("--out") + 1].name).exists()
    data, emb = stored(static_run)
    with pytest.raises(GistError, match="^--margin 2.0: "):
        plan_batches(data, 16, 1, 0, "fn-aware", emb, margin=2.0)


def low_rank_wide(emb: np.ndarray, rank: int, dim: int, rotate: bool) -> np.ndarray:
    """Unit vectors of `dim` dims lying in a `rank`-dim subspace: the guide's vectors projected to
    `rank` dims, zero-padded (as a padded embedder output) or rotated into a random subspace."""
    rng = np.random.default_rng(1)
    narrow = emb @ np.linalg.qr(rng.standard_normal((emb.shape[1], rank)))[0]
    narrow /= np.linalg.norm(narrow, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T if rotate else np.eye(rank, dim)
    return np.ascontiguousarray(narrow @ basis, dtype=np.float32)


@pytest.mark.parametrize("rotate", [False, True])
def test_bounded_search_on_low_rank_wide_vectors(static_run, monkeypatch, rotate):
    """128-dim vectors in a 40-dim subspace, projected on SEARCH_DIM = 64 directions (more than their
    rank): no crash, no invented conflict, most found, the same graph and plan twice."""
    data, emb = stored(static_run)
    wide = low_rank_wide(np.asarray(emb, dtype=np.float32), 40, 128, rotate)
    exact = dense(conflict_graph(data, wide))
    monkeypatch.setattr(conflicts, "EXACT_SEARCH_MADDS", 0)
    first, second = conflict_graph(data, wide), conflict_graph(data, wide)
    assert all(np.array_equal(x, y) for x, y in zip(first, second))
    bounded = dense(first)
    assert not (bounded & ~exact).any() and bounded.sum() > 0.8 * exact.sum(), (bounded.sum(), exact.sum())
    plans = [plan_batches(data, 16, 1, 0, "fn-aware", wide) for _ in range(2)]
    assert plans[0].tobytes() == plans[1].tobytes()

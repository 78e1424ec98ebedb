"""Exact duplicates masked by text id (`mask_duplicates`, the default): on every strategy the stored
masks are the guide rule's OR a brute-force rule over text ids, the manifest counts what that adds,
and `--no-mask-duplicates` stores the guide rule alone (what GISTEmbedLoss computes)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import read_manifest
from pipeline.guide import load_guide_pass
from pipeline.masks import BLOCKS, MASKS, PlannedMasks, batch_masks
from pipeline.plan import STRATEGIES
from tests.conftest import GUIDE_STATIC, SAMPLE, gist

BATCH = 16


@pytest.fixture(scope="module")
def duplicated_run(tmp_path_factory):
    """384 sample triplets with duplicates written in, dense enough that random batches hold some:
    rows 200-279 repeat the positives of rows 0-3, rows 280-329 have rows 4-7's positives as their
    negative, rows 330-359 repeat the anchors of rows 8-9 (beside the sample's own SNLI premise
    groups); a static-guide pass (margin 0, random batches of 16)."""
    table = pq.read_table(SAMPLE).slice(0, 384).to_pydict()
    for column, rows, sources, source_column in (("positive", range(200, 280), [0, 1, 2, 3], "positive"),
                                                 ("negative", range(280, 330), [4, 5, 6, 7], "positive"),
                                                 ("anchor", range(330, 360), [8, 9], "anchor")):
        for k, row in enumerate(rows):
            table[column][row] = table[source_column][sources[k % len(sources)]]
    directory = tmp_path_factory.mktemp("duplicates")
    pq.write_table(pa.table(table), directory / "data.parquet")
    gist("precompute-guide", directory / "data.parquet", "--guide", GUIDE_STATIC, "--out", directory / "guide", "--batch-size", str(BATCH))
    return directory / "guide"


def brute_force_duplicates(data, batch: np.ndarray, contrast_anchors: bool, contrast_positives: bool) -> dict[str, np.ndarray]:
    """Per block, True where the candidate's text id is row i's anchor or positive text id (not ap[i, i])."""
    g, k = len(batch), data.num_negatives
    anchors, positives, negatives = data.anchor_ids[batch], data.positive_ids[batch], data.negative_ids[batch]
    out = {"ap": np.zeros((g, g), bool), "aa": np.zeros((g, g), bool), "pp": np.zeros((g, g), bool), "an": np.zeros((g, k * g), bool)}
    for i in range(g):
        own = {anchors[i], positives[i]}
        for j in range(g):
            out["ap"][i, j] = j != i and positives[j] in own
            out["aa"][i, j] = contrast_anchors and anchors[j] in own
            out["pp"][i, j] = contrast_positives and positives[j] in own
            for c in range(k):
                out["an"][i, c * g + j] = negatives[j, c] in own
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stored_masks_are_the_guide_rule_or_equal_text_ids(tmp_path, duplicated_run, strategy):
    extra = ["--no-contrast-anchors"] if strategy == "by-task" else []  # a disabled block stays empty with duplicates too
    gist("plan", duplicated_run, "--out", tmp_path, "--batch-size", str(BATCH), "--strategy", strategy, *extra)
    masks, (_, data, embeddings) = PlannedMasks(tmp_path / MASKS), load_guide_pass(duplicated_run)
    assert masks.params.mask_duplicates
    exact = dataclasses.replace(masks.params, mask_duplicates=False)
    cols = {"ap": BATCH, "aa": BATCH, "pp": BATCH, "an": BATCH * data.num_negatives}
    added = {block: 0 for block in BLOCKS}
    for row, batch in enumerate(masks.batches):
        guide = batch_masks(embeddings, data, batch[None], exact)
        duplicates = brute_force_duplicates(data, batch, masks.params.contrast_anchors, masks.params.contrast_positives)
        for block in BLOCKS:
            stored = masks.dense(block, row, row + 1, BATCH, cols[block])[0]
            assert np.array_equal(stored, guide[block][0] | duplicates[block]), (strategy, row, block)
            added[block] += int((duplicates[block] & ~guide[block][0]).sum())
    assert read_manifest(tmp_path)["plan"]["duplicate_entries"] == added


def test_duplicates_the_guide_rule_keeps_are_masked_by_default(tmp_path, duplicated_run):
    """With margin 0, a candidate equal to the row's positive has g == t and the guide rule keeps it:
    duplicate masking is what masks it; --no-mask-duplicates stores the guide rule unchanged."""
    summary = read_manifest(duplicated_run)["plan"]
    assert summary["params"]["mask_duplicates"] and summary["params"]["margin"] == 0.0
    assert summary["duplicate_entries"]["ap"] > 0 and summary["duplicate_entries"]["an"] > 0

    gist("plan", duplicated_run, "--out", tmp_path, "--batch-size", str(BATCH), "--no-mask-duplicates")
    masks, (_, data, embeddings) = PlannedMasks(tmp_path / MASKS), load_guide_pass(duplicated_run)
    assert not masks.params.mask_duplicates
    assert read_manifest(tmp_path)["plan"]["duplicate_entries"] == {block: 0 for block in BLOCKS}
    recomputed = batch_masks(embeddings, data, masks.batches, masks.params)
    cols = {"ap": BATCH, "aa": BATCH, "pp": BATCH, "an": BATCH * data.num_negatives}
    for block in BLOCKS:
        assert np.array_equal(masks.dense(block, 0, masks.num_batches, BATCH, cols[block]), recomputed[block])
    # the same plan (same seed and strategy) with duplicates masked masks strictly more
    deduped = PlannedMasks(duplicated_run / MASKS)
    assert np.array_equal(deduped.batches, masks.batches)
    assert sum(len(deduped.positions("ap", r)) for r in range(masks.num_batches)) > sum(len(masks.positions("ap", r)) for r in range(masks.num_batches))


def test_fn_aware_keeps_duplicates_apart_when_they_are_masked(duplicated_run):
    """The fn-aware conflict graph follows the plan's rule: with duplicate masking, an example whose
    negative is another's positive conflicts with it (the guide rule alone, at margin 0, has g == t there)."""
    from pipeline.conflicts import conflict_graph

    _, data, embeddings = load_guide_pass(duplicated_run)

    def neighbours(graph, example):
        indptr, indices = graph
        return set(indices[indptr[example] : indptr[example + 1]].tolist())

    deduped, exact = conflict_graph(data, embeddings, mask_duplicates=True), conflict_graph(data, embeddings)
    pairs = [(4 + k % 4, row) for k, row in enumerate(range(280, 330))]  # row's negative is the source's positive
    assert all(row in neighbours(deduped, source) and source in neighbours(deduped, row) for source, row in pairs)
    assert any(row not in neighbours(exact, source) for source, row in pairs)
    for example in range(data.num_examples):  # duplicate masking only adds edges
        assert neighbours(exact, example) <= neighbours(deduped, example)

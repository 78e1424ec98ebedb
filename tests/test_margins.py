"""`gist report --margins`: the masked fraction of every margin from the stored pass, against an
independent numpy recomputation of the rule, and the manifest's own counts at the planned margin."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.artifacts import read_manifest
from pipeline.guide import load_guide_pass
from pipeline.masks import BLOCKS, MASKS, PlannedMasks
from tests.conftest import gist

MARGINS = [0.0, 0.02, 0.05, 0.1]
NEAR = 1e-6  # float32 products in another order may differ this close to a bound


def recomputed_counts(run, margin_strategy: str, margin: float) -> dict[str, tuple[int, int]]:
    """Per block: (entries surely masked, entries masked if every near-bound one is) in numpy."""
    masks = PlannedMasks(run / MASKS)
    _, data, emb = load_guide_pass(run)
    params, g = masks.params, masks.params.batch_size
    low, high = {b: 0 for b in BLOCKS}, {b: 0 for b in BLOCKS}
    for batch in masks.batches:
        a_ids, p_ids = data.anchor_ids[batch], data.positive_ids[batch]
        n_ids = data.negative_ids[batch].T.reshape(-1)
        a, p, n = emb[a_ids].astype(np.float32), emb[p_ids].astype(np.float32), emb[n_ids].astype(np.float32)
        t = np.einsum("gd,gd->g", a, p)[:, None]
        bound = t - margin if margin_strategy == "absolute" else t - np.abs(t) * margin
        blocks = {"ap": (a @ p.T, p_ids), "an": (a @ n.T, n_ids)}
        if params.contrast_anchors:
            blocks["aa"] = (a @ a.T, a_ids)
        if params.contrast_positives:
            blocks["pp"] = (p @ p.T, p_ids)
        for block, (sim, col_ids) in blocks.items():
            same = (col_ids[None, :] == a_ids[:, None]) | (col_ids[None, :] == p_ids[:, None]) if params.mask_duplicates else False
            surely, maybe = (sim > bound + NEAR) | same, (sim > bound - NEAR) | same
            if block == "ap":
                surely[np.diag_indices(g)] = maybe[np.diag_indices(g)] = False
            low[block] += int(surely.sum())
            high[block] += int(maybe.sum())
    return {b: (low[b], high[b]) for b in BLOCKS}


@pytest.mark.parametrize("margin_strategy", ["absolute", "relative"])
def test_margin_sweep_equals_recomputation(tmp_path, guide_run, margin_strategy):
    proc = gist("report", guide_run, "--out", tmp_path, "--margins", ",".join(map(str, MARGINS)), "--margin-strategy", margin_strategy)
    assert "masked fraction per block" in proc.stdout
    sweep = json.loads((tmp_path / "margins.json").read_text())
    assert (tmp_path / "margins.png").stat().st_size > 0 and "| margin |" in (tmp_path / "margins.md").read_text()
    assert [row["margin"] for row in sweep["margins"]] == MARGINS and sweep["margin_strategy"] == margin_strategy
    g, batches = sweep["plan"]["batch_size"], sweep["batches"]
    for row in sweep["margins"]:
        expected = recomputed_counts(guide_run, margin_strategy, row["margin"])
        for block in BLOCKS:
            low, high = expected[block]
            assert low <= row["masked_entries"][block] <= high, (row["margin"], block, low, row["masked_entries"][block], high)
        # every off-diagonal candidate is in exactly one of the two histograms
        assert sum(row["histograms"]["masked"]["ap"]) + sum(row["histograms"]["kept"]["ap"]) == batches * g * (g - 1)
    fractions = [row["masked_fraction"]["ap"] for row in sweep["margins"]]
    assert fractions == sorted(fractions) and fractions[-1] > fractions[0]  # a larger margin masks more
    plan = read_manifest(guide_run)["plan"]
    if margin_strategy == plan["params"]["margin_strategy"]:  # the planned margin: the stored masks' own counts
        planned = next(row for row in sweep["margins"] if row["margin"] == plan["params"]["margin"])
        assert planned["masked_entries"] == plan["masked_entries"]


@pytest.mark.parametrize("margins", ["a,b", "0,2.5", "nan", "0.05,0.05", ""])  # 2.5, nan: outside the plan's absolute range (-2, 2)
def test_bad_margins_are_one_line_errors(tmp_path, guide_run, margins):
    proc = gist("report", guide_run, "--out", tmp_path / "out", "--margins", margins, check=False)
    assert proc.returncode != 0 and "--margins" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()

"""GuidedMaskLoss beyond GISTEmbedLoss: MultipleNegativesRankingLoss's objectives (directions, partition_mode,
hardness_mode / hardness_strength) with the guide's masks applied in every block they use.

- masks that mask nothing (plan margin -1.99, the lowest the rule allows, no duplicate masking) and the masks' contrast flags matching the
  directions: equal to sentence-transformers' MultipleNegativesRankingLoss itself, every valid combination;
- the guide's masks (margin 0.05): equal to a row-by-row reference written here from DESIGN.md's rule (masked
  logits to -inf in each block, then the objective);
- the cached variant, MatryoshkaLoss, the refusal of masks planned without a block a direction needs.

Compared at MNRL's default scale 20 (temperature 0.05) in float32: loss to 1e-5 and gradients by the project's
relative rule (tests/test_equivalence.py). At scale 100 float32 noise in the similarities (MNRL normalises and
multiplies, we take the broadcast cosine) reaches ~1.3e-5 on a gradient; the float64 test shows the objectives
agree there too. The default objective's equality with GISTEmbedLoss is tests/test_equivalence.py, unchanged.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
)

from cli import plan_command
from pipeline import GistError
from pipeline.data import load_training_data
from pipeline.guide import read_embeddings
from pipeline.loss import CachedGuidedMaskLoss, GuidedMaskLoss
from pipeline.masks import MASKS, PlannedMasks
from pipeline.train import training_dataset
from tests.conftest import ROOT, load_student
from tests.test_equivalence import TOL, assert_grads_close, batch_inputs, loss_and_grads

TEMPERATURE = 0.05  # MNRL's default scale 20
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS = [(None, 0.0), ("in_batch_negatives", 9.0), ("hard_negatives", 5.0), ("all_negatives", 3.0)]


def valid_objectives():
    """Every (directions, partition_mode, hardness_mode, hardness_strength) MultipleNegativesRankingLoss accepts."""
    out = []
    others = ALL[1:]
    for n in range(len(others) + 1):
        for extra in itertools.combinations(others, n):
            directions = ("query_to_doc", *extra)
            for mode in ("joint", "per_direction"):
                if mode == "per_direction" and set(extra) & {"query_to_query", "doc_to_doc"}:
                    continue
                out += [(directions, mode, hm, hs) for hm, hs in HARDNESS]
    return out


OBJECTIVES = valid_objectives()


def objective_id(objective) -> str:
    directions, mode, hardness, _ = objective
    short = "+".join("".join(w[0] for w in d.split("_to_")) for d in directions)  # qd+qq+dq+dd
    return f"{short}-{mode}-{hardness or 'plain'}"


def test_every_valid_combination_is_covered():
    assert len(OBJECTIVES) == (8 + 2) * 4  # 8 direction sets joint, 2 per_direction (qd, qd+dq); 4 hardness settings


@pytest.fixture(scope="module")
def plans(tmp_path_factory, guide_run, pairs_run, triplets, pairs):
    """Re-planned masks, cached by (data, margin, contrast_anchors, contrast_positives); the document-side blocks
    are always planned (a direction that does not use them ignores them)."""
    cache = {}

    def get(kind: str, margin: float, anchors: bool, positives: bool):
        key = (kind, margin, anchors, positives)
        if key not in cache:
            run, data = (guide_run, triplets) if kind == "triplets" else (pairs_run, pairs)
            out = tmp_path_factory.mktemp("objectives")
            plan_command(run, out=out, batch_size=16, margin=margin, mask_duplicates=False, contrast_anchors=anchors,
                         contrast_positives=positives, contrast_doc_query=True, contrast_doc_negatives=True)
            cache[key] = (PlannedMasks(out / MASKS), training_dataset(load_training_data(data)), run, data)
        return cache[key]
    return get


def objective_kwargs(objective) -> dict:
    directions, mode, hardness, strength = objective
    return dict(directions=directions, partition_mode=mode, hardness_mode=hardness, hardness_strength=strength)


@pytest.mark.parametrize("kind", ["triplets", "pairs"])
@pytest.mark.parametrize("objective", OBJECTIVES, ids=objective_id)
def test_nothing_masked_equals_multiple_negatives_ranking_loss(plans, objective, kind):
    directions = objective[0]
    masks, dataset, _, _ = plans(kind, -1.99, "query_to_query" in directions, "doc_to_doc" in directions)
    assert not any(len(masks.positions(block, 0)) for block in masks.params.stored_blocks()), "margin -1.99 masks nothing here"
    student = load_student()
    ours = GuidedMaskLoss(student, masks, temperature=TEMPERATURE, **objective_kwargs(objective))
    reference = MultipleNegativesRankingLoss(student, scale=1 / TEMPERATURE, **objective_kwargs(objective))
    masks.cursor.step = 0
    loss_ours, grads_ours = loss_and_grads(student, ours, dataset, masks.batches[0])
    loss_ref, grads_ref = loss_and_grads(student, reference, dataset, masks.batches[0])
    assert abs(loss_ours - loss_ref) < TOL, (loss_ours, loss_ref)
    assert_grads_close(grads_ours, grads_ref)


@pytest.mark.parametrize("objective", [OBJECTIVES[i] for i in (4, 5, 36, 39)] + [(ALL, "joint", "in_batch_negatives", 9.0)], ids=objective_id)
def test_nothing_masked_equals_mnrl_at_scale_100_in_float64(plans, objective):
    masks, dataset, _, _ = plans("triplets", -1.99, "query_to_query" in objective[0], "doc_to_doc" in objective[0])
    student = load_student().double()
    ours = GuidedMaskLoss(student, masks, temperature=0.01, **objective_kwargs(objective))
    reference = MultipleNegativesRankingLoss(student, scale=100.0, **objective_kwargs(objective))
    masks.cursor.step = 1
    loss_ours, grads_ours = loss_and_grads(student, ours, dataset, masks.batches[1])
    loss_ref, grads_ref = loss_and_grads(student, reference, dataset, masks.batches[1])
    assert abs(loss_ours - loss_ref) < 1e-9, (loss_ours, loss_ref)
    assert_grads_close(grads_ours, grads_ref, tol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# The reference with masks: row by row, from the rule.

def embed(model, features) -> list[torch.Tensor]:
    return [model(dict(f))["sentence_embedding"] for f in features]


def guide_vectors(run, data_path, example_ids):
    """The stored guide embeddings of the batch's anchors, positives and negative columns (float64)."""
    emb = read_embeddings(run / "embeddings.parquet").astype(np.float64)
    data = load_training_data(data_path)
    columns = [data.anchor_ids[example_ids], data.positive_ids[example_ids]]
    columns += [data.negative_ids[example_ids, c] for c in range(data.num_negatives)]
    return [torch.from_numpy(emb[ids]) for ids in columns]


def reference_row_losses(student_cols, guide_cols, params, objective, temperature):
    """DESIGN.md's rule and MNRL's objective, one anchor row at a time.

    Row i, threshold t_i = g(a_i, p_i); a candidate x of block (left, x) is masked iff g(left_i, x) > t_i - m
    (absolute) or > t_i - |t_i| m (relative); the true pairs (a_i, p_i) in ap and (p_i, a_i) in pa never are.
    Masked logits are -inf; MNRL's own exclusions (a_i itself in query_to_query, p_i's own documents in
    doc_to_doc) too. query_to_doc holds GISTEmbedLoss's aa / pp blocks when the plan contrasts them and no
    direction takes them over. Returns the guide similarities' distance to their bounds (to check no entry is
    within rounding of its threshold) with the losses.
    """
    directions, mode, hardness, strength = objective
    a, p, *n = student_cols
    ga, gp, *gn = guide_cols
    g, k = a.size(0), len(n)
    docs, gdocs = torch.cat([p, *n]), torch.cat([gp, *gn])  # positives, then negative column c at g * (1 + c) + j
    losses, margins = [], []
    for i in range(g):
        t = float(ga[i] @ gp[i])
        bound = t - params.margin if params.margin_strategy == "absolute" else t - abs(t) * params.margin

        def block(x, xs, gx, gxs, never=(), always=(), penalised=()):
            sims = F.cosine_similarity(x[None], xs, dim=-1)
            guide = gxs @ gx
            masked = guide > bound
            margins.append((guide - bound).abs()[[j for j in range(len(xs)) if j not in never]])
            masked[list(never)] = False
            masked[list(always)] = True
            logits = sims / temperature
            if penalised and strength > 0:
                weight = torch.zeros(len(xs), dtype=sims.dtype)
                weight[list(penalised)] = 1.0
                logits = logits + strength * sims.detach() * weight
            return logits.masked_fill(masked, -torch.inf)

        own_docs = [i] + [g * (1 + c) + i for c in range(k)]
        penalised = {None: [], "in_batch_negatives": [j for j in range(len(docs)) if j not in own_docs],
                     "hard_negatives": own_docs[1:], "all_negatives": [j for j in range(len(docs)) if j != i]}[hardness]
        query_to_doc = [block(a[i], docs, ga[i], gdocs, never=[i], penalised=penalised)]
        positive = query_to_doc[0][i]
        if params.contrast_anchors and "query_to_query" not in directions:
            query_to_doc.append(block(a[i], a, ga[i], ga))
        if params.contrast_positives and "doc_to_doc" not in directions:
            query_to_doc.append(block(p[i], p, gp[i], gp))
        terms = [torch.cat(query_to_doc)]
        if "query_to_query" in directions:
            terms.append(block(a[i], a, ga[i], ga, always=[i]))
        if "doc_to_query" in directions:
            terms.append(block(p[i], a, gp[i], ga, never=[i]))
        if "doc_to_doc" in directions:
            terms.append(block(p[i], docs, gp[i], gdocs, always=own_docs))
        if mode == "joint":
            log_z = torch.logsumexp(torch.cat(terms), 0)
        else:
            log_z = sum(torch.logsumexp(term, 0) for term in terms) / len(terms)
        losses.append(log_z - positive)
    return torch.stack(losses), torch.cat(margins).min().item()


def reference_loss_and_grads(model, masks, dataset, example_ids, run, data_path, objective):
    model.zero_grad()
    features, _ = batch_inputs(model, dataset, example_ids)
    losses, closest = reference_row_losses(embed(model, features), guide_vectors(run, data_path, example_ids), masks.params, objective, TEMPERATURE)
    assert closest > 1e-6, "a guide similarity lies within rounding of its threshold: the stored verdict is ambiguous"
    loss = losses.mean()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["triplets", "pairs"])
@pytest.mark.parametrize("objective", OBJECTIVES, ids=objective_id)
def test_masked_equals_row_by_row_reference(plans, objective, kind):
    """With the guide's masks (margin 0.05): triplets planned with aa and pp (GISTEmbedLoss's defaults), pairs with
    the contrast flags the directions need only."""
    directions = objective[0]
    anchors, positives = (True, True) if kind == "triplets" else ("query_to_query" in directions, "doc_to_doc" in directions)
    masks, dataset, run, data_path = plans(kind, 0.05, anchors, positives)
    row = 1
    used = ["ap", "an", "aa", "pp", "pa", "pn"]
    assert sum(len(masks.positions(b, row)) for b in used if b in masks.params.stored_blocks()) > 0
    student = load_student()
    ours = GuidedMaskLoss(student, masks, temperature=TEMPERATURE, **objective_kwargs(objective))
    masks.cursor.step = row
    loss_ours, grads_ours = loss_and_grads(student, ours, dataset, masks.batches[row])
    loss_ref, grads_ref = reference_loss_and_grads(student, masks, dataset, masks.batches[row], run, data_path, objective)
    assert abs(loss_ours - loss_ref) < TOL, (loss_ours, loss_ref)
    assert_grads_close(grads_ours, grads_ref)


def test_masks_change_the_new_blocks(plans):
    """The doc-side blocks hold vetoes on this data, and they change the loss: the masked comparison exercises them."""
    masks, dataset, _, _ = plans("triplets", 0.05, True, True)
    assert sum(len(masks.positions("pa", r)) for r in range(3)) > 0 and sum(len(masks.positions("pn", r)) for r in range(3)) > 0
    student = load_student()
    masks.cursor.step = 1
    guided = GuidedMaskLoss(student, masks, temperature=TEMPERATURE, directions=ALL)
    unguided = GuidedMaskLoss(student, masks, temperature=TEMPERATURE, directions=ALL, guided=False)
    assert abs(loss_and_grads(student, guided, dataset, masks.batches[1])[0] - loss_and_grads(student, unguided, dataset, masks.batches[1])[0]) > 1e-3


CACHED = [(ALL, "joint", "in_batch_negatives", 9.0), (("query_to_doc", "doc_to_query"), "per_direction", "hard_negatives", 5.0),
          (("query_to_doc", "query_to_query"), "joint", "all_negatives", 3.0)]


@pytest.mark.parametrize("objective", CACHED, ids=objective_id)
def test_cached_equals_uncached(plans, objective):
    masks, dataset, _, _ = plans("triplets", 0.05, True, True)
    student = load_student()
    masks.cursor.step = 1
    plain = loss_and_grads(student, GuidedMaskLoss(student, masks, temperature=TEMPERATURE, **objective_kwargs(objective)), dataset, masks.batches[1])
    cached = loss_and_grads(student, CachedGuidedMaskLoss(student, masks, temperature=TEMPERATURE, mini_batch_size=5, **objective_kwargs(objective)),
                            dataset, masks.batches[1])
    assert abs(plain[0] - cached[0]) < TOL
    assert_grads_close(cached[1], plain[1], tol=2 * TOL)


@pytest.mark.parametrize("objective", CACHED[:2], ids=objective_id)
def test_cached_nothing_masked_equals_cached_mnrl(plans, objective):
    masks, dataset, _, _ = plans("triplets", -1.99, "query_to_query" in objective[0], "doc_to_doc" in objective[0])
    student = load_student()
    masks.cursor.step = 0
    ours = CachedGuidedMaskLoss(student, masks, temperature=TEMPERATURE, mini_batch_size=5, **objective_kwargs(objective))
    reference = CachedMultipleNegativesRankingLoss(student, scale=1 / TEMPERATURE, mini_batch_size=5, **objective_kwargs(objective))
    loss_ours, grads_ours = loss_and_grads(student, ours, dataset, masks.batches[0])
    loss_ref, grads_ref = loss_and_grads(student, reference, dataset, masks.batches[0])
    assert abs(loss_ours - loss_ref) < TOL
    assert_grads_close(grads_ours, grads_ref, tol=2 * TOL)


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_matryoshka_nothing_masked_equals_matryoshka_mnrl(plans, cached):
    objective = (ALL, "joint", "in_batch_negatives", 9.0)
    masks, dataset, _, _ = plans("triplets", -1.99, True, True)
    student = load_student()
    masks.cursor.step = 0
    if cached:
        inner = (CachedGuidedMaskLoss(student, masks, temperature=TEMPERATURE, mini_batch_size=6, **objective_kwargs(objective)),
                 CachedMultipleNegativesRankingLoss(student, scale=1 / TEMPERATURE, mini_batch_size=6, **objective_kwargs(objective)))
    else:
        inner = (GuidedMaskLoss(student, masks, temperature=TEMPERATURE, **objective_kwargs(objective)),
                 MultipleNegativesRankingLoss(student, scale=1 / TEMPERATURE, **objective_kwargs(objective)))
    ours, reference = (MatryoshkaLoss(student, loss, [64, 32, 16]) for loss in inner)
    loss_ours, grads_ours = loss_and_grads(student, ours, dataset, masks.batches[0])
    loss_ref, grads_ref = loss_and_grads(student, reference, dataset, masks.batches[0])
    assert abs(loss_ours - loss_ref) < TOL
    assert_grads_close(grads_ours, grads_ref, tol=2 * TOL)


def test_masks_planned_without_a_block_are_refused(guide_run):
    """No silent unmasked block: each direction names the plan option that plans what it needs."""
    masks = PlannedMasks(guide_run / MASKS)  # stage 1 defaults: aa, pp; no pa, pn
    student = load_student()
    with pytest.raises(GistError, match="doc_to_query needs the guide's pa masks.*--contrast-doc-query"):
        GuidedMaskLoss(student, masks, directions=("query_to_doc", "doc_to_query"))
    with pytest.raises(GistError, match="doc_to_doc needs the guide's pn masks.*--contrast-doc-negatives"):
        GuidedMaskLoss(student, masks, directions=("query_to_doc", "doc_to_doc"))
    GuidedMaskLoss(student, masks, directions=("query_to_doc", "query_to_query"))  # aa is planned
    GuidedMaskLoss(student, masks, directions=ALL, guided=False)  # the unguided ablation reads no masks
    with pytest.raises(GistError, match="per_direction"):
        GuidedMaskLoss(student, masks, directions=("query_to_doc", "query_to_query"), partition_mode="per_direction")
    with pytest.raises(GistError, match="query_to_doc"):
        GuidedMaskLoss(student, masks, directions=("doc_to_query",))
    with pytest.raises(GistError, match="hardness-mode"):
        GuidedMaskLoss(student, masks, hardness_mode="hardest")


def test_anchor_masks_planned_off_are_refused_for_query_to_query(tmp_path, guide_run):
    plan_command(guide_run, out=tmp_path, batch_size=16, contrast_anchors=False, contrast_positives=False)
    masks = PlannedMasks(tmp_path / MASKS)
    assert masks.params.stored_blocks() == ("ap", "aa", "pp", "an")
    with pytest.raises(GistError, match="query_to_query needs the guide's aa masks.*--contrast-anchors"):
        GuidedMaskLoss(load_student(), masks, directions=("query_to_doc", "query_to_query"))
    with pytest.raises(GistError, match="doc_to_doc needs the guide's pp masks.*--contrast-positives"):
        GuidedMaskLoss(load_student(), masks, directions=("query_to_doc", "doc_to_doc"))


def test_plan_options_are_recorded_and_the_train_options_reach_the_loss(tmp_path, guide_run, triplets):
    """`gist plan --contrast-doc-query --contrast-doc-negatives` stores pa and pn and records both in the plan parameters;
    `gist train --directions ... --partition-mode ... --hardness-mode ... --hardness-strength ...` trains with them (and
    the mnrl baseline takes the same objective); masks planned without pa are refused before OUT is touched, naming the option."""
    import json

    import pyarrow.parquet as pq

    from pipeline.train import TrainSettings, build_loss
    from pipeline import FORMAT_VERSION
    from tests.conftest import STUDENT, gist

    gist("plan", guide_run, "--out", tmp_path / "plan", "--batch-size", "16", "--margin", "0.05", "--contrast-doc-query", "--contrast-doc-negatives",
         "--device", "cpu")
    manifest = json.loads((tmp_path / "plan" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION >= 4  # pa and pn came with version 4
    assert manifest["plan"]["params"]["contrast_doc_query"] and manifest["plan"]["params"]["contrast_doc_negatives"]
    assert set(manifest["plan"]["masked_entries"]) == {"ap", "aa", "pp", "an", "pa", "pn"} and manifest["plan"]["masked_entries"]["pa"] > 0
    assert pq.read_schema(tmp_path / "plan" / MASKS).names == ["epoch", "step", "example_ids", "ap", "aa", "pp", "an", "pa", "pn"]
    masks = PlannedMasks(tmp_path / "plan" / MASKS)
    assert masks.params.contrast_doc_query and masks.planned_blocks == ("ap", "aa", "pp", "an", "pa", "pn")

    options = ["--directions", "query_to_doc,query_to_query,doc_to_query,doc_to_doc", "--hardness-mode", "in_batch_negatives", "--hardness-strength", "9"]
    out = tmp_path / "run"
    gist("train", triplets, "--masks", tmp_path / "plan" / MASKS, "--student", STUDENT, "--out", out, "--max-steps", "2", "--logging-steps", "1",
         "--device", "cpu", *options)
    record = json.loads((out / "run.json").read_text())
    assert record["directions"] == list(ALL) and record["hardness_mode"] == "in_batch_negatives" and record["hardness_strength"] == 9.0
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))

    settings = TrainSettings(loss="mnrl", directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", hardness_mode="hard_negatives",
                             hardness_strength=5.0)
    mnrl = build_loss(load_student(), masks, settings)
    assert (mnrl.directions, mnrl.partition_mode, mnrl.hardness_mode, mnrl.hardness_strength) == (("query_to_doc", "doc_to_query"), "per_direction", "hard_negatives", 5.0)
    guided = build_loss(load_student(), masks, TrainSettings(**{**settings.__dict__, "loss": "guided", "mini_batch_size": 4}))
    assert type(guided) is CachedGuidedMaskLoss and guided.directions == ("query_to_doc", "doc_to_query") and guided.hardness_strength == 5.0

    refused = gist("train", triplets, "--masks", guide_run / MASKS, "--student", STUDENT, "--out", tmp_path / "refused", "--device", "cpu",
                   "--directions", "query_to_doc,doc_to_query", check=False)
    assert refused.returncode == 1 and "--contrast-doc-query" in refused.stderr and not (tmp_path / "refused").exists()
    bad = gist("train", triplets, "--masks", guide_run / MASKS, "--student", STUDENT, "--out", tmp_path / "bad", "--device", "cpu",
               "--partition-mode", "per_direction", "--directions", "query_to_doc,doc_to_doc", check=False)
    assert bad.returncode == 1 and "per_direction" in bad.stderr


# Under torchrun: 2 processes, each with half of every planned batch, gathering across devices, equal 1 process with
# the whole batch (mean of the ranks' losses; gradients summed over ranks / 2, as DDP averages them).
DISTRIBUTED_ROWS = (0, 1)
DISTRIBUTED_CASES = {
    "gte-in-batch": ("all", (ALL, "joint", "in_batch_negatives", 9.0), None),
    "symmetric-hard": ("no-aa", (("query_to_doc", "doc_to_query"), "per_direction", "hard_negatives", 5.0), None),
    "qq-all-cached": ("all", (("query_to_doc", "query_to_query"), "joint", "all_negatives", 3.0), 3),
    "dd-plain": ("no-aa", (("query_to_doc", "doc_to_doc"), "joint", None, 0.0), None),
}


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path, guide_run, triplets):
    """query_to_query / doc_to_query compare with every anchor of the planned batch (gathered, as MNRL's
    gather_across_devices); GISTEmbedLoss's own aa block stays per-rank (its semantics), so the plans whose
    objectives keep it in query_to_doc are planned without it here."""
    from safetensors.torch import load_file

    from tests.test_distributed import torchrun

    plans = {}
    for which, anchors in (("all", True), ("no-aa", False)):
        plan_command(guide_run, out=tmp_path / which, batch_size=16, margin=0.05, contrast_anchors=anchors, contrast_doc_query=True,
                     contrast_doc_negatives=True)
        plans[which] = PlannedMasks(tmp_path / which / MASKS)
    out = tmp_path / "two"
    out.mkdir()
    torchrun(ROOT / "tests" / "objectives_worker.py", plans["all"].path, plans["no-aa"].path, triplets, out)
    two = json.loads((out / "losses.json").read_text())
    dataset = training_dataset(load_training_data(triplets))
    student = load_student()
    for name, (which, objective, mini_batch) in DISTRIBUTED_CASES.items():
        masks = plans[which]
        kwargs = objective_kwargs(objective)
        loss_fn = (CachedGuidedMaskLoss(student, masks, temperature=TEMPERATURE, mini_batch_size=mini_batch, **kwargs) if mini_batch
                   else GuidedMaskLoss(student, masks, temperature=TEMPERATURE, **kwargs))
        for row in DISTRIBUTED_ROWS:
            masks.cursor.step = row
            loss_one, grads_one = loss_and_grads(student, loss_fn, dataset, masks.batches[row])
            assert abs(two[f"{name}-{row}"] - loss_one) < TOL, (name, row, two[f"{name}-{row}"], loss_one)
            assert_grads_close(load_file(out / f"{name}-{row}.safetensors"), grads_one, tol=2 * TOL)

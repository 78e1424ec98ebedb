"""Distillation from the stored guide pass: the labels are the guide's embeddings of the batch's
texts; sentence-transformers' EmbedDistillLoss fed by gist equals it fed by the online guide's
`encode`; the in-batch KL term leaves the masked candidates out; `gist train --distill` trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss

from pipeline.data import load_training_data
from pipeline.distill import DistilledLoss, GuideTeacher, TeacherLabelLoss
from pipeline.guide import load_guide_pass
from pipeline.loss import GuidedMaskLoss
from pipeline.masks import MASKS, PlannedMasks
from pipeline.train import training_dataset
from tests.conftest import STUDENT, gist, load_student
from tests.test_equivalence import assert_grads_close, batch_inputs, loss_and_grads


@pytest.fixture(scope="module")
def planned(guide_run, triplets):
    masks = PlannedMasks(guide_run / MASKS)
    return masks, training_dataset(load_training_data(triplets)), masks.batches[:2]


def test_labels_are_the_stored_embeddings_of_the_batch_texts(guide_run, planned, guide):
    masks, dataset, batches = planned
    _, data, embeddings = load_guide_pass(guide_run)
    teacher = GuideTeacher.for_masks(masks)
    ids = torch.from_numpy(batches[0])
    labels = teacher.labels(ids, 3)
    expected = np.stack([embeddings[data.anchor_ids[batches[0]]], embeddings[data.positive_ids[batches[0]]],
                         embeddings[data.negative_ids[batches[0], 0]]], axis=1)
    np.testing.assert_array_equal(labels.numpy(), expected)
    rows = dataset[list(map(int, batches[0]))]
    online = np.stack([guide.encode(rows[c], normalize_embeddings=True) for c in dataset.column_names if c != "label"], axis=1)
    np.testing.assert_allclose(labels.numpy(), online, atol=1e-5)


def test_embed_distill_fed_by_gist_equals_fed_by_the_online_guide(planned, guide):
    """TeacherLabelLoss(EmbedDistillLoss) against EmbedDistillLoss with labels from guide.encode,
    with a projection (same initial weights) so that its gradient is compared too."""
    masks, dataset, batches = planned
    teacher = GuideTeacher.for_masks(masks)
    student = load_student()
    torch.manual_seed(0)
    reference = EmbedDistillLoss(student, projection_dim=teacher.dim)
    ours = TeacherLabelLoss(EmbedDistillLoss(student, projection_dim=teacher.dim), teacher)
    ours.loss.projection.load_state_dict(reference.projection.state_dict())
    for example_ids in batches:
        rows = dataset[list(map(int, example_ids))]
        online = torch.from_numpy(np.stack([guide.encode(rows[c], normalize_embeddings=True) for c in dataset.column_names if c != "label"], axis=1))
        features, ids = batch_inputs(student, dataset, example_ids)
        student.zero_grad()
        loss_ref = reference(features, online)
        loss_ref.backward()
        grads_ref = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        loss_ours, grads_ours = loss_and_grads(student, ours, dataset, example_ids)
        assert abs(loss_ours - loss_ref.item()) < 1e-5
        assert_grads_close(grads_ours, grads_ref)


@pytest.fixture
def guided(planned):
    """(masks, dataset, batches, teacher, student, GuidedMaskLoss of the student): a fresh student per test."""
    masks, dataset, batches = planned
    student = load_student()
    return masks, dataset, batches, GuideTeacher.for_masks(masks), student, GuidedMaskLoss(student, masks)


def test_distilled_loss_is_guided_plus_weighted_embed_distill(guided):
    masks, dataset, batches, teacher, student, guided = guided
    combined = DistilledLoss(guided, teacher, "embed", weight=0.5)
    alone = DistilledLoss(guided, teacher, "embed", contrastive_weight=0.0)
    embed = TeacherLabelLoss(EmbedDistillLoss(student), teacher)
    for row, example_ids in enumerate(batches):
        masks.cursor.step = row
        g, e = loss_and_grads(student, guided, dataset, example_ids)[0], loss_and_grads(student, embed, dataset, example_ids)[0]
        assert abs(loss_and_grads(student, combined, dataset, example_ids)[0] - (g + 0.5 * e)) < 1e-5
        assert abs(loss_and_grads(student, alone, dataset, example_ids)[0] - e) < 1e-6


def candidate_sims(columns, i):
    """Row i's candidates [ap, aa, pp, an] (anchor, positive, negative columns)."""
    a, p, n = columns
    return torch.cat([F.cosine_similarity(a[i : i + 1], p, dim=-1), F.cosine_similarity(a[i : i + 1], a, dim=-1),
                      F.cosine_similarity(p[i : i + 1], p, dim=-1), F.cosine_similarity(a[i : i + 1], n, dim=-1)])


def reference_kl(student_emb, guide_emb, mask_rows, temperature):
    """Row by row: both models' candidates, the masked ones dropped, KL(guide || student), averaged."""
    total = 0.0
    for i in range(len(mask_rows)):
        keep = torch.from_numpy(~mask_rows[i])
        p = torch.softmax(candidate_sims(guide_emb, i)[keep] / temperature, 0)
        log_q = torch.log_softmax(candidate_sims(student_emb, i)[keep] / temperature, 0)
        total += (p * (p.log() - log_q)).sum().item()
    return total / len(mask_rows)


def test_kl_distillation_leaves_the_masked_candidates_out(guided):
    masks, dataset, batches, teacher, student, guided = guided
    kl_alone = DistilledLoss(guided, teacher, "kl", contrastive_weight=0.0)
    for row, example_ids in enumerate(batches):
        masks.cursor.step = row
        features, ids = batch_inputs(student, dataset, example_ids)
        with torch.no_grad():
            ours = kl_alone(features, ids).item()
            student_emb = [student(f)["sentence_embedding"] for f in features]
        g = len(example_ids)
        mask_rows = np.concatenate([masks.dense(b, row, row + 1, g, g)[0] for b in ("ap", "aa", "pp", "an")], axis=1)
        guide_emb = list(teacher.labels(ids, 3).unbind(1))
        assert mask_rows.any(axis=1).sum() > 0 and mask_rows[:, :g].any()  # guide vetoes in these batches
        assert abs(ours - reference_kl(student_emb, guide_emb, mask_rows, guided.temperature)) < 1e-4


def test_gist_train_with_distillation(tmp_path, guide_run, triplets):
    out = tmp_path / "student"
    gist("train", triplets, "--masks", guide_run / MASKS, "--student", STUDENT, "--out", out, "--max-steps", "2",
         "--save-steps", "100", "--distill", "kl", "--distill-weight", "0.5")
    record = json.loads((out / "run.json").read_text())
    assert record["distill"] == "kl" and record["distill_weight"] == 0.5
    assert (out / "final").is_dir()
    for args, message in ((["--loss", "mnrl", "--distill", "embed"], "--distill combines with"),
                          (["--loss", "none"], "--loss none trains only"), (["--distill", "logits"], "--distill logits")):
        proc = gist("train", triplets, "--masks", guide_run / MASKS, "--student", STUDENT, "--out", tmp_path / "x", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_embed_projection_is_a_seeded_module_of_the_student(tmp_path, triplets):
    """With a guide of another dimension the projection is a GuideProjection in the student (what DDP wraps
    and checkpoints hold), initialised from the seed alone: it drew from the unseeded global state before
    the trainer seeded it, so two runs (and one process against a torchrun world) started apart."""
    from pipeline.distill import GuideProjection, remove_guide_projection
    from tests.conftest import GUIDE_RETOKENIZE

    gist("precompute-guide", triplets, "--guide", GUIDE_RETOKENIZE, "--out", tmp_path / "guide", "--batch-size", "16")
    masks = PlannedMasks(tmp_path / "guide" / MASKS)
    teacher = GuideTeacher.for_masks(masks)
    weights = []
    for draw in range(2):
        torch.manual_seed(draw)  # whatever the caller's random state
        student = load_student()
        state = torch.random.get_rng_state()
        DistilledLoss(GuidedMaskLoss(student, masks), teacher, "embed", seed=3)
        assert isinstance(student[-1], GuideProjection) and student.get_embedding_dimension() == 64 and teacher.dim == 48
        assert torch.equal(torch.random.get_rng_state(), state)
        weights.append(student[-1].linear.weight.detach().clone())
        remove_guide_projection(student)
        assert not any(isinstance(module, GuideProjection) for module in student)
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_embed_distill_checkpoints_load_as_the_student(tmp_path):
    """A --distill embed checkpoint holds the GuideProjection (pipeline.distill.GuideProjection in its
    modules.json, which sentence-transformers imports only under trust_remote_code): `gist evaluate` and
    `gist train --student` load it, without the projection, as the student eval.json scored at that step."""
    from tests.conftest import GUIDE_RETOKENIZE, ROOT, small_data

    data, sts = small_data(tmp_path / "data.parquet", 64), ROOT / "data" / "stsb_dev.parquet"
    gist("precompute-guide", data, "--guide", GUIDE_RETOKENIZE, "--out", tmp_path / "guide", "--batch-size", "16")
    masks = tmp_path / "guide" / MASKS
    gist("train", data, "--masks", masks, "--student", STUDENT, "--out", tmp_path / "run", "--max-steps", "2", "--save-steps", "100",
         "--eval-steps", "1", "--sts", sts, "--lr", "1e-3", "--distill", "embed", "--device", "cpu")
    scores = json.loads((tmp_path / "run" / "eval.json").read_text())
    best = Path(scores["best_checkpoint"])
    assert best.parent == tmp_path / "run" / "checkpoints" and "GuideProjection" in (best / "modules.json").read_text()
    gist("evaluate", best, "--sts", sts, "--out", tmp_path / "best.json", "--device", "cpu")
    assert json.loads((tmp_path / "best.json").read_text())["sts_spearman"] == pytest.approx(scores["best_metric"], abs=1e-6)
    gist("train", data, "--masks", masks, "--student", best, "--out", tmp_path / "again", "--max-steps", "2",
         "--save-steps", "100", "--distill", "embed", "--device", "cpu")
    assert "GuideProjection" not in (tmp_path / "again" / "final" / "modules.json").read_text()


def test_the_loader_allows_gists_projection_only(tmp_path):
    """Any other class outside sentence-transformers, gist's own included, stays refused without trust_remote_code."""
    import shutil

    from pipeline import GistError
    from pipeline.guide import load_model

    shutil.copytree(STUDENT, tmp_path / "model")
    modules = json.loads((tmp_path / "model" / "modules.json").read_text())
    modules[-1]["type"] = "pipeline.distill.DistilledLoss"
    (tmp_path / "model" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(GistError, match="pipeline.distill.DistilledLoss"):
        load_model(str(tmp_path / "model"), "cpu")

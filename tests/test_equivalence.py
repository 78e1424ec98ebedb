"""The central test: GuidedMaskLoss with stored masks equals sentence-transformers' GISTEmbedLoss
run online with the same guide on the same planned batches (loss and gradients, float32)."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

from pipeline.data import load_training_data
from pipeline.loss import BroadcastCosine, GuidedMaskLoss
from pipeline.masks import MASKS, PlannedMasks
from pipeline.train import build_trainer, training_dataset
from cli import plan_command
from tests.conftest import GUIDE_SAMEVOCAB, load_student

# Losses agree to 1e-5, gradients to 2e-5 (a gradient tensor: relative to its largest entry when that exceeds 1). The similarities
# are GISTEmbedLoss's to the bit (so are the losses, in practice); gradients come from BroadcastCosine's analytic backward instead of
# autograd through the broadcast: float32 noise, measured up to 9.5e-6 on a gradient whose largest entry is 2.75 (AMD EPYC) and
# 1.05e-5 on token_type_embeddings (Intel Xeon), a sum over every token of the batch whose terms cancel (its largest entry 0.90,
# the sum of its entries' magnitudes 22; the word embeddings' gradient, of the same upstream values, differs by 7e-7).
TOL = 1e-5
GRAD_TOL = 2e-5


def grad_errors(ours: dict, reference: dict) -> dict[str, float]:
    """Per gradient tensor: the largest difference, relative to the reference's largest entry when that exceeds 1."""
    assert ours.keys() == reference.keys()
    return {name: (ours[name] - ref).abs().max().item() / max(1.0, ref.abs().max().item()) for name, ref in reference.items()}


def assert_grads_close(ours: dict, reference: dict, tol: float = GRAD_TOL) -> None:
    errors = grad_errors(ours, reference)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (worst, errors[worst])


def batch_inputs(model, dataset, example_ids):
    """Features and labels of one planned batch, tokenized as the trainer's collator does."""
    rows = dataset[list(map(int, example_ids))]
    columns = [c for c in dataset.column_names if c != "label"]
    return [model.preprocess(rows[c]) for c in columns], torch.tensor(rows["label"])


def loss_and_grads(model, loss_fn, dataset, example_ids):
    model.zero_grad()
    features, labels = batch_inputs(model, dataset, example_ids)
    loss = loss_fn(features, labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


PLANS = [
    dict(margin_strategy="absolute", margin=0.05, contrast_anchors=True, contrast_positives=True),
    dict(margin_strategy="relative", margin=0.05, contrast_anchors=True, contrast_positives=True),
    dict(margin_strategy="absolute", margin=0.1, contrast_anchors=False, contrast_positives=True),
    dict(margin_strategy="relative", margin=0.02, contrast_anchors=True, contrast_positives=False),
    dict(margin_strategy="absolute", margin=0.0, contrast_anchors=False, contrast_positives=False),
]


@pytest.mark.parametrize("negatives", [True, False], ids=["triplets", "pairs"])
@pytest.mark.parametrize("options", PLANS, ids=lambda o: f"{o['margin_strategy']}-{o['margin']}-aa{int(o['contrast_anchors'])}-pp{int(o['contrast_positives'])}")
def test_guided_mask_loss_equals_gist_embed_loss(tmp_path, guide_run, pairs_run, triplets, pairs, guide, options, negatives):
    run, data_path = (guide_run, triplets) if negatives else (pairs_run, pairs)
    # `gist plan --no-mask-duplicates` (GISTEmbedLoss's exact rule), in-process to save an interpreter start
    plan_command(run, out=tmp_path, batch_size=16, mask_duplicates=False, **options)
    masks = PlannedMasks(tmp_path / MASKS)
    dataset = training_dataset(load_training_data(data_path))
    student = load_student()
    ours = GuidedMaskLoss(student, masks)
    reference = GISTEmbedLoss(student, guide, **options)

    masked_any = 0
    for row, example_ids in enumerate(masks.batches[:3]):
        masks.cursor.step = row  # the trainer's step whose planned batch this is
        loss_ours, grads_ours = loss_and_grads(student, ours, dataset, example_ids)
        loss_ref, grads_ref = loss_and_grads(student, reference, dataset, example_ids)
        assert abs(loss_ours - loss_ref) < TOL, (loss_ours, loss_ref)
        assert_grads_close(grads_ours, grads_ref)
        masked_any += sum(len(masks.positions(b, row)) for b in ("ap", "an"))
    if options["margin"] > 0:
        assert masked_any > 0, "the test batches mask nothing; the comparison would not exercise the masks"


def test_training_with_masks_equals_online_gist_training(tmp_path, guide_run, triplets, guide):
    """N trainer steps with stored masks give the same weights as N steps of online GISTEmbedLoss.

    Up to float32 noise in the gradients, which Adam's normalisation carries into the weights: measured 1.2e-5 at most
    after 6 steps that move weights by up to 3.5e-3; allowed 5e-5."""
    masks = PlannedMasks(guide_run / MASKS)
    data = load_training_data(triplets)
    weights = {}
    for name in ("masks", "online"):
        torch.manual_seed(0)
        student = load_student()
        loss = GuidedMaskLoss(student, masks) if name == "masks" else GISTEmbedLoss(student, guide, margin=0.05)
        trainer = build_trainer(student, data, masks, loss, tmp_path / name, max_steps=6, learning_rate=1e-3,
                                warmup_steps=0, save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)
        trainer.train()
        weights[name] = {k: v.detach().clone() for k, v in student.state_dict().items()}
    initial = load_student().state_dict()
    moved = max((weights["masks"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3, "training did not change the weights"
    for k in initial:
        torch.testing.assert_close(weights["masks"][k], weights["online"][k], atol=5e-5, rtol=1e-4, msg=k)


def test_cached_loss_equals_uncached(guide_run, triplets):
    """GradCache embeds in mini-batches, so gradients differ by float32 noise: measured 1.7e-5 on a
    gradient whose largest entry is 1.3 (token-type embeddings sum over every token). Each gradient
    must agree to 2e-5 relative to its largest entry; the loss to 1e-5."""
    from pipeline.loss import CachedGuidedMaskLoss

    masks = PlannedMasks(guide_run / MASKS)
    dataset = training_dataset(load_training_data(triplets))
    student = load_student()
    for row, example_ids in enumerate(masks.batches[:2]):
        masks.cursor.step = row
        loss_plain, grads_plain = loss_and_grads(student, GuidedMaskLoss(student, masks), dataset, example_ids)
        loss_cached, grads_cached = loss_and_grads(student, CachedGuidedMaskLoss(student, masks, mini_batch_size=5), dataset, example_ids)
        assert abs(loss_plain - loss_cached) < TOL
        assert_grads_close(grads_cached, grads_plain, tol=2 * TOL)


def test_broadcast_cosine_has_gist_values_and_the_true_gradient():
    """Forward: GISTEmbedLoss's broadcast nn.CosineSimilarity to the bit, also when split into row blocks.
    Backward: the analytic gradient passes torch's gradcheck (float64) and matches autograd through the broadcast."""
    from pipeline import loss as loss_mod

    torch.manual_seed(0)
    x, y = torch.randn(40, 24) * 3, torch.randn(56, 24)
    reference = torch.nn.CosineSimilarity(dim=-1)(x.unsqueeze(1), y.unsqueeze(0))
    assert torch.equal(BroadcastCosine.apply(x, y), reference)
    blocks = loss_mod.COSINE_CHUNK_ELEMENTS
    try:
        loss_mod.COSINE_CHUNK_ELEMENTS = 7 * 56 * 24  # 7 rows per block, the last block partial
        assert torch.equal(BroadcastCosine.apply(x, y), reference)
    finally:
        loss_mod.COSINE_CHUNK_ELEMENTS = blocks
    x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
    assert torch.autograd.gradcheck(BroadcastCosine.apply, (x64[:6], y64[:5]))
    upstream = torch.randn(40, 56)
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    (torch.nn.CosineSimilarity(dim=-1)(xa.unsqueeze(1), ya.unsqueeze(0)) * upstream).sum().backward()
    xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
    (BroadcastCosine.apply(xb, yb) * upstream).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(yb.grad, ya.grad, atol=1e-6, rtol=1e-5)


def test_guided_loss_keeps_only_score_matrices_for_backward(guide_run):
    """No (G, G, dim) broadcast is kept for the backward pass: what autograd saves is a few (G, G) score
    matrices and the embeddings, as for MNRL (GISTEmbedLoss keeps ~600 MB at G=128, dim 384)."""
    masks = PlannedMasks(guide_run / MASKS)
    loss_fn = GuidedMaskLoss(load_student(), masks)
    g, dim = masks.batches.shape[1], 256
    embeddings = [torch.randn(g, dim, requires_grad=True) for _ in range(2 + masks.num_negatives)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        scores = loss_fn.scores(embeddings[0], embeddings[1], embeddings[2:], 0, 0, 0, g)
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(g))
    loss.backward()
    assert all(e.grad is not None and e.grad.abs().sum() > 0 for e in embeddings)
    assert max(saved) < g * g * dim, "a (G, G, dim) broadcast is kept for the backward pass"
    assert sum(saved) < 10 * g * g * (4 + masks.num_negatives) + 10 * g * dim * len(embeddings)


def test_student_shorter_than_guide_reproduced_with_guide_max_seq_length(tmp_path, triplets, guide):
    """A same-tokenizer GISTEmbedLoss feeds the guide the student's tokens, cut at the student's
    max_seq_length; stage 1 with --guide-max-seq-length at that length stores the same verdicts."""
    from tests.conftest import gist

    short = 16
    gist("precompute-guide", triplets, "--guide", GUIDE_SAMEVOCAB, "--out", tmp_path / "cut", "--batch-size", "16", "--margin", "0.05",
         "--guide-max-seq-length", str(short))
    gist("precompute-guide", triplets, "--guide", GUIDE_SAMEVOCAB, "--out", tmp_path / "full", "--batch-size", "16", "--margin", "0.05")
    cut, full = PlannedMasks(tmp_path / "cut" / MASKS), PlannedMasks(tmp_path / "full" / MASKS)
    changed = sum(int((cut.dense("ap", r, r + 1, 16, 16) != full.dense("ap", r, r + 1, 16, 16)).sum()) for r in range(len(cut.batches)))
    assert changed > 0, "the guide's input length changes its verdicts on this data"
    dataset = training_dataset(load_training_data(triplets))
    student = load_student()
    student.max_seq_length = short
    ours, reference = GuidedMaskLoss(student, cut), GISTEmbedLoss(student, guide, margin=0.05)
    for row, example_ids in enumerate(cut.batches[:3]):
        cut.cursor.step = row
        loss_ours, grads_ours = loss_and_grads(student, ours, dataset, example_ids)
        loss_ref, grads_ref = loss_and_grads(student, reference, dataset, example_ids)
        assert abs(loss_ours - loss_ref) < TOL, (loss_ours, loss_ref)
        assert_grads_close(grads_ours, grads_ref)


@pytest.mark.parametrize("contrast_anchors", [False, True], ids=["ap+an", "ap+aa+an"])
def test_unguided_equals_mnrl_over_the_same_candidates(tmp_path, guide_run, triplets, contrast_anchors):
    """The "unguided" ablation (GuidedMaskLoss's candidates, only self-pairs masked, no guide veto)
    is sentence-transformers' MultipleNegativesRankingLoss over those candidates: plain MNRL for
    ap + an, MNRL with the query_to_query direction (self-pairs removed) when aa is on. MNRL's
    normalize-and-matmul similarities differ from the broadcast cosine by float32 noise, which the
    temperature amplifies: compared to 1e-4."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    plan_command(guide_run, out=tmp_path, batch_size=16, margin=0.05, contrast_anchors=contrast_anchors, contrast_positives=False, mask_duplicates=False)
    masks = PlannedMasks(tmp_path / MASKS)
    dataset = training_dataset(load_training_data(triplets))
    student = load_student()
    directions = ("query_to_doc", "query_to_query") if contrast_anchors else ("query_to_doc",)
    unguided, guided = GuidedMaskLoss(student, masks, guided=False), GuidedMaskLoss(student, masks)
    reference = MultipleNegativesRankingLoss(student, scale=100.0, directions=directions)
    differs = 0
    for row, example_ids in enumerate(masks.batches[:2]):
        masks.cursor.step = row
        loss_ours, grads_ours = loss_and_grads(student, unguided, dataset, example_ids)
        loss_ref, grads_ref = loss_and_grads(student, reference, dataset, example_ids)
        assert abs(loss_ours - loss_ref) < 1e-4, (loss_ours, loss_ref)
        assert_grads_close(grads_ours, grads_ref, tol=1e-4)
        differs += abs(loss_and_grads(student, guided, dataset, example_ids)[0] - loss_ours) > 1e-4
    assert differs, "the guide's vetoes change the loss on these batches"

"""Static-embedding students (pipeline/static.py): `gist static-student`, the guided loss against the
GISTEmbed rule evaluated online, GradCache over a StaticEmbedding batch, `gist train` end to end,
refused options, resume, --distill.

The student is a tiny StaticEmbedding (32 dims, random init) over tiny-student's tokenizer.
sentence-transformers' GISTEmbedLoss refuses a static student ("Both the training model and the guiding
model must use a PreTrainedTokenizer from transformers"), so the reference here is the GISTEmbed rule
itself: the guide run online on the batch's texts in the test, its similarities thresholded at
g(a_i, p_i) - margin, the masked student scores' cross-entropy.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from cli import plan_command
from pipeline import GistError
from pipeline.data import load_training_data
from pipeline.masks import MASKS, PlannedMasks
from pipeline.static import (
    CachedStaticGuidedMaskLoss, StaticGuidedMaskLoss, cached_static_mnrl, flat_static_features, padded_static_features,
)
from pipeline.train import build_trainer, training_dataset
from tests.test_train import StopAfter
from tests.conftest import ROOT, STUDENT, gist

# Matmul cosines (the static loss's) vs the rule's broadcast cosines: float32 rounding, amplified by 1/temperature = 100.
TOL = 1e-5


@pytest.fixture(scope="session")
def static_student(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "student"
    gist("static-student", STUDENT, "--out", out, "--init", "random", "--dim", "32", "--seed", "0")
    return out


def load_static(path) -> SentenceTransformer:
    return SentenceTransformer(str(path), device="cpu")


def embed(model, texts):
    return model(model.preprocess(texts))["sentence_embedding"]


def broadcast_cosine(x, y):
    return F.cosine_similarity(x[:, None], y[None], dim=-1)


def gist_rule_loss(student, guide, rows, columns, params, temperature=0.01):
    """GISTEmbed's loss for one batch, with the guide online: GISTEmbedLoss's rule written out."""
    student_emb = [embed(student, rows[c]) for c in columns]
    with torch.no_grad():
        guide_emb = [embed(guide, rows[c]) for c in columns]
    (a, p, *n), (ga, gp, *gn) = student_emb, guide_emb
    threshold = broadcast_cosine(ga, gp).diagonal()[:, None]

    def vetoed(g):
        if params["margin_strategy"] == "absolute":
            return g > threshold - params["margin"]
        return g > threshold - threshold.abs() * params["margin"]

    mask_ap = vetoed(broadcast_cosine(ga, gp))
    mask_ap.fill_diagonal_(False)  # the true pair is never masked
    blocks = [broadcast_cosine(a, p).masked_fill(mask_ap, -torch.inf)]
    if params["contrast_anchors"]:
        blocks.append(broadcast_cosine(a, a).masked_fill(vetoed(broadcast_cosine(ga, ga)), -torch.inf))
    if params["contrast_positives"]:
        blocks.append(broadcast_cosine(p, p).masked_fill(vetoed(broadcast_cosine(gp, gp)), -torch.inf))
    if n:
        blocks.append(broadcast_cosine(a, torch.cat(n)).masked_fill(vetoed(broadcast_cosine(ga, torch.cat(gn))), -torch.inf))
    scores = torch.cat(blocks, dim=1) / temperature
    return F.cross_entropy(scores, torch.arange(a.size(0)))


def loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(ours, reference, tol):
    assert ours.keys() == reference.keys() and ours
    for name, ref in reference.items():
        error = (ours[name] - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert error <= tol, (name, error)


def test_gist_embed_loss_refuses_a_static_student(static_student, guide):
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

    with pytest.raises(ValueError, match="PreTrainedTokenizer"):
        GISTEmbedLoss(load_static(static_student), guide)


PLANS = [
    dict(margin_strategy="absolute", margin=0.05, contrast_anchors=True, contrast_positives=True),
    dict(margin_strategy="relative", margin=0.05, contrast_anchors=False, contrast_positives=True),
]


@pytest.mark.parametrize("options", PLANS, ids=lambda o: f"{o['margin_strategy']}-aa{int(o['contrast_anchors'])}")
def test_static_guided_loss_equals_the_gist_rule_online(tmp_path, guide_run, triplets, guide, static_student, options):
    """Stored masks + StaticGuidedMaskLoss == the rule with the guide online: loss and gradients, 3 planned batches."""
    plan_command(guide_run, out=tmp_path, batch_size=16, mask_duplicates=False, **options)  # GISTEmbedLoss's exact rule
    masks = PlannedMasks(tmp_path / MASKS)
    dataset = training_dataset(load_training_data(triplets))
    columns = [c for c in dataset.column_names if c != "label"]
    student = load_static(static_student)
    ours = StaticGuidedMaskLoss(student, masks)
    masked = 0
    for row, example_ids in enumerate(masks.batches[:3]):
        masks.cursor.step = row
        rows = dataset[list(map(int, example_ids))]
        features = [student.preprocess(rows[c]) for c in columns]
        loss_ours, grads_ours = loss_and_grads(student, lambda: ours(features, torch.tensor(rows["label"])))
        loss_ref, grads_ref = loss_and_grads(student, lambda: gist_rule_loss(student, guide, rows, columns, options))
        assert abs(loss_ours - loss_ref) < TOL, (loss_ours, loss_ref)
        assert_grads_close(grads_ours, grads_ref, TOL)
        masked += sum(len(masks.positions(b, row)) for b in ("ap", "an"))
    assert masked > 0, "the batches mask nothing: the comparison would not exercise the masks"


def test_static_features_pad_and_flatten_back(static_student):
    model = load_static(static_student)
    features = model.preprocess(["a man eats", "", "the quick brown fox jumps over the lazy dog", "x"])
    padded = padded_static_features(features)
    assert padded["input_ids"].shape[0] == 4 and padded["attention_mask"][1].sum() == 0
    back = flat_static_features(padded)
    assert torch.equal(back["input_ids"], features["input_ids"]) and torch.equal(back["offsets"], features["offsets"])
    tail = flat_static_features({k: v[2:] for k, v in padded.items()})  # a mini-batch of rows 2..3
    assert torch.equal(model(tail)["sentence_embedding"], model(features)["sentence_embedding"][2:])


def test_cached_static_losses_equal_the_plain_ones(guide_run, triplets, static_student):
    """GradCache over a StaticEmbedding batch (which sentence-transformers' cached losses refuse): the
    cached guided loss and the cached MNRL equal their plain versions, loss and gradients."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

    masks = PlannedMasks(guide_run / MASKS)
    dataset = training_dataset(load_training_data(triplets))
    student = load_static(static_student)
    with pytest.raises(ValueError, match="StaticEmbedding"):
        CachedMultipleNegativesRankingLoss(student)  # sentence-transformers' own refusal
    pairs = [
        (StaticGuidedMaskLoss(student, masks), CachedStaticGuidedMaskLoss(student, masks, mini_batch_size=5)),
        (MultipleNegativesRankingLoss(student, scale=100), cached_static_mnrl(student, scale=100, mini_batch_size=5)),
    ]
    for row, example_ids in enumerate(masks.batches[:2]):
        masks.cursor.step = row
        rows = dataset[list(map(int, example_ids))]
        labels = torch.tensor(rows["label"])
        for plain, cached in pairs:
            loss_plain, grads_plain = loss_and_grads(student, lambda: plain([student.preprocess(rows[c]) for c in ("anchor", "positive", "negative_1")], labels))
            loss_cached, grads_cached = loss_and_grads(student, lambda: cached([student.preprocess(rows[c]) for c in ("anchor", "positive", "negative_1")], labels))
            assert abs(loss_plain - loss_cached) < TOL, (type(cached).__name__, loss_plain, loss_cached)
            assert_grads_close(grads_cached, grads_plain, 2 * TOL)


def test_build_loss_picks_the_static_classes(guide_run, static_student):
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    from pipeline.train import TrainSettings, build_loss

    masks, student = PlannedMasks(guide_run / MASKS), load_static(static_student)
    assert type(build_loss(student, masks, TrainSettings())) is StaticGuidedMaskLoss
    assert type(build_loss(student, masks, TrainSettings(loss="unguided"))).__name__ == "StaticGuidedMaskLoss"
    assert build_loss(student, masks, TrainSettings(loss="unguided")).guided is False
    assert type(build_loss(student, masks, TrainSettings(mini_batch_size=8))) is CachedStaticGuidedMaskLoss
    assert type(build_loss(student, masks, TrainSettings(loss="mnrl"))) is MultipleNegativesRankingLoss
    assert type(build_loss(student, masks, TrainSettings(loss="mnrl", mini_batch_size=8))).__name__ == "CachedStaticMultipleNegativesRankingLoss"
    wrapped = build_loss(student, masks, TrainSettings(mini_batch_size=8, matryoshka_dims=(32, 16)))
    assert isinstance(wrapped, MatryoshkaLoss) and type(wrapped.loss) is CachedStaticGuidedMaskLoss


def test_gist_train_a_static_student_end_to_end(tmp_path, static_run, triplets, static_student):
    """--loss guided with GradCache, MatryoshkaLoss and evaluation during training; --loss mnrl plain; the
    saved models load in plain sentence-transformers and moved away from the initial weights."""
    sts = ROOT / "data" / "stsb_dev.parquet"
    common = ["--masks", static_run / MASKS, "--student", static_student, "--logging-steps", "1", "--lr", "0.2", "--max-steps", "4", "--save-steps", "2"]
    gist("train", triplets, *common, "--out", tmp_path / "guided", "--mini-batch-size", "6", "--matryoshka-dims", "32,16",
         "--eval-steps", "2", "--sts", sts)
    gist("train", triplets, *common, "--out", tmp_path / "mnrl", "--loss", "mnrl")
    initial = load_static(static_student)[0].embedding.weight
    for name in ("guided", "mnrl"):
        model = SentenceTransformer(str(tmp_path / name / "final"), device="cpu")  # plain sentence-transformers
        assert type(model[0]).__name__ == "StaticEmbedding" and model.get_embedding_dimension() == 32
        assert not torch.equal(model[0].embedding.weight, initial)
        assert model.encode(["a man is eating"]).shape == (1, 32)
        log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]
    evaluation = json.loads((tmp_path / "guided" / "eval.json").read_text())
    assert evaluation["best_step"] in (2, 4) and -1 <= evaluation["sts_spearman"] <= 1


@pytest.mark.parametrize("option", [["--max-seq-length", "32"], ["--gradient-checkpointing"]], ids=["max-seq-length", "gradient-checkpointing"])
def test_options_without_meaning_are_refused_in_one_line(tmp_path, static_run, triplets, static_student, option):
    proc = gist("train", triplets, "--masks", static_run / MASKS, "--student", static_student, "--out", tmp_path / "run", *option, check=False)
    assert proc.returncode == 1
    assert "static embedding model" in proc.stderr and option[0] in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_resume_gives_the_same_weights(tmp_path, static_run, triplets, static_student):
    masks = PlannedMasks(static_run / MASKS)
    data = load_training_data(triplets)
    args = dict(max_steps=8, save_steps=4, learning_rate=0.2, warmup_steps=0, logging_steps=1, use_cpu=True, disable_tqdm=True, seed=3)

    def run(out, resume=False, callbacks=()):
        student = load_static(static_student)
        trainer = build_trainer(student, data, masks, StaticGuidedMaskLoss(student, masks), out, callbacks=list(callbacks), **args)
        trainer.train(resume_from_checkpoint=True if resume else None)
        return student

    full = run(tmp_path / "full")
    run(tmp_path / "interrupted", callbacks=[StopAfter(4)])
    resumed = run(tmp_path / "interrupted", resume=True)
    moved = (full[0].embedding.weight - load_static(static_student)[0].embedding.weight).abs().max().item()
    assert moved > 1e-3
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("kind", ["embed", "kl"])
def test_distill_with_a_static_student(tmp_path, static_run, triplets, static_student, kind):
    """--distill from the stored guide pass (a projection 32 -> 64 for embed, taken out of the saved model)."""
    out = tmp_path / kind
    gist("train", triplets, "--masks", static_run / MASKS, "--student", static_student, "--out", out, "--distill", kind,
         "--max-steps", "3", "--logging-steps", "1", "--lr", "0.2")
    model = SentenceTransformer(str(out / "final"), device="cpu")
    assert len(model) == 1 and model.get_embedding_dimension() == 32
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len([e for e in log if "loss" in e]) == 3


def test_static_student_random_init(tmp_path, static_student):
    record = json.loads((static_student / "gist_static.json").read_text())
    assert record["kind"] == "static-student" and record["init"] == "random" and record["dim"] == 32 and record["vocab_size"] == 30522
    again = tmp_path / "again"
    gist("static-student", STUDENT / "tokenizer.json", "--out", again, "--init", "random", "--dim", "32", "--seed", "0")
    assert torch.equal(load_static(again)[0].embedding.weight, load_static(static_student)[0].embedding.weight)  # seeded
    proc = gist("static-student", STUDENT, "--out", again, "--init", "random", "--dim", "32", check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    proc = gist("static-student", tmp_path / "missing", "--out", tmp_path / "x", "--init", "random", check=False)
    assert proc.returncode == 1 and "no such model directory" in proc.stderr


def test_static_student_distilled_with_model2vec(tmp_path):
    pytest.importorskip("model2vec.distill", reason="the static extra (model2vec, skeletoken) is not installed")
    out = tmp_path / "distilled"
    gist("static-student", STUDENT, "--out", out, "--init", "distill", "--dim", "16", "--device", "cpu")
    model = SentenceTransformer(str(out), device="cpu")
    assert type(model[0]).__name__ == "StaticEmbedding" and model.get_embedding_dimension() == 16
    e = model.encode(["a man is eating food", "a man eats", "the stock market fell sharply"], convert_to_tensor=True)
    sims = F.cosine_similarity(e[:, None], e[None], dim=-1)
    assert sims[0, 1] > sims[0, 2]  # distilled from a model, not random: paraphrases closer than unrelated texts
    assert json.loads((out / "gist_static.json").read_text())["init"] == "distill"


def test_distill_without_model2vec_is_a_one_line_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_model2vec(name, *args, **kwargs):
        if name.startswith("model2vec"):
            raise ImportError("No module named 'model2vec'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_model2vec)
    proc = gist("static-student", STUDENT, "--out", tmp_path / "x", "--init", "distill", check=False)
    assert proc.returncode == 1 and "pip install 'gist[static]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()
    with pytest.raises(GistError, match="--init random"):
        from pipeline.static import make_static_student

        make_static_student(STUDENT, tmp_path / "y", init="distill")


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_torchrun_two_processes_train_like_one(tmp_path, static_student, cached):
    """2 ranks x 8 (gloo) = 1 process x 16 with --no-contrast-anchors (anchor-anchor candidates are per rank,
    as in GISTEmbedLoss): the same static weights, plain and with GradCache (each rank splits its own slice)."""
    import shutil

    from safetensors.torch import load_file

    from tests.conftest import GUIDE_SAMEVOCAB, small_data
    from tests.test_distributed import torchrun

    data = small_data(tmp_path / "data.parquet", 64)
    gist("precompute-guide", data, "--guide", GUIDE_SAMEVOCAB, "--out", tmp_path / "guide", "--batch-size", "16", "--no-contrast-anchors", "--margin", "0.05")
    args = ["train", data, "--masks", tmp_path / "guide" / MASKS, "--student", static_student, "--max-steps", "3", "--lr", "0.05", "--device", "cpu",
            *(["--mini-batch-size", "3"] if cached else [])]
    gist(*args, "--out", tmp_path / "one")
    torchrun(shutil.which("gist") or ROOT / ".venv" / "bin" / "gist", *args, "--out", tmp_path / "two")
    one, two = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("one", "two"))
    start = load_file(static_student / "model.safetensors")
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3
    for name in one:  # Adam turns float32 noise in near-zero gradients into lr-sized steps on a few entries (as test_distributed)
        difference = (two[name] - one[name]).abs()
        assert difference.mean() < 1e-6 and (difference > 1e-4).float().mean() < 1e-4, (name, difference.max().item())

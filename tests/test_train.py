"""Stage 2: `gist train` without the guide, resume at the planned step, the log, `gist evaluate`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from pipeline import GistError
from pipeline.data import load_training_data
from pipeline.loss import GuidedMaskLoss
from pipeline.masks import PlannedMasks
from pipeline.train import PlannedBatchSampler, build_trainer, training_dataset
from tests.conftest import GUIDE_SAMEVOCAB, ROOT, STUDENT, gist, load_student


def test_training_never_needs_the_guide(tmp_path, triplets):
    guide = tmp_path / "guide-copy"
    shutil.copytree(GUIDE_SAMEVOCAB, guide)
    gist("precompute-guide", triplets, "--guide", guide, "--out", tmp_path / "run", "--batch-size", "16")
    shutil.rmtree(guide)
    out = tmp_path / "student"
    gist("train", triplets, "--masks", tmp_path / "run" / "masks.parquet", "--student", STUDENT, "--out", out,
         "--max-steps", "5", "--logging-steps", "1", "--lr", "1e-4")
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "modules.json").exists()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [entry["step"] for entry in log if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5]
    assert all(np.isfinite(entry["loss"]) and "epoch" in entry for entry in log if "loss" in entry)
    before, after = load_file(STUDENT / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def test_sampler_follows_the_trainer_step_not_set_epoch(guide_run, triplets):
    """The epoch comes from the trainer's global step (masks.cursor): set_epoch, which does not reach
    the sampler on a resume under torchrun, changes nothing."""
    masks = PlannedMasks(guide_run / "masks.parquet")
    sampler = PlannedBatchSampler(training_dataset(load_training_data(triplets)), 16, True, masks=masks)
    epochs, steps, _ = masks.plan.shape
    assert len(sampler) == steps
    for epoch in range(epochs):
        sampler.set_epoch(0)
        masks.cursor.step = epoch * steps + 1  # mid-epoch, as on a resume
        assert list(sampler) == masks.plan[epoch].tolist()
    masks.cursor.step = epochs * steps
    with pytest.raises(GistError, match="re-plan with more --epochs"):
        list(sampler)


@pytest.mark.parametrize("which", ["unplanned", "another step's"])
def test_batch_other_than_the_one_due_is_an_error(guide_run, triplets, which):
    """The loss checks the batch against the plan row of the trainer's step, so a sampler drifting
    to another epoch's batches fails loudly."""
    masks = PlannedMasks(guide_run / "masks.parquet")
    student = load_student()
    dataset = training_dataset(load_training_data(triplets))
    ids = list(range(16)) if which == "unplanned" else masks.batches[masks.plan.shape[1] + 2].tolist()  # a planned batch of epoch 2
    rows = dataset[ids]
    features = [student.preprocess(rows[c]) for c in ("anchor", "positive", "negative_1")]
    masks.cursor.step = 2
    with pytest.raises(GistError, match="not the batch planned for step 3"):
        GuidedMaskLoss(student, masks)(features, torch.tensor(rows["label"]))


class StopAfter(TrainerCallback):
    """Stops training after a given step, as an interruption right after a checkpoint would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_continues_at_the_planned_step_with_the_same_weights(tmp_path, guide_run, triplets):
    masks = PlannedMasks(guide_run / "masks.parquet")
    data = load_training_data(triplets)
    args = dict(max_steps=8, save_steps=4, learning_rate=1e-3, warmup_steps=0, logging_steps=1, use_cpu=True, disable_tqdm=True, seed=3)

    def run(out, resume=False, callbacks=()):
        student = load_student(dropout=True)  # dropout on: the checkpoint must restore the RNG state too
        seen = []

        class Batches(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                seen.append(state.global_step)

        trainer = build_trainer(student, data, masks, GuidedMaskLoss(student, masks), out, callbacks=[Batches(), *callbacks], **args)
        trainer.train(resume_from_checkpoint=True if resume else None)
        return student, seen

    full, _ = run(tmp_path / "full")
    run(tmp_path / "interrupted", callbacks=[StopAfter(4)])
    resumed, steps = run(tmp_path / "interrupted", resume=True)
    assert steps == [4, 5, 6, 7], "the resumed run must start at the checkpoint's step"
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)


def test_evaluate_writes_metrics(tmp_path):
    out = tmp_path / "eval.json"
    gist("evaluate", STUDENT, "--sts", ROOT / "data" / "stsb_dev.parquet", "--beir", ROOT / "data" / "scifact", "--out", out)
    results = json.loads(out.read_text())
    assert -1 <= results["sts_spearman"] <= 1 and 0 <= results["beir_ndcg@10"] <= 1
    assert results["beir_ndcg@10"] > 0  # a random BERT still retrieves by word overlap


def test_build_loss_follows_the_settings(guide_run):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss, MatryoshkaLoss, MultipleNegativesRankingLoss,
    )

    from pipeline.loss import CachedGuidedMaskLoss
    from pipeline.train import TrainSettings, build_loss

    masks, student = PlannedMasks(guide_run / "masks.parquet"), load_student()
    expected = {("guided", None): GuidedMaskLoss, ("guided", 8): CachedGuidedMaskLoss,
                ("unguided", None): GuidedMaskLoss, ("unguided", 8): CachedGuidedMaskLoss,
                ("mnrl", None): MultipleNegativesRankingLoss, ("mnrl", 8): CachedMultipleNegativesRankingLoss}
    for (loss, mini_batch), cls in expected.items():
        built = build_loss(student, masks, TrainSettings(loss=loss, mini_batch_size=mini_batch, temperature=0.02))
        assert type(built) is cls
        assert getattr(built, "guided", None) == {"guided": True, "unguided": False, "mnrl": None}[loss]
        assert getattr(built, "mini_batch_size", None) == mini_batch
        assert (built.scale if loss == "mnrl" else 1 / built.temperature) == pytest.approx(50)
    wrapped = build_loss(student, masks, TrainSettings(matryoshka_dims=(32, 16)))
    assert isinstance(wrapped, MatryoshkaLoss) and type(wrapped.loss) is GuidedMaskLoss and list(wrapped.matryoshka_dims) == [32, 16]
    with pytest.raises(GistError, match="the student's embeddings have 64 dimensions"):
        TrainSettings(matryoshka_dims=(128, 64)).check(64)


def test_train_options_reach_the_trainer(tmp_path, guide_run, triplets, monkeypatch):
    """--loss mnrl --mini-batch-size --matryoshka-dims --max-seq-length --gradient-checkpointing
    --eval-steps --lr-scheduler --weight-decay, in one short run of `gist train`'s function."""
    from sentence_transformers import SentenceTransformer

    from pipeline.train import TrainSettings, train_student

    enabled = []
    original = SentenceTransformer.activation_checkpointing_enable  # what the trainer calls (sentence-transformers >= 6.3)
    monkeypatch.setattr(SentenceTransformer, "activation_checkpointing_enable", lambda self, *a, **k: (enabled.append(True), original(self, *a, **k)))
    settings = TrainSettings(loss="mnrl", mini_batch_size=4, matryoshka_dims=(32, 16), max_seq_length=24, gradient_checkpointing=True,
                             eval_steps=2, lr_scheduler="cosine", weight_decay=0.01, max_steps=4, save_steps=2, logging_steps=1, lr=1e-4)
    out = tmp_path / "run"
    final = train_student(triplets, guide_run / "masks.parquet", STUDENT, out, settings, device="cpu", sts=ROOT / "data" / "stsb_dev.parquet")
    assert enabled, "gradient checkpointing was not switched on"
    assert SentenceTransformer(str(final), device="cpu").max_seq_length == 24
    results = json.loads((out / "eval.json").read_text())
    assert results["best_checkpoint"].endswith(("checkpoint-2", "checkpoint-4")) and -1 <= results["sts_spearman"] <= 1
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_sts_spearman_cosine" in e] == [2, 4]
    record = json.loads((out / "run.json").read_text())
    assert record["loss"] == "mnrl" and record["mini_batch_size"] == 4 and record["matryoshka_dims"] == [32, 16]
    lrs = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    assert lrs[-1] < lrs[1] and len(set(lrs)) > 2  # warm-up, then cosine decay


def test_cached_guided_bf16_training_through_the_cli(tmp_path, guide_run, triplets):
    out = tmp_path / "run"
    gist("train", triplets, "--masks", guide_run / "masks.parquet", "--student", STUDENT, "--out", out, "--mini-batch-size", "4",
         "--precision", "bf16", "--max-steps", "2", "--logging-steps", "1", "--device", "cpu")
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16"


def test_version(tmp_path):
    proc = gist("--version")
    assert proc.stdout.startswith("gist 0.1.0") and "torch" in proc.stdout and "faiss-cpu" in proc.stdout


def test_planned_dataset_from_a_users_dataset(guide_run, triplets):
    from datasets import Dataset

    from pipeline import planned_dataset

    masks = PlannedMasks(guide_run / "masks.parquet")
    users = Dataset.from_parquet(str(triplets))
    dataset = planned_dataset(users, masks)
    assert dataset.column_names == ["anchor", "positive", "negative_1", "label"]
    assert dataset["label"] == list(range(len(users))) and dataset["anchor"] == users["anchor"]
    with pytest.raises(GistError, match="planned for"):
        planned_dataset(users.shuffle(seed=0), masks)  # the same rows in another order are other examples


def test_a_checkpoint_or_log_line_cut_by_a_kill_is_skipped(tmp_path):
    """transformers writes trainer_state.json in place: a run killed while writing it leaves a
    partial one, and the JSONL log may end in half a line. Resume uses the newest whole checkpoint."""
    from types import SimpleNamespace

    from pipeline.train import JsonlLogCallback, last_complete_checkpoint

    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-2"
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    JsonlLogCallback(log).on_train_begin(None, SimpleNamespace(global_step=2, is_world_process_zero=True), None)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_planned_training_args_refuse_more_steps_than_the_plan(tmp_path, guide_run):
    """As `gist train --max-steps` is: a script passing max_steps beyond the plan (examples/train_with_gist.py
    passes --max-steps through) would train the whole plan, then fail asking for an epoch the plan lacks."""
    from pipeline.train import planned_training_args

    masks = PlannedMasks(guide_run / "masks.parquet")
    assert planned_training_args(masks, output_dir=str(tmp_path), max_steps=masks.num_batches).max_steps == masks.num_batches
    with pytest.raises(GistError, match=f"--max-steps {masks.num_batches + 1} exceeds the {masks.num_batches} planned batches"):
        planned_training_args(masks, output_dir=str(tmp_path), max_steps=masks.num_batches + 1)


def test_a_loss_given_the_masks_path_follows_the_trainers_cursor(tmp_path, guide_run, triplets):
    """The documented `GuidedMaskLoss(model, ".../masks.parquet")` opens its own PlannedMasks; both share the
    file's one cursor, so the batch check passes at every step (it failed at step 2: a second cursor never moved)."""
    path = guide_run / "masks.parquet"
    masks, student = PlannedMasks(path), load_student()
    loss = GuidedMaskLoss(student, str(path))
    assert loss.masks is not masks and loss.masks.cursor is masks.cursor
    trainer = build_trainer(student, load_training_data(triplets), masks, loss, tmp_path, max_steps=3, save_strategy="no",
                            logging_steps=1, use_cpu=True, disable_tqdm=True)
    trainer.train()
    assert trainer.state.global_step == 3 and masks.cursor.step == 2


def test_sampler_refuses_a_later_epoch_when_the_cursor_has_not_moved(guide_run, triplets):
    """Without `masks.cursor` among the callbacks and with a loss that checks no batch (MNRL), epoch 2
    replayed epoch 1's batches silently; the sampler now refuses to start an epoch the cursor has not reached."""
    masks = PlannedMasks(guide_run / "masks.parquet")
    sampler = PlannedBatchSampler(training_dataset(load_training_data(triplets)), 16, True, masks=masks)
    masks.cursor.step = 0
    assert list(sampler) == masks.plan[0].tolist()
    with pytest.raises(GistError, match="add `masks.cursor` to the trainer's callbacks"):
        list(sampler)
    masks.cursor.step = masks.steps_per_epoch  # where the trainer's callback puts it at epoch 2
    assert list(sampler) == masks.plan[1].tolist()


def test_eval_json_names_the_best_steps_own_checkpoint(tmp_path, guide_run, triplets, monkeypatch):
    """--eval-steps 1 --save-steps 100 --max-steps 3, scores falling: the best evaluation is step 1, where no
    save falls; eval.json named no best checkpoint (or, with other steps, an older one). Now that step is saved."""
    from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator

    import pipeline.evaluate
    from pipeline.train import TrainSettings, train_student

    class Falling(SentenceEvaluator):
        def __init__(self):
            super().__init__()
            self.primary_metric, self.scores = "sts_spearman_cosine", iter([0.9, 0.8, 0.7])

        def __call__(self, model, output_path=None, epoch=-1, steps=-1):
            return {"sts_spearman_cosine": next(self.scores)}

    monkeypatch.setattr(pipeline.evaluate, "training_evaluator", lambda built: Falling())
    settings = TrainSettings(eval_steps=1, save_steps=100, max_steps=3, logging_steps=1)
    out = tmp_path / "run"
    train_student(triplets, guide_run / "masks.parquet", STUDENT, out, settings, device="cpu", sts=ROOT / "data" / "stsb_dev.parquet")
    results = json.loads((out / "eval.json").read_text())
    assert results["best_checkpoint"] == str(out / "checkpoints" / "checkpoint-1")
    assert results["best_step"] == 1 and results["best_metric"] == 0.9
    assert (out / "checkpoints" / "checkpoint-1" / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]  # no save at the worse step 2

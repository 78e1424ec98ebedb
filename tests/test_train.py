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

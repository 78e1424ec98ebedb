"""The trainer options a sentence-transformers user looks for (issue 33 item 3), each passed to the
trainer: --report-to, --save-total-limit (with resume), --optim, --push-to-hub, and the model card."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from pipeline.outputs import stage_dir
from tests.conftest import STUDENT, gist
from tests.test_errors import assert_fails
from tests.test_resume import kill_when, start


def train_args(guide_run, triplets, *extra):
    return ("train", triplets, "--masks", guide_run / "masks.parquet", "--student", STUDENT, "--logging-steps", "1", "--lr", "1e-4", "--seed", "3", *extra)


def test_report_to_tensorboard_writes_an_event_file_and_the_card_names_the_guide_pass(guide_run, triplets, tmp_path):
    out = tmp_path / "run"
    gist(*train_args(guide_run, triplets, "--max-steps", "2", "--report-to", "tensorboard", "--optim", "adamw_torch", "--out", out))
    events = list((out / "checkpoints").rglob("events.out.tfevents.*"))
    assert events and any(e.stat().st_size > 0 for e in events)
    card = (out / "final" / "README.md").read_text()
    assert "## Trained with gist" in card and "tiny-guide-bert-samevocab" in card and "random batches of 16" in card and "GuidedMaskLoss" in card


def test_save_total_limit_keeps_one_checkpoint_and_resume_still_works(guide_run, triplets, tmp_path):
    args = train_args(guide_run, triplets, "--max-steps", "6", "--save-steps", "2", "--save-total-limit", "1")
    gist(*args, "--out", tmp_path / "full")
    assert [p.name for p in (tmp_path / "full" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-6"]
    out = tmp_path / "killed"
    proc = start(*args, "--out", out)
    checkpoints = stage_dir(out) / "new" / "checkpoints"
    assert kill_when(proc, lambda: (checkpoints / "checkpoint-4" / "trainer_state.json").exists()), proc.stderr.read()
    assert [p.name for p in checkpoints.glob("checkpoint-*")] in (["checkpoint-4"], ["checkpoint-2", "checkpoint-4"])  # the old one goes after the save
    gist(*args, "--out", out, "--resume")
    full, resumed = load_file(tmp_path / "full" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0, msg=name)


def test_unavailable_integrations_and_an_unreachable_hub_are_refused_before_training(guide_run, triplets, tmp_path):
    for extra, words in (
        (("--report-to", "wandb"), "--report-to wandb: not installed"),
        (("--optim", "adamw_fancy"), "--optim adamw_fancy"),
        (("--push-to-hub", "someone/student"), "--push-to-hub someone/student: the Hugging Face Hub cannot be reached"),  # HF_HUB_OFFLINE=1 in tests
    ):
        assert_fails(gist(*train_args(guide_run, triplets, "--max-steps", "1", "--out", tmp_path / "run", *extra), check=False), 1, words)
        assert not list(tmp_path.iterdir()), "refused before anything is written"

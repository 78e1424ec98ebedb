"""Stage 2 wiring: the planned batch sampler, the trainer, and the checks against the masks.

Training is sentence-transformers' `SentenceTransformerTrainer`; gist only supplies the loss
(`GuidedMaskLoss`) and a batch sampler that replays the plan, so checkpointing, resume, logging,
evaluators and torchrun are the trainer's own.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
from datasets import Dataset
from sentence_transformers.base.sampler import DefaultBatchSampler
from transformers import TrainerCallback

from pipeline import GistError
from pipeline.data import TrainingData
from pipeline.masks import PlannedMasks

TRAIN_LOG = "train_log.jsonl"


class PlannedBatchSampler(DefaultBatchSampler):
    """Yields the planned batches of the current epoch, in order (the trainer calls `set_epoch`).

    Dataset row i must be example i of DATA. Pass it to the trainer with `planned_batch_sampler(plan)`.
    """

    def __init__(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0, *, plan: np.ndarray):
        super().__init__(dataset, batch_size, drop_last, valid_label_columns, generator, seed)
        self.plan = plan
        # The planned (global) batch size: accelerate splits batches of exactly this size over the ranks.
        self.batch_size = plan.shape[2]

    def __len__(self) -> int:
        return self.plan.shape[1]

    def __iter__(self):
        if self.epoch >= len(self.plan):
            raise GistError(f"the trainer asked for epoch {self.epoch + 1}, the plan has {len(self.plan)}; re-plan with more --epochs")
        for batch in self.plan[self.epoch]:
            yield batch.tolist()


def planned_batch_sampler(plan: np.ndarray):
    """The `batch_sampler` training argument that makes the trainer replay `plan` (epochs, steps, G)."""
    return functools.partial(PlannedBatchSampler, plan=plan)


def training_dataset(data: TrainingData) -> Dataset:
    """Text columns in canonical order plus `label` = example id, which GuidedMaskLoss receives."""
    return Dataset.from_dict({**data.text_columns(), "label": np.arange(data.num_examples, dtype=np.int64)})


def check_masks_match(masks: PlannedMasks, data: TrainingData) -> None:
    """Refuse masks planned for other data: fingerprint, example count, negative count."""
    meta = masks.meta
    if meta["num_examples"] != data.num_examples:
        raise GistError(f"{masks.path} was planned for {meta['num_examples']} examples, DATA has {data.num_examples}; re-run stage 1 on this data")
    if meta["dataset_fingerprint"] != data.fingerprint:
        raise GistError(f"{masks.path} was planned for other data (fingerprint {meta['dataset_fingerprint'][:12]} != {data.fingerprint[:12]}); re-run stage 1 on this data")
    if masks.num_negatives != data.num_negatives:
        raise GistError(f"{masks.path} has {masks.num_negatives} negative column(s), DATA has {data.num_negatives}")


def last_complete_checkpoint(checkpoints_dir: Path) -> Path:
    """The newest checkpoint that was completely written (the trainer writes trainer_state.json last).

    transformers writes checkpoints in place, so a run killed while saving leaves a partial
    `checkpoint-N` that the trainer's own `get_last_checkpoint` would pick and fail to load.
    """
    complete = [p for p in Path(checkpoints_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    if not complete:
        raise GistError(f"--resume: no complete checkpoint in {checkpoints_dir}")
    return max(complete, key=lambda p: int(p.name.split("-")[1]))


class JsonlLogCallback(TrainerCallback):
    """Appends one JSON object per trainer log (step, epoch, loss, learning rate...) to a file.

    On resume, lines after the checkpoint's step are dropped first so the log has each step once.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.path.exists() and state.is_world_process_zero:
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= state.global_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def build_trainer(model, data: TrainingData, plan: np.ndarray, loss, out_dir: Path, *, evaluator=None, callbacks=(), **training_args):
    """A SentenceTransformerTrainer that replays `plan` with `loss`; `training_args` override the defaults.

    Under torchrun every planned batch (G examples) is split across the W ranks, G / W each.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun; torch.distributed starts later
    if plan.shape[2] % world_size:
        raise GistError(f"the planned batch size {plan.shape[2]} does not split over {world_size} processes; re-plan with a multiple")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    defaults = dict(
        output_dir=str(Path(out_dir) / "checkpoints"),
        per_device_train_batch_size=plan.shape[2] // world_size,
        num_train_epochs=plan.shape[0],
        learning_rate=5e-6,
        warmup_steps=0.1,  # a float is a ratio of the total steps (transformers >= 5)
        logging_steps=10,
        save_strategy="steps",
        save_steps=500,
        report_to="none",
        dataloader_drop_last=True,
        disable_tqdm=False,
        # Under torchrun the plan's batch is the global batch: each rank takes its contiguous slice.
        accelerator_config={"split_batches": True},
    )
    args = SentenceTransformerTrainingArguments(**{**defaults, **training_args}, batch_sampler=planned_batch_sampler(plan))
    return SentenceTransformerTrainer(
        model=model, args=args, train_dataset=training_dataset(data), loss=loss, evaluator=evaluator, callbacks=list(callbacks)
    )

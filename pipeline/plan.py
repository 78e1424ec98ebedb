"""Batch planners: which examples share a batch, for every epoch, fixed before training.

A plan is an int64 array of shape (epochs, steps_per_epoch, batch_size) of example ids. It is a
pure function of (data, batch size, epochs, seed, strategy), so stage 1, `gist plan` and stage 2
agree on it. Incomplete last batches are dropped, so every batch has exactly `batch_size` rows.

- random: a fresh permutation per epoch (seed + epoch).
- no-duplicates: sentence-transformers' NoDuplicatesBatchSampler over text ids, so no text
  appears twice in a batch (anchor, positive or negative), seeded with seed + epoch as it seeds itself.
- by-task: shuffle within each task, cut into batches, shuffle the batches (the GISTEmbed recipe).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import GistError
from pipeline.data import TrainingData

STRATEGIES = ("random", "no-duplicates", "by-task")


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + epoch)


def _random_epoch(data: TrainingData, batch_size: int, generator: torch.Generator) -> np.ndarray:
    order = torch.randperm(data.num_examples, generator=generator).numpy()
    steps = data.num_examples // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


def _no_duplicates_epoch(sampler, epoch: int) -> np.ndarray:
    sampler.set_epoch(epoch)
    return np.array(list(sampler), dtype=np.int64).reshape(-1, sampler.batch_size)


def _by_task_epoch(data: TrainingData, batch_size: int, generator: torch.Generator) -> np.ndarray:
    tasks = np.asarray(data.tasks, dtype=object)
    batches = []
    for task in sorted(set(data.tasks)):
        members = np.flatnonzero(tasks == task)
        members = members[torch.randperm(len(members), generator=generator).numpy()]
        steps = len(members) // batch_size
        batches.append(members[: steps * batch_size].reshape(steps, batch_size))
    batches = np.concatenate(batches)
    return batches[torch.randperm(len(batches), generator=generator).numpy()]


def plan_batches(data: TrainingData, batch_size: int, epochs: int, seed: int, strategy: str) -> np.ndarray:
    """Plan every batch of every epoch; returns int64 (epochs, steps_per_epoch, batch_size)."""
    if batch_size < 2:
        raise GistError(f"--batch-size {batch_size}: in-batch negatives need a batch size of at least 2")
    if epochs < 1:
        raise GistError(f"--epochs {epochs}: need at least one epoch")
    if data.num_examples < batch_size:
        raise GistError(f"{data.num_examples} examples are fewer than one batch of {batch_size}; lower --batch-size")
    if strategy == "random":
        plan = [_random_epoch(data, batch_size, _generator(seed, e)) for e in range(epochs)]
    elif strategy == "no-duplicates":
        from datasets import Dataset
        from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

        columns = {"anchor": data.anchor_ids, "positive": data.positive_ids}
        columns.update({f"negative_{c + 1}": data.negative_ids[:, c] for c in range(data.num_negatives)})
        sampler = NoDuplicatesBatchSampler(
            Dataset.from_dict(columns), batch_size=batch_size, drop_last=True, generator=torch.Generator(), seed=seed
        )
        plan = [_no_duplicates_epoch(sampler, e) for e in range(epochs)]
        steps = min(len(p) for p in plan)
        plan = [p[:steps] for p in plan]  # the trainer needs the same number of steps in every epoch
    elif strategy == "by-task":
        if data.tasks is None:
            raise GistError("--strategy by-task needs a 'task' column (map one with --columns task=NAME)")
        plan = [_by_task_epoch(data, batch_size, _generator(seed, e)) for e in range(epochs)]
    else:
        raise GistError(f"--strategy {strategy}: use one of {', '.join(STRATEGIES)}")
    plan = np.stack(plan).astype(np.int64)
    if plan.shape[1] == 0:
        raise GistError(f"strategy {strategy} yields no full batch of {batch_size}; lower --batch-size")
    return plan

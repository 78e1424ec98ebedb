"""Batch planners: which examples share a batch, for every epoch, fixed before training.

A plan is an int64 array of shape (epochs, steps_per_epoch, batch_size) of example ids. It is a
pure function of (data, batch size, epochs, seed, strategy), so stage 1, `gist plan` and stage 2
agree on it. Incomplete last batches are dropped, so every batch has exactly `batch_size` rows.

- random: a fresh permutation per epoch (seed + epoch).
- no-duplicates: sentence-transformers' NoDuplicatesBatchSampler over text ids, so no text
  appears twice in a batch (anchor, positive or negative), seeded with seed + epoch as it seeds itself.
- by-task: shuffle within each task, cut into batches, shuffle the batches (the GISTEmbed recipe).
- clustered: hard batches. FAISS k-means over the anchors' guide embeddings (about 4 batches per
  cluster, within each task when there are tasks); batches are cut within a (task, cluster)
  group, the groups' leftovers are pooled per task and cut too. False negatives concentrate in
  such batches, so this is where guidance matters most.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import GistError
from pipeline.data import TrainingData

STRATEGIES = ("random", "no-duplicates", "by-task", "clustered")
EXAMPLES_PER_CLUSTER_BATCHES = 4  # k-means clusters hold about this many batches


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + epoch)


def _random_epoch(data: TrainingData, batch_size: int, generator: torch.Generator) -> np.ndarray:
    order = torch.randperm(data.num_examples, generator=generator).numpy()
    steps = data.num_examples // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


def _no_duplicates_epoch(sampler, epoch: int) -> np.ndarray:
    sampler.set_epoch(epoch)
    return np.array(list(sampler), dtype=np.int64).reshape(-1, sampler.batch_size)


def _grouped_epoch(groups: dict, batch_size: int, generator: torch.Generator) -> np.ndarray:
    """Batches cut within each group {(task, cluster): example ids}; each task's leftovers pooled and cut."""
    batches, leftovers = [], {}
    for (task, _), members in sorted(groups.items(), key=lambda item: (str(item[0][0]), item[0][1])):
        members = members[torch.randperm(len(members), generator=generator).numpy()]
        steps = len(members) // batch_size
        batches.append(members[: steps * batch_size].reshape(steps, batch_size))
        leftovers.setdefault(task, []).append(members[steps * batch_size :])
    for task in sorted(leftovers, key=str):
        pool = np.concatenate(leftovers[task])
        pool = pool[torch.randperm(len(pool), generator=generator).numpy()]
        steps = len(pool) // batch_size
        batches.append(pool[: steps * batch_size].reshape(steps, batch_size))
    batches = np.concatenate(batches)
    return batches[torch.randperm(len(batches), generator=generator).numpy()]


def _task_groups(data: TrainingData) -> dict:
    tasks = np.asarray(data.tasks if data.tasks is not None else [None] * data.num_examples, dtype=object)
    return {(task, 0): np.flatnonzero(tasks == task) for task in dict.fromkeys(tasks.tolist())}


def _cluster_groups(data: TrainingData, embeddings: np.ndarray, batch_size: int, seed: int) -> dict:
    """Split each task's examples by FAISS k-means over their anchors' guide embeddings."""
    import faiss

    groups = {}
    for (task, _), members in _task_groups(data).items():
        vectors = np.ascontiguousarray(embeddings[data.anchor_ids[members]], dtype=np.float32)
        k = max(1, len(members) // (EXAMPLES_PER_CLUSTER_BATCHES * batch_size))
        if k == 1:
            groups[(task, 0)] = members
            continue
        faiss.omp_set_num_threads(1)  # parallel centroid sums are not bit-reproducible
        kmeans = faiss.Kmeans(vectors.shape[1], k, niter=20, seed=seed, spherical=True)
        kmeans.train(vectors)
        _, assignment = kmeans.index.search(vectors, 1)
        for cluster in range(k):
            groups[(task, cluster)] = members[assignment[:, 0] == cluster]
    return groups


def check_plan(data: TrainingData, batch_size: int, epochs: int, strategy: str) -> None:
    """The checks that need no planning, so a bad option fails before the guide pass."""
    if batch_size < 2:
        raise GistError(f"--batch-size {batch_size}: in-batch negatives need a batch size of at least 2")
    if epochs < 1:
        raise GistError(f"--epochs {epochs}: need at least one epoch")
    if strategy not in STRATEGIES:
        raise GistError(f"--strategy {strategy}: use one of {', '.join(STRATEGIES)}")
    if data.num_examples < batch_size:
        raise GistError(f"{data.num_examples} examples are fewer than one batch of {batch_size}; lower --batch-size")
    if strategy == "by-task" and data.tasks is None:
        raise GistError("--strategy by-task needs a 'task' column (map one with --columns task=NAME)")


def plan_batches(
    data: TrainingData, batch_size: int, epochs: int, seed: int, strategy: str, embeddings: np.ndarray | None = None
) -> np.ndarray:
    """Plan every batch of every epoch; returns int64 (epochs, steps_per_epoch, batch_size).

    `embeddings` (guide embeddings by text id) are needed by the clustered strategy only.
    """
    check_plan(data, batch_size, epochs, strategy)
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
    else:
        groups = _task_groups(data) if strategy == "by-task" else _cluster_groups(data, embeddings, batch_size, seed)
        plan = [_grouped_epoch(groups, batch_size, _generator(seed, e)) for e in range(epochs)]
    plan = np.stack(plan).astype(np.int64)
    if plan.shape[1] == 0:
        raise GistError(f"strategy {strategy} yields no full batch of {batch_size}; lower --batch-size")
    return plan

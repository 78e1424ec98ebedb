"""Batch planners: which examples share a batch, for every epoch, fixed before training.

A plan is an int64 array of shape (epochs, steps_per_epoch, batch_size) of example ids. It is a
pure function of (data, batch size, epochs, seed, strategy; for clustered and fn-aware also the
guide embeddings, for fn-aware the mask rule's options), so stage 1, `gist plan` and stage 2
agree on it. Incomplete last batches are dropped, so every batch has exactly `batch_size` rows.

- random: a fresh permutation per epoch (seed + epoch).
- no-duplicates: sentence-transformers' NoDuplicatesBatchSampler over text ids, so no text
  appears twice in a batch (anchor, positive or negative), seeded with seed + epoch as it seeds itself.
- by-task: shuffle within each task, cut into batches, shuffle the batches (the GISTEmbed recipe).
- clustered: hard batches. FAISS k-means over the anchors' guide embeddings (about 4 batches per
  cluster, within each task when there are tasks); batches are cut within a (task, cluster)
  group, the groups' leftovers are pooled per task and cut too. False negatives concentrate in
  such batches, so this is where guidance matters most.
- fn-aware: the opposite aim, batches that carry few false negatives to begin with. A FAISS range
  search over the guide embeddings finds, for every example, the examples the mask rule
  (pipeline.masks.false_negative_mask, with the plan's margin and contrast flags) would flag in a
  batch with it (pipeline.conflicts); each batch is then filled greedily, as NoDuplicatesBatchSampler
  does, skipping examples that conflict with its members (within one task when there are tasks).
  Where nothing that fits remains, the batch takes the examples with the fewest conflicts and the
  masks handle them, so every epoch has the same number of full batches.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from pipeline import GistError
from pipeline.conflicts import conflict_graph
from pipeline.data import TrainingData
from pipeline.guide import ADD_ROWS, faiss_gpu, faiss_single_thread, gather, training_sample
from pipeline.masks import MARGIN_STRATEGIES, PlanParams, check_sparse_sizes

STRATEGIES = ("random", "no-duplicates", "by-task", "clustered", "fn-aware")
EXAMPLES_PER_CLUSTER_BATCHES = 4  # k-means clusters hold about this many batches
KMEANS_POINTS_PER_CLUSTER = 64  # k-means training sample per cluster (of 128 members per cluster)

BATCH_WINDOW = 64  # examples checked at a time (vectorised) by the greedy batcher
FALLBACK_WINDOW = 1024  # deferred examples considered when a batch must take a conflicting one


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + epoch)


def _random_epoch(data: TrainingData, batch_size: int, generator: torch.Generator) -> np.ndarray:
    order = torch.randperm(data.num_examples, generator=generator).numpy()
    steps = data.num_examples // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


def _no_duplicates_epoch(sampler, epoch: int) -> np.ndarray:
    sampler.set_epoch(epoch)
    return np.array(list(sampler), dtype=np.int64).reshape(-1, sampler.batch_size)


def _cut(members: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive full batches of shuffled examples; returns (batches, the examples left over)."""
    steps = len(members) // batch_size
    return members[: steps * batch_size].reshape(steps, batch_size), members[steps * batch_size :]


def _grouped_epoch(groups: dict, batch_size: int, generator: torch.Generator, cut=_cut) -> np.ndarray:
    """Batches cut within each group {(task, cluster): example ids}; each task's leftovers pooled and cut.

    `cut(shuffled examples, batch_size) -> (batches, leftover)` forms the batches of a group.
    """
    batches, leftovers = [], {}
    for (task, _), members in sorted(groups.items(), key=lambda item: (str(item[0][0]), item[0][1])):
        members = members[torch.randperm(len(members), generator=generator).numpy()]
        group_batches, rest = cut(members, batch_size)
        batches.append(group_batches)
        leftovers.setdefault(task, []).append(rest)
    for task in sorted(leftovers, key=str):
        pool = np.concatenate(leftovers[task])
        pool = pool[torch.randperm(len(pool), generator=generator).numpy()]
        batches.append(cut(pool, batch_size)[0])
    batches = np.concatenate(batches)
    return batches[torch.randperm(len(batches), generator=generator).numpy()]


def _task_groups(data: TrainingData) -> dict:
    tasks = np.asarray(data.tasks if data.tasks is not None else [None] * data.num_examples, dtype=object)
    return {(task, 0): np.flatnonzero(tasks == task) for task in dict.fromkeys(tasks.tolist())}


def _cluster_groups(data: TrainingData, embeddings: np.ndarray, batch_size: int, seed: int, device: str = "cpu") -> dict:
    """Split each task's examples by FAISS k-means over their anchors' guide embeddings.

    k-means is trained on a seeded sample of KMEANS_POINTS_PER_CLUSTER anchors per cluster (FAISS's
    own cap is 256), on the GPU with faiss-gpu; every member is then assigned a chunk at a time.
    """
    import faiss

    groups = {}
    for (task, _), members in _task_groups(data).items():
        k = max(1, len(members) // (EXAMPLES_PER_CLUSTER_BATCHES * batch_size))
        if k == 1:
            groups[(task, 0)] = members
            continue
        anchors = data.rows.anchor[members]  # the anchors' stored rows (their query view)
        sample = gather(embeddings, anchors[training_sample(len(members), KMEANS_POINTS_PER_CLUSTER * k, seed)])
        kmeans = faiss.Kmeans(sample.shape[1], k, niter=20, seed=seed, spherical=True, gpu=faiss_gpu(device) is not None)
        assignment = np.empty(len(members), dtype=np.int64)
        with faiss_single_thread():
            kmeans.train(sample)
            for start in range(0, len(members), ADD_ROWS):
                assignment[start : start + ADD_ROWS] = kmeans.index.search(gather(embeddings, anchors[start : start + ADD_ROWS]), 1)[1][:, 0]
        for cluster in range(k):
            groups[(task, cluster)] = members[assignment == cluster]
    return groups


class _ConflictBatcher:
    """Cuts shuffled examples into full batches, keeping conflicting examples apart where it can.

    As sentence-transformers' NoDuplicatesBatchSampler: walk the examples in order and take each
    one that conflicts with no member of the batch yet, deferring the others to later batches
    (deferred ones come first in the next walk). When no remaining example fits, the batch is
    filled anyway, each time with the deferred example (among the first FALLBACK_WINDOW) that
    conflicts with the fewest members; the masks handle those conflicts.
    """

    def __init__(self, indptr: np.ndarray, neighbours: np.ndarray, num_examples: int):
        self.indptr, self.neighbours = indptr, neighbours
        self.hits = np.zeros(num_examples, dtype=np.int32)  # members of the current batch it conflicts with

    def _add(self, batch: list, example: int) -> None:
        batch.append(example)
        self.hits[self.neighbours[self.indptr[example] : self.indptr[example + 1]]] += 1  # neighbours are unique

    def _take(self, sequence: np.ndarray, batch: list, batch_size: int) -> tuple[list, int]:
        """Add the examples of `sequence` that fit, in order; returns (their positions, length walked)."""
        taken, position = [], 0
        while len(batch) < batch_size and position < len(sequence):
            window = sequence[position : position + BATCH_WINDOW]
            for k in np.flatnonzero(self.hits[window] == 0).tolist():
                example = int(window[k])
                if self.hits[example]:  # conflicts with a member taken from this window
                    continue
                self._add(batch, example)
                taken.append(position + k)
                if len(batch) == batch_size:
                    return taken, position + k + 1
            position += len(window)
        return taken, position

    def __call__(self, members: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        steps = len(members) // batch_size
        batches = np.empty((steps, batch_size), dtype=np.int64)
        deferred, walked = members[:0], 0
        for step in range(steps):
            batch: list[int] = []
            taken, _ = self._take(deferred, batch, batch_size)
            deferred = np.delete(deferred, taken)
            taken, length = self._take(members[walked:], batch, batch_size)
            deferred = np.concatenate([deferred, np.delete(members[walked : walked + length], taken)])
            walked += length
            while len(batch) < batch_size:  # every remaining example conflicts with the batch
                pick = int(np.argmin(self.hits[deferred[:FALLBACK_WINDOW]]))
                self._add(batch, int(deferred[pick]))
                deferred = np.delete(deferred, pick)
            batches[step] = batch
            for example in batch:
                self.hits[self.neighbours[self.indptr[example] : self.indptr[example + 1]]] = 0
        return batches, np.concatenate([deferred, members[walked:]])


def check_plan(data: TrainingData, batch_size: int, epochs: int, strategy: str) -> None:
    """The checks that need no planning, so a bad option fails before the guide pass."""
    if batch_size < 2:
        raise GistError(f"--batch-size {batch_size}: in-batch negatives need a batch size of at least 2")
    if epochs < 1:
        raise GistError(f"--epochs {epochs}: need at least one epoch")
    if strategy not in STRATEGIES:
        raise GistError(f"--strategy {strategy}: use one of {', '.join(STRATEGIES)}")
    check_sparse_sizes(batch_size, data.num_negatives)
    if data.num_examples < batch_size:
        raise GistError(f"{data.num_examples} examples are fewer than one batch of {batch_size}; lower --batch-size")
    if strategy == "by-task" and data.tasks is None:
        raise GistError("--strategy by-task needs task names: DATA has no 'task' column or it is all null (map one with --columns task=NAME)")
    if strategy in ("by-task", "clustered", "fn-aware") and data.tasks is not None:
        # Batches never mix tasks, so some task must hold a full batch.
        largest = max(np.unique(np.asarray(data.tasks, dtype=object).astype(str), return_counts=True)[1])
        if largest < batch_size:
            raise GistError(f"--strategy {strategy} batches within one task, and the largest task has {largest} examples, fewer than one batch of {batch_size}; lower --batch-size")


def check_rule(params, option: str = "--margin") -> None:
    """The mask rule's margin strategy and margin, checked before any data or model is read (the
    strategy is check_plan's); `option` names the margin in the error (the sweep's is --margins).

    Cosines lie in [-1, 1]. Absolute (mask iff g > t - m): m <= -2 masks nothing and m >= 2 every
    candidate (at m = 2 all but one exactly opposite an anchor whose positive equals it), so m must
    lie in (-2, 2). Relative (mask iff g > t - |t| m): a row with t = 0 masks g > 0 whatever m, so
    no finite margin decides every candidate; it must only be finite.
    """
    if params.margin_strategy not in MARGIN_STRATEGIES:
        raise GistError(f"--margin-strategy {params.margin_strategy}: use one of {', '.join(MARGIN_STRATEGIES)}")
    margin = params.margin
    if params.margin_strategy == "absolute" and not -2 < margin < 2:
        raise GistError(f"{option} {margin}: an absolute margin must lie in (-2, 2); cosines lie in [-1, 1], so m >= 2 masks every candidate and m <= -2 none")
    if not np.isfinite(margin):
        raise GistError(f"{option} {margin}: a relative margin may be any finite number (a row with t = 0 masks g > 0 whatever the margin)")


def rule_options(params) -> dict:
    """The mask rule's parameters of a PlanParams, as plan_batches' keyword arguments."""
    return {name: getattr(params, name) for name in ("margin_strategy", "margin", "contrast_anchors", "contrast_positives", "mask_duplicates")}


def plan_batches(
    data: TrainingData, batch_size: int, epochs: int, seed: int, strategy: str, embeddings: np.ndarray | None = None,
    *, margin_strategy: str = "absolute", margin: float = 0.0, contrast_anchors: bool = True, contrast_positives: bool = True,
    mask_duplicates: bool = True, device: str = "cpu",
) -> np.ndarray:
    """Plan every batch of every epoch; returns int64 (epochs, steps_per_epoch, batch_size).

    `embeddings` (the stored guide vectors, gathered by `data.rows`) are needed by the clustered and fn-aware strategies.
    The mask rule's parameters (those of the masks the plan is written with) are used by fn-aware only.
    """
    check_plan(data, batch_size, epochs, strategy)
    check_rule(PlanParams(margin_strategy=margin_strategy, margin=margin))
    if strategy in ("clustered", "fn-aware") and embeddings is None:
        raise GistError(f"--strategy {strategy} needs the guide embeddings")
    if strategy == "random":
        epoch_batches = lambda e: _random_epoch(data, batch_size, _generator(seed, e))  # noqa: E731
    elif strategy == "no-duplicates":
        from datasets import Dataset
        from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

        columns = {"anchor": data.anchor_ids, "positive": data.positive_ids}
        columns.update({f"negative_{c + 1}": data.negative_ids[:, c] for c in range(data.num_negatives)})
        sampler = NoDuplicatesBatchSampler(
            Dataset.from_dict(columns), batch_size=batch_size, drop_last=True, generator=torch.Generator(), seed=seed
        )
        epoch_batches = functools.partial(_no_duplicates_epoch, sampler)
    elif strategy == "fn-aware":
        graph = conflict_graph(data, embeddings, margin_strategy, margin, contrast_anchors, contrast_positives, mask_duplicates)
        batcher, groups = _ConflictBatcher(*graph, data.num_examples), _task_groups(data)
        epoch_batches = lambda e: _grouped_epoch(groups, batch_size, _generator(seed, e), batcher)  # noqa: E731
    else:
        groups = _task_groups(data) if strategy == "by-task" else _cluster_groups(data, embeddings, batch_size, seed, device)
        epoch_batches = lambda e: _grouped_epoch(groups, batch_size, _generator(seed, e))  # noqa: E731
    # One array filled epoch by epoch: at 80 epochs of 1M examples the plan is 640 MB, held once.
    first = epoch_batches(0)
    plan = np.empty((epochs, *first.shape), dtype=np.int64)
    plan[0], steps = first, len(first)
    for epoch in range(1, epochs):
        batches = epoch_batches(epoch)
        steps = min(steps, len(batches))  # no-duplicates: the trainer needs the same number of steps in every epoch
        plan[epoch, :steps] = batches[:steps]
    if steps < plan.shape[1]:
        plan = np.ascontiguousarray(plan[:, :steps])
    if plan.shape[1] == 0:
        raise GistError(f"strategy {strategy} yields no full batch of {batch_size}; lower --batch-size")
    return plan

"""Run under `torchrun --nproc-per-node 2` by tests/test_objectives.py (gloo, CPU).

Each rank takes its half of planned batches and computes its loss and local gradients with GuidedMaskLoss /
CachedGuidedMaskLoss under a new objective (gathering across the two processes); the losses are averaged and
the gradients summed and divided by 2 (what DDP does). Rank 0 writes them to OUT (JSON and safetensors), for
the test to compare with one process on the same global batches.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from pipeline.data import load_training_data
from pipeline.loss import CachedGuidedMaskLoss, GuidedMaskLoss
from pipeline.masks import PlannedMasks
from pipeline.train import training_dataset
from tests.conftest import load_student
from tests.test_equivalence import loss_and_grads
from tests.test_objectives import DISTRIBUTED_CASES, DISTRIBUTED_ROWS, TEMPERATURE, objective_kwargs

all_planned, no_anchors, data_path, out = map(Path, sys.argv[1:5])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
dataset = training_dataset(load_training_data(data_path))
student = load_student()
losses = {}
for name, (which, objective, mini_batch) in DISTRIBUTED_CASES.items():
    masks = PlannedMasks(all_planned if which == "all" else no_anchors)
    kwargs = objective_kwargs(objective)
    loss_fn = (CachedGuidedMaskLoss(student, masks, temperature=TEMPERATURE, mini_batch_size=mini_batch, **kwargs) if mini_batch
               else GuidedMaskLoss(student, masks, temperature=TEMPERATURE, **kwargs))
    for row in DISTRIBUTED_ROWS:
        masks.cursor.step = row
        local = masks.batches[row].reshape(world, -1)[rank]
        loss, grads = loss_and_grads(student, loss_fn, dataset, local)
        total = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(total)
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world
        losses[f"{name}-{row}"] = total.item() / world
        if rank == 0:
            save_file({k: v.contiguous() for k, v in grads.items()}, str(out / f"{name}-{row}.safetensors"))
if rank == 0:
    (out / "losses.json").write_text(json.dumps(losses))
dist.destroy_process_group()

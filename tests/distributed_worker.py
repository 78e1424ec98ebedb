"""Run under `torchrun --nproc-per-node 2` by tests/test_distributed.py (gloo, CPU).

Each rank takes its half of the first planned batches and computes loss and local gradients with
GuidedMaskLoss and with sentence-transformers GISTEmbedLoss(gather_across_devices=True) and the
guide online; writes the largest differences to OUT/rank<r>.json.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

from pipeline.data import load_training_data
from pipeline.loss import GuidedMaskLoss
from pipeline.masks import PlannedMasks
from pipeline.train import training_dataset
from tests.conftest import GUIDE_SAMEVOCAB, load_student
from tests.test_equivalence import grad_errors, loss_and_grads

masks_path, data_path, out = map(Path, sys.argv[1:4])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
masks = PlannedMasks(masks_path)
dataset = training_dataset(load_training_data(data_path))
student, guide = load_student(), SentenceTransformer(str(GUIDE_SAMEVOCAB), device="cpu")
ours = GuidedMaskLoss(student, masks)
reference = GISTEmbedLoss(student, guide, margin=masks.params.margin, gather_across_devices=True)
report = {"loss_diff": 0.0, "grad_diff": 0.0, "losses": []}
for row, batch in enumerate(masks.batches[:3]):
    masks.cursor.step = row
    local = batch.reshape(world, -1)[rank]
    loss_ours, grads_ours = loss_and_grads(student, ours, dataset, local)
    loss_ref, grads_ref = loss_and_grads(student, reference, dataset, local)
    report["losses"].append(loss_ours)
    report["loss_diff"] = max(report["loss_diff"], abs(loss_ours - loss_ref))
    report["grad_diff"] = max(report["grad_diff"], *grad_errors(grads_ours, grads_ref).values())
(out / f"rank{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()

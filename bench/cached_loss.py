"""cached_loss: peak memory and time of one step's loss at batch 1024, GuidedMaskLoss vs CachedGuidedMaskLoss.

One planned batch of 1024 triplets (masks from the static tiny guide: their content does not
change the cost), forward + backward of the student through each loss, each (loss, repetition)
in a fresh process so its peak memory is its own. The uncached loss holds every activation of
3 x 1024 texts; the cached one holds a mini-batch's worth (and the 1024-row embeddings).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from sentence_transformers.util import batch_to_device

from bench.common import SHARED, Context, PeakMemory, median, print_table, run_isolated
from pipeline import guide as guide_mod
from pipeline.data import load_training_data
from pipeline.loss import CachedGuidedMaskLoss, GuidedMaskLoss
from pipeline.masks import MASKS, PlannedMasks
from pipeline.train import training_dataset

NAME = "cached_loss"
BATCH = 1024
MINI_BATCH = 64
CONFIGS = ("guided", "cached")


def measure(config: str, student: str, data_path: str, masks_path: str) -> dict:
    masks = PlannedMasks(Path(masks_path))
    model = guide_mod.load_model(student)
    dataset = training_dataset(load_training_data(Path(data_path)))
    rows = dataset[masks.batches[0].tolist()]
    features = [model.preprocess(rows[c]) for c in dataset.column_names if c != "label"]
    loss_fn = GuidedMaskLoss(model, masks) if config == "guided" else CachedGuidedMaskLoss(model, masks, mini_batch_size=MINI_BATCH)
    cuda = model.device.type == "cuda"
    with PeakMemory(cuda) as memory:
        start = time.perf_counter()
        loss = loss_fn([batch_to_device(f, model.device) for f in features], torch.tensor(rows["label"], device=model.device))
        loss.backward()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "loss": loss.item(), "memory": memory.report()}


def run(ctx: Context) -> dict:
    import cli

    work = ctx.work_dir(NAME)
    data_path = ctx.sample(quick_rows=None)
    cli.precompute_guide(data_path, guide=str(SHARED / "models" / "tiny-guide-static"), out=work / "guide", batch_size=BATCH)
    reps = ctx.repetitions(1, 1)
    runs = {config: [] for config in CONFIGS}
    for _ in range(reps):
        for config in CONFIGS:
            runs[config].append(run_isolated(measure, config, str(ctx.student), str(data_path), str(work / "guide" / MASKS)))
    record = {config: {"seconds": round(median(r["seconds"] for r in runs[config]), 2),
                       "peak_mb": round(median(r["memory"]["increase_mb"] for r in runs[config]), 1)} for config in CONFIGS}
    return {
        "student": str(ctx.student), "batch_size": BATCH, "mini_batch_size": MINI_BATCH, "repetitions": reps,
        "guided_peak_mb": record["guided"]["peak_mb"], "cached_peak_mb": record["cached"]["peak_mb"],
        "guided_s": record["guided"]["seconds"], "cached_s": record["cached"]["seconds"],
        "memory_ratio": round(record["cached"]["peak_mb"] / record["guided"]["peak_mb"], 3),
        "loss_equal": abs(runs["guided"][0]["loss"] - runs["cached"][0]["loss"]) < 1e-4,
        "definitions": {"peak_mb": "peak increase over the memory before the loss call (RSS high-water mark on CPU, CUDA allocator on GPU): forward + backward of one batch"},
        "runs": runs,
    }


def table(result: dict) -> None:
    print_table(
        f"cached_loss ({result['mode']}): one batch of {result['batch_size']}, forward + backward",
        ["loss", "peak MB", "seconds"],
        [["GuidedMaskLoss", result["guided_peak_mb"], result["guided_s"]],
         [f"CachedGuidedMaskLoss (mini-batch {result['mini_batch_size']})", result["cached_peak_mb"], result["cached_s"]]],
    )

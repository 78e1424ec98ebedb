"""mask_kernel: µs per example of the mask computation against the implementation before it and its floors.

On 2048 planned batches (batch 32, one negative) of a synthetic 1M x 768 float32 guide pass
(`bench.synthetic.write_pass`, memory-mapped as `gist plan` maps it), in this process, medians of 3:

- `batch_masks` (torch, every core): what `gist plan` and stage 1 run;
- numpy on one BLAS thread: the implementation before torch, kept here as the reference;
- the bare `torch.bmm` of the same four products (ap, aa, pp, an) on pre-gathered vectors: the floor;
- the gather of those vectors from the memory map alone.

Separate from `scale` so it can run on a quiet machine in minutes. Targets (issue 15): >= 2x the
numpy implementation's speed, within 2x of the bmm floor.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from bench import synthetic
from bench.common import Context, median, print_table

NAME = "mask_kernel"
BATCHES = 2048
TARGETS = {"speedup_vs_numpy": (">=", 2.0), "ratio_to_bmm_floor": ("<=", 2.0)}


def numpy_masks(embeddings: np.ndarray, data, batches: np.ndarray, params) -> dict:
    """The mask computation before torch (numpy batched matmul, run on one BLAS thread): the reference."""
    from pipeline.guide import gather
    from pipeline.masks import false_negative_mask

    nb, g = batches.shape
    anchors, positives = gather(embeddings, data.rows.anchor[batches]), gather(embeddings, data.rows.positive[batches])
    ap = anchors @ positives.transpose(0, 2, 1)
    threshold = ap[:, np.arange(g), np.arange(g)][..., None]
    masks = {"ap": false_negative_mask(ap, threshold, params.margin_strategy, params.margin)}
    masks["ap"][:, np.arange(g), np.arange(g)] = False
    masks["aa"] = false_negative_mask(anchors @ anchors.transpose(0, 2, 1), threshold, params.margin_strategy, params.margin)
    masks["pp"] = false_negative_mask(positives @ positives.transpose(0, 2, 1), threshold, params.margin_strategy, params.margin)
    negatives = gather(embeddings, data.rows.negative[batches].transpose(0, 2, 1).reshape(nb, -1))
    masks["an"] = false_negative_mask(anchors @ negatives.transpose(0, 2, 1), threshold, params.margin_strategy, params.margin)
    return masks


def kernel(pass_dir: Path, batches: int, reps: int = 3) -> dict:
    """µs per example of the mask computation and its floors on the same planned batches."""
    import torch
    from threadpoolctl import threadpool_limits

    from pipeline.guide import gather, load_guide_pass
    from pipeline.masks import PlanParams, batch_masks, chunk_batches
    from pipeline.plan import plan_batches

    _, data, embeddings = load_guide_pass(pass_dir)
    params = PlanParams(batch_size=32)
    plan = plan_batches(data, 32, 1, 0, "random")[0][:batches]
    chunks = [plan[s : s + chunk_batches(32, 1)] for s in range(0, len(plan), chunk_batches(32, 1))]
    examples = plan.size

    def gathered(chunk):
        return [torch.from_numpy(gather(embeddings, ids)) for ids in (data.rows.anchor[chunk], data.rows.positive[chunk], data.rows.negative[chunk, 0])]

    def floor(tensors):
        a, p, n = tensors
        for left, right in ((a, p), (a, a), (p, p), (a, n)):
            torch.bmm(left, right.transpose(1, 2))

    pre = [gathered(c) for c in chunks]  # also warms the page cache for every variant
    timings = {"numpy_one_thread": [], "torch_batch_masks": [], "gather_only": [], "bmm_floor": []}
    for _ in range(reps):
        t0 = time.perf_counter()
        with threadpool_limits(1):
            for c in chunks:
                numpy_masks(embeddings, data, c, params)
        t1 = time.perf_counter()
        for c in chunks:
            batch_masks(embeddings, data, c, params, "cpu")
        t2 = time.perf_counter()
        for c in chunks:
            gathered(c)
        t3 = time.perf_counter()
        for tensors in pre:
            floor(tensors)
        t4 = time.perf_counter()
        for key, seconds in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            timings[key].append(seconds / examples * 1e6)
    us = {key: round(median(values), 4) for key, values in timings.items()}
    return {"batches": len(plan), "examples": examples, "dim": embeddings.shape[1], "torch_threads": torch.get_num_threads(),
            "us_per_example": us, "speedup_vs_numpy": round(us["numpy_one_thread"] / us["torch_batch_masks"], 2),
            "ratio_to_bmm_floor": round(us["torch_batch_masks"] / us["bmm_floor"], 2),
            "ratio_to_bmm_plus_gather_floor": round(us["torch_batch_masks"] / (us["bmm_floor"] + us["gather_only"]), 2)}


def run(ctx: Context) -> dict:
    examples, dim = ctx.pick((40_000, 64), (1_000_000, 768))
    pass_dir = ctx.work_dir(NAME) / "pass"
    synthetic.write_pass(pass_dir, examples, dim)
    result = kernel(pass_dir, ctx.steps or ctx.pick(256, BATCHES))
    shutil.rmtree(pass_dir)
    result["pass"] = {"examples": examples, "dim": dim, "dtype": "float32"}
    result["targets_met"] = {f"{key} {op} {bound}": (result[key] >= bound if op == ">=" else result[key] <= bound)
                             for key, (op, bound) in TARGETS.items()}
    result["definitions"] = {
        "us_per_example": "µs per example on the same planned batches: batch_masks (torch) vs numpy on one thread (the implementation "
                          "before), bare torch.bmm of the same 4 products on pre-gathered vectors, and the gather of those vectors alone",
    }
    return result


def table(result: dict) -> None:
    k = result
    print_table(f"mask kernel ({k['mode']}), {k['batches']} batches x 32, dim {k['dim']}, {k['torch_threads']} torch threads (µs/example)",
                ["numpy 1 thread", "torch batch_masks", "gather only", "bmm floor", "speed-up", "/ bmm floor", "/ (bmm + gather)", "targets met"],
                [[*k["us_per_example"].values(), k["speedup_vs_numpy"], k["ratio_to_bmm_floor"], k["ratio_to_bmm_plus_gather_floor"],
                  "yes" if all(k["targets_met"].values()) else "no"]])

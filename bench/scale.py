"""scale: time and peak memory of planning and masking (`plan_batches` + `write_masks`) as data grows.

Synthetic triplets (bench.synthetic: 2 texts per example, unit float32 guide vectors) at 100k, 1M
and 10M examples, batch 32, one epoch, strategy random; each (size, dim, repetition) in a fresh
process. Sizes whose vectors would not fit in the memory available are not run; they are
extrapolated along a line through the two largest measured sizes of the same dim, and labelled so.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench import synthetic
from bench.common import MIB, Context, PeakMemory, median, print_table, run_isolated
from pipeline.masks import PlanParams, write_masks
from pipeline.plan import plan_batches, rule_options

NAME = "scale"
PARAMS = PlanParams(batch_size=32, epochs=1, seed=0, strategy="random")
MEMORY_SHARE = 0.6  # run a size only if its estimated footprint is below this share of MemAvailable


def sizes(ctx: Context) -> list[tuple[int, int]]:
    """(examples, dim): the guide's dim 768 where it fits, dim 64 to reach 10M in memory."""
    return ctx.pick(
        [(10_000, 64), (100_000, 64)],
        [(100_000, 768), (1_000_000, 768), (10_000_000, 768), (100_000, 64), (1_000_000, 64), (10_000_000, 64)],
    )


def estimated_bytes(examples: int, dim: int) -> int:
    """Vectors of 2 texts per example, plus 4 int64 id arrays (anchor, positive, negative, plan)."""
    return 2 * examples * dim * 4 + 4 * examples * 8


def available_bytes() -> int:
    line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable"))
    return int(line.split()[1]) * 1024


def measure(examples: int, dim: int, out_path: str) -> dict:
    """Build the synthetic inputs, then plan and write masks, in this (fresh) process."""
    with PeakMemory(cuda=False) as data_memory:
        data = synthetic.triplets(examples)
        embeddings = synthetic.guide_embeddings(data, 2 * examples, dim)
    with PeakMemory(cuda=False) as memory:
        t0 = time.perf_counter()
        plan = plan_batches(data, PARAMS.batch_size, PARAMS.epochs, PARAMS.seed, PARAMS.strategy, embeddings, **rule_options(PARAMS))
        t1 = time.perf_counter()
        counts = write_masks(Path(out_path), embeddings, data, plan, PARAMS, {"synthetic": True})
        t2 = time.perf_counter()
    masks_bytes = Path(out_path).stat().st_size
    Path(out_path).unlink()
    return {
        "plan_s": t1 - t0,
        "masks_s": t2 - t1,
        "total_s": t2 - t0,
        "imports_mb": data_memory.before,
        "data_mb": memory.before - data_memory.before,
        "plan_masks_peak_increase_mb": memory.peak - memory.before,
        "peak_rss_mb": memory.peak,
        "masks_file_mb": masks_bytes / MIB,
        "masked_entries_per_batch": sum(counts.values()) / plan.shape[1],
    }


def summarize(examples: int, dim: int, runs: list[dict]) -> dict:
    record = {"examples": examples, "dim": dim, "extrapolated": False, "repetitions": len(runs)}
    for key in runs[0]:
        record[key] = round(median(r[key] for r in runs), 4)
    record["us_per_example"] = round(record["total_s"] / examples * 1e6, 3)
    return record


def extrapolate(examples: int, dim: int, measured: list[dict]) -> dict | None:
    """A straight line through the two largest measured sizes of this dim (through 0 if only one).

    A line, not a proportion: at small sizes the fixed costs (process, Parquet writer) dominate.
    None if no size of this dim was measured.
    """
    base = sorted((r for r in measured if r["dim"] == dim), key=lambda r: r["examples"])[-2:]
    if not base:
        return None
    record = {"examples": examples, "dim": dim, "extrapolated": True, "extrapolated_from": [r["examples"] for r in base], "repetitions": 0}
    for key in ("plan_s", "masks_s", "total_s", "data_mb", "plan_masks_peak_increase_mb", "masks_file_mb"):
        (n1, y1), (n2, y2) = [(0, 0.0)] * (2 - len(base)) + [(r["examples"], r[key]) for r in base]
        slope = (y2 - y1) / (n2 - n1)
        record[key] = round(y2 + slope * (examples - n2), 4)
    record["masked_entries_per_batch"] = base[-1]["masked_entries_per_batch"]
    record["imports_mb"] = base[-1]["imports_mb"]
    record["peak_rss_mb"] = round(record["imports_mb"] + record["data_mb"] + record["plan_masks_peak_increase_mb"], 1)
    record["us_per_example"] = round(record["total_s"] / examples * 1e6, 3)
    return record


def too_big(examples: int, dim: int) -> str:
    return (
        f"estimated {estimated_bytes(examples, dim) / 2**30:.1f} GiB of vectors and ids exceeds {MEMORY_SHARE:.0%} of the "
        f"{available_bytes() / 2**30:.1f} GiB available: masks.write_masks takes the whole embedding matrix in memory"
    )


def run(ctx: Context) -> dict:
    work = ctx.work_dir(NAME)
    reps = ctx.repetitions(1, 2)
    todo = [s for s in sizes(ctx) if estimated_bytes(*s) < MEMORY_SHARE * available_bytes()]
    runs = {s: [] for s in todo}
    for rep in range(reps):
        for examples, dim in todo:
            result = run_isolated(measure, examples, dim, str(work / f"masks-{examples}-{dim}.parquet"))
            runs[(examples, dim)].append(result)
            print(f"scale {examples} x {dim} rep {rep + 1}/{reps}: {result['total_s']:.2f} s, peak {result['peak_rss_mb']:.0f} MB", file=sys.stderr)
    measured = [summarize(e, d, runs[(e, d)]) for e, d in todo]
    records, not_run = list(measured), []
    for examples, dim in (s for s in sizes(ctx) if s not in runs):
        record = extrapolate(examples, dim, measured)
        if record:
            records.append({**record, "why": too_big(examples, dim)})
        else:
            not_run.append({"examples": examples, "dim": dim, "why": too_big(examples, dim) + "; no size of this dim was measured"})
    return {
        "plan": {"batch_size": PARAMS.batch_size, "epochs": PARAMS.epochs, "strategy": PARAMS.strategy},
        "data": "synthetic triplets: 2 unique texts per example (anchor, positive), 1 negative column; "
        "float32 unit vectors, positive = normalize(anchor + noise); texts themselves not materialized",
        "definitions": {
            "plan_s / masks_s": "pipeline.plan.plan_batches / pipeline.masks.write_masks, medians over repetitions",
            "data_mb": "RSS taken by the synthetic ids and vectors (the embedding matrix dominates: 2 * examples * dim * 4 bytes)",
            "plan_masks_peak_increase_mb": "peak RSS during plan + masks above the RSS holding the data",
            "peak_rss_mb": "high-water mark of the whole process during plan + masks",
            "extrapolated": "true: not run (see why); a line through the two largest measured sizes of the same dim",
        },
        "records": sorted(records, key=lambda r: (-r["dim"], r["examples"])),
        "not_run": not_run,
    }


def table(result: dict) -> None:
    rows = [
        [f"{r['examples']:,}", r["dim"], "extrapolated" if r["extrapolated"] else "measured", r["plan_s"], r["masks_s"],
         r["us_per_example"], r["data_mb"], r["plan_masks_peak_increase_mb"], r["peak_rss_mb"], r["masks_file_mb"]]
        for r in result["records"]
    ]
    print_table(
        f"scale ({result['mode']}): plan + masks, batch 32, 1 epoch",
        ["examples", "dim", "", "plan s", "masks s", "us/example", "data MB", "plan+masks +MB", "peak RSS MB", "masks MB"],
        rows,
    )

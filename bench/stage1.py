"""stage1: texts per second of `gist precompute-guide` against a bare `SentenceTransformer.encode`.

Both run in this process over the same unique texts with the same encode batch size, interleaved
(precompute, bare, precompute, bare, ...), each precompute into a fresh directory. Stage-1 time
excludes imports and the model load: it is `total_s - load_s` from the manifest's `timings`
(which time data loading, planning, encoding, index and masks separately).
"""

from __future__ import annotations

import json
import sys
import time

from bench.common import Context, median, print_table
from pipeline import guide as guide_mod
from pipeline.artifacts import MANIFEST
from pipeline.data import load_training_data

NAME = "stage1"
ENCODE_BATCH = 64  # precompute-guide's default --encode-batch-size
PLAN = {"batch_size": 32, "epochs": 1, "seed": 0, "strategy": "random"}


def precompute_once(ctx: Context, data_path, out) -> dict:
    """One `precompute-guide` into `out`; its manifest timings, stage-1 time and overhead share."""
    import cli

    cli.precompute_guide(data_path, guide=str(ctx.guide), out=out, encode_batch_size=ENCODE_BATCH, **PLAN)
    manifest = json.loads((out / MANIFEST).read_text())
    timings = manifest["timings"]
    stage1_s = timings["total_s"] - timings["load_s"]
    return {
        "timings": timings,
        "model_encode_s": manifest["encoding"]["encode_seconds"],
        "stage1_s": stage1_s,
        "overhead_fraction": (timings["plan_s"] + timings["index_s"] + timings["masks_s"]) / stage1_s,
    }


def bare_once(model, texts: list[str]) -> float:
    t0 = time.perf_counter()
    model.encode(texts, batch_size=ENCODE_BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return time.perf_counter() - t0


def run(ctx: Context) -> dict:
    data_path = ctx.sample(quick_rows=300)
    texts = load_training_data(data_path).texts.to_pylist()
    model = guide_mod.load_model(str(ctx.guide))  # float32, as precompute-guide's default --guide-dtype
    work = ctx.work_dir(NAME)
    reps = ctx.repetitions(2, 2)
    precomputes, bares = [], []
    for rep in range(reps):
        precomputes.append(precompute_once(ctx, data_path, work / f"rep{rep}"))
        bares.append(bare_once(model, texts))
        print(f"stage1 rep {rep + 1}/{reps}: precompute {precomputes[-1]['stage1_s']:.2f} s, bare encode {bares[-1]:.2f} s", file=sys.stderr)
    precompute_rate = len(texts) / median(p["stage1_s"] for p in precomputes)
    bare_rate = len(texts) / median(bares)
    ratio = precompute_rate / bare_rate
    overhead = median(p["overhead_fraction"] for p in precomputes)
    return {
        "guide": str(ctx.guide),
        "data": str(data_path),
        "num_texts": len(texts),
        "encode_batch_size": ENCODE_BATCH,
        "plan": PLAN,
        "repetitions": reps,
        "precompute_texts_per_s": round(precompute_rate, 2),
        "bare_encode_texts_per_s": round(bare_rate, 2),
        "ratio": round(ratio, 3),
        "overhead_fraction": round(overhead, 4),
        "targets_met": {"ratio >= 0.9": ratio >= 0.9, "overhead_fraction < 0.05": overhead < 0.05},
        "definitions": {
            "stage1_s": "manifest timings total_s - load_s: data loading, planning, data tables, encoding, Parquet writes, index, masks",
            "overhead_fraction": "manifest (plan_s + index_s + masks_s) / stage1_s, median over repetitions",
            "model_encode_s": "time inside model.encode during stage 1 (the manifest's encoding.encode_seconds)",
        },
        "runs": {"precompute": precomputes, "bare_encode_s": bares},
    }


def table(result: dict) -> None:
    print_table(
        f"stage1 ({result['mode']}): {result['num_texts']} texts, medians of {result['repetitions']}",
        ["precompute texts/s", "bare encode texts/s", "ratio (>= 0.9)", "overhead fraction (< 0.05)"],
        [[result["precompute_texts_per_s"], result["bare_encode_texts_per_s"], result["ratio"], result["overhead_fraction"]]],
    )

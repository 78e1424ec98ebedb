"""amortization: guide compute for R student runs x E epochs, offline (stage 1) vs online (GISTEmbedLoss).

From unit costs measured here, interleaved over repetitions, on the 10156-triplet training set:
- offline: one guide pass over the unique texts (`SentenceTransformer.encode`, stage 1's batch size)
  plus the FAISS index, then planning and masks for every epoch of every run (each run is assumed
  to re-plan, e.g. with its own seed: the conservative case; runs sharing a plan share its masks);
- online: the guide's forward on each step's columns, as GISTEmbedLoss runs it (`embed_columns`
  under no_grad, batch 32), on every step of every epoch of every run. Retokenization between
  different vocabularies is not timed, so this slightly understates the online cost.
Both use the guide in float32 (stage 1 uses fp16 on GPU, so there the offline figure is conservative).
Planning and mask time use synthetic guide-like vectors of the guide's dim on the real ids
(mask cost does not depend on the vectors' meaning; see bench.synthetic).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.util import batch_to_device

from bench import synthetic
from bench.common import FULL_TRAIN, Context, median, print_table
from pipeline import guide as guide_mod
from pipeline.data import load_training_data
from pipeline.masks import PlanParams, write_masks
from pipeline.plan import plan_batches

NAME = "amortization"
BATCH = 32
ENCODE_BATCH = 64  # precompute-guide's default --encode-batch-size
RUNS = (1, 5, 20)
EPOCHS = (1, 10, 80)


def offline_seconds_per_text(model, texts: list[str]) -> float:
    t0 = time.perf_counter()
    model.encode(texts, batch_size=ENCODE_BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return (time.perf_counter() - t0) / len(texts)


def online_seconds_per_step(model, columns: dict[str, list[str]], batches: np.ndarray) -> float:
    """The guide's share of a GISTEmbedLoss step: tokenize each column, embed them with no_grad."""
    t0 = time.perf_counter()
    for batch in batches:
        features = [batch_to_device(model.preprocess([texts[i] for i in batch]), model.device) for texts in columns.values()]
        with torch.no_grad():
            embed_columns(model, features)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(batches)


def planning_seconds_per_epoch(data, embeddings: np.ndarray, out) -> float:
    t0 = time.perf_counter()
    plan = plan_batches(data, BATCH, 1, 0, "random")
    write_masks(out, embeddings, data, plan, PlanParams(batch_size=BATCH), {"synthetic": True})
    return time.perf_counter() - t0


def train_step_cross_check(ctx: Context) -> float | None:
    """online_step_s - guided_step_s at batch 32 from the train_step result of the same mode, if any."""
    path = ctx.results / "train_step.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    record = next((r for r in result["records"] if r["batch_size"] == BATCH), None) if result["mode"] == ctx.mode else None
    return None if record is None else round(record["online_step_s"] - record["guided_step_s"], 4)


def run(ctx: Context) -> dict:
    data = load_training_data(FULL_TRAIN)
    model = guide_mod.load_model(str(ctx.guide))
    rng = np.random.default_rng(0)
    sample = [data.text(i) for i in rng.choice(len(data.texts), size=ctx.rows or ctx.pick(128, 512), replace=False)]
    plan = plan_batches(data, BATCH, 1, 0, "random")[0]
    batches = plan[: ctx.steps or ctx.pick(3, 6)]
    columns = {name: texts.to_pylist() for name, texts in data.text_columns().items()}
    embeddings = synthetic.guide_embeddings(data, len(data.texts), model.get_embedding_dimension())
    work = ctx.work_dir(NAME)
    t0 = time.perf_counter()
    guide_mod.build_index(embeddings, work / guide_mod.INDEX)
    index_s = time.perf_counter() - t0

    reps = ctx.repetitions(2, 3)
    units = {"offline_s_per_text": [], "online_guide_s_per_step": [], "planning_s_per_epoch": []}
    for rep in range(reps):
        units["offline_s_per_text"].append(offline_seconds_per_text(model, sample))
        units["online_guide_s_per_step"].append(online_seconds_per_step(model, columns, batches))
        units["planning_s_per_epoch"].append(planning_seconds_per_epoch(data, embeddings, work / "masks.parquet"))
        print(f"amortization rep {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.4g}" for k, v in units.items()), file=sys.stderr)
    per_text, per_step, per_epoch = (median(units[k]) for k in units)

    steps_per_epoch = len(plan)
    guide_pass_s = len(data.texts) * per_text + index_s
    rows = []
    for runs in RUNS:
        for epochs in EPOCHS:
            offline = guide_pass_s + runs * epochs * per_epoch
            online = runs * epochs * steps_per_epoch * per_step
            rows.append({"runs": runs, "epochs": epochs, "offline_guide_s": round(offline, 1), "online_guide_s": round(online, 1), "ratio": round(online / offline, 2)})
    return {
        "guide": str(ctx.guide),
        "data": str(FULL_TRAIN),
        "num_examples": data.num_examples,
        "num_texts": len(data.texts),
        "batch_size": BATCH,
        "steps_per_epoch": steps_per_epoch,
        "repetitions": reps,
        "samples": {"texts_encoded": len(sample), "online_batches": len(batches)},
        "unit_costs": {
            "offline_s_per_text": round(per_text, 6),
            "online_guide_s_per_step": round(per_step, 5),
            "planning_s_per_epoch": round(per_epoch, 4),
            "index_s": round(index_s, 4),
            "guide_pass_s": round(guide_pass_s, 1),
            "train_step_online_minus_guided_s": train_step_cross_check(ctx),
            "runs": units,
        },
        "definitions": {
            "offline_guide_s": "num_texts * offline_s_per_text + index_s + runs * epochs * planning_s_per_epoch",
            "online_guide_s": "runs * epochs * steps_per_epoch * online_guide_s_per_step",
            "ratio": "online_guide_s / offline_guide_s",
            "train_step_online_minus_guided_s": "cross-check from bench/results/train_step.json (same mode, batch 32), if present",
        },
        "table": rows,
    }


def table(result: dict) -> None:
    print_table(
        f"amortization ({result['mode']}): guide seconds, {result['num_examples']} examples, {result['num_texts']} texts, batch {result['batch_size']}",
        ["runs", "epochs", "offline s", "online s", "online/offline"],
        [[r["runs"], r["epochs"], r["offline_guide_s"], r["online_guide_s"], r["ratio"]] for r in result["table"]],
    )

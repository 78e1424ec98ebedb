"""mine: hard-negative mining from the stored guide pass (`gist mine`) vs sentence-transformers'
`mine_hard_negatives`, which encodes the queries and the corpus with the guide again.

Same data (the sample's anchor/positive pairs; the tiny slice in --quick), same guide, same options
(3 negatives, relative margin 0.05, top, corpus = the positives, FAISS search, encode batch 64),
interleaved repetitions in this process. `gist mine` time = reading the stored embeddings
(checksummed) and the data tables + mining + writing the Parquet output; the guide pass it reads is
run once beforehand (or reused from bench/.work/stage1) and timed separately. Also reports how many
rows got the very same negatives in the same order from both.
"""

from __future__ import annotations

import json
import random
import sys
import time

from bench.common import WORK, Context, median, print_table
from pipeline import guide as guide_mod
from pipeline.artifacts import MANIFEST
from pipeline.data import load_training_data

NAME = "mine"
OPTIONS = {"num_negatives": 3, "relative_margin": 0.05, "sampling_strategy": "top"}
ENCODE_BATCH = 64


def guide_pass(ctx: Context, data_path, work) -> tuple:
    """A precompute-guide directory of this guide over `data_path`: bench stage1's, or a new one."""
    import cli

    for candidate in sorted((WORK / "stage1" / ctx.mode).glob("rep*")):
        manifest = json.loads((candidate / MANIFEST).read_text()) if (candidate / MANIFEST).exists() else {}
        if manifest.get("dataset", {}).get("path") == str(data_path.resolve()) and manifest["guide"]["path"] == str(ctx.guide.resolve()):
            return candidate, manifest["timings"]["total_s"], "reused from bench stage1"
    out = work / "guide"
    cli.precompute_guide(data_path, guide=str(ctx.guide), out=out, encode_batch_size=ENCODE_BATCH)
    return out, json.loads((out / MANIFEST).read_text())["timings"]["total_s"], "run here"


def gist_mine_once(guide_dir, out) -> float:
    import cli

    t0 = time.perf_counter()
    cli.mine_command(guide_dir, out=out, overwrite=True, **OPTIONS)
    return time.perf_counter() - t0


def st_mine_once(model, data) -> tuple[float, object]:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    columns = data.text_columns()
    dataset = Dataset.from_dict({"anchor": columns["anchor"], "positive": columns["positive"]})
    random.seed(0)
    t0 = time.perf_counter()
    mined = mine_hard_negatives(
        dataset, model, use_faiss=True, output_format="n-tuple", batch_size=ENCODE_BATCH, verbose=False,
        num_negatives=OPTIONS["num_negatives"], relative_margin=OPTIONS["relative_margin"], sampling_strategy=OPTIONS["sampling_strategy"],
    )
    return time.perf_counter() - t0, mined


def agreement(ours_path, theirs) -> dict:
    """Rows keyed by (anchor, positive): how many have the same negatives in the same order."""
    import pyarrow.parquet as pq

    negatives = [f"negative_{c + 1}" for c in range(OPTIONS["num_negatives"])]
    ours = {(r["anchor"], r["positive"]): [r[c] for c in negatives] for r in pq.read_table(ours_path).to_pylist()}
    st = {(r["anchor"], r["positive"]): [r[c] for c in negatives] for r in theirs}
    shared = ours.keys() & st.keys()
    return {
        "rows_ours": len(ours), "rows_st": len(st), "rows_both": len(shared),
        "identical_rows": sum(ours[k] == st[k] for k in shared),
        "same_negative_sets": sum(set(ours[k]) == set(st[k]) for k in shared),
    }


def run(ctx: Context) -> dict:
    data_path = ctx.sample(quick_rows=300)
    data = load_training_data(data_path)
    work = ctx.work_dir(NAME)
    guide_dir, guide_pass_s, guide_pass_source = guide_pass(ctx, data_path, work)
    model = guide_mod.load_model(str(ctx.guide))
    reps = ctx.repetitions(2, 2)
    ours_s, st_s = [], []
    for rep in range(reps):
        ours_s.append(gist_mine_once(guide_dir, work / "mined.parquet"))
        seconds, st_mined = st_mine_once(model, data)
        st_s.append(seconds)
        print(f"mine rep {rep + 1}/{reps}: gist mine {ours_s[-1]:.2f} s, mine_hard_negatives {st_s[-1]:.2f} s", file=sys.stderr)
    return {
        "guide": str(ctx.guide),
        "data": str(data_path),
        "examples": data.num_examples,
        "options": {**OPTIONS, "corpus": "positives", "encode_batch_size": ENCODE_BATCH, "use_faiss": True},
        "repetitions": reps,
        "gist_mine_s": round(median(ours_s), 3),
        "mine_hard_negatives_s": round(median(st_s), 3),
        "speedup": round(median(st_s) / median(ours_s), 1),
        "guide_pass_s": guide_pass_s,
        "guide_pass": guide_pass_source,
        "agreement": agreement(work / "mined.parquet", st_mined),
        "definitions": {
            "gist_mine_s": "`gist mine` (cli.mine_command): read + verify stored embeddings and data tables, mine, write Parquet",
            "mine_hard_negatives_s": "sentence_transformers.util.mine_hard_negatives with the loaded guide: encode queries and corpus, FAISS search, select",
            "guide_pass_s": "the one precompute-guide run gist mine reads (manifest total_s), paid once for masks, mining and every re-plan",
        },
        "runs": {"gist_mine_s": ours_s, "mine_hard_negatives_s": st_s},
    }


def table(result: dict) -> None:
    agree = result["agreement"]
    print_table(
        f"mine ({result['mode']}): {result['examples']} examples, medians of {result['repetitions']}",
        ["gist mine s", "mine_hard_negatives s", "speedup", "guide pass s (once)", "identical rows"],
        [[result["gist_mine_s"], result["mine_hard_negatives_s"], result["speedup"], result["guide_pass_s"],
          f"{agree['identical_rows']}/{agree['rows_both']}"]],
    )

"""guide_prompts: what the guide's own prompts change in the masks, and what their views cost.

`GISTEmbedLoss` feeds the guide the student's input; with an unprompted student (the demo's MiniLM)
the guide sees no prompt at all. gist encodes each role with the guide's own prompts. The guide here
(all-mpnet-base-v2; tiny-guide-bert-samevocab in --quick) defines no prompts of its own, so two
prompt settings of current retrieval embedders stand in for them, given with --guide-prompts:
E5-style (`query: ` on anchors, `passage: ` on positives and negatives) and BGE-style (an
instruction on anchors only). Settings fixed before any result was seen.

Data: the demo's pairs (data/demo_train.parquet; the sample's first 128 rows in --quick), the
demo's plan (clustered, batch 32, 3 epochs, guide max length 256). Every setting's masks are
computed on the *same* batches (those the unprompted pass planned; clustered batches depend on the
vectors), so the counts are entries of the same candidates that one setting masks and the other
does not. Cost: vectors stored (a text in two views is two) and encoding seconds.
"""

from __future__ import annotations

import numpy as np

from bench.common import ROOT, WORK, Context, print_table

NAME = "guide_prompts"
SETTINGS = {
    "none (GISTEmbedLoss, unprompted student)": "",
    "E5-style": "anchor=query: ,positive=passage: ,negative=passage: ",
    "BGE-style": "anchor=Represent this sentence for searching relevant passages: ,positive=,negative=",
}


def run(ctx: Context) -> dict:
    import pyarrow.parquet as pq

    from pipeline.guide import load_guide_pass
    from pipeline.masks import MASKS, PlanParams, PlannedMasks, batch_masks
    from pipeline.stage1 import precompute_guide

    work = WORK / NAME / ctx.mode
    data = ROOT / "data" / "demo_train.parquet"
    if ctx.quick:
        work.mkdir(parents=True, exist_ok=True)
        data = work / "data.parquet"
        pq.write_table(pq.read_table(ROOT / "data" / "train.parquet").slice(0, 128), data)
    plan = PlanParams(batch_size=ctx.pick(16, 32), epochs=ctx.pick(1, 3), strategy="clustered")
    passes = {}
    for name, prompts in SETTINGS.items():
        out = work / f"pass-{len(passes)}"
        done = precompute_guide(data, ctx.guide, out, plan, guide_prompts=prompts, guide_max_seq_length=256, device="cpu", overwrite=out.exists())
        passes[name] = (done.manifest, *load_guide_pass(out)[1:])
    baseline = next(iter(SETTINGS))
    batches = PlannedMasks(work / "pass-0" / MASKS).batches
    reference = {block: mask for block, mask in batch_masks(passes[baseline][2], passes[baseline][1], batches, plan).items()}
    rows = []
    for name, (manifest, training, vectors) in passes.items():
        masks = batch_masks(vectors, training, batches, plan)
        blocks = {}
        for block in ("ap", "aa", "pp", "an"):
            blocks[block] = {"masked": int(masks[block].sum()), "added": int((masks[block] & ~reference[block]).sum()),
                             "removed": int((~masks[block] & reference[block]).sum()), "candidates": int(masks[block].size)}
        rows.append({"setting": name, "guide_prompts": SETTINGS[name], "views": manifest["guide"]["views"],
                     "texts": manifest["dataset"]["num_texts"], "vectors": manifest["dataset"]["num_vectors"],
                     "encode_s": manifest["encoding"]["encode_seconds"], "blocks": blocks,
                     "changed_vs_none": sum(b["added"] + b["removed"] for b in blocks.values())})
    return {"data": str(data.relative_to(ROOT)), "guide": ctx.guide.name, "plan": {"batch_size": plan.batch_size, "epochs": plan.epochs,
            "strategy": plan.strategy, "margin": plan.margin}, "batches": len(batches), "settings": rows}


def table(result: dict) -> None:
    print_table(
        f"guide prompts vs none: mask entries on the same {result['batches']} batches ({result['guide']}, {result['data']})",
        ["setting", "vectors / texts", "encode s", "ap masked", "aa masked", "pp masked", "changed vs none (+added / -removed)"],
        [[r["setting"], f"{r['vectors']} / {r['texts']}", r["encode_s"], *(r["blocks"][b]["masked"] for b in ("ap", "aa", "pp")),
          f"{r['changed_vs_none']} (+{sum(b['added'] for b in r['blocks'].values())} / -{sum(b['removed'] for b in r['blocks'].values())})"]
         for r in result["settings"]],
    )

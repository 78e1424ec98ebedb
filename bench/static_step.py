"""static_step: the cost of guidance for a static-embedding student.

A static student (full: `gist static-student --init distill` of all-MiniLM-L6-v2, 256 dims; quick: random
init over tiny-student's tokenizer, 32 dims) trained on the same planned batches with

- mnrl:   sentence-transformers `MultipleNegativesRankingLoss` (candidates ap);
- guided: `StaticGuidedMaskLoss` reading the stored masks (GISTEmbedLoss's candidates ap, aa, pp);
- online: the guide's forward over the batch's texts (anchors and positives, no gradient, in chunks of 64
  texts as `CachedGISTEmbedLoss` runs its guide; the plain `GISTEmbedLoss` would embed the whole column at
  once) and its similarity blocks, then the same guided step: what `GISTEmbedLoss` would cost if it accepted
  a static student (it refuses one: "Both the training model and the guiding model must use a
  PreTrainedTokenizer"). Its step takes minutes at batch 2048 on this CPU, so it gets one timed step and
  no warm-up (the guide's forward, which is nearly all of it, needs none);

at batch 256, 1024 and 2048 (quick: 16 and 64). The plain losses fit at every size here (a static
student's memory is its token table and the similarity matrices), so no cached variant is needed.
Also timed: stage 1 (`precompute_guide` with the same guide over the same data), so the table shows
after how many steps the stored pass has paid for itself: stage-1 seconds / (online - guided seconds per step).

Each (configuration, batch size) runs in a fresh process; memory is the peak of RssAnon (anonymous
memory: the memory-mapped model and mask files are file pages) sampled every millisecond during
`trainer.train()`, minus RssAnon before it. Data: the first 2048 pairs of the 10156-triplet training
set (negative column dropped; quick: 300 rows of the sample).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.common import FULL_TRAIN, SAMPLE, WORK, Context, _proc_status_mib, median, print_table, run_isolated
from bench.train_step import StepClock

NAME = "static_step"
# guided: GISTEmbedLoss's candidates (ap, aa, pp) with the stored masks; guided_ap: MNRL's candidates (ap only,
# masks planned with --no-contrast-anchors --no-contrast-positives) with the stored masks: the like-for-like cost
# of the masks alone. For a static student the similarity blocks are most of a step, so the two differ.
CONFIGS = ("mnrl", "guided", "guided_ap", "online")
TEMPERATURE = 0.01
GUIDE_CHUNK = 64  # texts per guide forward in the online configuration
TARGETS = {"guided_over_mnrl_time": ("<=", 1.05), "guided_over_mnrl_memory": ("<=", 1.05), "guided_ap_over_mnrl_time": ("<=", 1.05),
           "guided_ap_over_mnrl_memory": ("<=", 1.05), "online_over_guided_time": (">=", 100.0)}


class AnonPeak:
    """Peak RssAnon during a block, sampled every `interval` seconds by a thread, minus RssAnon on entry."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval

    def __enter__(self):
        self.before = self.peak = _proc_status_mib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _proc_status_mib("RssAnon"))
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _proc_status_mib("RssAnon"))

    def report(self) -> dict:
        return {"kind": "RssAnon peak (1 ms sampling)", "before_mb": round(self.before, 1), "peak_mb": round(self.peak, 1),
                "increase_mb": round(self.peak - self.before, 1)}


class OnlineGuide:
    """The guided loss preceded by the online guide's work: its forward over the batch's texts (looked
    up by example id) and its similarity blocks, as GISTEmbedLoss would compute them every step."""

    def __init__(self, loss, guide, columns: dict[str, list[str]], chunk: int = GUIDE_CHUNK):
        self.loss, self.guide, self.columns, self.chunk = loss, guide, columns, chunk
        self.guide_s: list[float] = []

    def __call__(self, sentence_features, labels):
        import torch

        from pipeline.static import unit_cosine

        start = time.perf_counter()
        ids = labels.tolist()
        with torch.no_grad():
            embedded = []
            for name, texts in self.columns.items():
                batch = [texts[i] for i in ids]
                parts = []
                for begin in range(0, len(batch), self.chunk):
                    features = self.guide.preprocess(batch[begin:begin + self.chunk])
                    features = {k: v.to(self.guide.device) if hasattr(v, "to") else v for k, v in features.items()}
                    parts.append(self.guide(features)["sentence_embedding"])
                embedded.append(torch.cat(parts))
            a, p = embedded[0], embedded[1]
            blocks = [unit_cosine(a, p), unit_cosine(a, a), unit_cosine(p, p)]
            threshold = blocks[0].diagonal()[:, None]
            _ = [g > threshold for g in blocks]  # the veto (margin 0)
        if self.guide.device.type == "cuda":
            torch.cuda.synchronize()
        self.guide_s.append(time.perf_counter() - start)
        return self.loss(sentence_features, labels)


def measure(config: str, student: str, guide: str, data_path: str, masks_path: str, warmup: int, steps: int, device: str = "cpu") -> dict:
    """`warmup + steps` planned steps of one configuration in this (fresh) process: time and memory."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import PrinterCallback

    from pipeline import train
    from pipeline.data import load_training_data
    from pipeline.guide import load_model
    from pipeline.masks import PlannedMasks
    from pipeline.static import StaticGuidedMaskLoss

    masks = PlannedMasks(Path(masks_path))
    data = load_training_data(Path(data_path))
    model = load_model(student, device)
    online = None
    if config == "mnrl":
        loss = MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE)
    else:
        loss = StaticGuidedMaskLoss(model, masks, temperature=TEMPERATURE)
        if config == "online":
            table = pq.read_table(data_path)
            online = OnlineGuide(loss.forward, load_model(guide, device), {c: table.column(c).to_pylist() for c in ("anchor", "positive")})
            online.guide.eval()
            loss.forward = online  # the trainer calls loss(...) -> forward
    cuda = model.device.type == "cuda"
    clock = StepClock(cuda)
    with tempfile.TemporaryDirectory() as out:
        trainer = train.build_trainer(model, data, masks, loss, Path(out), callbacks=[clock], max_steps=warmup + steps, save_strategy="no",
                                      logging_strategy="no", disable_tqdm=True, use_cpu=not cuda, seed=0)
        trainer.remove_callback(PrinterCallback)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with AnonPeak() as memory:
            trainer.train()
    first = clock.ends[warmup - 1] if warmup else clock.begins[0]
    result = {"step_s": (clock.ends[-1] - first) / steps, "compute_s": median(clock.ends[i] - clock.begins[i] for i in range(warmup, warmup + steps)),
              "memory": memory.report(), "load_avg_1m_after": round(os.getloadavg()[0], 2)}
    if cuda:
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if online is not None:
        result["guide_forward_s"] = median(online.guide_s[warmup:])
    return result


def data_file(ctx: Context) -> Path:
    """Pairs: the first 2048 rows of the training set (quick: 300 of the sample), negative column dropped."""
    rows = ctx.rows or ctx.pick(300, 2048)
    path = WORK / NAME / f"pairs-{ctx.mode}-{rows}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pq.read_table(ctx.pick(SAMPLE, FULL_TRAIN)).slice(0, rows)
        pq.write_table(table.drop([c for c in table.column_names if c.startswith("negative")]), path)
    return path


def static_student(ctx: Context) -> Path:
    """The static student: distilled from the real student (full), random over the tiny student's tokenizer (quick)."""
    from pipeline.static import make_static_student, static_record

    out = WORK / NAME / f"student-{ctx.mode}"
    init, dim = ctx.pick(("random", 32), ("distill", 256))
    shared = WORK / "quality-static" / "full" / "static-student"  # the same distillation, made by bench.quality.static
    record = static_record(shared) if not ctx.quick and shared.is_dir() else None
    if record and record["init"] == init and record["dim"] == dim and record["source"]["path"] == str(Path(ctx.student).resolve()):
        return shared
    record = static_record(out) if out.is_dir() else None
    if record is None or record["init"] != init or record["dim"] != dim:
        t0 = time.perf_counter()
        make_static_student(ctx.student, out, init=init, dim=dim, device="cpu", overwrite=True)
        print(f"static_step: {init} static student from {ctx.student} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def schedules(ctx: Context) -> dict[str, list[tuple[int, int, int]]]:
    """(batch, warm-up steps, timed steps) per configuration kind: the cheap static steps, the online guide."""
    steps = ctx.steps
    cheap = ctx.pick([(16, 1, 3), (64, 1, 3)], [(256, 2, 10), (1024, 2, 6), (2048, 2, 4)])
    online = ctx.pick([(16, 0, 1), (64, 0, 1)], [(256, 0, 1), (1024, 0, 1), (2048, 0, 1)])
    if steps:
        cheap = [(b, w, steps) for b, w, _ in cheap]
    return {"cheap": cheap, "online": online}


def ap_plans(first: Path, work: Path, sizes: list[int], most: int, rows: int) -> dict[int, Path]:
    """Masks of MNRL's candidates (ap only) for each batch size, re-planned from the guide pass `first`."""
    import cli

    masks = {}
    for size in sizes:
        out = work / f"plan-ap-b{size}"
        cli.plan_command(first, out=out, batch_size=size, epochs=math.ceil(most / (rows // size)), strategy="random",
                         contrast_anchors=False, contrast_positives=False, overwrite=True)
        masks[size] = out / "masks.parquet"
    return masks


def like_for_like(ctx: Context) -> dict:
    """MNRL against guided_ap only (no guide online), side by side in one run: `python -m bench.static_step
    --like-for-like` (its own guide pass over the same data)."""
    import cli

    data_path, student, work = data_file(ctx), static_student(ctx), ctx.work_dir(f"{NAME}-like-for-like")
    rows = pq.read_metadata(data_path).num_rows
    plan = schedules(ctx)["cheap"]
    sizes, most = [b for b, _, _ in plan], max(w + s for _, w, s in plan)
    first = work / f"guide-b{sizes[0]}"
    cli.precompute_guide(data_path, guide=str(ctx.guide), out=first, batch_size=sizes[0], epochs=math.ceil(most / (rows // sizes[0])), strategy="random")
    ap_masks = ap_plans(first, work, sizes, most, rows)
    records = []
    for size, warm, steps in plan:
        record = {"batch_size": size}
        for config in ("mnrl", "guided_ap"):
            result = run_isolated(measure, config, str(student), str(ctx.guide), str(data_path), str(ap_masks[size]), warm, steps)
            print(f"static_step b{size} {config}: {result['step_s']:.4f} s/step, +{result['memory']['increase_mb']:.0f} MB RssAnon", file=sys.stderr)
            record[f"{config}_step_s"], record[f"{config}_peak_mb"], record[f"{config}_run"] = round(result["step_s"], 4), result["memory"]["increase_mb"], result
        record["guided_ap_over_mnrl_time"] = round(record["guided_ap_step_s"] / record["mnrl_step_s"], 3)
        record["guided_ap_over_mnrl_memory"] = round(record["guided_ap_peak_mb"] / max(record["mnrl_peak_mb"], 0.1), 3)
        records.append(record)
    return {"student": str(student), "data": str(data_path), "rows": rows, "records": records}


def run(ctx: Context) -> dict:
    import cli

    data_path = data_file(ctx)
    student = static_student(ctx)
    rows = pq.read_metadata(data_path).num_rows
    work = ctx.work_dir(NAME)
    plan = schedules(ctx)
    sizes = [b for b, _, _ in plan["cheap"]]
    most = max(w + s for _, w, s in plan["cheap"])
    masks: dict[int, Path] = {}
    t0 = time.perf_counter()
    first = work / f"guide-b{sizes[0]}"
    cli.precompute_guide(data_path, guide=str(ctx.guide), out=first, batch_size=sizes[0], epochs=math.ceil(most / (rows // sizes[0])), strategy="random")
    stage1_s = time.perf_counter() - t0
    masks[sizes[0]] = first / "masks.parquet"
    for size in sizes[1:]:
        out = work / f"plan-b{size}"
        cli.plan_command(first, out=out, batch_size=size, epochs=math.ceil(most / (rows // size)), strategy="random", overwrite=True)
        masks[size] = out / "masks.parquet"
    ap_masks = ap_plans(first, work, sizes, most, rows)
    import json

    manifest = json.loads((first / "manifest.json").read_text())
    records = []
    for (size, warm, steps), (_, owarm, osteps) in zip(plan["cheap"], plan["online"]):
        record = {"batch_size": size}
        for config in CONFIGS:
            w, s = (owarm, osteps) if config == "online" else (warm, steps)
            chosen = ap_masks[size] if config == "guided_ap" else masks[size]
            result = run_isolated(measure, config, str(student), str(ctx.guide), str(data_path), str(chosen), w, s)
            print(f"static_step b{size} {config}: {result['step_s']:.4f} s/step, +{result['memory']['increase_mb']:.0f} MB RssAnon "
                  f"(load {result['load_avg_1m_after']:.1f})", file=sys.stderr)
            record[f"{config}_step_s"] = round(result["step_s"], 4)
            record[f"{config}_peak_mb"] = result["memory"]["increase_mb"]
            record[f"{config}_warmup_timed"] = [w, s]
            record[f"{config}_run"] = result
        record["online_guide_forward_s"] = round(record["online_run"]["guide_forward_s"], 3)
        record["guided_over_mnrl_time"] = round(record["guided_step_s"] / record["mnrl_step_s"], 3)
        record["guided_over_mnrl_memory"] = round(record["guided_peak_mb"] / max(record["mnrl_peak_mb"], 0.1), 3)
        record["guided_ap_over_mnrl_time"] = round(record["guided_ap_step_s"] / record["mnrl_step_s"], 3)
        record["guided_ap_over_mnrl_memory"] = round(record["guided_ap_peak_mb"] / max(record["mnrl_peak_mb"], 0.1), 3)
        record["online_over_guided_time"] = round(record["online_step_s"] / record["guided_step_s"], 1)
        record["guide_forward_over_guided_step"] = round(record["online_guide_forward_s"] / record["guided_step_s"], 1)
        saved = record["online_step_s"] - record["guided_step_s"]
        record["break_even_steps"] = round(stage1_s / saved, 2) if saved > 0 else None
        record["steps_per_epoch"] = rows // size
        record["targets_met"] = {f"{k} {op} {bound}": (record[k] <= bound if op == "<=" else record[k] >= bound) for k, (op, bound) in TARGETS.items()}
        records.append(record)
    return {
        "student": str(student), "student_source": str(ctx.student), "guide": str(ctx.guide), "data": str(data_path), "rows": rows,
        "unique_texts": manifest.get("counts", {}).get("texts") if isinstance(manifest.get("counts"), dict) else None,
        "stage1_s": round(stage1_s, 1), "stage1_timings": manifest.get("timings"),
        "definitions": {
            "step_s": "wall time from the end of the last warm-up step (online: the start of training) to the end of the last timed step, / timed steps",
            "peak_mb": "peak RssAnon (1 ms sampling) during trainer.train() minus RssAnon before it; one fresh process per configuration and batch size",
            "online": f"guide forward over the batch's anchors and positives (no gradient, chunks of {GUIDE_CHUNK}) + its similarity blocks + the guided step",
            "break_even_steps": "stage1_s / (online_step_s - guided_step_s): after this many steps the stored pass has cost less than the online guide",
            "stage1_s": "cli.precompute_guide over the data (every unique text once, index, plan, masks) at the first batch size; the other sizes re-planned",
        },
        "records": records,
    }


def table(result: dict) -> None:
    rows = []
    for r in result["records"]:
        missed = [k for k, ok in r["targets_met"].items() if not ok]
        rows.append([r["batch_size"], r["mnrl_step_s"], r["guided_step_s"], r["online_step_s"], r["online_guide_forward_s"],
                     r["mnrl_peak_mb"], r["guided_peak_mb"], r["online_peak_mb"], r["guided_over_mnrl_time"], r["guided_over_mnrl_memory"],
                     r["online_over_guided_time"], r["break_even_steps"], "yes" if not missed else "no: " + ", ".join(missed)])
    print_table(f"static_step ({result['mode']}): s/step and peak RssAnon MB added; stage 1 {result['stage1_s']} s",
                ["batch", "mnrl s", "guided s", "online s", "guide fwd s", "mnrl MB", "guided MB", "online MB", "guided/mnrl t",
                 "guided/mnrl mem", "online/guided t", "break-even steps", "targets met"], rows)


def device_run(work: Path, guide_dir: Path, device: str, quick: bool) -> dict:
    """The static-student configuration of bench/gpu_check.py: the same measurement on the GPU machine.

    No trained weights travel there, so the static student is random-init over all-MiniLM-L6-v2's
    tokenizer (256 dims: the distilled student's shape, hence its step cost) and the guide is gpu_check's
    random-weight mpnet; the data is the shipped 2000-row sample tiled to 4096 pairs (duplicate texts
    are encoded once by stage 1; the training steps are the same size). Batches 256, 1024, 2048 (quick: 16, 32).
    """
    import pyarrow as pa

    import cli
    from bench.common import ROOT
    from pipeline.static import make_static_student

    student = work / "static-student"
    make_static_student(ROOT / "bench" / "gpu_models" / "all-MiniLM-L6-v2", student, init="random", dim=256, overwrite=True)
    rows = 64 if quick else 4096
    table = pq.read_table(SAMPLE).select(["anchor", "positive"])
    table = pa.concat_tables([table] * math.ceil(rows / table.num_rows)).slice(0, rows)
    data_path = work / "static-pairs.parquet"
    pq.write_table(table, data_path)
    sizes = [16, 32] if quick else [256, 1024, 2048]
    warm, steps = (1, 2) if quick else (3, 10)
    start = time.perf_counter()
    first = work / "static-pass"
    cli.precompute_guide(data_path, guide=str(guide_dir), out=first, batch_size=sizes[0], epochs=math.ceil((warm + steps) / (rows // sizes[0])),
                         strategy="random", device=device, overwrite=True)
    result: dict = {"stage1_s": time.perf_counter() - start, "rows": rows, "records": []}
    masks = {sizes[0]: first / "masks.parquet"}
    for size in sizes[1:]:
        cli.plan_command(first, out=work / f"static-plan-b{size}", batch_size=size, epochs=math.ceil((warm + steps) / (rows // size)), strategy="random",
                         overwrite=True)
        masks[size] = work / f"static-plan-b{size}" / "masks.parquet"
    for size in sizes:
        record = {"batch_size": size}
        for config in CONFIGS:
            r = measure(config, str(student), str(guide_dir), str(data_path), str(masks[size]), warm, steps, device)
            record[config] = {k: r.get(k) for k in ("step_s", "cuda_peak_mb", "guide_forward_s")}
        record["guided_over_mnrl_time"] = record["guided"]["step_s"] / record["mnrl"]["step_s"]
        record["online_over_guided_time"] = record["online"]["step_s"] / record["guided"]["step_s"]
        saved = record["online"]["step_s"] - record["guided"]["step_s"]
        record["break_even_steps"] = result["stage1_s"] / saved if saved > 0 else None
        result["records"].append(record)
    return result


if __name__ == "__main__":
    import argparse

    from bench.common import ROOT, write_result

    parser = argparse.ArgumentParser(prog="python -m bench.static_step", description=like_for_like.__doc__.splitlines()[0])
    parser.add_argument("--like-for-like", action="store_true", required=True, help="MNRL vs guided_ap only, from a full run's guide pass")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models")
    args = parser.parse_args()
    context = Context("full", args.models.resolve(), None, None, None)
    started, load = time.perf_counter(), os.getloadavg()[0]
    write_result(f"{NAME}-like-for-like", context, like_for_like(context), started, load)

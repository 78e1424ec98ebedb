"""train_step: wall time and peak memory per optimizer step, MNRL vs GuidedMaskLoss vs online GISTEmbedLoss,
GuidedMaskLoss plus distillation from the stored guide pass (`--distill embed` / `kl`), and the three contrastive
losses under sentence-transformers' MatryoshkaLoss (`<loss>+matryoshka`, dims 384,256,128,64; 64,32,16,8 with the
tiny student of quick mode). MatryoshkaLoss calls the wrapped loss once per dimension: GISTEmbedLoss then runs its
guide once per dimension every step, GuidedMaskLoss reads the same stored masks each time.

Same student, same planned batches, same trainer (`pipeline.train.build_trainer` with the plan of
`PlannedMasks(...).plan`): only the loss differs. The masks come from stage 1
(`cli.precompute_guide`) on the 2000-row sample (its first 300 rows in quick mode) with the same
guide, strategy random.

Each (configuration, repetition) runs in a fresh process, so its peak memory is its own; the
order is interleaved (mnrl, guided, online, mnrl, guided, online, ...) and medians are reported.
Time per step is the wall time between the ends of consecutive optimizer steps after warm-up
(collation, forward, backward, optimizer step); `compute_s` is the same without collation.

The `+matryoshka` configurations run at the first batch size only (32 in full mode: the online guide then runs
four times a step). `python -m bench.train_step --full --configs matryoshka [--batch-size 32]` runs only those
configurations and the plain losses they are compared with, into `results/train_step-matryoshka.json`;
`train_step.json` keeps the run of every configuration.

Objectives (`<loss>@<objective>`, loss mnrl or guided): MultipleNegativesRankingLoss against GuidedMaskLoss with the
same `directions` / `partition_mode` / `hardness_mode` / `hardness_strength` (OBJECTIVES) and the same candidates: the
guided masks are re-planned with the blocks the objective uses (aa and pp only where query_to_query / doc_to_doc take
them, pa / pn planned), so both losses score the same blocks. `all` runs the GTE objective; `--configs objectives`
runs every objective against its MNRL, into `results/train_step-objectives.json`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq
from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss, MatryoshkaLoss, MultipleNegativesRankingLoss
from transformers import PrinterCallback, TrainerCallback

from bench.common import ROOT, Context, PeakMemory, median, print_table, run_isolated, write_result
from pipeline import guide as guide_mod
from pipeline import train
from pipeline.data import load_training_data
from pipeline.loss import GuidedMaskLoss
from pipeline.masks import MASKS, PlannedMasks

NAME = "train_step"
MATRYOSHKA = "+matryoshka"
ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
OBJECTIVES = {  # name -> MultipleNegativesRankingLoss / GuidedMaskLoss objective arguments
    "gte": dict(directions=ALL_DIRECTIONS),  # GTE's improved contrastive loss, one joint softmax
    "symmetric": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "lan": dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),  # Lan et al. 2025
    "gemma": dict(hardness_mode="hard_negatives", hardness_strength=5.0),  # EmbeddingGemma
    "gte-lan": dict(directions=ALL_DIRECTIONS, hardness_mode="in_batch_negatives", hardness_strength=9.0),
}
OBJECTIVE_CONFIGS = tuple(f"{loss}@{name}" for name in OBJECTIVES for loss in ("mnrl", "guided"))
CONFIGS = ("mnrl", "guided", "online", "guided+embed", "guided+kl", *(f"{c}{MATRYOSHKA}" for c in ("mnrl", "guided", "online")),
           "mnrl@gte", "guided@gte")
GROUPS = {"all": CONFIGS, "matryoshka": ("mnrl", "guided", "online", *(c for c in CONFIGS if c.endswith(MATRYOSHKA))),
          "objectives": ("mnrl", "guided", *OBJECTIVE_CONFIGS)}
ALL_CONFIGS = tuple(dict.fromkeys((*CONFIGS, *OBJECTIVE_CONFIGS)))
TEMPERATURE = 0.01  # GISTEmbedLoss's default; MNRL gets the same scale (1 / temperature)
MATRYOSHKA_DIMS = {"full": (384, 256, 128, 64), "quick": (64, 32, 16, 8)}  # the tiny student has 64 dims
TARGETS = {
    "guided_over_mnrl_time": ("<=", 1.05), "guided_over_mnrl_memory": ("<=", 1.05), "online_over_guided_time": (">=", 2.5),
    "matryoshka_guided_over_mnrl_time": ("<=", 1.05), "matryoshka_online_over_guided_time": (">=", 6.0),
    **{f"{name}_guided_over_mnrl_{m}": ("<=", 1.05) for name in OBJECTIVES for m in ("time", "memory")},
}


def objective_plan(name: str) -> dict:
    """The plan options whose masks give GuidedMaskLoss under objective `name` MNRL's candidates: aa / pp only where
    query_to_query / doc_to_doc use them (else GISTEmbedLoss's aa / pp would join query_to_doc), pa / pn planned."""
    directions = OBJECTIVES[name].get("directions", ("query_to_doc",))
    return dict(contrast_anchors="query_to_query" in directions, contrast_positives="doc_to_doc" in directions,
                contrast_doc_query=True, contrast_doc_negatives=True)


@dataclass(frozen=True)
class Schedule:
    """Steps per measured process at one batch size: warm-up steps (untimed), then timed steps."""

    batch_size: int
    warmup: int
    steps: int


def schedules(ctx: Context) -> list[Schedule]:
    # Quick runs two batch sizes once each so CI covers both stage 1 and re-planning (`gist plan`).
    # Full: batch 128 gets fewer steps (a step costs ~4x as much; the run should stay near 15 minutes).
    chosen = ctx.pick([Schedule(16, 1, 2), Schedule(32, 1, 2)], [Schedule(32, 2, 5), Schedule(128, 1, 3)])
    return [replace(s, steps=ctx.steps or s.steps) for s in chosen]


class StepClock(TrainerCallback):
    """Records when each optimizer step begins and ends (after `optimizer.step()` and the scheduler)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.begins: list[float] = []
        self.ends: list[float] = []

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(self._now())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self._now())


def measure(config: str, student: str, guide: str, data_path: str, masks_path: str, warmup: int, steps: int, dims: tuple[int, ...] = ()) -> dict:
    """Train `warmup + steps` planned steps with one loss in this (fresh) process; time and memory.
    A `+matryoshka` configuration wraps its loss in MatryoshkaLoss over `dims`."""
    masks = PlannedMasks(Path(masks_path))
    data = load_training_data(Path(data_path))
    model = guide_mod.load_model(student)
    matryoshka = config.endswith(MATRYOSHKA)
    config = config.removesuffix(MATRYOSHKA)
    loss_name, _, objective = config.partition("@")
    if objective:
        kwargs = OBJECTIVES[objective]
        loss = (MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, **kwargs) if loss_name == "mnrl"
                else GuidedMaskLoss(model, masks, temperature=TEMPERATURE, **kwargs))
    elif config == "mnrl":
        loss = MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE)
    elif config == "guided":
        loss = GuidedMaskLoss(model, masks, temperature=TEMPERATURE)
    elif config.startswith("guided+"):
        from pipeline.distill import DistilledLoss, GuideTeacher

        loss = DistilledLoss(GuidedMaskLoss(model, masks, temperature=TEMPERATURE), GuideTeacher.for_masks(masks), config.removeprefix("guided+"))
    else:
        p = masks.params
        loss = GISTEmbedLoss(
            model, guide_mod.load_model(guide, str(model.device)), temperature=TEMPERATURE, margin_strategy=p.margin_strategy,
            margin=p.margin, contrast_anchors=p.contrast_anchors, contrast_positives=p.contrast_positives,
        )
    if matryoshka:
        loss = MatryoshkaLoss(model, loss, matryoshka_dims=list(dims))
    cuda = model.device.type == "cuda"
    clock = StepClock(cuda)
    with tempfile.TemporaryDirectory() as out:
        trainer = train.build_trainer(
            model, data, masks, loss, Path(out), callbacks=[clock], max_steps=warmup + steps, save_strategy="no",
            logging_strategy="no", disable_tqdm=True, use_cpu=not cuda, seed=0,
        )
        trainer.remove_callback(PrinterCallback)  # it would print the final metrics between the tables
        with PeakMemory(cuda) as memory:
            trainer.train()
    timed = range(warmup, warmup + steps)
    return {
        "step_s": (clock.ends[-1] - clock.ends[warmup - 1]) / steps,
        "compute_s": median(clock.ends[i] - clock.begins[i] for i in timed),
        "memory": memory.report(),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),  # the machine is shared: what this configuration ran beside
    }


def guide_pass(ctx: Context, data_path: Path, plan: list[Schedule], objectives: tuple[str, ...] = ()) -> dict:
    """Stage 1 at the first batch size; the others re-planned from its embeddings (`gist plan`).

    Re-planning applies the same mask rule to the same guide embeddings, so the masks equal those of
    a stage-1 run at that batch size, without a second guide pass. Returns masks.parquet per batch size, and per
    (batch size, objective) for `objectives`, re-planned with `objective_plan`'s options.
    """
    import cli

    work = ctx.work_dir(NAME)
    rows = pq.read_metadata(data_path).num_rows
    first = work / f"guide-b{plan[0].batch_size}"
    masks = {}
    for schedule in plan:
        epochs = math.ceil((schedule.warmup + schedule.steps) / max(1, rows // schedule.batch_size))
        if schedule is plan[0]:
            cli.precompute_guide(data_path, guide=str(ctx.guide), out=first, batch_size=schedule.batch_size, epochs=epochs, strategy="random")
            masks[schedule.batch_size] = first / MASKS
        else:
            out = work / f"plan-b{schedule.batch_size}"
            cli.plan_command(first, out=out, batch_size=schedule.batch_size, epochs=epochs, strategy="random")
            masks[schedule.batch_size] = out / MASKS
        for name in objectives:
            out = work / f"plan-b{schedule.batch_size}-{name}"
            cli.plan_command(first, out=out, batch_size=schedule.batch_size, epochs=epochs, strategy="random", **objective_plan(name))
            masks[(schedule.batch_size, name)] = out / MASKS
    return masks


RATIOS = {  # name -> (numerator, denominator): config and "step_s" or "peak_mb"
    "guided_over_mnrl_time": ("guided_step_s", "mnrl_step_s"), "guided_over_mnrl_memory": ("guided_peak_mb", "mnrl_peak_mb"),
    "online_over_guided_time": ("online_step_s", "guided_step_s"),
    **{f"distill_{k}_over_guided_{m}": (f"guided+{k}_{u}", f"guided_{u}") for k in ("embed", "kl") for m, u in (("time", "step_s"), ("memory", "peak_mb"))},
    "matryoshka_guided_over_mnrl_time": (f"guided{MATRYOSHKA}_step_s", f"mnrl{MATRYOSHKA}_step_s"),
    "matryoshka_guided_over_mnrl_memory": (f"guided{MATRYOSHKA}_peak_mb", f"mnrl{MATRYOSHKA}_peak_mb"),
    "matryoshka_online_over_guided_time": (f"online{MATRYOSHKA}_step_s", f"guided{MATRYOSHKA}_step_s"),
    "matryoshka_online_over_mnrl_time": (f"online{MATRYOSHKA}_step_s", f"mnrl{MATRYOSHKA}_step_s"),
    **{f"matryoshka_over_plain_{c}_time": (f"{c}{MATRYOSHKA}_step_s", f"{c}_step_s") for c in ("mnrl", "guided", "online")},
    **{f"{name}_guided_over_mnrl_{m}": (f"guided@{name}_{u}", f"mnrl@{name}_{u}") for name in OBJECTIVES for m, u in (("time", "step_s"), ("memory", "peak_mb"))},
}


def summarize(schedule: Schedule, runs: dict[str, list[dict]]) -> dict:
    """Medians per configuration run, the ratios (and targets) whose configurations were run."""
    configs = [c for c in ALL_CONFIGS if c in runs]
    record = {"batch_size": schedule.batch_size, "warmup_steps": schedule.warmup, "timed_steps": schedule.steps, "repetitions": len(runs[configs[0]])}
    for config in configs:
        record[f"{config}_step_s"] = round(median(r["step_s"] for r in runs[config]), 4)
        record[f"{config}_compute_s"] = round(median(r["compute_s"] for r in runs[config]), 4)
        record[f"{config}_peak_mb"] = round(median(r["memory"]["increase_mb"] for r in runs[config]), 1)
        record[f"{config}_resident_before_mb"] = round(median(r["memory"]["before_mb"] for r in runs[config]), 1)
    for name, (numerator, denominator) in RATIOS.items():
        if numerator in record and denominator in record:
            record[name] = round(record[numerator] / record[denominator], 3)
    record["targets_met"] = {
        f"{key} {op} {bound}": (record[key] <= bound if op == "<=" else record[key] >= bound) for key, (op, bound) in TARGETS.items() if key in record
    }
    record["runs"] = {config: runs[config] for config in configs}
    return record


def run(ctx: Context, configs: tuple[str, ...] = CONFIGS, batch_sizes: tuple[int, ...] = ()) -> dict:
    """Every configuration of `configs` at every schedule (those of `batch_sizes`, if given), interleaved."""
    data_path = ctx.sample(quick_rows=300)
    plan = [s for s in schedules(ctx) if not batch_sizes or s.batch_size in batch_sizes]
    objectives = tuple(dict.fromkeys(c.partition("@")[2] for c in configs if "@" in c))
    masks = guide_pass(ctx, data_path, plan, objectives)
    reps = ctx.repetitions(1, 3)
    dims = MATRYOSHKA_DIMS[ctx.mode]
    # Under MatryoshkaLoss the online guide runs once per dimension: those configurations only at the first batch size.
    runs = {(s.batch_size, c): [] for s in plan for c in configs if s is plan[0] or not c.endswith(MATRYOSHKA)}
    for rep in range(reps):
        for s in plan:
            for config in (c for c in configs if (s.batch_size, c) in runs):
                masks_path = masks[(s.batch_size, config.partition("@")[2])] if "@" in config else masks[s.batch_size]
                result = run_isolated(measure, config, str(ctx.student), str(ctx.guide), str(data_path), str(masks_path), s.warmup, s.steps, dims)
                runs[(s.batch_size, config)].append(result)
                print(f"train_step b{s.batch_size} {config} rep {rep + 1}/{reps}: {result['step_s']:.3f} s/step, "
                      f"+{result['memory']['increase_mb']:.0f} MB (load {result['load_avg_1m_after']:.1f})", file=sys.stderr)
    return {
        "student": str(ctx.student),
        "guide": str(ctx.guide),
        "data": str(data_path),
        "rows": pq.read_metadata(data_path).num_rows,
        "configs": list(configs),
        "matryoshka_dims": list(dims),
        "masks_source": f"stage 1 (cli.precompute_guide, strategy random) at batch {plan[0].batch_size}; other batch sizes "
        "re-planned from its embeddings with cli.plan_command (same embeddings and mask rule, hence the same masks)",
        "definitions": {
            "step_s": "median over repetitions of (wall time from the end of the last warm-up step to the end of the last timed step) / timed steps",
            "compute_s": "median of on_step_begin -> on_step_end (excludes the dataloader's collation/tokenization)",
            "peak_mb": "median peak increase during trainer.train() over the memory before it (models loaded): "
            "RSS high-water mark on CPU, torch.cuda.max_memory_allocated on GPU; one fresh process per (config, repetition)",
            "resident_before_mb": "memory before training, models loaded; safetensors weights are memory-mapped and become resident "
            "when first used, so on CPU the online guide's weights show up in online_peak_mb rather than here",
            "mnrl": "MultipleNegativesRankingLoss, scale 1/temperature, candidates ap + an",
            "guided": "GuidedMaskLoss with stored masks, candidates ap + aa + pp + an",
            "online": "GISTEmbedLoss with the guide loaded, same plan parameters as the masks",
            "guided+embed / guided+kl": "DistilledLoss: GuidedMaskLoss + 1.0 x EmbedDistillLoss (projection to the guide's dim) or the "
            "in-batch KL to the guide's score distribution, teacher embeddings looked up from the stored pass",
            "<loss>@<objective>": "MultipleNegativesRankingLoss / GuidedMaskLoss with the objective arguments of `objectives`; the guided "
            "masks re-planned so both score the same blocks (aa / pp only where query_to_query / doc_to_doc use them; pa, pn planned)",
            "<loss>+matryoshka": "sentence-transformers MatryoshkaLoss(model, <loss>, matryoshka_dims) with every dimension each step: "
            "one student forward (cached by MatryoshkaLoss), the wrapped loss once per dimension; GISTEmbedLoss's guide runs inside it, once per dimension",
        },
        "objectives": {name: {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()} for name, kwargs in OBJECTIVES.items()},
        "records": [summarize(s, {c: runs[(s.batch_size, c)] for c in configs if (s.batch_size, c) in runs}) for s in plan],
    }


def table(result: dict) -> None:
    def show(title: str, configs: tuple[str, ...], header: list[str], row) -> None:
        shown = [r for r in result["records"] if set(configs) <= set(r["runs"])]
        if shown:
            print_table(title, header, [row(r) for r in shown])

    def met(r: dict, matryoshka: bool) -> str:
        missed = [k for k, ok in r["targets_met"].items()
                  if k.startswith("matryoshka") == matryoshka and k.split("_guided_over")[0] not in OBJECTIVES and not ok]
        return "no: " + ", ".join(missed) if missed else "yes"

    show(f"train_step ({result['mode']}): s/step and peak MB added, medians", ("mnrl", "guided", "online"),
         ["batch", "mnrl s", "guided s", "online s", "mnrl MB", "guided MB", "online MB", "guided/mnrl t", "guided/mnrl mem", "online/guided t", "targets met"],
         lambda r: [r["batch_size"], r["mnrl_step_s"], r["guided_step_s"], r["online_step_s"], r["mnrl_peak_mb"], r["guided_peak_mb"], r["online_peak_mb"],
                    r["guided_over_mnrl_time"], r["guided_over_mnrl_memory"], r["online_over_guided_time"], met(r, False)])
    show("distillation from the stored pass, against GuidedMaskLoss alone", ("guided", "guided+embed", "guided+kl"),
         ["batch", "+embed s", "+kl s", "+embed MB", "+kl MB", "embed/guided t", "kl/guided t", "embed/guided mem", "kl/guided mem"],
         lambda r: [r["batch_size"], r["guided+embed_step_s"], r["guided+kl_step_s"], r["guided+embed_peak_mb"], r["guided+kl_peak_mb"],
                    r["distill_embed_over_guided_time"], r["distill_kl_over_guided_time"], r["distill_embed_over_guided_memory"], r["distill_kl_over_guided_memory"]])
    for name in OBJECTIVES:
        show(f"objective {name} {OBJECTIVES[name]}: GuidedMaskLoss against MNRL with the same objective", (f"mnrl@{name}", f"guided@{name}"),
             ["batch", "mnrl s", "guided s", "mnrl MB", "guided MB", "guided/mnrl t", "guided/mnrl mem"],
             lambda r, n=name: [r["batch_size"], r[f"mnrl@{n}_step_s"], r[f"guided@{n}_step_s"], r[f"mnrl@{n}_peak_mb"], r[f"guided@{n}_peak_mb"],
                                r[f"{n}_guided_over_mnrl_time"], r[f"{n}_guided_over_mnrl_memory"]])
    dims = ",".join(map(str, result.get("matryoshka_dims", ())))
    show(f"under MatryoshkaLoss (dims {dims}): s/step and peak MB added, medians", tuple(f"{c}{MATRYOSHKA}" for c in ("mnrl", "guided", "online")),
         ["batch", "mnrl s", "guided s", "online s", "mnrl MB", "guided MB", "online MB", "guided/mnrl t", "guided/mnrl mem", "online/guided t", "online/mnrl t", "targets met"],
         lambda r: [r["batch_size"], *(r[f"{c}{MATRYOSHKA}_{u}"] for u in ("step_s", "peak_mb") for c in ("mnrl", "guided", "online")),
                    r["matryoshka_guided_over_mnrl_time"], r["matryoshka_guided_over_mnrl_memory"], r["matryoshka_online_over_guided_time"],
                    r["matryoshka_online_over_mnrl_time"], met(r, True)])


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.train_step --quick|--full --configs all|matryoshka [--batch-size N ...]`: some configurations
    only, into results/train_step-<configs>.json (with --configs all, train_step.json as `python -m bench` writes)."""
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--configs", choices=GROUPS, default="all")
    parser.add_argument("--batch-size", type=int, action="append", default=[], help="only these batch sizes (repeatable)")
    for hidden in ("--reps", "--steps", "--rows"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ctx = Context(args.mode, args.models.resolve(), args.reps, args.steps, args.rows)
    name = NAME if args.configs == "all" else f"{NAME}-{args.configs}"
    started, load = time.perf_counter(), os.getloadavg()[0]
    table(write_result(name, ctx, run(ctx, GROUPS[args.configs], tuple(args.batch_size)), started, load))


if __name__ == "__main__":
    main()

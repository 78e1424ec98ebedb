"""Does guidance help a static student? `python -m bench.quality.static [--quick] [--resume]`.

A static-embedding student (model2vec distillation of all-MiniLM-L6-v2, 256 dims: `gist static-student
--init distill`) fine-tuned with MultipleNegativesRankingLoss and with the stored guide masks
(`StaticGuidedMaskLoss`) on the same planned batches, three plan seeds, evaluated on SciFact test (nDCG@10)
and STS-B test (Spearman) with the statistics of `bench.quality.stats`; the distilled model before training
is the base.

Settings, fixed before any result was seen (`SETTINGS`): the data, guide and guide pass of the transformer
quality benchmark (`bench.quality.experiment`: 2204 pairs, all-mpnet-base-v2 at max_seq_length 128, by-task
plan, margin 0, GISTEmbedLoss's candidates ap/aa/pp and exact rule); the optimisation from
sentence-transformers' static-embedding recipe (blog "Train 400x faster Static Embedding Models": lr 2e-1,
warm-up ratio 0.1, linear decay, one epoch, MNRL's default scale 20 = temperature 0.05, batch 2048) with
the batch adapted to the data: 2204 pairs give one batch of 2048, so batches of 256 (7 by-task steps).
Seeds are plan seeds (the batches and their order): a static model has no dropout and the distilled
start is deterministic, so trainer seeds alone would train identical models. MatryoshkaLoss, which the
recipe wraps around MNRL, is left out to compare the two signals alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.common import RESULTS, ROOT, WORK, machine_info, print_table  # noqa: E402
from bench.quality import phases, stats  # noqa: E402
from bench.quality.experiment import build_training_set, make_settings  # noqa: E402

NAME = "quality-static"
VARIANTS = ("mnrl", "guided")
SEEDS = (0, 1, 2)
SETTINGS = dict(batch_size=256, epochs=1, learning_rate=0.2, warmup_ratio=0.1, lr_scheduler="linear", temperature=0.05)
STATIC_DIM = 256  # model2vec's default PCA dimensions
NOTES = [
    "settings fixed before any result was seen: data, guide and plan rule from the transformer quality benchmark; lr 2e-1, warm-up 0.1, "
    "linear decay, one epoch and scale 20 (temperature 0.05) from sentence-transformers' static-embedding recipe; its batch of 2048 "
    "adapted to 2204 pairs as 256 (2048 would be one step); nothing tuned on a test split",
    "seeds are plan seeds (batches and order re-planned from the one guide pass with `gist plan --seed`); a static model has no dropout",
    "MatryoshkaLoss (part of the recipe) left out: the comparison is MNRL vs the guide's masks alone",
]


def log(message: str) -> None:
    print(f"[quality-static] {message}", file=sys.stderr, flush=True)


def cached(work: Path, name: str, key: dict, compute, resume: bool):
    """A phase's (result, details), reused with --resume while its key is unchanged."""
    path = work / "phases" / f"{name}.json"
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            log(f"{name}: reusing the finished phase")
            return saved["result"], saved["details"]
    result, details = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "result": result, "details": details}))
    return result, details


def run(quick: bool, models: Path, seeds: list[int], resume: bool) -> dict:
    import torch

    from pipeline import train
    from pipeline.data import load_training_data
    from pipeline.guide import load_model
    from pipeline.masks import PlannedMasks
    from pipeline.stage1 import replan
    from pipeline.static import make_static_student, static_record

    from bench.quality.evaluation import evaluate

    t_start = time.perf_counter()
    base_settings = make_settings(quick, models)
    s = replace(base_settings, **(dict(SETTINGS, batch_size=64) if quick else SETTINGS))
    work = WORK / NAME / s.mode
    work.mkdir(parents=True, exist_ok=True)
    data_path, data_info = build_training_set(s, work)
    student_dir = work / "static-student"
    dim = 16 if quick else STATIC_DIM
    record = static_record(student_dir) if student_dir.is_dir() else None
    if record is None or record["dim"] != dim or record["source"]["path"] != str(Path(s.student).resolve()):
        log(f"gist static-student {s.student} --init distill --dim {dim}")
        t0 = time.perf_counter()
        make_static_student(s.student, student_dir, init="distill", dim=dim, device="cpu", overwrite=True)
        log(f"distilled in {time.perf_counter() - t0:.0f} s")
    pass_dir = phases.guide_pass(s, data_path, work / "guide")
    plans = {}
    for seed in seeds:
        if seed == s.plan_seed:
            plans[seed] = pass_dir
            continue
        out = work / "plans" / f"seed{seed}"
        if not phases._matches(out, replace(s, plan_seed=seed), s.stage1_strategy, load_training_data(data_path).fingerprint):
            log(f"gist plan --seed {seed}")
            replan(pass_dir, out, phases.plan_params(replace(s, plan_seed=seed), s.stage1_strategy), overwrite=True)
        plans[seed] = out
    training = load_training_data(data_path)
    student_sha = static_record(student_dir)["source"].get("sha256")

    def base():
        metrics, eval_s, details = evaluate(s.sts, s.beir, load_model(str(student_dir), "cpu"))
        return {"metrics": metrics, "eval_s": eval_s}, details

    key_common = {"settings": asdict(replace(s, notes=[])), "student": student_sha, "dim": dim}
    base_result, base_details = cached(work, "base", {**key_common, "phase": "base"}, base, resume)

    def train_one(variant: str, seed: int):
        masks = PlannedMasks(plans[seed] / "masks.parquet")
        model = load_model(str(student_dir), "cpu")
        settings = train.TrainSettings(loss=variant, lr=s.learning_rate, warmup_ratio=s.warmup_ratio, lr_scheduler=s.lr_scheduler,
                                       temperature=s.temperature, seed=seed)
        loss = train.build_loss(model, masks, settings)
        out = work / "runs" / variant / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        trainer = train.build_trainer(model, training, masks, loss, out, learning_rate=s.learning_rate, warmup_steps=s.warmup_ratio,
                                      lr_scheduler_type=s.lr_scheduler, logging_steps=1, save_strategy="no", seed=seed, use_cpu=True,
                                      disable_tqdm=True)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        model.save(str(out / "final"))
        metrics, eval_s, details = evaluate(s.sts, s.beir, model)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        return {"variant": variant, "seed": seed, "loss": type(loss).__name__, "metrics": metrics, "steps": trainer.state.global_step,
                "train_s": round(train_s, 2), "eval_s": eval_s, "train_loss_first": losses[0] if losses else None,
                "train_loss_last": losses[-1] if losses else None, "masks": str(plans[seed] / "masks.parquet")}, details

    runs = {v: [] for v in VARIANTS}
    details = {v: [] for v in VARIANTS}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for seed in seeds:
        for variant in VARIANTS:
            log(f"training {variant}, plan seed {seed}")
            result, detail = cached(work, f"{variant}.seed{seed}", {**key_common, "variant": variant, "seed": seed,
                                                                   "masks": str(plans[seed])}, lambda: train_one(variant, seed), resume)
            runs[variant].append(result)
            details[variant].append(detail)
    comparisons = {
        "guided_vs_mnrl": {"question": "guided vs MNRL on the same planned batches", **stats.compare(details["mnrl"], details["guided"])},
        **{f"{v}_vs_base": {"question": f"{v} vs the distilled model before training", **stats.compare([base_details], details[v])} for v in VARIANTS},
    }
    return {
        "benchmark": NAME, "mode": s.mode, "command": "python -m bench.quality.static" + (" --quick" if quick else ""),
        "question": "does guidance help a static-embedding student? MNRL vs the stored guide masks, same planned batches",
        "student": {"source": s.student, "init": "model2vec distillation (gist static-student --init distill)", "dim": dim,
                    "record": static_record(student_dir)},
        "settings": {k: v for k, v in asdict(s).items() if k != "notes"}, "seeds": seeds, "seed_kind": "plan seed",
        "data": {"train": data_info, "eval": {"sts": s.sts, "beir": s.beir}},
        "plans": {seed: phases_summary(plans[seed]) for seed in seeds},
        "base": base_result, "runs": runs, "summary": {v: stats.spread(runs[v]) for v in VARIANTS}, "comparisons": comparisons,
        "statistics": stats.__doc__.strip(), "notes": NOTES + list(base_settings.notes),
        "wall_s_this_invocation": round(time.perf_counter() - t_start, 1),
        "machine": {**machine_info(), "shared_cpu": "other work shared the CPU"},
    }


def phases_summary(plan_dir: Path) -> dict:
    from pipeline.artifacts import read_manifest

    plan = read_manifest(plan_dir)["plan"]
    return {"dir": str(plan_dir), "steps_per_epoch": plan["steps_per_epoch"], "masked_fraction": plan["masked_fraction"]}


def table(result: dict) -> None:
    def cell(spread: dict) -> str:
        return f"{spread['mean']:.4f}" + (f" ± {spread['sd']:.4f}" if spread["sd"] is not None else "")

    base = result["base"]["metrics"]
    rows = [["distilled, before training", f"{base['beir_ndcg@10']:.4f}", f"{base['sts_spearman']:.4f}", "–"]]
    for v, sp in result["summary"].items():
        rows.append([v, cell(sp["beir_ndcg@10"]), cell(sp["sts_spearman"]), len(result["runs"][v])])
    print_table(f"quality, static student ({result['mode']}): mean ± sd over plan seeds", ["student", "SciFact nDCG@10", "STS-B Spearman", "seeds"], rows)
    rows = [[name.replace("_vs_", " − "), *(f"{c[m]['delta']:+.4f} [{c[m]['ci95'][0]:+.4f}, {c[m]['ci95'][1]:+.4f}] {stats.judgement(c[m])}"
                                            for m in stats.METRICS)] for name, c in result["comparisons"].items()]
    print_table("paired differences, 95% CI over test items and plan seeds", ["B − A", "Δ SciFact nDCG@10", "Δ STS-B Spearman"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality.static", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (a wiring check, not a result)")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--seeds", default=None, metavar="S[,S]", help="plan seeds (default 0,1,2)")
    parser.add_argument("--resume", action="store_true", help="reuse finished phases with the same settings")
    args = parser.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(SEEDS)
    result = run(args.quick, args.models.resolve(), seeds, args.resume)
    from bench.quality.__main__ import write_results

    write_results((WORK / NAME / "quick" / f"{NAME}.json") if args.quick else RESULTS / f"{NAME}.json", result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

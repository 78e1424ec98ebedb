"""`python -m bench.quality`: run the experiment's phases for one plan, write the results, print the tables."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CPU is shared with other work: OpenMP threads that spin while waiting made encoding ~2x slower
# than one thread under load here; passive waiting keeps both cores' benefit without that penalty.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from bench.common import RESULTS, ROOT, WORK, machine_info, print_table  # noqa: E402
from bench.quality import NAME, phases, stats  # noqa: E402
from bench.quality.experiment import SEEDS, VARIANTS, Settings, build_training_set, make_settings  # noqa: E402

# B minus A, each a question the experiment asks (computed when both were trained).
QUESTIONS = {
    ("mnrl", "guided"): "guided vs MNRL: what the shipped loss buys",
    ("unguided", "guided"): "guidance alone: the same candidates, with and without the guide's vetoes",
    ("mnrl", "unguided"): "extra candidates alone (aa, pp), no guidance",
    ("guided", "guided+filter"): "consistency filtering on top of guidance",
    ("guided", "guided+distill"): "KL distillation on top of guidance",
    ("guided", "guided+dedup"): "exact duplicates masked by text id on top of guidance",
    ("mnrl", "guided+dedup"): "guided with duplicate masking vs MNRL",
    ("guided", "guided+e5-guide"): "E5-style prompts given to a guide trained without prompts",
    ("mnrl+hardness", "guided+hardness"): "guidance vs MNRL, both with hardness weighting of in-batch negatives (alpha 9)",
    ("guided", "guided+hardness"): "hardness weighting of in-batch negatives (alpha 9) on top of guidance",
}


def strict_json(obj):
    """`obj` with every non-finite float replaced by None, so the file is standard JSON."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def plan_summary(plan_dir: Path) -> dict:
    from pipeline.artifacts import read_manifest

    plan = read_manifest(plan_dir)["plan"]
    return {"dir": str(plan_dir), "steps_per_epoch": plan["steps_per_epoch"], "num_batches": plan["num_batches"],
            "masked_fraction": plan["masked_fraction"], "masked_entries": plan["masked_entries"],
            "duplicate_entries": plan["duplicate_entries"], "mask_duplicates": plan["params"]["mask_duplicates"]}


def run(s: Settings, work: Path, strategy: str, variants: list[str], seeds: list[int], resume: bool) -> dict:
    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    done = phases.Phases(work, resume)
    data_path, data_info = build_training_set(s, work)
    pass_dir = phases.guide_pass(s, data_path, work / "guide")
    # (filtered, dedup, guide prompts) -> (training data, plan directory)
    plans = {(False, False, None): (data_path, phases.plan(s, pass_dir, strategy))}
    if any(VARIANTS[v].dedup for v in variants):
        plans[(False, True, None)] = (data_path, phases.plan(s, pass_dir, strategy, dedup=True))
    for prompts in {VARIANTS[v].guide_prompts for v in variants} - {None}:  # a pass of its own: other views, other vectors
        prompted_pass = phases.guide_pass(s, data_path, work / "guide-prompted" / hashlib.sha256(prompts.encode()).hexdigest()[:12], guide_prompts=prompts)
        plans[(False, False, prompts)] = (data_path, phases.plan(s, prompted_pass, strategy))
    filter_summary = None
    if any(VARIANTS[v].filtered for v in variants):
        clean, filter_summary = phases.filtered_data(s, pass_dir, work)
        filtered_pass = phases.guide_pass(s, clean, work / "filtered" / "guide", reuse=(pass_dir,))
        plans[(True, False, None)] = (clean, phases.plan(s, filtered_pass, strategy))
    base, base_details = phases.base_run(s, done)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    details: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in seeds:  # every variant of a seed before the next seed: a partial run is already a comparison
        for name in variants:
            variant = VARIANTS[name]
            data, plan_dir = plans[(variant.filtered, variant.dedup, variant.guide_prompts)]
            result, detail = phases.train_run(s, variant, seed, data, plan_dir / "masks.parquet",
                                              work / "runs" / strategy / name / f"seed{seed}", done)
            runs[name].append(result)
            details[name].append(detail)

    comparisons = {f"{v}_vs_base": stats.compare([base_details], details[v]) for v in variants}
    for (a, b), question in QUESTIONS.items():
        if a in variants and b in variants:
            comparisons[f"{b}_vs_{a}"] = {"question": question, **stats.compare(details[a], details[b])}
    summary = {v: stats.spread(runs[v]) for v in variants}
    best = max(variants, key=lambda v: summary[v]["beir_ndcg@10"]["mean"])
    for other in variants:
        if other != best and f"{best}_vs_{other}" not in comparisons and f"{other}_vs_{best}" not in comparisons:
            comparisons[f"{best}_vs_{other}"] = {"question": f"the best SciFact configuration ({best}) against {other}",
                                                 **stats.compare(details[other], details[best])}
    command = "python -m bench.quality" + (" --quick" if s.mode == "quick" else "") + f" --plan {strategy}"
    return {
        "benchmark": NAME, "mode": s.mode, "command": command, "plan_strategy": strategy,
        "question": "same plan, same hyper-parameters, several trainer seeds: which signal of the guide pass trains the best student?",
        "settings": {k: v for k, v in vars(s).items() if k != "notes"}, "variants": {v: vars(VARIANTS[v]) for v in variants}, "seeds": seeds,
        "data": {"train": data_info, "eval": {"sts": s.sts, "beir": s.beir, "beir_split": "qrels/test.tsv"}},
        "plans": {name: plan_summary(plans[key][1]) for key, name in
                  (((False, False, None), "unfiltered"), ((False, True, None), "dedup"), ((True, False, None), "filtered"),
                   *(((False, False, p), f"guide prompts {p!r}") for p in {VARIANTS[v].guide_prompts for v in variants} - {None})) if key in plans},
        "filter": filter_summary and {k: filter_summary[k] for k in ("params", "examples", "kept", "dropped", "per_task", "rank_quantiles")},
        "base": base, "runs": runs, "summary": summary, "best_scifact": best, "comparisons": comparisons,
        "statistics": stats.__doc__.strip(), "notes": s.notes,
        "wall_s_this_invocation": round(time.perf_counter() - t_start, 1),
        "machine": {**machine_info(), "shared_cpu": "other work shared the CPU; timings are approximate"},
    }


def table(result: dict) -> None:
    def cell(spread: dict) -> str:
        return f"{spread['mean']:.4f}" + (f" ± {spread['sd']:.4f}" if spread["sd"] is not None else "")

    base = result["base"]["metrics"]
    rows = [["base", f"{base['beir_ndcg@10']:.4f}", f"{base['beir_mrr@10']:.4f}", f"{base['sts_spearman']:.4f}", "–"]]
    for v, sp in result["summary"].items():
        rows.append([v, cell(sp["beir_ndcg@10"]), cell(sp["beir_mrr@10"]), cell(sp["sts_spearman"]), len(result["runs"][v])])
    fn = result["plans"]["unfiltered"]["masked_fraction"]
    print_table(f"quality ({result['mode']}, {result['plan_strategy']} plan, ap FN rate {fn['ap']:.2%}): mean ± sd over seeds",
                ["student", "SciFact nDCG@10", "SciFact MRR@10", "STS-B Spearman", "seeds"], rows)
    rows = []
    for name, c in result["comparisons"].items():
        if name.endswith("_vs_base"):
            continue
        rows.append([name.replace("_vs_", " − "), *(f"{c[m]['delta']:+.4f} [{c[m]['ci95'][0]:+.4f}, {c[m]['ci95'][1]:+.4f}] {stats.judgement(c[m])}"
                                                   for m in stats.METRICS)])
    print_table("paired differences, 95% CI over test items and seeds", ["B − A", "Δ SciFact nDCG@10", "Δ STS-B Spearman"], rows)


def main(argv: list[str] | None = None) -> int:
    from pipeline.plan import STRATEGIES

    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=(__import__("bench.quality").quality.__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and the small sample, 2 seeds (< 2 min): a wiring check")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models", help="directory with all-MiniLM-L6-v2 and all-mpnet-base-v2")
    parser.add_argument("--plan", default="by-task", choices=STRATEGIES, help="the training plan (by-task: the guide pass's own; others re-planned from it)")
    parser.add_argument("--variants", default=",".join(VARIANTS), metavar="V[,V]", help=f"from {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--seeds", default=None, metavar="S[,S]", help="trainer seeds (default 0,1,2; quick 0,1)")
    parser.add_argument("--resume", action="store_true", help="reuse finished phases with the same settings")
    parser.add_argument("--out", type=Path, default=None, help="results file (full: bench/results/quality-PLAN.json)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants: a comma-separated subset of {', '.join(VARIANTS)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list((0, 1) if args.quick else SEEDS)
    except ValueError:
        parser.error("--seeds: comma-separated integers")
    s = make_settings(args.quick, args.models)
    work = WORK / NAME / s.mode
    result = run(s, work, args.plan, [v for v in VARIANTS if v in variants], seeds, args.resume)
    write_results(args.out or (work / f"quality-{args.plan}.json" if args.quick else RESULTS / f"{NAME}-{args.plan}.json"), result, table)
    return 0


def write_results(out: Path, result: dict, print_table) -> None:
    """Write a quality run's result as strict JSON to `out` and print its tables."""
    from pipeline.artifacts import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, strict_json(result))
    print_table(result)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

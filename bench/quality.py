"""quality: does offline guidance (GuidedMaskLoss + stage-1 masks) train a better student than MNRL?

`python -m bench.quality [--quick]` fine-tunes the student twice on exactly the same planned
batches (one stage-1 plan, replayed by `pipeline.train.build_trainer`), with the same
hyper-parameters, changing only the loss:

- mnrl:   sentence-transformers `MultipleNegativesRankingLoss`, scale = 1 / temperature;
- guided: `pipeline.loss.GuidedMaskLoss` reading the masks that `gist precompute-guide`
          (`cli.precompute_guide`, stage 1) wrote with the guide.

and evaluates the untrained student (base), mnrl and guided with `pipeline.evaluate.evaluate_model`
on SciFact test (BEIR, nDCG@10) and STS-B test (Spearman). It also reports the false-negative rate
the guide found in that plan (the stage-1 manifest's `plan.masked_fraction` / `masked_entries`) and
a breakdown of the masked `ap` candidates (same anchor text, same positive text, other).

Full mode (real models; ~30-45 min on 2 CPU cores):
- student all-MiniLM-L6-v2, guide all-mpnet-base-v2 (from --models, default .cache/models);
- training data: written to bench/.work/quality/full/train.parquet from the shared
  train_pairs.parquet: every `scifact` pair (916 train claim -> cited abstract; in-domain for the
  SciFact evaluation, train claims only), every `scitail` pair (839; 169 hypotheses with up to 38
  entailing premises each, so by-task batches hold many true false negatives) and 448 `snli` pairs
  taken as whole premise groups from premises with >= 2 entailment hypotheses (general domain,
  for STS; seed 0). Batches by task (`--strategy by-task`), batch 32, 3 epochs.
- max_seq_length: student 128 (training and evaluation, so SciFact abstracts are truncated to
  ~128 word pieces: title and first sentences), guide 256. On this CPU budget 256 for the student
  would double training and SciFact evaluation time; all three models are evaluated alike.
- hyper-parameters fixed a priori, never tuned on a test split: lr 2e-5, linear warm-up 10% then
  linear decay, temperature 0.01 (MNRL scale 100), absolute margin 0.0, contrast_anchors and
  contrast_positives on (GISTEmbedLoss defaults), trainer seed 0, plan seed 0, fp32.
- writes bench/results/quality.json and prints a table.

Quick mode (`--quick`, < 60 s): tiny-student, tiny-guide-static as the guide (stage 1 only needs
`encode`), the 2000-triplet sample data/train.parquet, data/stsb_dev.parquet and data/scifact;
20 steps. It checks the wiring, its numbers mean nothing; it writes
bench/.work/quality/quick/quality.json (not the results file) unless --out is given.

Phase results are kept in the work directory; `--resume` reuses those whose configuration matches
(the stage-1 pass, the base evaluation, a finished loss), so an interrupted full run can continue.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CPU is shared with other work: OpenMP threads that spin while waiting made encoding ~2x slower
# than one thread under load here; passive waiting keeps both cores' benefit without that penalty.
# (Takes effect only if torch was not imported before this module.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import RESULTS, ROOT, SHARED, WORK, machine_info, print_table  # noqa: E402

NAME = "quality"
LOSSES = ("mnrl", "guided")


@dataclass
class Config:
    mode: str
    student: str
    guide: str
    train_source: str
    sts: str
    beir: str
    selection: dict | None  # task -> "all" | at least this many rows (whole anchor groups); None: the first head_rows rows of train_source
    student_max_seq_length: int
    guide_max_seq_length: int | None  # None: the guide's own setting
    batch_size: int = 32
    epochs: int = 3
    plan_seed: int = 0
    strategy: str = "by-task"
    margin_strategy: str = "absolute"
    margin: float = 0.0
    contrast_anchors: bool = True
    contrast_positives: bool = True
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"
    temperature: float = 0.01
    train_seed: int = 0
    max_steps: int = -1  # -1: every planned step
    encode_batch_size: int = 64
    data_seed: int = 0
    head_rows: int | None = None
    notes: list = field(default_factory=list)

    def key(self, *parts: str) -> str:
        """A hash of the settings a phase depends on (for --resume)."""
        d = asdict(self)
        d.pop("notes")
        return hashlib.sha256(json.dumps([d, parts], sort_keys=True).encode()).hexdigest()[:16]


def make_config(quick: bool, models: Path) -> Config:
    if quick:
        return Config(
            mode="quick",
            student=str(SHARED / "models" / "tiny-student"),
            guide=str(SHARED / "models" / "tiny-guide-static"),
            train_source=str(ROOT / "data" / "train.parquet"),
            sts=str(ROOT / "data" / "stsb_dev.parquet"),
            beir=str(ROOT / "data" / "scifact"),
            selection=None,
            head_rows=640,
            student_max_seq_length=128,
            guide_max_seq_length=None,
            epochs=1,
            max_steps=10,
            notes=["quick mode: tiny random-init student and a static guide; a wiring check, not a quality result"],
        )
    return Config(
        mode="full",
        student=str(models / "all-MiniLM-L6-v2"),
        guide=str(models / "all-mpnet-base-v2"),
        train_source=str(SHARED / "data" / "train_pairs.parquet"),
        sts=str(SHARED / "data" / "sts" / "stsb_test.parquet"),
        beir=str(SHARED / "data" / "scifact"),
        selection={"scifact": "all", "scitail": "all", "snli": 448},
        student_max_seq_length=128,
        guide_max_seq_length=256,
        notes=[
            "hyper-parameters chosen a priori (GISTEmbedLoss / common fine-tuning defaults); no run was repeated or tuned on test results",
            "student max_seq_length 128 in training and evaluation (SciFact abstracts truncated), guide max_seq_length 256: CPU budget",
            "scifact rows are SciFact train claims only; the 300 SciFact test queries never appear in training",
            "single seed: differences of a few thousandths are within run-to-run noise",
            "the guided loss also contrasts anchor-anchor and positive-positive candidates (GISTEmbedLoss's default); MNRL only anchor-positive",
        ],
    )


# ---------------------------------------------------------------------------------------- data


def build_training_set(cfg: Config, work: Path) -> tuple[Path, dict]:
    """Write the training Parquet for this run (full: a documented selection of train_pairs)."""
    if cfg.selection is None:
        table = pq.read_table(cfg.train_source)
        if cfg.head_rows is not None:
            table = table.slice(0, cfg.head_rows)
        path = work / "train.parquet"
        pq.write_table(table, path)
    else:
        import pandas as pd

        pairs = pd.read_parquet(cfg.train_source)
        rng = np.random.default_rng(cfg.data_seed)
        parts = []
        for task, wanted in cfg.selection.items():
            rows = pairs[pairs.task == task]
            if wanted == "all":
                parts.append(rows)
                continue
            # Whole groups of premises with several entailment hypotheses, until >= `wanted` rows.
            sizes = rows.groupby("anchor", sort=True).size()
            groups = sizes[sizes >= 2].index.to_numpy()
            chosen, total = [], 0
            for anchor in groups[rng.permutation(len(groups))]:
                if total >= wanted:
                    break
                chosen.append(anchor)
                total += sizes[anchor]
            parts.append(rows[rows.anchor.isin(set(chosen))])
        selected = pd.concat(parts)[["anchor", "positive", "task"]]
        selected = selected.iloc[rng.permutation(len(selected))].reset_index(drop=True)
        path = work / "train.parquet"
        table = pa.Table.from_pandas(selected, preserve_index=False)
        pq.write_table(table, path)
    tasks = table.column("task").to_pylist() if "task" in table.column_names else []
    info = {
        "path": str(path),
        "source": cfg.train_source,
        "rows": table.num_rows,
        "columns": table.column_names,
        "rows_per_task": {t: tasks.count(t) for t in sorted(set(tasks))},
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "selection": cfg.selection if cfg.selection is not None else f"first {cfg.head_rows} rows",
    }
    return path, info


def guide_dir_with_length(cfg: Config, work: Path) -> str:
    """The guide, or a view of it (symlinks) whose sentence_bert_config.json sets max_seq_length.

    `gist precompute-guide` uses the model's own max_seq_length; the view changes only that file, so
    the recorded weights hash is the real guide's.
    """
    src = Path(cfg.guide)
    config = src / "sentence_bert_config.json"
    if cfg.guide_max_seq_length is None or not config.is_file():
        return str(src)
    view = work / "models" / f"{src.name}-msl{cfg.guide_max_seq_length}"
    view.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = view / entry.name
        if entry.name == config.name or target.is_symlink() or target.exists():
            continue
        target.symlink_to(entry.resolve())
    settings = json.loads(config.read_text())
    settings["max_seq_length"] = cfg.guide_max_seq_length
    (view / config.name).write_text(json.dumps(settings, indent=2) + "\n")
    return str(view)


# ------------------------------------------------------------------------------------- phases


def load_phase(work: Path, name: str, key: str, resume: bool) -> dict | None:
    path = work / "phases" / f"{name}.json"
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            print(f"[quality] {name}: reusing {path}", file=sys.stderr, flush=True)
            return saved["result"]
    return None


def save_phase(work: Path, name: str, key: str, result: dict) -> None:
    from pipeline.artifacts import write_json

    (work / "phases").mkdir(parents=True, exist_ok=True)
    write_json(work / "phases" / f"{name}.json", {"key": key, "result": strict_json(result)})


def stage1(cfg: Config, data_path: Path, work: Path, resume: bool) -> dict:
    """`gist precompute-guide` (the CLI command's function) with the guide: masks for the plan."""
    import cli
    from pipeline.artifacts import read_manifest

    out = work / "guide"
    key = cfg.key("stage1", hashlib.sha256(data_path.read_bytes()).hexdigest())
    saved = load_phase(work, "stage1", key, resume)
    if saved is not None and (out / "manifest.json").is_file():
        return saved
    guide = guide_dir_with_length(cfg, work)
    print(f"[quality] stage 1: precompute-guide with {guide}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cli.precompute_guide(
        data_path, guide=guide, out=out, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.plan_seed,
        strategy=cfg.strategy, margin_strategy=cfg.margin_strategy, margin=cfg.margin,
        contrast_anchors=cfg.contrast_anchors, contrast_positives=cfg.contrast_positives,
        encode_batch_size=cfg.encode_batch_size, device="auto", overwrite=True,
    )
    wall = time.perf_counter() - t0
    manifest = read_manifest(out)
    result = {"dir": str(out), "wall_s": round(wall, 1), "manifest_timings": manifest["timings"], "guide": manifest["guide"],
              "dataset": manifest["dataset"], "plan": manifest["plan"], "encoding": manifest["encoding"]}
    save_phase(work, "stage1", key, result)
    return result


def mask_breakdown(masks, training) -> dict:
    """Masked candidates by task and kind, read back from masks.parquet.

    ap kinds: `same_anchor` (a_j has a_i's text: another positive of the same query), `same_positive`
    (p_j has p_i's text: the same document, cited by another query), `other` (the guide judged a
    different text at least as close to a_i as p_i). `aa`/`pp` exclude the diagonal (self-pairs,
    always masked at margin 0). `duplicate_positive_pairs` counts (i, j != i) pairs with the same
    positive text, masked or not: g(a_i, p_j) equals the threshold t_i there, and the rule is
    strict (>), so float rounding decides.
    """
    g = masks.params.batch_size
    tasks = np.asarray(training.tasks if training.tasks is not None else ["all"] * training.num_examples, dtype=object)
    out: dict[str, dict] = {}
    for row, ids in enumerate(masks.batches):
        task = str(tasks[ids[0]])
        s = out.setdefault(task, {"batches": 0, "ap_candidates": 0, "ap_masked": 0, "ap_same_anchor": 0, "ap_same_positive": 0,
                                  "ap_other": 0, "duplicate_positive_pairs": 0, "anchors_with_masked_ap": 0,
                                  "aa_masked_offdiag": 0, "pp_masked_offdiag": 0, "an_masked": 0})
        a = training.anchor_ids[ids]
        p = training.positive_ids[ids]
        s["batches"] += 1
        s["ap_candidates"] += g * (g - 1)
        same_p = (p[:, None] == p[None, :]) & ~np.eye(g, dtype=bool)
        s["duplicate_positive_pairs"] += int(same_p.sum())
        pos = masks.blocks["ap"][row].values.to_numpy()
        i, j = pos // g, pos % g
        s["ap_masked"] += len(pos)
        sa = a[i] == a[j]
        sp = p[i] == p[j]
        s["ap_same_anchor"] += int(sa.sum())
        s["ap_same_positive"] += int((sp & ~sa).sum())
        s["ap_other"] += int((~sa & ~sp).sum())
        s["anchors_with_masked_ap"] += len(np.unique(i))
        for block in ("aa", "pp"):
            q = masks.blocks[block][row].values.to_numpy()
            s[f"{block}_masked_offdiag"] += int((q // g != q % g).sum())
        s["an_masked"] += len(masks.blocks["an"][row].values)
    for s in out.values():
        s["ap_masked_fraction"] = round(s["ap_masked"] / s["ap_candidates"], 5)
        s["anchors_with_masked_ap_fraction"] = round(s["anchors_with_masked_ap"] / (s["batches"] * g), 4)
    return out


def evaluate(cfg: Config, model) -> tuple[dict, float]:
    from pipeline.evaluate import evaluate_model

    t0 = time.perf_counter()
    metrics = evaluate_model(model, sts=Path(cfg.sts), beir=Path(cfg.beir))
    return {k: round(float(v), 5) for k, v in metrics.items()}, round(time.perf_counter() - t0, 1)


def load_student(cfg: Config):
    from pipeline import guide as guide_mod

    model = guide_mod.load_model(cfg.student, "auto")
    model.max_seq_length = cfg.student_max_seq_length
    return model


def base_phase(cfg: Config, work: Path, resume: bool) -> dict:
    key = cfg.key("base")
    saved = load_phase(work, "base", key, resume)
    if saved is not None:
        return saved
    print("[quality] evaluating the untrained student", file=sys.stderr, flush=True)
    model = load_student(cfg)
    metrics, eval_s = evaluate(cfg, model)
    result = {"metrics": metrics, "eval_s": eval_s}
    save_phase(work, "base", key, result)
    return result


def train_phase(cfg: Config, kind: str, data_path: Path, masks_path: Path, work: Path, resume: bool) -> dict:
    """Train one student on the planned batches with `kind`'s loss, then evaluate it."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from pipeline import train
    from pipeline.data import load_training_data
    from pipeline.loss import GuidedMaskLoss
    from pipeline.masks import PlannedMasks

    key = cfg.key("train", kind, hashlib.sha256(masks_path.read_bytes()).hexdigest())
    saved = load_phase(work, kind, key, resume)
    if saved is not None:
        return saved
    print(f"[quality] training with {kind}", file=sys.stderr, flush=True)
    masks = PlannedMasks(masks_path)
    training = load_training_data(data_path)
    train.check_masks_match(masks, training)
    model = load_student(cfg)
    if kind == "mnrl":
        loss = MultipleNegativesRankingLoss(model, scale=1.0 / cfg.temperature)
    else:
        loss = GuidedMaskLoss(model, masks, temperature=cfg.temperature)
    out = work / kind
    log = out / train.TRAIN_LOG
    if log.exists():
        log.unlink()
    out.mkdir(parents=True, exist_ok=True)
    trainer = train.build_trainer(
        model, training, masks.plan, loss, out, callbacks=[train.JsonlLogCallback(log)],
        learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler,
        max_steps=cfg.max_steps, logging_steps=10, save_strategy="no", seed=cfg.train_seed,
        use_cpu=model.device.type == "cpu", disable_tqdm=True,
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    model.save(str(out / "final"))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    metrics, eval_s = evaluate(cfg, model)
    result = {
        "metrics": metrics,
        "steps": trainer.state.global_step,
        "train_s": round(train_s, 1),
        "s_per_step": round(train_s / max(1, trainer.state.global_step), 2),
        "eval_s": eval_s,
        "train_loss_first_log": round(losses[0], 4) if losses else None,
        "train_loss_last_log": round(losses[-1], 4) if losses else None,
        "train_loss_mean": round(float(trainer.state.log_history[-1].get("train_loss", float("nan"))), 4),
        "loss": {"name": type(loss).__name__, **({"scale": 1.0 / cfg.temperature} if kind == "mnrl" else {"temperature": cfg.temperature})},
        "model_dir": str(out / "final"),
        "train_log": str(log),
    }
    save_phase(work, kind, key, result)
    return result


def finite_or_none(value):
    """JSON has no Infinity: a static guide reports max_seq_length inf (no truncation)."""
    return value if isinstance(value, (int, float)) and np.isfinite(value) else None


def strict_json(obj):
    """`obj` with every non-finite float replaced by None, so the file is standard JSON."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def verdict(models: dict) -> str:
    m, g = models["mnrl"]["metrics"], models["guided"]["metrics"]
    b = models["base"]["metrics"]
    nd = g["beir_ndcg@10"] - m["beir_ndcg@10"]
    st = g["sts_spearman"] - m["sts_spearman"]

    def word(d: float) -> str:
        return "beats" if d > 0 else ("ties" if d == 0 else "does not beat")

    return (
        f"SciFact nDCG@10: guided {g['beir_ndcg@10']:.4f} vs MNRL {m['beir_ndcg@10']:.4f} ({nd:+.4f}; base {b['beir_ndcg@10']:.4f}) -> "
        f"guided {word(nd)} MNRL. STS-B Spearman: guided {g['sts_spearman']:.4f} vs MNRL {m['sts_spearman']:.4f} ({st:+.4f}; "
        f"base {b['sts_spearman']:.4f}) -> guided {word(st)} MNRL. One seed, one plan: differences of a few thousandths "
        "are within run-to-run noise and should not be read as a win or a loss."
    )


# --------------------------------------------------------------------------------------- run


def run(cfg: Config, work: Path, resume: bool = False) -> dict:
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    work.mkdir(parents=True, exist_ok=True)
    data_path, data_info = build_training_set(cfg, work)
    s1 = stage1(cfg, data_path, work, resume)
    masks_path = Path(s1["dir"]) / "masks.parquet"

    from pipeline.data import load_training_data
    from pipeline.masks import PlannedMasks

    training = load_training_data(data_path)
    masks = PlannedMasks(masks_path)
    breakdown = mask_breakdown(masks, training)
    data_info.update(unique_texts=len(training.texts), fingerprint=training.fingerprint, num_negatives=training.num_negatives)

    models = {"base": base_phase(cfg, work, resume)}
    for kind in LOSSES:
        models[kind] = train_phase(cfg, kind, data_path, masks_path, work, resume)

    plan = s1["plan"]
    steps = int(np.prod(masks.plan.shape[:2])) if cfg.max_steps < 0 else cfg.max_steps
    result = {
        "benchmark": NAME,
        "mode": cfg.mode,
        "question": "same plan, same hyper-parameters: does GuidedMaskLoss with stage-1 guide masks beat MultipleNegativesRankingLoss?",
        "student": cfg.student,
        "guide": cfg.guide,
        "hyperparameters": {
            "batch_size": cfg.batch_size, "epochs_planned": cfg.epochs, "steps": steps, "strategy": cfg.strategy,
            "plan_seed": cfg.plan_seed, "margin_strategy": cfg.margin_strategy, "margin": cfg.margin,
            "contrast_anchors": cfg.contrast_anchors, "contrast_positives": cfg.contrast_positives,
            "learning_rate": cfg.learning_rate, "warmup_ratio": cfg.warmup_ratio, "lr_scheduler": cfg.lr_scheduler,
            "optimizer": "AdamW (transformers default, weight decay 0)", "temperature": cfg.temperature,
            "mnrl_scale": 1.0 / cfg.temperature, "trainer_seed": cfg.train_seed, "precision": "fp32",
            "student_max_seq_length": cfg.student_max_seq_length,
            "guide_max_seq_length": finite_or_none(s1["guide"].get("max_seq_length")),
        },
        "data": {
            "train": data_info,
            "eval": {"sts": cfg.sts, "beir": cfg.beir, "beir_split": "qrels/test.tsv", "sts_note": "STS-B test" if cfg.mode == "full" else "sample of STS-B dev"},
        },
        "false_negatives": {
            "definition": "share of in-batch candidates the guide masked (guide sim > t_i - margin), per block, over the planned batches",
            "masked_fraction": plan["masked_fraction"],
            "masked_entries": plan["masked_entries"],
            "ap_false_negative_rate": plan["masked_fraction"]["ap"],
            "by_task": breakdown,
        },
        "models": models,
        "delta_guided_minus_mnrl": {
            k: round(models["guided"]["metrics"][k] - models["mnrl"]["metrics"][k], 5) for k in models["guided"]["metrics"]
        },
        "verdict": verdict(models),
        "wall_times_s": {
            "stage1": s1["wall_s"], "stage1_manifest": s1["manifest_timings"],
            "eval_base": models["base"]["eval_s"],
            **{f"train_{k}": models[k]["train_s"] for k in LOSSES}, **{f"eval_{k}": models[k]["eval_s"] for k in LOSSES},
            "total_this_invocation": round(time.perf_counter() - t_start, 1),
        },
        "notes": cfg.notes,
        "machine": {**machine_info(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
                    "shared_cpu": "other work shared the CPU; timings are approximate"},
        "command": "python -m bench.quality" + (" --quick" if cfg.mode == "quick" else ""),
    }
    return result


def table(result: dict) -> None:
    rows = []
    for name in ("base", *LOSSES):
        m = result["models"][name]["metrics"]
        rows.append([name, m["beir_ndcg@10"], m["beir_recall@100"], m["sts_spearman"], result["models"][name].get("steps", 0)])
    fn = result["false_negatives"]["masked_fraction"]
    print_table(
        f"quality ({result['mode']}): guide false-negative rate ap {fn['ap']:.2%}, aa {fn['aa']:.2%}, pp {fn['pp']:.2%}",
        ["model", "SciFact nDCG@10", "SciFact R@100", "STS Spearman", "steps"], rows,
    )
    print(result["verdict"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and the small sample (< 60 s), a wiring check")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models", help="directory with all-MiniLM-L6-v2 and all-mpnet-base-v2")
    parser.add_argument("--out", type=Path, default=None, help="results file (full: bench/results/quality.json)")
    parser.add_argument("--resume", action="store_true", help="reuse finished phases of an earlier run with the same settings")
    args = parser.parse_args(argv)
    cfg = make_config(args.quick, args.models)
    work = WORK / NAME / cfg.mode
    out = args.out or (work / "quality.json" if args.quick else RESULTS / f"{NAME}.json")
    result = run(cfg, work, args.resume)
    from pipeline.artifacts import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, strict_json(result))
    table(result)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

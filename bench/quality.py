"""quality: does offline guidance (GuidedMaskLoss + stage-1 masks) train a better student than MNRL?

`python -m bench.quality [--quick]` fine-tunes the student twice on exactly the same planned
batches (one stage-1 plan, replayed by `pipeline.train.build_trainer`), with the same
hyper-parameters, changing only the loss:

- mnrl:   sentence-transformers `MultipleNegativesRankingLoss`, scale = 1 / temperature;
- guided: `pipeline.loss.GuidedMaskLoss` reading the masks that `gist precompute-guide`
          (`cli.precompute_guide`, stage 1) wrote with the guide.

and evaluates the untrained student (base), mnrl and guided with `pipeline.evaluate.evaluate_model`
on SciFact test (BEIR, nDCG@10) and STS-B test (Spearman). It also reports the false-negative rate
the guide found in that plan (the stage-1 manifest's `plan.masked_fraction` / `masked_entries`), a
breakdown of the masked `ap` candidates by task (same anchor text, same positive text, other), and
paired-bootstrap confidence intervals of the differences (per-query nDCG@10 and per-pair cosines are
captured from the evaluators' own computation while `evaluate_model` runs, and checked against it).
A check that both losses saw exactly the planned batches, in order, guards the comparison.

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
`encode`), the first 640 rows of the 2000-triplet sample data/train.parquet, data/stsb_dev.parquet
and data/scifact; 10 steps. It checks the wiring, its numbers mean nothing; it writes
bench/.work/quality/quick/quality.json (not the results file) unless --out is given.

Phase results are kept in the work directory; `--resume` reuses those whose configuration matches
(the stage-1 pass, the base evaluation, a finished loss), so an interrupted full run can continue.

Other plans (`--strategy clustered`, `--strategy fn-aware`, ...): the stage-1 pass stays the by-task
one above; the plan and its masks are derived from its stored embeddings with `gist plan`
(`cli.plan_command`: plan_batches + write_plan_masks, the guide is not loaded again) into
WORK/strategy-<strategy>/plan, and that strategy's trainings and phases live in
WORK/strategy-<strategy>. The base evaluation and the guide pass are shared (their phase keys do not
depend on the training plan); a trained phase's key holds the training strategy and the sha256 of the
masks.parquet it trained on, so --resume never reuses a run trained on another plan. `--losses mnrl`
trains only some losses (e.g. plain MNRL on fn-aware batches, a baseline against guidance). Results
go to bench/results/quality-<strategy>.json (quick: WORK/quality-<strategy>.json) and compare each
trained student with base, with each other, and with every finished run of the other plans found in
the work directory (paired bootstrap on the same test items).
"""

from __future__ import annotations

import argparse
import contextlib
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
    strategy: str = "by-task"  # the stage-1 pass's plan (precompute-guide --strategy)
    train_strategy: str | None = None  # the plan trained on, if not the stage-1 one: `gist plan` from the stored pass
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

    def key(self, *parts: str, training_plan: bool = False) -> str:
        """A hash of the settings a phase depends on (for --resume).

        The training plan's strategy counts only for phases trained on it (`training_plan`); the
        stage-1 pass and the base evaluation do not depend on it (and keep their keys).
        """
        d = asdict(self)
        d.pop("notes")
        train_strategy = d.pop("train_strategy")
        if training_plan and train_strategy is not None:
            d["train_strategy"] = train_strategy
        return hashlib.sha256(json.dumps([d, parts], sort_keys=True).encode()).hexdigest()[:16]


def make_config(quick: bool, models: Path, strategy: str | None = None) -> Config:
    """`strategy`: the training plan; None or the stage-1 strategy (by-task) trains on the stage-1 plan."""
    cfg = _make_config(quick, models)
    if strategy is not None and strategy != cfg.strategy:
        cfg.train_strategy = strategy
        cfg.notes.append(
            f"training plan: --strategy {strategy}, derived with `gist plan` from the stage-1 ({cfg.strategy}) guide pass's "
            "stored embeddings (same data, seed, batch size, epochs and mask rule; the guide is not run again)"
        )
    return cfg


def _make_config(quick: bool, models: Path) -> Config:
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
            "single seed and plan: the paired-bootstrap CIs cover test-set sampling, not training variance",
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


def train_strategy(cfg: Config) -> str:
    return cfg.train_strategy or cfg.strategy


def runs_dir(cfg: Config, work: Path, strategy: str | None = None) -> Path:
    """Where the trainings (and their phases) on `strategy`'s plan live: the stage-1 plan's in WORK."""
    strategy = strategy or train_strategy(cfg)
    return work if strategy == cfg.strategy else work / f"strategy-{strategy}"


def derive_plan(cfg: Config, guide_dir: Path, out: Path) -> dict:
    """`gist plan` (the CLI command's function) on the stored stage-1 pass: the training plan's masks.

    Re-derived on every invocation (seconds; deterministic, byte-identical masks.parquet), so the
    training phases' keys (which hold its sha256) decide what --resume may reuse.
    """
    import cli
    from pipeline.artifacts import read_manifest

    strategy = train_strategy(cfg)
    print(f"[quality] gist plan --strategy {strategy} from {guide_dir}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cli.plan_command(
        guide_dir, out=out, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.plan_seed, strategy=strategy,
        margin_strategy=cfg.margin_strategy, margin=cfg.margin, contrast_anchors=cfg.contrast_anchors,
        contrast_positives=cfg.contrast_positives, overwrite=True,
    )
    wall = time.perf_counter() - t0
    manifest = read_manifest(out)
    return {"source": "gist plan (cli.plan_command) on the stored stage-1 guide pass", "dir": str(out), "guide_dir": manifest["guide_dir"],
            "wall_s": round(wall, 2), "plan": manifest["plan"],
            "masks_sha256": hashlib.sha256((out / "masks.parquet").read_bytes()).hexdigest()}


def mask_breakdown(masks, training) -> dict:
    """Masked candidates by task and kind, read back from masks.parquet.

    ap kinds: `same_anchor` (a_j has a_i's text: another positive of the same query), `same_positive`
    (p_j has p_i's text: the same document, cited by another query), `other` (the guide judged a
    different text at least as close to a_i as p_i). `aa`/`pp` exclude the diagonal (self-pairs,
    always masked at margin 0). `same_anchor_pairs` counts (i, j != i) pairs with the same anchor
    text, masked or not (the guide masks p_j where it scores it above p_i). `duplicate_positive_pairs` counts (i, j != i) pairs with the same
    positive text, masked or not: g(a_i, p_j) equals the threshold t_i there, and the rule is
    strict (>), so float rounding decides.
    """
    g = masks.params.batch_size
    tasks = np.asarray(training.tasks if training.tasks is not None else ["all"] * training.num_examples, dtype=object)
    out: dict[str, dict] = {}
    for row, ids in enumerate(masks.batches):
        task = str(tasks[ids[0]])
        s = out.setdefault(task, {"batches": 0, "ap_candidates": 0, "ap_masked": 0, "ap_same_anchor": 0, "ap_same_positive": 0,
                                  "ap_other": 0, "duplicate_positive_pairs": 0, "same_anchor_pairs": 0, "anchors_with_masked_ap": 0,
                                  "aa_masked_offdiag": 0, "pp_masked_offdiag": 0, "an_masked": 0})
        a = training.anchor_ids[ids]
        p = training.positive_ids[ids]
        s["batches"] += 1
        s["ap_candidates"] += g * (g - 1)
        same_p = (p[:, None] == p[None, :]) & ~np.eye(g, dtype=bool)
        s["duplicate_positive_pairs"] += int(same_p.sum())
        s["same_anchor_pairs"] += int(((a[:, None] == a[None, :]) & ~np.eye(g, dtype=bool)).sum())
        pos = masks.positions("ap", row)
        i, j = pos // g, pos % g
        s["ap_masked"] += len(pos)
        sa = a[i] == a[j]
        sp = p[i] == p[j]
        s["ap_same_anchor"] += int(sa.sum())
        s["ap_same_positive"] += int((sp & ~sa).sum())
        s["ap_other"] += int((~sa & ~sp).sum())
        s["anchors_with_masked_ap"] += len(np.unique(i))
        for block in ("aa", "pp"):
            q = masks.positions(block, row)
            s[f"{block}_masked_offdiag"] += int((q // g != q % g).sum())
        s["an_masked"] += len(masks.positions("an", row))
    for s in out.values():
        s["ap_masked_fraction"] = round(s["ap_masked"] / s["ap_candidates"], 5)
        s["anchors_with_masked_ap_fraction"] = round(s["anchors_with_masked_ap"] / (s["batches"] * g), 4)
    return out


@contextlib.contextmanager
def capture_evaluation():
    """Record what sentence-transformers' evaluators score, item by item, while evaluate_model runs.

    - retrieval: the ranked hits of every query, as `InformationRetrievalEvaluator.compute_metrics`
      receives them (its own retrieval, nothing re-encoded);
    - STS: the gold scores and cosine scores `EmbeddingSimilarityEvaluator` passes to `spearmanr`.

    From them, per-query nDCG@10 (sentence-transformers' formula) and per-pair cosines, for paired
    bootstrap comparisons of two models; their means are checked against the evaluators' numbers.
    """
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.sentence_transformer.evaluation import embedding_similarity

    captured: dict = {}
    compute_metrics = InformationRetrievalEvaluator.compute_metrics
    spearmanr = embedding_similarity.spearmanr

    def recording_compute_metrics(self, queries_result_list):
        captured["ir"] = (self, queries_result_list)
        return compute_metrics(self, queries_result_list)

    def recording_spearmanr(labels, scores, *args, **kwargs):
        captured["sts"] = (np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64))
        return spearmanr(labels, scores, *args, **kwargs)

    InformationRetrievalEvaluator.compute_metrics = recording_compute_metrics
    embedding_similarity.spearmanr = recording_spearmanr
    try:
        yield captured
    finally:
        InformationRetrievalEvaluator.compute_metrics = compute_metrics
        embedding_similarity.spearmanr = spearmanr


def per_query_ndcg(evaluator, queries_result_list, k: int = 10) -> dict[str, float]:
    """nDCG@k of each query, exactly as InformationRetrievalEvaluator.compute_metrics averages it."""
    out = {}
    for itr, hits in enumerate(queries_result_list):
        qid = evaluator.queries_ids[itr]
        relevant = evaluator.relevant_docs[qid]
        top = sorted(hits, key=lambda x: (-x["score"], x["corpus_id"]))[:k]
        dcg = sum((1.0 if h["corpus_id"] in relevant else 0.0) / np.log2(i + 2) for i, h in enumerate(top))
        idcg = sum(1.0 / np.log2(i + 2) for i in range(min(len(relevant), k)))
        out[str(qid)] = dcg / idcg
    return out


def evaluate(cfg: Config, model) -> tuple[dict, float, dict]:
    """evaluate_model on STS and BEIR; returns metrics, seconds, and per-item details."""
    from pipeline.evaluate import evaluate_model

    t0 = time.perf_counter()
    with capture_evaluation() as captured:
        metrics = evaluate_model(model, sts=Path(cfg.sts), beir=Path(cfg.beir))
    eval_s = round(time.perf_counter() - t0, 1)
    ndcg = per_query_ndcg(*captured["ir"])
    labels, cosines = captured["sts"]
    # The details must reproduce the evaluators' numbers, or the bootstrap would compare other things.
    assert abs(np.mean(list(ndcg.values())) - metrics["beir_ndcg@10"]) < 1e-9, "per-query nDCG does not match the evaluator"
    assert abs(spearman(labels, cosines) - metrics["sts_spearman"]) < 1e-9, "STS cosines do not match the evaluator"
    details = {"ndcg@10": ndcg, "sts_gold": labels.tolist(), "sts_cosine": cosines.tolist()}
    return {k: round(float(v), 5) for k, v in metrics.items()}, eval_s, details


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def save_details(work: Path, name: str, key: str, details: dict) -> None:
    from pipeline.artifacts import write_json

    (work / "phases").mkdir(parents=True, exist_ok=True)
    write_json(work / "phases" / f"{name}.details.json", {"key": key, "details": details})


def load_details(work: Path, name: str, key: str) -> dict | None:
    path = work / "phases" / f"{name}.details.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["details"]
    return None


def details_for(cfg: Config, work: Path, name: str, key: str, result: dict) -> dict:
    """Per-item details of a finished phase; a phase saved before they were recorded is re-evaluated
    from its saved model, and must reproduce its recorded metrics."""
    details = load_details(work, name, key)
    if details is not None:
        return details
    from pipeline import guide as guide_mod

    print(f"[quality] {name}: re-evaluating the saved model for per-item scores", file=sys.stderr, flush=True)
    if "model_dir" in result:
        model = guide_mod.load_model(result["model_dir"], "auto")
        model.max_seq_length = cfg.student_max_seq_length
    else:
        model = load_student(cfg)
    metrics, _, details = evaluate(cfg, model)
    if any(abs(metrics[k] - result["metrics"][k]) > 1e-5 for k in metrics):
        raise RuntimeError(f"{name}: re-evaluation gives {metrics}, the run recorded {result['metrics']}")
    save_details(work, name, key, details)
    return details


def paired_bootstrap(details: dict, a: str, b: str, reps: int = 10_000, seed: int = 0) -> dict:
    """b minus a: SciFact nDCG@10 over queries and STS-B Spearman over pairs, resampled with replacement."""
    rng = np.random.default_rng(seed)
    queries = sorted(details[a]["ndcg@10"])
    x = np.array([details[a]["ndcg@10"][q] for q in queries])
    y = np.array([details[b]["ndcg@10"][q] for q in queries])
    diff = y - x
    idx = rng.integers(0, len(diff), size=(reps, len(diff)))
    boot = diff[idx].mean(axis=1)
    out = {
        "beir_ndcg@10": {
            "delta": round(float(diff.mean()), 5),
            "ci95": [round(float(v), 5) for v in np.percentile(boot, [2.5, 97.5])],
            "p_two_sided": round(float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean()))), 4),
            "queries_better_worse_equal": [int((diff > 1e-12).sum()), int((diff < -1e-12).sum()), int((np.abs(diff) <= 1e-12).sum())],
            "queries": len(diff),
        }
    }
    from scipy.stats import rankdata

    gold = np.asarray(details[a]["sts_gold"])
    ca, cb = np.asarray(details[a]["sts_cosine"]), np.asarray(details[b]["sts_cosine"])
    sts_reps = min(reps, 2000)
    idx = rng.integers(0, len(gold), size=(sts_reps, len(gold)))

    def rho(g, c):  # Spearman per row: Pearson of (average) ranks
        rg, rc = rankdata(g, axis=1), rankdata(c, axis=1)
        rg -= rg.mean(axis=1, keepdims=True)
        rc -= rc.mean(axis=1, keepdims=True)
        return (rg * rc).sum(axis=1) / np.sqrt((rg**2).sum(axis=1) * (rc**2).sum(axis=1))

    boot = rho(gold[idx], cb[idx]) - rho(gold[idx], ca[idx])
    out["sts_spearman"] = {
        "delta": round(spearman(gold, cb) - spearman(gold, ca), 5),
        "ci95": [round(float(v), 5) for v in np.percentile(boot, [2.5, 97.5])],
        "p_two_sided": round(float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean()))), 4),
        "pairs": len(gold),
        "resamples": sts_reps,
    }
    out["beir_ndcg@10"]["resamples"] = reps
    return out


def load_student(cfg: Config):
    from pipeline import guide as guide_mod

    model = guide_mod.load_model(cfg.student, "auto")
    model.max_seq_length = cfg.student_max_seq_length
    return model


def base_key(cfg: Config) -> str:
    return cfg.key("base")


def train_key(cfg: Config, kind: str, masks_path: Path) -> str:
    return cfg.key("train", kind, hashlib.sha256(masks_path.read_bytes()).hexdigest(), training_plan=True)


def base_phase(cfg: Config, work: Path, resume: bool) -> dict:
    key = base_key(cfg)
    saved = load_phase(work, "base", key, resume)
    if saved is not None:
        return saved
    print("[quality] evaluating the untrained student", file=sys.stderr, flush=True)
    model = load_student(cfg)
    metrics, eval_s, details = evaluate(cfg, model)
    result = {"metrics": metrics, "eval_s": eval_s}
    save_details(work, "base", key, details)
    save_phase(work, "base", key, result)
    return result


def train_phase(cfg: Config, kind: str, data_path: Path, masks_path: Path, work: Path, resume: bool) -> dict:
    """Train one student on the planned batches with `kind`'s loss, then evaluate it."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from pipeline import train
    from pipeline.data import load_training_data
    from pipeline.loss import GuidedMaskLoss
    from pipeline.masks import PlannedMasks

    key = train_key(cfg, kind, masks_path)
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
    # Record the plan row of every batch the loss sees: both losses must replay the plan, in order.
    # (GuidedMaskLoss refuses unplanned batches itself; MNRL would train on anything.)
    rows_seen: list[int] = []
    loss_forward = loss.forward

    def recording_forward(sentence_features, labels):
        rows_seen.append(masks.due_row(labels.cpu().numpy()))
        return loss_forward(sentence_features, labels)

    loss.forward = recording_forward
    out = work / kind
    log = out / train.TRAIN_LOG
    if log.exists():
        log.unlink()
    out.mkdir(parents=True, exist_ok=True)
    trainer = train.build_trainer(
        model, training, masks, loss, out, callbacks=[train.JsonlLogCallback(log)],
        learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler,
        max_steps=cfg.max_steps, logging_steps=10, save_strategy="no", seed=cfg.train_seed,
        use_cpu=model.device.type == "cpu", disable_tqdm=True,
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    if rows_seen != list(range(trainer.state.global_step)):
        raise RuntimeError(f"{kind}: the trainer did not replay the plan in order (first rows seen: {rows_seen[:8]})")
    model.save(str(out / "final"))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    metrics, eval_s, details = evaluate(cfg, model)
    save_details(work, kind, key, details)
    result = {
        "metrics": metrics,
        "steps": trainer.state.global_step,
        "replayed_plan_rows_in_order": True,
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


DISPLAY = {"mnrl": "MNRL", "guided": "guided"}


def display(label: str, strategy: str | None = None) -> str:
    """'MNRL' / 'guided' for this run's students; 'MNRL (by-task plan)' for 'mnrl@by-task' references."""
    kind, _, plan = label.partition("@")
    name = DISPLAY.get(kind, kind)
    plan = plan or strategy
    return f"{name} ({plan} plan)" if plan else name


def judged(metric: str, label: str, name_b: str, name_a: str, mb: float, ma: float, d: dict, over: str, base: float | None = None) -> str:
    """One sentence: B vs A on `metric`, the paired-bootstrap delta and CI, and what they show."""
    lo, hi = d["ci95"]
    if lo > 0:
        word = f"{name_b} beats {name_a} (the 95% CI excludes 0)"
    elif hi < 0:
        word = f"{name_b} is WORSE than {name_a} (the 95% CI excludes 0)"
    else:
        word = f"{name_b} does NOT beat {name_a}: the difference is within noise (the 95% CI includes 0)"
    based = f" (base {base:.4f})" if base is not None else ""
    return (
        f"{label}: {name_b} {mb:.4f} vs {name_a} {ma:.4f}{based}; {name_b} - {name_a} = {d['delta']:+.4f}, "
        f"paired-bootstrap 95% CI [{lo:+.4f}, {hi:+.4f}] over {over}, p = {d['p_two_sided']:.3f} -> {word}."
    )


def judged_pair(metrics: dict, comparison: dict, b: str, a: str, name_b: str, name_a: str, base: dict | None = None) -> list[str]:
    q = comparison["beir_ndcg@10"]["queries_better_worse_equal"]
    over = f"{comparison['beir_ndcg@10']['queries']} queries ({name_b} better on {q[0]}, worse on {q[1]}, equal on {q[2]})"
    return [
        judged("beir_ndcg@10", "SciFact nDCG@10", name_b, name_a, metrics[b]["beir_ndcg@10"], metrics[a]["beir_ndcg@10"],
               comparison["beir_ndcg@10"], over, base["beir_ndcg@10"] if base else None),
        judged("sts_spearman", "STS-B Spearman", name_b, name_a, metrics[b]["sts_spearman"], metrics[a]["sts_spearman"],
               comparison["sts_spearman"], f"{comparison['sts_spearman']['pairs']} pairs", base["sts_spearman"] if base else None),
    ]


def verdict(models: dict, comparisons: dict, fn_rate: float, losses=LOSSES, strategy: str = "by-task", references: dict | None = None) -> str:
    metrics = {k: v["metrics"] for k, v in models.items()}
    metrics.update({label: r["metrics"] for label, r in (references or {}).items()})
    b = metrics["base"]
    parts = []
    if "mnrl" in losses and "guided" in losses:
        m, g = metrics["mnrl"], metrics["guided"]
        parts += judged_pair(metrics, comparisons["guided_vs_mnrl"], "guided", "mnrl", "guided", "MNRL", b)
        if m["sts_spearman"] < b["sts_spearman"] and g["sts_spearman"] < b["sts_spearman"]:
            parts.append(
                f"Both fine-tuned students score below the base on STS-B ({m['sts_spearman'] - b['sts_spearman']:+.4f} MNRL, "
                f"{g['sts_spearman'] - b['sts_spearman']:+.4f} guided): the training data is mostly scientific."
            )
        else:
            parts.append(
                f"STS-B against the base: {m['sts_spearman'] - b['sts_spearman']:+.4f} MNRL, {g['sts_spearman'] - b['sts_spearman']:+.4f} guided."
            )
    for name, comparison in comparisons.get("cross_plan", {}).items():
        mine, _, reference = name.partition("_vs_")
        kind = mine.partition("@")[0]
        parts.append(judged_pair(metrics, comparison, kind, reference, display(mine), display(reference))[0])  # STS-B: see comparisons
    caveat = (
        f"Caveats: one seed and one plan per strategy (the CI covers test-set sampling, not training variance); the guide masked "
        f"{fn_rate:.2%} of anchor-positive candidates of the {strategy} plan"
    )
    if "guided" in losses or any(label.startswith("guided@") for label in references or {}):
        caveat += (", and GuidedMaskLoss also adds GISTEmbedLoss's anchor-anchor and positive-positive candidate blocks, which MNRL "
                   "lacks, so these runs do not separate the effect of the masks from that of the extra in-batch negatives")
    if "guided" not in losses and "mnrl" in losses:
        caveat += f"; MNRL trains on that plan unmasked: those {fn_rate:.2%} are the false negatives it pushes apart"
    parts.append(caveat + ".")
    return " ".join(parts)


def reference_runs(cfg: Config, work: Path) -> dict:
    """Finished trainings on the other plans of this work directory: {'kind@strategy': run}.

    A run counts only if its phase and its per-item details carry the key of its plan's current
    masks.parquet (the stage-1 pass's for the stage-1 strategy, WORK/strategy-X/plan's for X).
    """
    from dataclasses import replace

    from pipeline.artifacts import read_manifest

    plans = {cfg.strategy: work / "guide"}
    plans.update({d.name.removeprefix("strategy-"): d / "plan" for d in sorted(work.glob("strategy-*"))})
    refs = {}
    for strategy, plan_dir in plans.items():
        masks_path = plan_dir / "masks.parquet"
        if strategy == train_strategy(cfg) or not (plan_dir / "manifest.json").is_file() or not masks_path.is_file():
            continue
        other = replace(cfg, train_strategy=None if strategy == cfg.strategy else strategy, notes=[])
        plan = read_manifest(plan_dir)["plan"]
        for kind in LOSSES:
            key = train_key(other, kind, masks_path)
            phase = runs_dir(other, work) / "phases" / f"{kind}.json"
            saved = json.loads(phase.read_text()) if phase.is_file() else None
            details = load_details(runs_dir(other, work), kind, key)
            if saved is None or saved.get("key") != key or details is None:
                continue
            r = saved["result"]
            refs[f"{kind}@{strategy}"] = {
                "strategy": strategy, "loss": kind, "metrics": r["metrics"], "steps": r["steps"], "steps_per_epoch": plan["steps_per_epoch"],
                "ap_false_negative_rate": plan["masked_fraction"]["ap"], "masks": str(masks_path), "key": key, "details": details,
            }
    return refs


def run(cfg: Config, work: Path, resume: bool = False, losses=LOSSES) -> dict:
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    work.mkdir(parents=True, exist_ok=True)
    data_path, data_info = build_training_set(cfg, work)
    s1 = stage1(cfg, data_path, work, resume)
    strategy = train_strategy(cfg)
    rdir = runs_dir(cfg, work)
    if cfg.train_strategy is None:
        plan_info = {"source": "stage 1 (precompute-guide)", "dir": s1["dir"], "wall_s": 0.0, "plan": s1["plan"]}
    else:
        plan_info = derive_plan(cfg, Path(s1["dir"]), rdir / "plan")
    masks_path = Path(plan_info["dir"]) / "masks.parquet"

    from pipeline.data import load_training_data
    from pipeline.masks import PlannedMasks

    training = load_training_data(data_path)
    masks = PlannedMasks(masks_path)
    breakdown = mask_breakdown(masks, training)
    data_info.update(unique_texts=len(training.texts), fingerprint=training.fingerprint, num_negatives=training.num_negatives)

    models = {"base": base_phase(cfg, work, resume)}
    for kind in losses:
        models[kind] = train_phase(cfg, kind, data_path, masks_path, rdir, resume)

    unchecked = [k for k in losses if "replayed_plan_rows_in_order" not in models[k]]
    if unchecked:
        cfg.notes.append(
            f"plan-replay check not recorded for {', '.join(unchecked)}: trained (and reused with --resume) before the check "
            "was added; GuidedMaskLoss itself raises on any unplanned batch, and both losses ran in one process with the same trainer code"
        )
    phases = {"base": (work, base_key(cfg)), **{k: (rdir, train_key(cfg, k, masks_path)) for k in losses}}
    details = {name: details_for(cfg, where, name, key, models[name]) for name, (where, key) in phases.items()}
    references = reference_runs(cfg, work)
    details.update({label: r.pop("details") for label, r in references.items()})
    comparisons = {
        "definition": "paired bootstrap, B minus A: SciFact over test queries (per-query nDCG@10), STS-B over test pairs (Spearman recomputed per resample); seed 0",
    }
    if "mnrl" in losses and "guided" in losses:
        comparisons["guided_vs_mnrl"] = paired_bootstrap(details, "mnrl", "guided")
    for kind in losses:
        comparisons[f"{kind}_vs_base"] = paired_bootstrap(details, "base", kind)
    cross = {f"{kind}@{strategy}_vs_{label}": paired_bootstrap(details, label, kind) for kind in losses for label in references}
    if cross:
        comparisons["cross_plan"] = cross
    offdiag = {blk: sum(t[f"{blk}_masked_offdiag"] for t in breakdown.values()) / (masks.batches.shape[0] * cfg.batch_size * (cfg.batch_size - 1))
               for blk in ("aa", "pp")}

    plan = plan_info["plan"]
    steps = int(np.prod(masks.plan.shape[:2])) if cfg.max_steps < 0 else cfg.max_steps
    steps_per_epoch = int(masks.plan.shape[1])
    command = "python -m bench.quality" + (" --quick" if cfg.mode == "quick" else "")
    if cfg.train_strategy is not None:
        command += f" --strategy {strategy}"
    if tuple(losses) != LOSSES:
        command += f" --losses {','.join(losses)}"
    result = {
        "benchmark": NAME,
        "mode": cfg.mode,
        "question": f"same plan ({strategy}), same hyper-parameters: does GuidedMaskLoss with stage-1 guide masks beat MultipleNegativesRankingLoss?",
        "student": cfg.student,
        "guide": cfg.guide,
        "losses": list(losses),
        "hyperparameters": {
            "batch_size": cfg.batch_size, "epochs_planned": cfg.epochs, "steps": steps, "steps_per_epoch": steps_per_epoch,
            "examples_dropped_per_epoch": training.num_examples - steps_per_epoch * cfg.batch_size, "strategy": strategy,
            "stage1_strategy": cfg.strategy,
            "plan_seed": cfg.plan_seed, "margin_strategy": cfg.margin_strategy, "margin": cfg.margin,
            "contrast_anchors": cfg.contrast_anchors, "contrast_positives": cfg.contrast_positives,
            "learning_rate": cfg.learning_rate, "warmup_ratio": cfg.warmup_ratio, "lr_scheduler": cfg.lr_scheduler,
            "optimizer": "AdamW (transformers default, weight decay 0)", "temperature": cfg.temperature,
            "mnrl_scale": 1.0 / cfg.temperature, "trainer_seed": cfg.train_seed, "precision": "fp32",
            "student_max_seq_length": cfg.student_max_seq_length,
            "guide_max_seq_length": finite_or_none(s1["guide"].get("max_seq_length")),
        },
        "plan": {k: v for k, v in plan_info.items() if k != "plan"},
        "data": {
            "train": data_info,
            "eval": {"sts": cfg.sts, "beir": cfg.beir, "beir_split": "qrels/test.tsv", "sts_note": "STS-B test" if cfg.mode == "full" else "sample of STS-B dev"},
        },
        "false_negatives": {
            "definition": "share of in-batch candidates the guide masked (guide sim > t_i - margin), per block, over the planned batches",
            "masked_fraction": plan["masked_fraction"],
            "masked_entries": plan["masked_entries"],
            "ap_false_negative_rate": plan["masked_fraction"]["ap"],
            "offdiagonal_fraction": {"aa": round(offdiag["aa"], 5), "pp": round(offdiag["pp"], 5),
                                     "note": "manifest aa/pp fractions count the diagonal (self-pairs, always masked at margin 0: 1/batch_size of entries); these exclude it"},
            "by_task": breakdown,
        },
        "models": models,
        "reference_runs": references,
        "comparisons": comparisons,
        "verdict": verdict(models, comparisons, plan["masked_fraction"]["ap"], losses, strategy, references),
        "wall_times_s": {
            "stage1": s1["wall_s"], "stage1_manifest": s1["manifest_timings"], "plan_derivation": plan_info["wall_s"],
            "eval_base": models["base"]["eval_s"],
            **{f"train_{k}": models[k]["train_s"] for k in losses}, **{f"eval_{k}": models[k]["eval_s"] for k in losses},
            "total_phases": round(s1["wall_s"] + plan_info["wall_s"] + models["base"]["eval_s"] + sum(models[k]["train_s"] + models[k]["eval_s"] for k in losses), 1),
            "total_this_invocation": round(time.perf_counter() - t_start, 1),
        },
        "notes": cfg.notes,
        "machine": {**machine_info(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
                    "shared_cpu": "other work shared the CPU; timings are approximate"},
        "command": command,
    }
    if "mnrl" in losses and "guided" in losses:
        result["delta_guided_minus_mnrl"] = {
            k: round(models["guided"]["metrics"][k] - models["mnrl"]["metrics"][k], 5) for k in models["guided"]["metrics"]
        }
    return result


def table(result: dict) -> None:
    losses = result.get("losses", list(LOSSES))
    strategy = result["hyperparameters"]["strategy"]
    rows = []
    for name in ("base", *losses):
        m = result["models"][name]["metrics"]
        label = name if name == "base" else f"{name} ({strategy})"
        rows.append([label, m["beir_ndcg@10"], m["beir_mrr@10"], m["sts_spearman"], result["models"][name].get("steps", 0)])
    for label, r in result.get("reference_runs", {}).items():
        m = r["metrics"]
        rows.append([f"{r['loss']} ({r['strategy']})", m["beir_ndcg@10"], m["beir_mrr@10"], m["sts_spearman"], r["steps"]])
    pairs = []
    if "guided_vs_mnrl" in result["comparisons"]:
        pairs.append(("guided - mnrl", result["comparisons"]["guided_vs_mnrl"]))
    pairs += [(name.replace("_vs_", " - "), c) for name, c in result["comparisons"].get("cross_plan", {}).items()]
    for name, c in pairs:
        rows.append([name, c["beir_ndcg@10"]["delta"], "", c["sts_spearman"]["delta"], ""])
        rows.append(["  95% CI", "[{:+.4f}, {:+.4f}]".format(*c["beir_ndcg@10"]["ci95"]), "", "[{:+.4f}, {:+.4f}]".format(*c["sts_spearman"]["ci95"]), ""])
    fn = result["false_negatives"]
    print_table(
        f"quality ({result['mode']}, {strategy} plan): guide masked {fn['masked_fraction']['ap']:.2%} of anchor-positive candidates "
        f"(aa {fn['offdiagonal_fraction']['aa']:.2%}, pp {fn['offdiagonal_fraction']['pp']:.2%} off-diagonal)",
        ["model", "SciFact nDCG@10", "SciFact MRR@10", "STS-B Spearman", "steps"], rows,
    )
    print(result["verdict"])


def main(argv: list[str] | None = None) -> int:
    from pipeline.plan import STRATEGIES

    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and the small sample (< 60 s), a wiring check")
    parser.add_argument("--models", type=Path, default=ROOT / ".cache" / "models", help="directory with all-MiniLM-L6-v2 and all-mpnet-base-v2")
    parser.add_argument("--out", type=Path, default=None, help="results file (full: bench/results/quality.json, or quality-STRATEGY.json)")
    parser.add_argument("--resume", action="store_true", help="reuse finished phases of an earlier run with the same settings")
    parser.add_argument("--strategy", default=None, choices=STRATEGIES,
                        help="training plan (gist's --strategy); default by-task, the stage-1 plan. Others are derived from the stored "
                             "stage-1 guide pass with `gist plan`")
    parser.add_argument("--losses", default=",".join(LOSSES), metavar="LOSS[,LOSS]", help=f"losses to train, from {', '.join(LOSSES)} (default: both)")
    args = parser.parse_args(argv)
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    if not losses or set(losses) - set(LOSSES) or len(set(losses)) != len(losses):
        parser.error(f"--losses: a comma-separated subset of {', '.join(LOSSES)}")
    losses = tuple(k for k in LOSSES if k in losses)
    cfg = make_config(args.quick, args.models, args.strategy)
    work = WORK / NAME / cfg.mode
    suffix = "" if cfg.train_strategy is None else f"-{cfg.train_strategy}"
    out = args.out or (work / f"quality{suffix}.json" if args.quick else RESULTS / f"{NAME}{suffix}.json")
    result = run(cfg, work, args.resume, losses)
    from pipeline.artifacts import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, strict_json(result))
    table(result)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

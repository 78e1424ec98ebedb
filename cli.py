"""`gist`: the command-line recipes. Each command parses options and calls pipeline/ components."""

from __future__ import annotations

import math
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline import GistError

app = typer.Typer(
    help="Offline GISTEmbed: run the guide once (stage 1), train students with the stored masks (stage 2).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)
state = {"debug": False}

# Plan options, shared by `precompute-guide` and `plan`.
BatchSize = Annotated[int, typer.Option(min=2, help="Examples per (global) batch. Incomplete last batches are dropped.")]
Epochs = Annotated[int, typer.Option(min=1, help="Epochs to plan; stage 2 trains at most this many.")]
Seed = Annotated[int, typer.Option(help="Seed of the batch plan.")]
Strategy = Annotated[str, typer.Option(help="Batching: random, no-duplicates (no text twice in a batch), by-task, clustered (hard batches: k-means over guide embeddings, within tasks), or fn-aware (keeps apart, within tasks, the examples the guide would mask against each other: few false negatives).")]
MarginStrategy = Annotated[str, typer.Option(help="absolute: mask if g > t - m; relative: mask if g > t - |t|*m.")]
Margin = Annotated[float, typer.Option(help="Margin m of the false-negative rule (GISTEmbedLoss's margin).")]
ContrastAnchors = Annotated[bool, typer.Option(help="Include anchor-anchor candidates (GISTEmbedLoss default: on).")]
ContrastPositives = Annotated[bool, typer.Option(help="Include positive-positive candidates (GISTEmbedLoss default: on).")]
Overwrite = Annotated[bool, typer.Option(help="Replace a finished run in --out (only files gist wrote are removed).")]
Columns = Annotated[Optional[str], typer.Option(help="Map column names, e.g. 'anchor=query,positive=doc,task=source'.")]


@app.callback()
def main_options(debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False) -> None:
    state["debug"] = debug


def _plan_params(batch_size, epochs, seed, strategy, margin_strategy, margin, contrast_anchors, contrast_positives):
    from pipeline.masks import PlanParams
    from pipeline.plan import STRATEGIES

    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"use one of {', '.join(STRATEGIES)}", param_hint="--strategy")
    if margin_strategy not in ("absolute", "relative"):
        raise typer.BadParameter("use absolute or relative", param_hint="--margin-strategy")
    return PlanParams(batch_size, epochs, seed, strategy, margin_strategy, margin, contrast_anchors, contrast_positives)


@app.command("precompute-guide")
def precompute_guide(
    data_path: Annotated[Path, typer.Argument(metavar="DATA", help="Parquet, JSONL or CSV file, or a datasets.save_to_disk directory.")],
    guide: Annotated[str, typer.Option(help="Guide model directory (sentence-transformers).")],
    out: Annotated[Path, typer.Option(help="Output directory for the guide pass.")],
    columns: Columns = None,
    batch_size: BatchSize = 32,
    epochs: Epochs = 1,
    seed: Seed = 0,
    strategy: Strategy = "random",
    margin_strategy: MarginStrategy = "absolute",
    margin: Margin = 0.0,
    contrast_anchors: ContrastAnchors = True,
    contrast_positives: ContrastPositives = True,
    encode_batch_size: Annotated[int, typer.Option(min=1, help="Guide encoding batch size.")] = 64,
    device: Annotated[str, typer.Option(help="auto (CUDA with fp16 when present), cpu, cuda, cuda:N.")] = "auto",
    index: Annotated[str, typer.Option(help="FAISS index: auto (flat up to 200k texts, HNSW above), flat or hnsw.")] = "auto",
    rows_per_group: Annotated[int, typer.Option(min=1, help="Texts per embeddings row group: the unit a killed run resumes from.")] = 4096,
    reuse: Annotated[Optional[list[Path]], typer.Option(help="An earlier precompute-guide directory of the same guide (repeatable): its texts are copied, not encoded again (e.g. after `gist mine`).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the guide's own Python code to run.")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Stage 1: encode every unique text with the guide once, index it, plan the batches, store their masks."""
    from pipeline import artifacts, data, guide as guide_mod, masks
    from pipeline.plan import check_plan, plan_batches, rule_options

    params = _plan_params(batch_size, epochs, seed, strategy, margin_strategy, margin, contrast_anchors, contrast_positives)
    t_start = time.perf_counter()
    training = data.load_training_data(data_path, columns)
    check_plan(training, params.batch_size, params.epochs, params.strategy)
    t_data = time.perf_counter()
    rank, world_size = guide_mod.init_distributed()  # under torchrun each rank encodes a share of the texts
    model = guide_mod.load_model(guide, device, trust_remote_code)
    owned = [data.TEXTS, data.EXAMPLES, guide_mod.EMBEDDINGS, guide_mod.INDEX, masks.MASKS]
    if rank == 0:
        artifacts.prepare_out_dir(out, overwrite, owned)
    fp16 = model.device.type == "cuda"
    if fp16:
        model.half()
    identity = guide_mod.model_identity(guide)
    stored = guide_mod.StoredEmbeddings(reuse, identity, "float16" if fp16 else "float32") if reuse else None
    t_load = time.perf_counter()

    if rank == 0:
        data.write_data_tables(out, training)
    run_key = {"guide": identity["weights_sha256"], "fingerprint": training.fingerprint, "fp16": fp16}
    encoding = guide_mod.encode_to_parquet(model, training.texts, out, encode_batch_size, run_key, rows_per_group, rank, world_size, stored)
    if rank != 0:
        return  # rank 0 joins the parts, builds the index and writes the plan
    t_encode = time.perf_counter()
    embeddings = guide_mod.read_embeddings(out / guide_mod.EMBEDDINGS)
    index_kind = guide_mod.build_index(embeddings, out / guide_mod.INDEX, index)
    t_index = time.perf_counter()
    batch_plan = plan_batches(training, params.batch_size, params.epochs, params.seed, params.strategy, embeddings, **rule_options(params))
    t_plan = time.perf_counter()
    plan = masks.write_plan_masks(out, embeddings, training, batch_plan, params, identity)
    t_masks = time.perf_counter()

    artifacts.write_manifest(
        out, owned,
        kind="guide-pass",
        world_size=world_size,
        guide={**identity, "dim": encoding["dim"], "max_seq_length": model.max_seq_length if math.isfinite(model.max_seq_length) else None, "device": str(model.device), "dtype": "float16" if fp16 else "float32", "trust_remote_code": trust_remote_code},
        dataset={"path": str(Path(data_path).resolve()), "fingerprint": training.fingerprint, "columns": training.columns, "num_examples": training.num_examples, "num_texts": len(training.texts), "num_negatives": training.num_negatives},
        encoding={"batch_size": encode_batch_size, "rows_per_group": rows_per_group, "embedding_dtype": "float32", "reused_from": [str(Path(r).resolve()) for r in reuse or []], **encoding},
        index={"kind": index_kind, "metric": "inner_product"},
        plan=plan,
        timings={"data_s": round(t_data - t_start, 3), "load_s": round(t_load - t_data, 3), "encode_s": round(t_encode - t_load, 3), "index_s": round(t_index - t_encode, 3), "plan_s": round(t_plan - t_index, 3), "masks_s": round(t_masks - t_plan, 3), "total_s": round(time.perf_counter() - t_start, 3)},
    )
    total = time.perf_counter() - t_start
    console.print(
        f"[green]done[/] {out}: {len(training.texts)} texts ({encoding['encoded_texts']} encoded, {encoding['reused_texts']} reused, {encoding['resumed_texts']} resumed), "
        f"{plan['num_batches']} batches, masked ap {plan['masked_fraction']['ap']:.2%}, {total:.1f}s"
    )


@app.command("plan")
def plan_command(
    guide_dir: Annotated[Path, typer.Argument(metavar="GUIDE_DIR", help="A finished precompute-guide directory.")],
    out: Annotated[Path, typer.Option(help="Output directory for the new plan and masks.")],
    batch_size: BatchSize = 32,
    epochs: Epochs = 1,
    seed: Seed = 0,
    strategy: Strategy = "random",
    margin_strategy: MarginStrategy = "absolute",
    margin: Margin = 0.0,
    contrast_anchors: ContrastAnchors = True,
    contrast_positives: ContrastPositives = True,
    overwrite: Overwrite = False,
) -> None:
    """Re-plan batches and masks from stored guide embeddings, without loading the guide."""
    from pipeline import artifacts, guide as guide_mod, masks
    from pipeline.plan import plan_batches, rule_options

    params = _plan_params(batch_size, epochs, seed, strategy, margin_strategy, margin, contrast_anchors, contrast_positives)
    t_start = time.perf_counter()
    manifest, training, embeddings = guide_mod.load_guide_pass(guide_dir)
    batch_plan = plan_batches(training, params.batch_size, params.epochs, params.seed, params.strategy, embeddings, **rule_options(params))
    artifacts.prepare_out_dir(out, overwrite, [masks.MASKS])
    plan = masks.write_plan_masks(out, embeddings, training, batch_plan, params, manifest["guide"])
    artifacts.write_manifest(
        out, [masks.MASKS], kind="plan", guide_dir=str(Path(guide_dir).resolve()), guide=manifest["guide"],
        dataset=manifest["dataset"], plan=plan, timings={"total_s": round(time.perf_counter() - t_start, 3)},
    )
    console.print(f"[green]done[/] {out / masks.MASKS}: {plan['num_batches']} batches, masked ap {plan['masked_fraction']['ap']:.2%}")


@app.command("mine")
def mine_command(
    guide_dir: Annotated[Path, typer.Argument(metavar="GUIDE_DIR", help="A finished precompute-guide directory.")],
    out: Annotated[Path, typer.Option(help="Output .parquet: anchor, positive, negative_1..k[, task], ready for precompute-guide.")],
    corpus: Annotated[str, typer.Option(help="Where negatives come from: positives (the data's positives, as mine_hard_negatives), all (every text of the guide pass), or a Parquet/JSONL/CSV file whose new texts are encoded once with the guide.")] = "positives",
    corpus_column: Annotated[str, typer.Option(help="Text column of a --corpus file.")] = "text",
    num_negatives: Annotated[int, typer.Option(min=1, help="Negatives per example (negative_1..negative_k).")] = 3,
    range_min: Annotated[int, typer.Option(min=0, help="Skip this many of the closest candidates.")] = 0,
    range_max: Annotated[Optional[int], typer.Option(help="Consider at most this many closest candidates (default as mine_hard_negatives: range_min + num_negatives (x10 with a margin) + most positives per anchor).")] = None,
    absolute_margin: Annotated[Optional[float], typer.Option(help="Skip candidates with score + m > the anchor's hardest positive score.")] = None,
    relative_margin: Annotated[Optional[float], typer.Option(help="Skip candidates with score > p - |p| * m, p the hardest positive score (0.05: NV-Retriever's TopK-PercPos 95%).")] = None,
    sampling_strategy: Annotated[str, typer.Option(help="top: the closest survivors; random: sampled from the window.")] = "top",
    seed: Annotated[int, typer.Option(help="Seed of random sampling.")] = 0,
    guide: Annotated[Optional[str], typer.Option(help="Guide model directory, only to encode a --corpus file's new texts (default: the path in GUIDE_DIR's manifest).")] = None,
    encode_batch_size: Annotated[int, typer.Option(min=1, help="Guide encoding batch size for a --corpus file.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda (for encoding a --corpus file).")] = "auto",
    overwrite: Overwrite = False,
) -> None:
    """Hard negatives from the stored guide embeddings: sentence-transformers' mine_hard_negatives without re-encoding."""
    from dataclasses import asdict

    import numpy as np

    from pipeline import data, guide as guide_mod
    from pipeline.mine import SAMPLING, MiningParams, mine_negatives, write_mined

    if sampling_strategy not in SAMPLING:
        raise typer.BadParameter("use top or random", param_hint="--sampling-strategy")
    if out.suffix != ".parquet":
        raise GistError(f"--out {out}: write a .parquet file")
    if out.exists() and not overwrite:
        raise GistError(f"{out} exists; pass --overwrite or choose another --out")
    params = MiningParams(num_negatives, range_min, range_max, absolute_margin, relative_margin, sampling_strategy, seed)
    t_start = time.perf_counter()
    manifest, training, embeddings = guide_mod.load_guide_pass(guide_dir)
    texts = training.texts
    if corpus == "positives":
        corpus_ids = training.positive_ids
    elif corpus == "all":
        corpus_ids = np.arange(len(texts))
    else:
        # A corpus file: its texts already in the guide pass reuse their vectors, the rest are encoded once.
        corpus_texts = data.read_corpus(Path(corpus), corpus_column)
        model_path = guide or manifest["guide"]["path"]
        model = guide_mod.load_model(model_path, device)  # checks the directory before hashing its weights
        if guide_mod.model_identity(model_path)["weights_sha256"] != manifest["guide"]["weights_sha256"]:
            raise GistError(f"--guide {model_path}: not the guide of {guide_dir} (weights differ); mining needs one guide's embeddings")
        if manifest["guide"]["dtype"] == "float16":
            model.half()
        rows = guide_mod.StoredEmbeddings([guide_dir], manifest["guide"], manifest["guide"]["dtype"]).lookup(corpus_texts)
        new_texts = [corpus_texts[i] for i in np.flatnonzero(rows < 0)]
        with console.status(f"guide: encoding {len(new_texts)} new corpus texts"):
            new_vectors, _ = guide_mod.embed(model, new_texts, encode_batch_size, first_id=len(texts))
        rows[rows < 0] = len(texts) + np.arange(len(new_texts))
        texts, embeddings, corpus_ids = texts + new_texts, np.concatenate([embeddings, new_vectors]), rows
    t_load = time.perf_counter()
    mined = mine_negatives(embeddings, training.anchor_ids, training.positive_ids, corpus_ids, params)
    t_mine = time.perf_counter()
    meta = {
        "mining": {**asdict(params), "range_max": mined.range_max, "corpus": corpus if corpus in ("positives", "all") else str(Path(corpus).resolve())},
        "guide_dir": str(Path(guide_dir).resolve()), "guide": manifest["guide"], "dataset": manifest["dataset"],
        "corpus_texts": len(np.unique(corpus_ids)), "encoded_texts": len(texts) - len(training.texts),
        "examples": training.num_examples, "skipped_candidates": mined.skipped,
        "timings": {"load_s": round(t_load - t_start, 3), "mine_s": round(t_mine - t_load, 3)},
    }
    kept = write_mined(out, texts, training, mined, {**meta, "rows": int(mined.complete.sum())})
    dropped = training.num_examples - kept
    console.print(
        f"[green]done[/] {out}: {kept} rows x {num_negatives} negatives"
        + (f" ({dropped} dropped: not enough negatives in the window; widen --range-max or lower the margin)" if dropped else "")
        + f", mined in {t_mine - t_load:.2f}s; next: gist precompute-guide {out} --reuse {guide_dir} ..."
    )


@app.command("report")
def report_command(
    guide_dir: Annotated[Path, typer.Argument(metavar="GUIDE_DIR", help="A finished precompute-guide or plan directory.")],
    out: Annotated[Path, typer.Option(help="Output directory for report.md, report.json and the plots.")],
    examples: Annotated[int, typer.Option(min=0, help="Most similar masked pairs to list.")] = 20,
) -> None:
    """Data-quality report: false-negative rates, guide-similarity plots, the guide's strongest vetoes. Loads no model."""
    from pipeline.report import write_report

    report = write_report(guide_dir, out, examples)
    rates = ", ".join(f"{b} {v['rate']:.2%}" for b, v in report["blocks"].items() if v["rate"] is not None)
    console.print(f"[green]done[/] {out / 'report.md'}: {report['counts']['batches']} batches, masked {rates}")


@app.command("train")
def train_command(
    data_path: Annotated[Path, typer.Argument(metavar="DATA", help="The training data stage 1 was run on.")],
    masks_path: Annotated[Path, typer.Option("--masks", help="masks.parquet from precompute-guide or plan.")],
    student: Annotated[str, typer.Option(help="Student model directory (sentence-transformers).")],
    out: Annotated[Path, typer.Option(help="Output directory: checkpoints/, final/, train_log.jsonl.")],
    columns: Columns = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-6,
    warmup_ratio: Annotated[float, typer.Option(help="Share of steps for linear warm-up.")] = 0.1,
    temperature: Annotated[float, typer.Option(help="Softmax temperature (GISTEmbedLoss default 0.01).")] = 0.01,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (-1: all planned epochs).")] = -1,
    logging_steps: Annotated[int, typer.Option(min=1, help="Log the loss every N steps.")] = 10,
    save_steps: Annotated[int, typer.Option(min=1, help="Checkpoint every N steps.")] = 500,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in OUT/checkpoints.")] = False,
    seed: Annotated[int, typer.Option(help="Trainer seed (initialisation, dropout); batches come from the plan.")] = 0,
    sts: Annotated[Optional[Path], typer.Option(help="STS file to evaluate on after training.")] = None,
    beir: Annotated[Optional[Path], typer.Option(help="BEIR directory to evaluate on after training.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, or the trainer's mixed precision on GPU: fp16 or bf16.")] = "fp32",
) -> None:
    """Stage 2: train the student with the stored masks; the guide is never loaded."""
    import json

    from pipeline import artifacts, data, guide as guide_mod, train
    from pipeline.evaluate import evaluate_model
    from pipeline.loss import GuidedMaskLoss
    from pipeline.masks import PlannedMasks

    if precision not in ("fp32", "fp16", "bf16"):
        raise typer.BadParameter("use fp32, fp16 or bf16", param_hint="--precision")
    masks = PlannedMasks(masks_path)
    renames = ",".join(f"{k}={v}" for k, v in masks.meta["columns"].items() if k != v)  # as stage 1 mapped them
    training = data.load_training_data(data_path, columns or renames)
    train.check_masks_match(masks, training)
    if max_steps > masks.batches.shape[0]:
        raise GistError(f"--max-steps {max_steps} exceeds the {masks.batches.shape[0]} planned batches; re-plan with more --epochs")
    if (out / "final").exists():
        raise GistError(f"{out} already holds a finished training run (final/); choose another --out")
    checkpoint = train.last_complete_checkpoint(out / "checkpoints") if resume else None
    if not resume:
        artifacts.prepare_out_dir(out, overwrite=False, owned=[])
    model = guide_mod.load_model(student, device)
    loss = GuidedMaskLoss(model, masks, temperature=temperature)
    trainer = train.build_trainer(
        model, training, masks.plan, loss, out, callbacks=[train.JsonlLogCallback(out / train.TRAIN_LOG)],
        learning_rate=lr, warmup_steps=warmup_ratio, max_steps=max_steps, logging_steps=logging_steps, save_steps=save_steps, seed=seed,
        use_cpu=model.device.type == "cpu", fp16=precision == "fp16", bf16=precision == "bf16",
    )
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if not trainer.is_world_process_zero():
        return
    final = out / "final"
    with artifacts.atomic_path(final) as tmp:
        model.save(str(tmp))
    console.print(f"[green]done[/] {final} after {trainer.state.global_step} steps")
    if sts or beir:
        results = evaluate_model(model, sts, beir)
        artifacts.write_json(out / "eval.json", results)
        print(json.dumps(results, indent=2))


@app.command("evaluate")
def evaluate_command(
    model_path: Annotated[str, typer.Argument(metavar="MODEL", help="A sentence-transformers model directory.")],
    sts: Annotated[Optional[Path], typer.Option(help="STS file with sentence1, sentence2, score.")] = None,
    beir: Annotated[Optional[Path], typer.Option(help="BEIR directory: corpus.jsonl[.gz], queries.jsonl, qrels/test.tsv.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
) -> None:
    """Evaluate a model on STS (Spearman) and/or BEIR retrieval (nDCG@10); prints a table."""
    from pipeline import artifacts, guide as guide_mod
    from pipeline.evaluate import evaluate_model

    if sts is None and beir is None:
        raise typer.BadParameter("give --sts FILE and/or --beir DIR", param_hint="--sts/--beir")
    model = guide_mod.load_model(model_path, device)
    results = evaluate_model(model, sts, beir)
    table = Table("metric", "value", title=str(model_path))
    for name, value in results.items():
        table.add_row(name, f"{value:.4f}")
    Console().print(table)
    if out:
        artifacts.write_json(out, {"model": str(model_path), **results})


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 1."""
    try:
        app()
    except GistError as e:
        if state["debug"]:
            traceback.print_exc()
        console.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the interface is one line, the traceback is behind --debug
        if state["debug"]:
            raise
        console.print(f"[red]error:[/] {type(e).__name__}: {e} (run with --debug for the traceback)", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()

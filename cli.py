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
Strategy = Annotated[str, typer.Option(help="Batching: random, no-duplicates (no text twice in a batch), by-task, or clustered (hard batches: k-means over guide embeddings, within tasks).")]
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
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the guide's own Python code to run.")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Stage 1: encode every unique text with the guide once, index it, plan the batches, store their masks."""
    from pipeline import artifacts, data, guide as guide_mod, masks
    from pipeline.plan import check_plan, plan_batches

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
    t_load = time.perf_counter()

    if rank == 0:
        data.write_data_tables(out, training)
    run_key = {"guide": identity["weights_sha256"], "fingerprint": training.fingerprint, "fp16": fp16}
    encoding = guide_mod.encode_to_parquet(model, training.texts, out, encode_batch_size, run_key, rows_per_group, rank, world_size)
    if rank != 0:
        return  # rank 0 joins the parts, builds the index and writes the plan
    t_encode = time.perf_counter()
    embeddings = guide_mod.read_embeddings(out / guide_mod.EMBEDDINGS)
    index_kind = guide_mod.build_index(embeddings, out / guide_mod.INDEX, index)
    t_index = time.perf_counter()
    batch_plan = plan_batches(training, params.batch_size, params.epochs, params.seed, params.strategy, embeddings)
    t_plan = time.perf_counter()
    plan = masks.write_plan_masks(out, embeddings, training, batch_plan, params, identity)
    t_masks = time.perf_counter()

    artifacts.write_manifest(
        out, owned,
        kind="guide-pass",
        world_size=world_size,
        guide={**identity, "dim": encoding["dim"], "max_seq_length": model.max_seq_length if math.isfinite(model.max_seq_length) else None, "device": str(model.device), "dtype": "float16" if fp16 else "float32", "trust_remote_code": trust_remote_code},
        dataset={"path": str(Path(data_path).resolve()), "fingerprint": training.fingerprint, "columns": training.columns, "num_examples": training.num_examples, "num_texts": len(training.texts), "num_negatives": training.num_negatives},
        encoding={"batch_size": encode_batch_size, "rows_per_group": rows_per_group, "embedding_dtype": "float32", **encoding},
        index={"kind": index_kind, "metric": "inner_product"},
        plan=plan,
        timings={"data_s": round(t_data - t_start, 3), "load_s": round(t_load - t_data, 3), "encode_s": round(t_encode - t_load, 3), "index_s": round(t_index - t_encode, 3), "plan_s": round(t_plan - t_index, 3), "masks_s": round(t_masks - t_plan, 3), "total_s": round(time.perf_counter() - t_start, 3)},
    )
    total = time.perf_counter() - t_start
    console.print(
        f"[green]done[/] {out}: {len(training.texts)} texts ({encoding['encoded_texts']} encoded, {encoding['reused_texts']} resumed), "
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
    from pipeline import artifacts, data, guide as guide_mod, masks
    from pipeline.plan import plan_batches

    params = _plan_params(batch_size, epochs, seed, strategy, margin_strategy, margin, contrast_anchors, contrast_positives)
    t_start = time.perf_counter()
    manifest = artifacts.read_manifest(guide_dir)
    if manifest.get("kind") != "guide-pass":
        raise GistError(f"{guide_dir}: not a precompute-guide directory (kind {manifest.get('kind')!r})")
    training = data.read_data_tables(guide_dir, manifest)
    embeddings = guide_mod.read_embeddings(artifacts.verify_checksum(guide_dir, guide_mod.EMBEDDINGS, manifest))
    batch_plan = plan_batches(training, params.batch_size, params.epochs, params.seed, params.strategy, embeddings)
    artifacts.prepare_out_dir(out, overwrite, [masks.MASKS])
    plan = masks.write_plan_masks(out, embeddings, training, batch_plan, params, manifest["guide"])
    artifacts.write_manifest(
        out, [masks.MASKS], kind="plan", guide_dir=str(Path(guide_dir).resolve()), guide=manifest["guide"],
        dataset=manifest["dataset"], plan=plan, timings={"total_s": round(time.perf_counter() - t_start, 3)},
    )
    console.print(f"[green]done[/] {out / masks.MASKS}: {plan['num_batches']} batches, masked ap {plan['masked_fraction']['ap']:.2%}")


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

"""`gist`: the command-line recipes. Each command parses options and calls pipeline/ components."""

from __future__ import annotations

import json
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline import GistError

app = typer.Typer(
    help="Offline GISTEmbed: run the guide once (stage 1), train students with the stored masks (stage 2).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: option names whole, descriptions wrapped to the terminal
)
console = Console(stderr=True, soft_wrap=True)
state = {"debug": False}


def say(label: str, style: str, message: str) -> None:
    """One status line on stderr: a styled label, then `message` as plain text. Paths and corpus
    texts are user data: never parsed as rich markup (`runs/[exp1]` prints as written)."""
    console.print(Text.assemble((label, style), " ", message), highlight=False)

# Plan options, shared by `precompute-guide` and `plan`.
BatchSize = Annotated[int, typer.Option(min=2, help="Examples per (global) batch. Incomplete last batches are dropped.")]
Epochs = Annotated[int, typer.Option(min=1, help="Epochs to plan; stage 2 trains at most this many.")]
Seed = Annotated[int, typer.Option(help="Seed of the batch plan.")]
Strategy = Annotated[str, typer.Option(help="Batching: random, no-duplicates (no text twice in a batch), by-task, clustered (hard batches: k-means over guide embeddings, within tasks), or fn-aware (keeps apart, within tasks, the examples the guide would mask against each other: few false negatives).")]
MarginStrategy = Annotated[str, typer.Option(help="absolute: mask if g > t - m; relative: mask if g > t - |t|*m.")]
Margin = Annotated[float, typer.Option(help="Margin m of the false-negative rule (GISTEmbedLoss's margin). absolute: mask iff g > t - m, m must lie in (-2, 2) (cosines lie in [-1, 1]: m >= 2 masks every candidate, m <= -2 none); relative: mask iff g > t - |t|*m, any finite m.")]
ContrastAnchors = Annotated[bool, typer.Option(help="Include anchor-anchor candidates (GISTEmbedLoss default: on).")]
ContrastPositives = Annotated[bool, typer.Option(help="Include positive-positive candidates (GISTEmbedLoss default: on).")]
MaskDuplicates = Annotated[bool, typer.Option(help="Also mask candidates whose text is the row's own anchor or positive (same text id): never true negatives. --no-mask-duplicates reproduces GISTEmbedLoss exactly.")]
ContrastDocQuery = Annotated[bool, typer.Option(help="Also plan the positive-anchor masks (pa: p_i vs a_j, g(p_i, a_j) > t_i - m), which gist train --directions doc_to_query needs.")]
ContrastDocNegatives = Annotated[bool, typer.Option(help="Also plan the positive-negative masks (pn: p_i vs every negative, g(p_i, n) > t_i - m), which gist train --directions doc_to_doc needs with negative columns.")]
Overwrite = Annotated[bool, typer.Option(show_default=False, help="Replace an earlier output of this command at --out, once the new one is complete (never anything else; your own files inside an output directory are kept).")]
Columns = Annotated[Optional[str], typer.Option(help="Map column names, e.g. 'anchor=query,positive=doc,task=source'.")]
# Where a Hub dataset comes from (datasets.load_dataset's name, split, revision), shared by `precompute-guide` and `train`.
Subset = Annotated[Optional[str], typer.Option(help="The subset (configuration name) of a Hub dataset or dataset repository DATA (every one of a mixture).")]
Split = Annotated[Optional[str], typer.Option(help="The split of a Hub dataset or dataset repository DATA (default: train).")]
Revision = Annotated[Optional[str], typer.Option(help="The revision (branch, tag or commit) of a Hub dataset DATA.")]
DATA_HELP = ("Parquet, JSONL or CSV file; a datasets.save_to_disk directory (a DatasetDict: its splits train together, each a task); "
             "a Hub dataset id or a local dataset repository folder, loaded with datasets.load_dataset (--subset, --split, --revision; "
             "offline with HF_DATASETS_OFFLINE=1, from the cache); or several datasets 'name=SOURCE,name=SOURCE', each a task when it has no task column.")
# Evaluator prompts, shared by `train` and `evaluate` (pipeline.prompts.EvalPrompts).
QueryPrompt = Annotated[Optional[str], typer.Option(help="Prompt prepended to the queries of --beir (InformationRetrievalEvaluator's query_prompt) and to both sentences of --sts, e.g. 'query: '.")]
CorpusPrompt = Annotated[Optional[str], typer.Option(help="Prompt prepended to the --beir corpus (InformationRetrievalEvaluator's corpus_prompt), e.g. 'passage: '.")]
QueryPromptName = Annotated[Optional[str], typer.Option(help="Instead of --query-prompt: the name of one of the model's own prompts (its config's prompts, e.g. query).")]
CorpusPromptName = Annotated[Optional[str], typer.Option(help="Instead of --corpus-prompt: the name of one of the model's own prompts (e.g. document).")]


def _print_versions(value: bool) -> None:
    if value:
        from pipeline.artifacts import versions_text

        print(versions_text())
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option(show_default=False, help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_versions, is_eager=True, help="Print the versions of gist and its main packages, then exit.")] = False,
) -> None:
    state["debug"] = debug


def _plan_params(batch_size, epochs, seed, strategy, margin_strategy, margin, contrast_anchors, contrast_positives, mask_duplicates,
                 contrast_doc_query=False, contrast_doc_negatives=False):
    from pipeline.masks import MARGIN_STRATEGIES, PlanParams
    from pipeline.plan import STRATEGIES

    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"use one of {', '.join(STRATEGIES)}", param_hint="--strategy")
    if margin_strategy not in MARGIN_STRATEGIES:
        raise typer.BadParameter(f"use one of {', '.join(MARGIN_STRATEGIES)}", param_hint="--margin-strategy")
    return PlanParams(batch_size, epochs, seed, strategy, margin_strategy, margin, contrast_anchors, contrast_positives, mask_duplicates,
                      contrast_doc_query, contrast_doc_negatives)


@app.command("precompute-guide", short_help="Stage 1: encode once with the guide, plan, store masks.")
def precompute_guide(
    data_path: Annotated[Path, typer.Argument(metavar="DATA", help=DATA_HELP)],
    out: Annotated[Path, typer.Option(help="Output directory for the guide pass.")],
    guide: Annotated[Optional[str], typer.Option(help="Guide model directory (sentence-transformers). Or --embeddings: one of the two.")] = None,
    embeddings: Annotated[Optional[Path], typer.Option(metavar="VECTORS", help="Instead of --guide: any embedder's vectors of DATA's texts, no model loaded. Parquet with a 'text' column and one vector column (list of floats), looked up by text (extra texts are ignored); or .npy, one row per unique text of DATA in text-id order: distinct texts in order of first appearance, down the anchor column, then positive, then negative_1, negative_2, ... Checked (every text covered, one dimension, finite, non-zero), normalised to unit norm; the file's name and sha256 are the guide's identity.")] = None,
    columns: Columns = None,
    batch_size: BatchSize = 32,
    epochs: Epochs = 1,
    seed: Seed = 0,
    strategy: Strategy = "random",
    margin_strategy: MarginStrategy = "absolute",
    margin: Margin = 0.0,
    contrast_anchors: ContrastAnchors = True,
    contrast_positives: ContrastPositives = True,
    mask_duplicates: MaskDuplicates = True,
    contrast_doc_query: ContrastDocQuery = False,
    contrast_doc_negatives: ContrastDocNegatives = False,
    encode_batch_size: Annotated[int, typer.Option(min=1, help="Guide encoding batch size.")] = 64,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    guide_dtype: Annotated[str, typer.Option(help="The guide's dtype on any device: float32 (default: the masks of a float32 GISTEmbedLoss), or float16 / bfloat16 for speed on a GPU (similarities move by ~1e-3: entries near a threshold flip).")] = "float32",
    index: Annotated[str, typer.Option(help="FAISS index: auto (flat up to 200k texts, IVF above), flat (exact), ivf (IVF-SQ8 trained on a sample; on the GPU with faiss-gpu) or hnsw.")] = "auto",
    guide_max_seq_length: Annotated[Optional[int], typer.Option(min=1, help="Truncate the guide's inputs at N tokens (default: the guide's own max_seq_length). GISTEmbedLoss with a guide that shares the student's tokenizer feeds the guide the student's tokens, cut at the student's max_seq_length: set N to that length to reproduce its masks exactly.")] = None,
    embedding_dtype: Annotated[str, typer.Option(help="Storage of the guide's vectors: float32 (exact) or float16 (half the disk and page cache; similarities change by ~1e-3).")] = "float32",
    rows_per_group: Annotated[int, typer.Option(min=1, help="Stored vectors per embeddings row group (a text per view it is used in): the unit a killed run resumes from.")] = 4096,
    reuse: Annotated[Optional[list[Path]], typer.Option(metavar="DIR", help="An earlier precompute-guide directory of the same guide (repeatable): its texts are copied, not encoded again (e.g. after `gist mine`).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(show_default=False, help="Allow the guide's own Python code to run.")] = False,
    guide_prompts: Annotated[Optional[str], typer.Option(help="The guide's prompt per role, instead of its own: one prompt for every role, role=prompt pairs over anchor, positive, negative ('anchor=query: ,positive=passage: ,negative=passage: '), or a JSON object of them; '' for no prompt at all. Default: anchors encoded as the guide's encode_query (its 'query' prompt), positives and negatives as encode_document (its 'document'/'passage'/'corpus' prompt). The student's --prompts strings here reproduce GISTEmbedLoss, whose guide sees the student's prompts.")] = None,
    guide_prompt_names: Annotated[Optional[str], typer.Option(help="Instead of --guide-prompts: names of the guide's own prompts (its config's prompts), in the same forms, e.g. 'anchor=query,positive=document'.")] = None,
    subset: Subset = None,
    split: Split = None,
    revision: Revision = None,
    overwrite: Overwrite = False,
) -> None:
    """Stage 1: encode every unique text with the guide once, index it, plan the batches, store their masks.

    A text in two roles with two prompts (an anchor that is also a positive) is stored once per view."""
    from pipeline.guide import INDEX_KINDS
    from pipeline.stage1 import precompute_guide as run_stage1

    params = _plan_params(batch_size, epochs, seed, strategy, margin_strategy, margin, contrast_anchors, contrast_positives, mask_duplicates,
                          contrast_doc_query, contrast_doc_negatives)
    if index not in INDEX_KINDS:
        raise typer.BadParameter(f"use one of {', '.join(INDEX_KINDS)}", param_hint="--index")
    done = run_stage1(
        data_path, guide, out, params, embeddings=embeddings, columns=columns, encode_batch_size=encode_batch_size, device=device, index=index,
        guide_max_seq_length=guide_max_seq_length, embedding_dtype=embedding_dtype, rows_per_group=rows_per_group, reuse=reuse or [], trust_remote_code=trust_remote_code,
        guide_dtype=guide_dtype, subset=subset, split=split, revision=revision, guide_prompts=guide_prompts, guide_prompt_names=guide_prompt_names,
        overwrite=overwrite,
    )
    if done is None:
        return  # a rank other than 0 under torchrun: it only encoded
    m = done.manifest
    encoding, plan = m["encoding"], m["plan"]
    source = (f"vectors from {m['guide']['name']}, {encoding['renormalized_texts']} renormalised" if m["guide"].get("source") == "embeddings"
              else f"{encoding['encoded_texts']} encoded, {encoding['reused_texts']} reused, {encoding['resumed_texts']} resumed")
    views = f" as {m['dataset']['num_vectors']} vectors" if m["dataset"]["num_vectors"] != m["dataset"]["num_texts"] else ""
    say("done", "green", f"{out}: {m['dataset']['num_texts']} texts{views} ({source}), "
        f"{plan['num_batches']} batches, masked ap {plan['masked_fraction']['ap']:.2%}, {m['timings']['total_s']:.1f}s")


@app.command("plan", short_help="Re-plan batches and masks from a guide pass.")
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
    mask_duplicates: MaskDuplicates = True,
    contrast_doc_query: ContrastDocQuery = False,
    contrast_doc_negatives: ContrastDocNegatives = False,
    device: Annotated[str, typer.Option(help="Where the masks are computed: auto (CUDA when present), cpu (every core), cuda, cuda:N.")] = "auto",
    overwrite: Overwrite = False,
) -> None:
    """Re-plan batches and masks from stored guide embeddings, without loading the guide."""
    from pipeline.stage1 import replan

    params = _plan_params(batch_size, epochs, seed, strategy, margin_strategy, margin, contrast_anchors, contrast_positives, mask_duplicates,
                          contrast_doc_query, contrast_doc_negatives)
    done = replan(guide_dir, out, params, device=device, overwrite=overwrite)
    if done is None:
        return  # a torchrun rank other than 0: rank 0 joined the masks and reports
    plan = done.manifest["plan"]
    say("done", "green", f"{out / 'masks.parquet'}: {plan['num_batches']} batches, masked ap {plan['masked_fraction']['ap']:.2%}")


def _vectors_option(guide: dict, guide_dir: Path) -> str:
    """How a next pass over mined or filtered data gets its vectors without encoding: a model pass is
    reused (--reuse, with the prompts its views were encoded with), a pass from --embeddings VECTORS
    takes them from VECTORS again."""
    if guide.get("source") == "embeddings":
        return f"--embeddings {guide['path']}"
    from pipeline.views import ROLES, GuideViews

    views = GuideViews.from_record(guide["views"])
    prompts = json.dumps({role: views.view_of(role).prompt for role in ROLES})
    spelled = any(v.prompt for v in views.views) or any((guide.get("prompts") or {}).values())  # the guide's defaults may differ from what this pass used
    return f"--reuse {guide_dir}" + (f" --guide-prompts {shlex.quote(prompts)}" if spelled else "")


@app.command("mine", short_help="Mine hard negatives from the stored embeddings.")
def mine_command(
    guide_dir: Annotated[Path, typer.Argument(metavar="GUIDE_DIR", help="A finished precompute-guide directory.")],
    out: Annotated[Path, typer.Option(help="Output .parquet: anchor, positive, negative_1..k[, task], ready for precompute-guide.")],
    corpus: Annotated[str, typer.Option(help="Where negatives come from: positives (the data's positives, as mine_hard_negatives), all (every text the guide pass stores in the positives' view: every text of a pass without prompts), or a Parquet/JSONL/CSV file whose new texts are encoded once with the guide (its document view).")] = "positives",
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
    query_prompt: Annotated[Optional[str], typer.Option(help="mine_hard_negatives' query_prompt: must be the prompt the guide pass encoded anchors with (queries are read from that stored view; refused otherwise).")] = None,
    corpus_prompt: Annotated[Optional[str], typer.Option(help="mine_hard_negatives' corpus_prompt: must be the prompt the guide pass encoded positives with.")] = None,
    query_prompt_name: Annotated[Optional[str], typer.Option(help="Instead of --query-prompt: the name of one of the guide's own prompts (e.g. query).")] = None,
    corpus_prompt_name: Annotated[Optional[str], typer.Option(help="Instead of --corpus-prompt: the name of one of the guide's own prompts (e.g. document).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Hard negatives from the stored guide embeddings: sentence-transformers' mine_hard_negatives without re-encoding.

    Queries (anchors) and corpus (positives) are read in the views the guide pass stored them in."""
    from pipeline.mine import SAMPLING, MiningParams, mine_from_pass

    if sampling_strategy not in SAMPLING:
        raise typer.BadParameter(f"use {' or '.join(SAMPLING)}", param_hint="--sampling-strategy")
    params = MiningParams(num_negatives, range_min, range_max, absolute_margin, relative_margin, sampling_strategy, seed)
    with console.status("mining (encoding a --corpus file's new texts first, if any)"):
        meta = mine_from_pass(guide_dir, out, params, corpus=corpus, corpus_column=corpus_column, guide=guide,
                              encode_batch_size=encode_batch_size, device=device, overwrite=overwrite, query_prompt=query_prompt,
                              corpus_prompt=corpus_prompt, query_prompt_name=query_prompt_name, corpus_prompt_name=corpus_prompt_name)
    kept, dropped = meta["rows"], meta["examples"] - meta["rows"]
    guide_option = _vectors_option(meta["guide"], guide_dir)
    say("done", "green", f"{out}: {kept} rows x {num_negatives} negatives"
        + (f" ({dropped} dropped: not enough negatives in the window; widen --range-max or lower the margin)" if dropped else "")
        + f", mined in {meta['timings']['mine_s']:.2f}s; next: gist precompute-guide {out} {guide_option} ...")


@app.command("filter", short_help="Drop pairs the guide does not rank near the top.")
def filter_command(
    guide_dir: Annotated[Path, typer.Argument(metavar="GUIDE_DIR", help="A finished precompute-guide directory.")],
    out: Annotated[Path, typer.Option(help="The kept examples, in DATA's format (.parquet, .jsonl, .csv, or a directory for save_to_disk) with its original columns.")],
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Keep an example if the guide ranks its positive within the top K candidates for its anchor.")] = None,
    min_score: Annotated[Optional[float], typer.Option(help="Keep an example if the guide's similarity of its anchor and positive is at least S.")] = None,
    among: Annotated[str, typer.Option(help="Candidates the positive is ranked among: positives (every distinct positive text) or all (every text the pass stores in the positives' view: every text of a pass without prompts).")] = "positives",
    data_path: Annotated[Optional[Path], typer.Option("--data", help="The pass's training data, if it moved (default: the path in GUIDE_DIR's manifest).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Consistency filtering from the stored guide pass: drop pairs whose positive the guide does not rank near the top. Loads no model."""
    from pipeline.filter import FilterParams, filter_pass, summary_path

    with console.status("ranking every positive for its anchor"):
        summary = filter_pass(guide_dir, out, FilterParams(top_k, min_score, among), data=data_path, overwrite=overwrite)
    dropped = ", ".join(f"{t} {v['dropped']}/{v['examples']}" for t, v in summary["per_task"].items())
    guide_option = _vectors_option(summary["guide"], guide_dir)
    say("done", "green", f"{out}: kept {summary['kept']} of {summary['examples']} examples (dropped per task: {dropped}); "
        f"summary {summary_path(out)}; next: gist precompute-guide {out} {guide_option} ... (encodes nothing)")


@app.command("report", short_help="Data-quality report: false-negative rates, plots.")
def report_command(
    guide_dir: Annotated[Path, typer.Argument(metavar="GUIDE_DIR", help="A finished precompute-guide or plan directory.")],
    out: Annotated[Path, typer.Option(help="Output directory for report.md, report.json and the plots.")],
    examples: Annotated[int, typer.Option(min=0, help="Most similar masked pairs to list.")] = 20,
    filter_summary: Annotated[Optional[Path], typer.Option("--filter", help="A `gist filter` summary (CLEAN.filter.json) to add: what the filter dropped, per task, the worst pairs.")] = None,
    margins: Annotated[Optional[str], typer.Option(help="Instead of the report, sweep these margins (e.g. 0,0.02,0.05,0.1): masked fraction per block and similarity histograms at each, from the stored pass (margins.md/.json/.png).")] = None,
    margin_strategy: Annotated[Optional[str], typer.Option(help="The sweep's margin strategy: absolute or relative (default: the plan's).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Data-quality report: false-negative rates, guide-similarity plots, the guide's strongest vetoes. Loads no model."""
    if margins is not None:
        from pipeline.margins import parse_margins, write_margin_sweep

        sweep = write_margin_sweep(guide_dir, out, parse_margins(margins), margin_strategy, overwrite=overwrite)
        table = Table(title=f"masked fraction per block, {sweep['margin_strategy']} margin ({sweep['batches']} batches)")
        for column in ("margin", "ap", "aa", "pp", "an"):
            table.add_column(column, justify="right")
        for row in sweep["margins"]:
            table.add_row(f"{row['margin']:g}", *(f"{f:.2%}" if f is not None else "–" for f in row["masked_fraction"].values()))
        Console().print(table)
        say("done", "green", str(out / "margins.md"))
        return
    if margin_strategy is not None:
        raise typer.BadParameter("only with --margins", param_hint="--margin-strategy")
    from pipeline.report import write_report

    report = write_report(guide_dir, out, examples, filter_summary, overwrite=overwrite)
    rates = ", ".join(f"{b} {v['rate']:.2%}" for b, v in report["blocks"].items() if v["rate"] is not None)
    say("done", "green", f"{out / 'report.md'}: {report['counts']['batches']} batches, masked {rates}")


@app.command("train", short_help="Stage 2: train a student with the stored masks.")
def train_command(
    data_path: Annotated[Path, typer.Argument(metavar="DATA", help="The training data stage 1 was run on, in any form precompute-guide takes (a Hub id, a local file with the same rows: the fingerprint decides).")],
    masks_path: Annotated[Path, typer.Option("--masks", help="masks.parquet from precompute-guide or plan.")],
    student: Annotated[str, typer.Option(help="Student model directory (sentence-transformers).")],
    out: Annotated[Path, typer.Option(help="Output directory: run.json, checkpoints/, final/, train_log.jsonl, eval.json.")],
    columns: Columns = None,
    loss: Annotated[str, typer.Option(help="guided: GuidedMaskLoss with the stored masks; unguided: the same candidates (ap, aa, pp, an) with only self-pairs masked, no guide vetoes (the ablation); mnrl: MultipleNegativesRankingLoss on the same plan (the baseline: does guidance pay on your data?); none: only the --distill term.")] = "guided",
    mini_batch_size: Annotated[Optional[int], typer.Option(min=1, help="Train large batches with GradCache: CachedGuidedMaskLoss (or CachedMultipleNegativesRankingLoss with --loss mnrl) embedding N examples at a time. Memory follows N, not the batch size; the loss is unchanged.")] = None,
    matryoshka_dims: Annotated[Optional[str], typer.Option(help="Wrap the loss in MatryoshkaLoss with these dimensions, e.g. 384,256,128,64.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-6,
    warmup_ratio: Annotated[float, typer.Option(help="Share of steps for linear warm-up.")] = 0.1,
    lr_scheduler: Annotated[str, typer.Option(help="transformers' lr_scheduler_type: linear, cosine, constant, constant_with_warmup, ...")] = "linear",
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    temperature: Annotated[float, typer.Option(help="Softmax temperature (GISTEmbedLoss default 0.01; MNRL's scale is 1/temperature).")] = 0.01,
    max_seq_length: Annotated[Optional[int], typer.Option(min=1, help="Truncate the student's inputs at N tokens (default: the student's own).")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(show_default=False, help="Recompute activations in backward: less memory, ~30% slower steps.")] = False,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (-1: all planned epochs).")] = -1,
    logging_steps: Annotated[int, typer.Option(min=1, help="Log the loss every N steps.")] = 10,
    save_steps: Annotated[int, typer.Option(min=1, help="Checkpoint every N steps.")] = 500,
    eval_steps: Annotated[Optional[int], typer.Option(min=1, help="Evaluate on --sts/--beir every N steps during training (the trainer's evaluator); the best checkpoint is recorded in OUT/eval.json.")] = None,
    resume: Annotated[bool, typer.Option(show_default=False, help="Continue from the last checkpoint in OUT/checkpoints (same options as the run being resumed).")] = False,
    seed: Annotated[int, typer.Option(help="Trainer seed (initialisation, dropout); batches come from the plan.")] = 0,
    sts: Annotated[Optional[Path], typer.Option(help="STS file to evaluate on (after training, and with --eval-steps during it).")] = None,
    beir: Annotated[Optional[Path], typer.Option(help="BEIR directory to evaluate on (after training, and with --eval-steps during it).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, or the trainer's mixed precision: bf16 (CPU or GPU) or fp16 (GPU).")] = "fp32",
    distill: Annotated[Optional[str], typer.Option(help="Add distillation from the guide pass's stored embeddings (found beside --masks): embed (EmbedDistillLoss, cosine, projected when dims differ) or kl (in-batch score distillation over the loss's candidates, masked ones left out).")] = None,
    distill_weight: Annotated[float, typer.Option(help="Weight of the --distill term (the contrastive loss has weight 1; with --loss none, 0).")] = 1.0,
    report_to: Annotated[Optional[str], typer.Option(help="Where the trainer reports the loss and metrics, e.g. tensorboard, trackio, wandb (comma-separated; whatever is installed). Default: none. TensorBoard logs go to OUT/checkpoints/runs/ (under .OUT.gist-stage/new/ while the run trains).")] = None,
    save_total_limit: Annotated[Optional[int], typer.Option(min=1, help="Keep at most N checkpoints (the oldest are deleted; the best one, with --eval-steps, is kept). Default: all.")] = None,
    optim: Annotated[Optional[str], typer.Option(help="The trainer's optimizer (transformers' optim names: adamw_torch, adamw_torch_fused, adafactor, sgd, ...). Default: the trainer's.")] = None,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (the trainer's max_grad_norm).")] = 1.0,
    dataloader_num_workers: Annotated[int, typer.Option(min=0, help="Worker processes loading batches (the trainer's dataloader_num_workers).")] = 0,
    push_to_hub: Annotated[Optional[str], typer.Option(metavar="REPO_ID", help="Upload OUT/final to this Hugging Face Hub model repository when training ends (checked before training starts: the Hub must be reachable and a token set).")] = None,
    directions: Annotated[str, typer.Option(help="MultipleNegativesRankingLoss's directions, comma-separated, with the guide's masks in each: query_to_doc (always), query_to_query (needs masks planned with --contrast-anchors), doc_to_query (--contrast-doc-query), doc_to_doc (--contrast-positives, and --contrast-doc-negatives with negative columns). GTE: all four.")] = "query_to_doc",
    partition_mode: Annotated[str, typer.Option(help="joint: one softmax over every direction's candidates; per_direction: one per direction, averaged (not with query_to_query or doc_to_doc).")] = "joint",
    hardness_mode: Annotated[Optional[str], typer.Option(help="Hardness-weighted negatives: in_batch_negatives (Lan et al. 2025), hard_negatives (EmbeddingGemma) or all_negatives; adds --hardness-strength x the detached cosine to those logits. Masked candidates stay out.")] = None,
    hardness_strength: Annotated[float, typer.Option(min=0.0, help="alpha of --hardness-mode (Lan et al. 9, EmbeddingGemma 5).")] = 0.0,
    prompts: Annotated[Optional[str], typer.Option(help="The student's training prompts (SentenceTransformerTrainingArguments' prompts): one prompt for every column ('query: '), column=prompt pairs ('anchor=query: ,positive=passage: ,negative=passage: '; negative: every negative column), or a JSON object of them ('{\"anchor\": \"query: \"}').")] = None,
    prompt_names: Annotated[Optional[str], typer.Option(help="Instead of --prompts: names of the student's own prompts (its config's prompts), in the same forms, e.g. 'anchor=query,positive=document,negative=document'.")] = None,
    query_prompt: QueryPrompt = None,
    corpus_prompt: CorpusPrompt = None,
    query_prompt_name: QueryPromptName = None,
    corpus_prompt_name: CorpusPromptName = None,
    subset: Subset = None,
    split: Split = None,
    revision: Revision = None,
) -> None:
    """Stage 2: train the student with the stored masks; the guide is never loaded."""
    import json

    from pipeline.train import LOSSES, PRECISIONS, TrainSettings, train_student

    if loss not in LOSSES:
        raise typer.BadParameter(f"use one of {', '.join(LOSSES)}", param_hint="--loss")
    if precision not in PRECISIONS:
        raise typer.BadParameter(f"use one of {', '.join(PRECISIONS)}", param_hint="--precision")
    try:
        dims = tuple(int(d) for d in matryoshka_dims.split(",")) if matryoshka_dims else ()
    except ValueError:
        raise typer.BadParameter("comma-separated integers, e.g. 384,256,128,64", param_hint="--matryoshka-dims") from None
    settings = TrainSettings(
        loss=loss, lr=lr, warmup_ratio=warmup_ratio, lr_scheduler=lr_scheduler, weight_decay=weight_decay, temperature=temperature,
        mini_batch_size=mini_batch_size, matryoshka_dims=dims, max_seq_length=max_seq_length, gradient_checkpointing=gradient_checkpointing,
        max_steps=max_steps, logging_steps=logging_steps, save_steps=save_steps, eval_steps=eval_steps, seed=seed, precision=precision,
        distill=distill, distill_weight=distill_weight,
        report_to=tuple(name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none") if report_to else (),
        save_total_limit=save_total_limit, optim=optim, max_grad_norm=max_grad_norm, dataloader_num_workers=dataloader_num_workers, hub_model_id=push_to_hub,
        directions=tuple(d.strip() for d in directions.split(",") if d.strip()), partition_mode=partition_mode,
        hardness_mode=hardness_mode, hardness_strength=hardness_strength,
        prompts=prompts, prompt_names=prompt_names, query_prompt=query_prompt, corpus_prompt=corpus_prompt,
        query_prompt_name=query_prompt_name, corpus_prompt_name=corpus_prompt_name,
    )
    final = train_student(data_path, masks_path, student, out, settings, columns=columns, resume=resume, device=device, sts=sts, beir=beir,
                          subset=subset, split=split, revision=revision)
    if final is None:
        return  # a rank other than 0 under torchrun
    say("done", "green", str(final))
    if (sts or beir) and (out / "eval.json").exists():
        print(json.dumps(json.loads((out / "eval.json").read_text()), indent=2))


@app.command("evaluate", short_help="Evaluate a model on STS and/or BEIR retrieval.")
def evaluate_command(
    model_path: Annotated[str, typer.Argument(metavar="MODEL", help="A sentence-transformers model directory.")],
    sts: Annotated[Optional[Path], typer.Option(help="STS file with sentence1, sentence2, score.")] = None,
    beir: Annotated[Optional[Path], typer.Option(help="BEIR directory: corpus.jsonl[.gz], queries.jsonl, qrels/test.tsv.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the results as JSON here.")] = None,
    max_seq_length: Annotated[Optional[int], typer.Option(min=1, help="Truncate inputs at N tokens (default: the model's own), e.g. to match a student trained with --max-seq-length.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    query_prompt: QueryPrompt = None,
    corpus_prompt: CorpusPrompt = None,
    query_prompt_name: QueryPromptName = None,
    corpus_prompt_name: CorpusPromptName = None,
    overwrite: Overwrite = False,
) -> None:
    """Evaluate a model on STS (Spearman) and/or BEIR retrieval (nDCG@10); prints a table."""
    from pipeline.evaluate import evaluate_path
    from pipeline.prompts import EvalPrompts

    if sts is None and beir is None:
        raise typer.BadParameter("give --sts FILE and/or --beir DIR", param_hint="--sts/--beir")
    results = evaluate_path(model_path, sts, beir, out=out, max_seq_length=max_seq_length, device=device, overwrite=overwrite,
                            prompts=EvalPrompts(query_prompt, corpus_prompt, query_prompt_name, corpus_prompt_name))
    table = Table("metric", "value", title=Text(str(model_path)))
    for name, value in results.items():
        table.add_row(name, f"{value:.4f}")
    Console().print(table)


@app.command("static-student", short_help="Make a static-embedding student (model2vec distillation or random).")
def static_student_command(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="A local model directory (distill: a sentence-transformers or transformers model; random: any directory with tokenizer.json) or, for --init random, a tokenizer.json file.")],
    out: Annotated[Path, typer.Option(help="Output directory: a sentence-transformers model (StaticEmbedding) for gist train --student.")],
    init: Annotated[str, typer.Option(help="distill: model2vec distillation of SOURCE (needs the static extra: pip install 'gist[static]'); random: N(0, 1) token vectors over SOURCE's tokenizer, as sentence-transformers' static-embedding recipe.")] = "distill",
    dim: Annotated[int, typer.Option(min=1, help="Embedding dimension (distill: PCA dimensions, at most SOURCE's hidden size).")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of --init random.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda: where SOURCE embeds its vocabulary (distill).")] = "auto",
    overwrite: Overwrite = False,
) -> None:
    """Write a static-embedding student (sentence-transformers StaticEmbedding) to OUT, without Hub access; train it with gist train --student OUT."""
    from pipeline.static import INITS, make_static_student, static_record

    if init not in INITS:
        raise typer.BadParameter(f"use one of {', '.join(INITS)}", param_hint="--init")
    made = make_static_student(source, out, init=init, dim=dim, seed=seed, device=device, overwrite=overwrite)
    record = static_record(made)
    say("done", "green", f"{made}: static student, {record['vocab_size']:,} tokens x {record['dim']} dims ({init} from {source})")


@app.command("verify", short_help="Check every file of a run directory against its manifest.")
def verify_command(
    run_dir: Annotated[Path, typer.Argument(metavar="GUIDE_DIR", help="A finished precompute-guide or plan directory.")],
) -> None:
    """Hash every file the manifest of GUIDE_DIR lists, whole, against its recorded sha256; exits 1 naming the first missing or different file. (Opening a pass checks sizes and sampled blocks only.)"""
    from pipeline.artifacts import MANIFEST, verify_run

    files = verify_run(run_dir)["files"]
    say("ok", "green", f"{run_dir}: {len(files)} files match {MANIFEST} ({sum(f['bytes'] for f in files.values()) / 2**20:,.1f} MiB hashed)")


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. Not KeyboardInterrupt, which click turns into a silent exit before main()
    can say how to resume; a BaseException, so no `except Exception` on the way swallows it."""


def _interrupted(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)  # temporary files are removed on the way out, finished work stays


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 1; Ctrl-C and
    SIGTERM stop with status 130, leaving a directory the same command resumes."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupted)
    try:
        app()
    except GistError as e:
        if state["debug"]:
            traceback.print_exc()
        say("error:", "red", str(e))
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt) as e:
        say("interrupted", "red", f"({e or 'SIGINT'}): an output is only ever replaced whole, once complete; a guide pass resumes when the same command runs again, a training run with --resume once it has a complete checkpoint (else it starts afresh)")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the interface is one line, the traceback is behind --debug
        if state["debug"]:
            raise
        say("error:", "red", f"{type(e).__name__}: {e} (run with --debug for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()

"""STS and retrieval evaluation on local files, with sentence-transformers' own evaluators.

- STS: a Parquet/JSONL/CSV file with `sentence1`, `sentence2`, `score` -> Spearman of cosine similarity.
- BEIR: a directory with `corpus.jsonl[.gz]` (_id, title, text), `queries.jsonl` (_id, text) and
  `qrels/test.tsv` (query-id, corpus-id, score) -> nDCG@10, MRR@10, Recall@100 of cosine retrieval.
"""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path

import pyarrow.compute as pc
from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator, InformationRetrievalEvaluator

from pipeline import GistError
from pipeline.artifacts import write_json
from pipeline.data import read_table
from pipeline.outputs import Kind, Output
from pipeline.prompts import EvalPrompts

NO_PROMPTS = EvalPrompts()


class PromptedSimilarityEvaluator(EmbeddingSimilarityEvaluator):
    """EmbeddingSimilarityEvaluator that encodes both sentences with a prompt (or a prompt name)."""

    def __init__(self, *args, prompt_kwargs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt_kwargs = dict(prompt_kwargs or {})

    def embed_inputs(self, model, sentences, **kwargs):
        return super().embed_inputs(model, sentences, **{**self.prompt_kwargs, **kwargs})


def sts_evaluator(path: Path, prompts: EvalPrompts = NO_PROMPTS) -> EmbeddingSimilarityEvaluator:
    table = read_table(path)
    missing = {"sentence1", "sentence2", "score"} - set(table.column_names)
    if missing:
        raise GistError(f"{path}: STS file needs columns sentence1, sentence2, score; missing {sorted(missing)}")
    return PromptedSimilarityEvaluator(
        table.column("sentence1").to_pylist(), table.column("sentence2").to_pylist(),
        pc.cast(table.column("score"), "float64").to_pylist(), name="sts", show_progress_bar=False, prompt_kwargs=prompts.sts_kwargs(),
    )


def beir_evaluator(beir_dir: Path, prompts: EvalPrompts = NO_PROMPTS) -> InformationRetrievalEvaluator:
    beir_dir = Path(beir_dir)
    corpus_path = next((p for p in (beir_dir / "corpus.jsonl", beir_dir / "corpus.jsonl.gz") if p.exists()), None)
    qrels_path = beir_dir / "qrels" / "test.tsv"
    if corpus_path is None or not (beir_dir / "queries.jsonl").exists() or not qrels_path.exists():
        raise GistError(f"{beir_dir}: a BEIR directory needs corpus.jsonl[.gz], queries.jsonl and qrels/test.tsv")
    corpus_table = read_table(corpus_path)
    titles = corpus_table.column("title").to_pylist() if "title" in corpus_table.column_names else [""] * corpus_table.num_rows
    corpus = {str(i): f"{t} {x}".strip() for i, t, x in zip(corpus_table.column("_id").to_pylist(), titles, corpus_table.column("text").to_pylist())}
    queries_table = read_table(beir_dir / "queries.jsonl")
    all_queries = dict(zip(map(str, queries_table.column("_id").to_pylist()), queries_table.column("text").to_pylist()))
    relevant: dict[str, set[str]] = {}
    with open(qrels_path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if float(row["score"]) > 0:
                relevant.setdefault(str(row["query-id"]), set()).add(str(row["corpus-id"]))
    queries = {q: all_queries[q] for q in relevant if q in all_queries}
    return InformationRetrievalEvaluator(
        queries, corpus, relevant, name="beir", show_progress_bar=False, batch_size=32,
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[100], map_at_k=[100],
        **prompts.ir_kwargs(),
    )


def evaluators(sts: Path | None = None, beir: Path | None = None, prompts: EvalPrompts = NO_PROMPTS) -> dict:
    """The chosen evaluators by name ("sts", "beir"), with `prompts`; building them reads (and checks) their files."""
    return {**({"sts": sts_evaluator(sts, prompts)} if sts else {}), **({"beir": beir_evaluator(beir, prompts)} if beir else {})}


def evaluate_model(model, sts: Path | None = None, beir: Path | None = None, prompts: EvalPrompts = NO_PROMPTS, built: dict | None = None) -> dict[str, float]:
    """Run the chosen evaluators (with `prompts`; or the `built` ones); returns {metric: value} with short, stable metric names."""
    built = built if built is not None else evaluators(sts, beir, prompts)
    results: dict[str, float] = {}
    if "sts" in built:
        scores = built["sts"](model)
        results["sts_spearman"] = scores["sts_spearman_cosine"]
    if "beir" in built:
        scores = built["beir"](model)
        results["beir_ndcg@10"] = scores["beir_cosine_ndcg@10"]
        results["beir_mrr@10"] = scores["beir_cosine_mrr@10"]
        results["beir_recall@100"] = scores["beir_cosine_recall@100"]
    return results


def training_evaluator(built: dict):
    """The evaluator the trainer runs every `eval_steps`: the `built` STS and/or BEIR evaluators (a SequentialEvaluator of both)."""
    from sentence_transformers.sentence_transformer.evaluation import SequentialEvaluator

    chosen = list(built.values())
    return chosen[0] if len(chosen) == 1 else SequentialEvaluator(chosen)


EVALUATION = Kind("evaluation", directory=False, record=lambda out: out)  # the JSON file records the kind


def evaluate_path(model_path: str | Path, sts: Path | None = None, beir: Path | None = None, *, out: Path | None = None,
                  max_seq_length: int | None = None, device: str = "auto", overwrite: bool = False,
                  prompts: EvalPrompts = NO_PROMPTS) -> dict[str, float]:
    """`gist evaluate`: load MODEL, evaluate it on STS and/or BEIR (with `prompts`: the query prompt on
    queries and on both STS sentences, the corpus prompt on the corpus), and (with `out`) write the
    results as JSON; every input is read (the evaluators built) before OUT is touched."""
    from pipeline.guide import load_model

    if sts is None and beir is None:
        raise GistError("give --sts FILE and/or --beir DIR")
    output = Output(out, EVALUATION, inputs={"MODEL": model_path, "--sts": sts, "--beir": beir}, overwrite=overwrite) if out else None
    prompts.check()
    if output:
        output.check()
    built = evaluators(sts, beir, prompts)  # the files are read before the model loads
    model = load_model(str(model_path), device)
    prompts.check_model(model)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    results = evaluate_model(model, built=built)
    if output:
        with output.stage() as stage:
            record = {"prompts": asdict(prompts)} if prompts else {}
            write_json(stage.path(out), {"kind": EVALUATION.name, "model": str(model_path), **record, **results})
    return results

"""Hard negatives from the stored guide pass: sentence-transformers' `mine_hard_negatives` without
encoding the corpus again.

`mine_hard_negatives` takes a model and always encodes the queries and the corpus; stage 1 already
holds the guide's embeddings of every text, so this is its selection, run on stored vectors. The
selection is that of `mine_hard_negatives(..., use_faiss=True, output_format="n-tuple")`:

- queries are the unique anchors; the corpus is deduplicated and always contains the positives;
- candidates are the `range_max + max_positives + 1` nearest corpus texts (FAISS inner product; the
  extra one leaves room for the query itself, as sentence-transformers 6.3 searches);
- a query's own positives are never its negatives; with a margin, a candidate scoring above the
  query's hardest positive p minus the margin is skipped (absolute: s + m > p, relative:
  s > p - |p| * m; relative 0.05 is NV-Retriever's TopK-PercPos 95%);
- the survivors are ranked, the first `range_min` dropped, and `num_negatives` taken from the top
  or sampled at random from the `range_max` window (`random.Random(seed)`, then re-sorted);
- rows whose query lacks `num_negatives` negatives are dropped.

One deliberate difference: a candidate that *is* the anchor's text is skipped (sentence-transformers
mines the anchor as its own negative when it is in the corpus and no margin is set).

Prompts: queries are the anchors' stored view, the corpus the positives' (pipeline.views), i.e.
`mine_hard_negatives(query_prompt=..., corpus_prompt=...)` with the prompts the pass encoded them
with; `--query-prompt` / `--corpus-prompt` (or their names) state them and are refused when the pass
holds no such view. A corpus file's texts without a stored document view are encoded with it.

Reference: NV-Retriever, arXiv 2407.15831 (positive-aware mining).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import GistError
from pipeline.data import TrainingData
from pipeline.guide import gather
from pipeline.outputs import Kind, Output

SAMPLING = ("top", "random")
MINED = Kind("mined", directory=False, record=lambda out: out)  # the Parquet file's metadata records the kind
SEARCH_CHUNK = 16384  # queries per FAISS search call, as mine_hard_negatives' faiss_batch_size


@dataclass(frozen=True)
class MiningParams:
    """mine_hard_negatives' selection options, under the same names."""

    num_negatives: int = 3
    range_min: int = 0
    range_max: int | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    sampling_strategy: str = "top"
    seed: int = 0


@dataclass
class MinedNegatives:
    """Per example: mined negative text ids (-1: none found) and their guide scores (-inf: none)."""

    negative_ids: np.ndarray  # (num_examples, num_negatives) int64
    scores: np.ndarray  # (num_examples, num_negatives) float32
    range_max: int
    skipped: dict = field(default_factory=dict)  # candidates removed by each margin

    @property
    def complete(self) -> np.ndarray:
        """Rows that got all their negatives (the others are dropped, as mine_hard_negatives does)."""
        return (self.negative_ids >= 0).all(axis=1)


def _unique_in_order(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique values in order of first appearance, and each input's position among them."""
    unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return unique[order], position[inverse]


def default_range_max(params: MiningParams, max_positives: int) -> int:
    """mine_hard_negatives' default window: room for skipped candidates when a margin is set."""
    margin = params.absolute_margin is not None or params.relative_margin is not None
    return params.range_min + params.num_negatives * (10 if margin else 1) + max_positives


def check_params(params: MiningParams, range_max: int) -> None:
    if params.num_negatives < 1:
        raise GistError(f"--num-negatives {params.num_negatives}: need at least 1")
    if params.sampling_strategy not in SAMPLING:
        raise GistError(f"--sampling-strategy {params.sampling_strategy}: use top or random")
    if params.range_min < 0:
        raise GistError(f"--range-min {params.range_min}: must be non-negative")
    if params.range_min >= range_max:
        raise GistError(f"--range-min {params.range_min} must be smaller than --range-max {range_max}")
    if params.num_negatives > range_max - params.range_min:
        raise GistError(
            f"cannot mine {params.num_negatives} negatives from the {range_max - params.range_min} candidates between "
            f"--range-min {params.range_min} and --range-max {range_max}; lower --num-negatives or widen the range"
        )


def mine_negatives(
    embeddings: np.ndarray, anchor_ids: np.ndarray, positive_ids: np.ndarray, corpus_ids: np.ndarray, params: MiningParams,
    query_rows: np.ndarray | None = None, document_rows: np.ndarray | None = None,
) -> MinedNegatives:
    """Mine negatives for every example from unit guide embeddings.

    Args:
        embeddings: (rows, dim) float32 unit vectors (stage 1's stored vectors, maybe extended).
        anchor_ids: (num_examples,) text ids of each example's anchor.
        positive_ids: (num_examples,) text ids of each example's positive.
        corpus_ids: text ids to draw negatives from; the positives are added, as mine_hard_negatives does.
        params: the selection options.
        query_rows: the row of each text id's query view (the anchors'); None: row = text id.
        document_rows: the row of each text id's document view (the corpus'); None: row = text id.
    """
    import faiss

    queries, query_of_row = _unique_in_order(anchor_ids)
    corpus, _ = _unique_in_order(np.concatenate([corpus_ids, positive_ids]))
    max_positives = int(np.bincount(query_of_row).max())  # rows per query, as mine_hard_negatives counts them
    range_max = params.range_max if params.range_max is not None else default_range_max(params, max_positives)
    check_params(params, range_max)

    query_rows = np.arange(len(embeddings)) if query_rows is None else query_rows
    document_rows = np.arange(len(embeddings)) if document_rows is None else document_rows
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(gather(embeddings, document_rows[corpus]))
    query_vectors = gather(embeddings, query_rows[queries])
    found = [index.search(query_vectors[s : s + SEARCH_CHUNK], range_max + max_positives + 1) for s in range(0, len(queries), SEARCH_CHUNK)]
    scores = np.concatenate([f[0] for f in found])
    candidates = np.concatenate([f[1] for f in found])
    candidates = np.where(candidates >= 0, corpus[np.maximum(candidates, 0)], -1)  # corpus positions -> text ids

    # Never a query's own positives, never the query itself, never FAISS's -1 padding.
    num_texts = np.int64(len(document_rows))
    positive_keys = np.unique(query_of_row * num_texts + positive_ids)
    own = np.isin(np.arange(len(queries))[:, None] * num_texts + candidates, positive_keys)
    scores[own | (candidates == queries[:, None]) | (candidates < 0)] = -np.inf

    skipped = {}
    if params.absolute_margin is not None or params.relative_margin is not None:
        # The hardest (lowest-scoring) positive of each query sets its bar.
        positive_scores = np.einsum("nd,nd->n", gather(embeddings, query_rows[anchor_ids]), gather(embeddings, document_rows[positive_ids]))
        bar = np.full(len(queries), np.inf, dtype=np.float32)
        np.minimum.at(bar, query_of_row, positive_scores)
        bar = bar[:, None]
        if params.absolute_margin is not None:
            removed = scores + np.float32(params.absolute_margin) > bar
            skipped["absolute_margin"] = int(removed.sum())
            scores[removed] = -np.inf
        if params.relative_margin is not None:
            removed = scores > bar - np.abs(bar) * np.float32(params.relative_margin)
            skipped["relative_margin"] = int(removed.sum())
            scores[removed] = -np.inf

    ranked = np.argsort(-scores, axis=1, kind="stable")[:, params.range_min : range_max]
    scores = np.take_along_axis(scores, ranked, axis=1)
    candidates = np.take_along_axis(candidates, ranked, axis=1)
    if params.sampling_strategy == "top":
        picked = np.broadcast_to(np.arange(params.num_negatives), (len(queries), params.num_negatives))
    else:
        rng = random.Random(params.seed)
        options = np.maximum(np.isfinite(scores).sum(axis=1), params.num_negatives)
        picked = np.array([rng.sample(range(n), k=params.num_negatives) for n in options.tolist()], dtype=np.int64)
        picked = np.take_along_axis(picked, np.argsort(-np.take_along_axis(scores, picked, axis=1), axis=1, kind="stable"), axis=1)
    scores = np.take_along_axis(scores, picked, axis=1)
    candidates = np.where(np.isfinite(scores), np.take_along_axis(candidates, picked, axis=1), -1)
    return MinedNegatives(candidates[query_of_row], scores[query_of_row], range_max, skipped)


def write_mined(out_path: Path, texts: pa.Array, data: TrainingData, mined: MinedNegatives, meta: dict) -> int:
    """Write the examples that got all their negatives as Parquet (anchor, positive, negative_1..k[, task]).

    The columns are those `gist precompute-guide` reads; `meta` (options, source, counts) goes into
    the file's metadata under b"gist". Returns the number of rows written.
    """
    keep = np.flatnonzero(mined.complete)
    columns = {"anchor": texts.take(data.anchor_ids[keep]), "positive": texts.take(data.positive_ids[keep])}
    for c in range(mined.negative_ids.shape[1]):
        columns[f"negative_{c + 1}"] = texts.take(mined.negative_ids[keep, c])
    if data.tasks is not None:
        columns["task"] = pa.array(data.tasks, pa.string()).take(keep)
    table = pa.table(columns).replace_schema_metadata({b"gist": json.dumps(meta, sort_keys=True).encode()})
    pq.write_table(table, out_path)
    return len(keep)


def mine_from_pass(
    guide_dir: str | Path, out: str | Path, params: MiningParams = MiningParams(), *, corpus: str = "positives",
    corpus_column: str = "text", guide: str | None = None, encode_batch_size: int = 64, device: str = "auto", overwrite: bool = False,
    query_prompt: str | None = None, corpus_prompt: str | None = None, query_prompt_name: str | None = None, corpus_prompt_name: str | None = None,
) -> dict:
    """Mine hard negatives for every example of a stored guide pass and write them to `out` (.parquet).

    `corpus`: "positives" (the data's positives, as mine_hard_negatives), "all" (every text the
    pass stores in the positives' view: every text of a pass without prompts), or a Parquet/JSONL/CSV file whose texts not in the pass are encoded
    once with the guide (`guide`, default the path in the pass's manifest) in the document view.
    `query_prompt` / `corpus_prompt` (or the guide's prompt names): as mine_hard_negatives takes
    them; they must be the prompts the pass encoded anchors / positives with. Returns the metadata
    written with the rows.
    """
    from pipeline import data as data_mod, guide as guide_mod
    from pipeline.prompts import EvalPrompts
    from pipeline.views import GuideViews, served_prompt

    guide_dir, out = Path(guide_dir), Path(out)
    if params.sampling_strategy not in SAMPLING:
        raise GistError(f"--sampling-strategy {params.sampling_strategy}: use one of {', '.join(SAMPLING)}")
    if out.suffix != ".parquet":
        raise GistError(f"--out {out}: write a .parquet file")
    corpus_file = None if corpus in ("positives", "all") else Path(corpus)
    t_start = time.perf_counter()
    manifest, training, embeddings = guide_mod.load_guide_pass(guide_dir)
    views = GuideViews.from_record(manifest["guide"]["views"])
    asked = EvalPrompts(query_prompt, corpus_prompt, query_prompt_name, corpus_prompt_name).resolve(
        manifest["guide"].get("prompts") or {}, f"the guide of {guide_dir}")
    for option, prompt, role in zip(("--query-prompt", "--corpus-prompt"), asked, ("anchor", "positive")):
        served_prompt(views, role, prompt, option)
    model_path = guide or manifest["guide"]["path"]  # what encodes a --corpus file's new texts
    output = Output(out, MINED, overwrite=overwrite, inputs={
        "GUIDE_DIR": guide_dir, "--corpus": corpus_file, "the guide model": model_path if corpus_file else None})
    output.check()
    texts = training.texts
    query_rows = training.rows.of("anchor", np.arange(len(texts)))
    document_rows = training.rows.of("positive", np.arange(len(texts)))
    if corpus == "positives":
        corpus_ids = training.positive_ids
    elif corpus == "all":
        corpus_ids = np.flatnonzero(document_rows >= 0)
    else:
        # A corpus file: its texts stored in the document view reuse their vectors, the rest are encoded once.
        corpus_texts = data_mod.read_corpus(Path(corpus), corpus_column)
        corpus_ids = pc.index_in(pa.array(corpus_texts, pa.large_string()), value_set=texts).fill_null(-1).to_numpy().astype(np.int64)
        unstored = np.flatnonzero((corpus_ids < 0) | (document_rows[np.maximum(corpus_ids, 0)] < 0))
        new_texts = [corpus_texts[i] for i in unstored]
        if manifest["guide"].get("source") == "embeddings":  # a pass from --embeddings VECTORS: no model to encode with
            if new_texts:
                where = "not stored as documents (positives' view)" if (corpus_ids[unstored] >= 0).all() else "not"
                raise GistError(f"--corpus {corpus}: {len(new_texts)} text(s) {where} in {guide_dir}, e.g. {new_texts[0][:60]!r}, and its vectors came from "
                                f"--embeddings {manifest['guide']['name']} (no model to encode them): add their (document) vectors there and run precompute-guide again")
            new_vectors = np.zeros((0, embeddings.shape[1]), dtype=np.float32)
        else:
            if Path(model_path).is_dir() and guide_mod.model_identity(model_path)["sha256"] != manifest["guide"]["sha256"]:
                raise GistError(f"--guide {model_path}: not the guide of {guide_dir} (model files differ); mining needs one guide's embeddings")
            model = guide_mod.load_guide(model_path, device, manifest["guide"]["dtype"], manifest["guide"]["max_seq_length"])  # encoding as the pass did
            new_vectors, _ = guide_mod.embed(model, new_texts, views.view_of("positive"), encode_batch_size)
        new_rows = len(embeddings) + np.arange(len(new_texts))
        new = corpus_ids[unstored] < 0  # texts not in the pass get text ids after its own
        known = corpus_ids[unstored[~new]]
        document_rows[known] = new_rows[~new]
        corpus_ids[unstored[new]] = len(texts) + np.arange(int(new.sum()))
        texts = pa.concat_arrays([texts, pa.array([t for t, n in zip(new_texts, new) if n], pa.large_string())])
        query_rows = np.concatenate([query_rows, np.full(int(new.sum()), -1)])
        document_rows = np.concatenate([document_rows, new_rows[new]])
        embeddings = np.concatenate([embeddings, new_vectors])
    t_load = time.perf_counter()
    mined = mine_negatives(embeddings, training.anchor_ids, training.positive_ids, corpus_ids, params, query_rows, document_rows)
    t_mine = time.perf_counter()
    meta = {
        "kind": MINED.name,
        "mining": {**asdict(params), "range_max": mined.range_max, "corpus": corpus if corpus in ("positives", "all") else str(Path(corpus).resolve())},
        "guide_dir": str(guide_dir.resolve()), "guide": manifest["guide"], "dataset": manifest["dataset"],
        "corpus_texts": len(np.unique(corpus_ids)), "encoded_texts": len(embeddings) - training.rows.num_rows,
        "query_prompt": views.view_of("anchor").prompt, "corpus_prompt": views.view_of("positive").prompt,
        "examples": training.num_examples, "skipped_candidates": mined.skipped,
        "timings": {"load_s": round(t_load - t_start, 3), "mine_s": round(t_mine - t_load, 3)},
    }
    with output.stage() as stage:
        meta["rows"] = write_mined(stage.path(out), texts, training, mined, {**meta, "rows": int(mined.complete.sum())})
    return meta

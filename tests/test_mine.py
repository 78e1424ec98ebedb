"""`gist mine` against sentence-transformers' own `mine_hard_negatives`, and reuse of stored embeddings."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import read_manifest
from pipeline.guide import load_guide_pass, read_embeddings
from pipeline.mine import MiningParams, mine_negatives
from tests.conftest import GUIDE_SAMEVOCAB, GUIDE_STATIC, gist

SCORE_TIES = 1e-5  # ST re-encodes in other batches: a swap is allowed only between scores this close

CONFIGS = {
    "positives-top": dict(corpus="positives", num_negatives=3),
    "all-relative-range": dict(corpus="all", num_negatives=2, relative_margin=0.05, range_min=2),
    "positives-absolute-random": dict(corpus="positives", num_negatives=2, absolute_margin=0.02, sampling_strategy="random", seed=7),
    "all-range-max": dict(corpus="all", num_negatives=4, range_max=12, relative_margin=0.1),
}


@pytest.fixture(scope="module")
def stored(static_run):
    _, data, embeddings = load_guide_pass(static_run)
    return data, embeddings


def reference(data, corpus: str, **options):
    """sentence-transformers' mine_hard_negatives, re-encoding with the same guide: {(anchor, positive): (negatives, scores)}."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    columns = data.text_columns()
    dataset = Dataset.from_dict({"anchor": columns["anchor"].to_pylist(), "positive": columns["positive"].to_pylist()})
    corpus_texts = data.texts.to_pylist() if corpus == "all" else None
    random.seed(options.get("seed", 0))  # mine_hard_negatives samples with the global `random`
    options = {k: v for k, v in options.items() if k != "seed"}
    mined = mine_hard_negatives(
        dataset, SentenceTransformer(str(GUIDE_STATIC), device="cpu"), corpus=corpus_texts, use_faiss=True,
        output_format="n-tuple", output_scores=True, verbose=False, **options,
    )
    negatives = [c for c in mined.column_names if c.startswith("negative_")]
    return {(row["anchor"], row["positive"]): ([row[c] for c in negatives], row["scores"][1:]) for row in mined}


def ours(data, embeddings, corpus: str, **options):
    corpus_ids = data.positive_ids if corpus == "positives" else np.arange(len(data.texts))
    mined = mine_negatives(embeddings, data.anchor_ids, data.positive_ids, corpus_ids, MiningParams(**options))
    texts = np.asarray(data.texts.to_pylist(), dtype=object)
    return {
        (texts[data.anchor_ids[i]], texts[data.positive_ids[i]]): (texts[mined.negative_ids[i]].tolist(), mined.scores[i].tolist())
        for i in np.flatnonzero(mined.complete)
    }


def assert_same_negatives(got: dict, expected: dict) -> None:
    """Same rows, same negatives in the same order, except swaps between near-equal scores."""
    assert got.keys() == expected.keys(), f"rows differ: {len(got.keys() - expected.keys())} only ours, {len(expected.keys() - got.keys())} only ST"
    identical = 0
    for key, (negatives, scores) in got.items():
        st_negatives, st_scores = expected[key]
        np.testing.assert_allclose(scores, st_scores, atol=SCORE_TIES, err_msg=str(key))
        for mine, theirs, score in zip(negatives, st_negatives, scores):
            if mine != theirs:  # a tie: the text ST put here scores the same for this anchor
                assert any(abs(s - score) < SCORE_TIES for n, s in zip(st_negatives, st_scores) if n == theirs)
        identical += negatives == st_negatives
    assert identical >= 0.98 * len(got), f"only {identical}/{len(got)} rows identical"


@pytest.mark.parametrize("name", CONFIGS)
def test_mined_negatives_equal_sentence_transformers(stored, name):
    data, embeddings = stored
    options = dict(CONFIGS[name])
    corpus = options.pop("corpus")
    expected = reference(data, corpus, **options)
    assert len(expected) > 100, "the configuration must mine something to compare"
    assert_same_negatives(ours(data, embeddings, corpus, **options), expected)


def test_mine_never_returns_positives_or_the_anchor(stored):
    data, embeddings = stored
    mined = mine_negatives(embeddings, data.anchor_ids, data.positive_ids, np.arange(len(data.texts)), MiningParams(num_negatives=5))
    positives_of = {}
    for a, p in zip(data.anchor_ids, data.positive_ids):
        positives_of.setdefault(a, set()).add(p)
    for a, negatives in zip(data.anchor_ids, mined.negative_ids):
        assert a not in negatives and not positives_of[a] & set(negatives.tolist())
    assert (np.diff(mined.scores, axis=1) <= 0).all(), "negatives are ordered by guide score"


def test_gist_mine_then_precompute_reuses_every_embedding(static_run, triplets, tmp_path):
    mined_path = tmp_path / "mined.parquet"
    gist("mine", static_run, "--out", mined_path, "--corpus", "all", "--num-negatives", "2", "--relative-margin", "0.05")
    table = pq.read_table(mined_path)
    assert table.column_names == ["anchor", "positive", "negative_1", "negative_2", "task"]
    meta = json.loads(table.schema.metadata[b"gist"])
    assert meta["mining"]["relative_margin"] == 0.05 and meta["rows"] == table.num_rows and meta["encoded_texts"] == 0
    assert table.num_rows > 256

    out = tmp_path / "second"
    result = gist("precompute-guide", mined_path, "--guide", GUIDE_STATIC, "--out", out, "--batch-size", "16", "--reuse", static_run)
    encoding = read_manifest(out)["encoding"]
    assert encoding["encoded_texts"] == 0 and encoding["reused_texts"] == read_manifest(out)["dataset"]["num_texts"]
    assert "0 encoded" in result.stderr
    # Reused vectors are the stored ones, so the second pass holds exactly the first pass's embeddings.
    first = dict(zip(pq.read_table(static_run / "texts.parquet").column("text").to_pylist(), read_embeddings(static_run / "embeddings.parquet")))
    second_texts = pq.read_table(out / "texts.parquet").column("text").to_pylist()
    np.testing.assert_array_equal(read_embeddings(out / "embeddings.parquet"), np.stack([first[t] for t in second_texts]))


def test_gist_mine_with_a_corpus_file_encodes_only_new_texts(static_run, stored, tmp_path):
    data, _ = stored
    new = [f"a sentence about topic number {i} that stage one never saw" for i in range(20)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in data.texts[:300].to_pylist() + new))
    mined_path = tmp_path / "mined.parquet"
    gist("mine", static_run, "--out", mined_path, "--corpus", corpus, "--num-negatives", "1", "--guide", GUIDE_STATIC)
    meta = json.loads(pq.read_table(mined_path).schema.metadata[b"gist"])
    assert meta["encoded_texts"] == len(new)
    allowed = set(data.texts[:300].to_pylist()) | set(new) | set(data.texts.take(data.positive_ids).to_pylist())
    assert set(pq.read_table(mined_path).column("negative_1").to_pylist()) <= allowed
    for guide, message in ((GUIDE_SAMEVOCAB, "not the guide of"), (tmp_path / "nowhere", "no such model directory")):
        proc = gist("mine", static_run, "--out", tmp_path / "m.parquet", "--corpus", corpus, "--guide", guide, check=False)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_mine_refuses_bad_options(static_run, tmp_path):
    proc = gist("mine", static_run, "--out", tmp_path / "m.parquet", "--range-min", "5", "--range-max", "6", "--num-negatives", "3", check=False)
    assert proc.returncode == 1 and "cannot mine 3 negatives" in proc.stderr and "Traceback" not in proc.stderr
    proc = gist("mine", static_run, "--out", tmp_path / "m.csv", check=False)
    assert proc.returncode == 1 and "write a .parquet file" in proc.stderr
    proc = gist("mine", tmp_path / "nowhere", "--out", tmp_path / "m.parquet", check=False)
    assert proc.returncode == 1 and "not a finished gist run directory" in proc.stderr



def test_reuse_refuses_another_guides_embeddings(static_run, triplets, tmp_path):
    proc = gist("precompute-guide", triplets, "--guide", GUIDE_SAMEVOCAB, "--out", tmp_path / "out", "--reuse", static_run, check=False)
    assert proc.returncode == 1 and "cannot be reused" in proc.stderr and "Traceback" not in proc.stderr

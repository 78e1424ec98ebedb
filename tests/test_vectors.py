"""`gist precompute-guide DATA --embeddings VECTORS`: any embedder's vectors as the guide pass (issue 23, item 2).

The vectors a tiny-model pass stored, written out by hand (Parquet text -> vector in another order with extra
texts; .npy in text-id order, scaled off unit norm), make a pass whose masks equal the model pass's; plan, report
and train --distill run on it; every bad file is one line on stderr, exit 1, nothing in --out.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import read_manifest, sha256_file
from pipeline.data import TEXTS, load_training_data
from pipeline.guide import VECTORS
from pipeline.masks import MASKS, PlannedMasks
from tests.conftest import GUIDE_SAMEVOCAB, ROOT, STUDENT, gist
from tests.test_distributed import torchrun
from tests.test_errors import assert_fails

PLAN = ("--batch-size", "16", "--epochs", "2", "--margin", "0.05")  # guide_run's plan


def model_vectors(guide_run) -> tuple[list[str], np.ndarray]:
    """The texts and vectors the model pass stored, by text id."""
    return pq.read_table(guide_run / TEXTS).column("text").to_pylist(), np.load(guide_run / VECTORS)


def write_text_vectors(path, texts: list[str], vectors: np.ndarray, fixed: bool = False) -> None:
    values = pa.array(vectors.reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(values, vectors.shape[1]) if fixed else pa.ListArray.from_arrays(pa.array(np.arange(len(vectors) + 1) * vectors.shape[1], pa.int32()), values)
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), "vector": column}), path)


@pytest.fixture(scope="module")
def exported(guide_run, tmp_path_factory):
    """The model pass's vectors as Parquet text -> vector, rows shuffled, plus texts DATA lacks."""
    texts, vectors = model_vectors(guide_run)
    order = np.random.default_rng(0).permutation(len(texts))
    extra = np.random.default_rng(1).standard_normal((3, vectors.shape[1])).astype(np.float32)
    path = tmp_path_factory.mktemp("vectors") / "served.parquet"
    write_text_vectors(path, [texts[i] for i in order] + ["not in DATA 1", "not in DATA 2", "not in DATA 3"], np.concatenate([vectors[order], extra]))
    return path


@pytest.fixture(scope="module")
def vectors_run(exported, triplets, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "from-vectors"
    gist("precompute-guide", triplets, "--embeddings", exported, "--out", out, *PLAN)
    return out


def assert_same_masks(ours, theirs) -> None:
    a, b = pq.read_table(ours / MASKS), pq.read_table(theirs / MASKS)
    for column in ("epoch", "step", "example_ids", "ap", "aa", "pp", "an"):
        assert a.column(column).equals(b.column(column)), column


def test_parquet_vectors_give_the_model_pass(vectors_run, guide_run, exported):
    assert_same_masks(vectors_run, guide_run)
    assert np.array_equal(np.load(vectors_run / VECTORS), np.load(guide_run / VECTORS))  # unit already: stored as given
    assert sum(map(len, pq.read_table(guide_run / MASKS).column("ap").to_pylist())) > 0  # the compared masks mask something
    manifest = read_manifest(vectors_run)
    guide = manifest["guide"]
    assert guide["source"] == "embeddings" and guide["name"] == "served.parquet" and guide["sha256"] == sha256_file(exported)
    assert guide["path"] == str(exported.resolve()) and guide["dim"] == np.load(guide_run / VECTORS).shape[1]
    assert manifest["encoding"]["renormalized_texts"] == 0 and manifest["encoding"]["encoded_texts"] == 0
    meta = PlannedMasks(vectors_run / MASKS).meta
    assert meta["guide"] == "served.parquet" and meta["guide_sha256"] == guide["sha256"]


def test_npy_rows_in_text_id_order_normalised(guide_run, triplets, tmp_path):
    """Vectors off unit norm (float64, scaled per row) are normalised: the same vectors to float32 rounding, the same masks."""
    texts, vectors = model_vectors(guide_run)
    assert texts == load_training_data(triplets).texts.to_pylist()  # the documented text-id order
    scale = np.random.default_rng(2).uniform(0.1, 10, (len(vectors), 1))
    np.save(tmp_path / "rows.npy", vectors.astype(np.float64) * scale)
    gist("precompute-guide", triplets, "--embeddings", tmp_path / "rows.npy", "--out", tmp_path / "out", *PLAN)
    stored = np.load(tmp_path / "out" / VECTORS)
    assert np.abs(stored - vectors).max() < 1e-6
    assert_same_masks(tmp_path / "out", guide_run)
    assert read_manifest(tmp_path / "out")["encoding"]["renormalized_texts"] == len(vectors)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_vectors_scaled_past_the_float64_squares_are_normalised(scale, guide_run, triplets, tmp_path):
    """Rows scaled by 1e200 (squares overflow: the plain norm is inf, every stored vector was 0) or 1e-200
    (squares underflow: the norm was 0, every vector refused as zero) give the unscaled pass's unit vectors."""
    _, vectors = model_vectors(guide_run)
    np.save(tmp_path / "scaled.npy", vectors.astype(np.float64) * scale)
    gist("precompute-guide", triplets, "--embeddings", tmp_path / "scaled.npy", "--out", tmp_path / "out", *PLAN)
    assert np.abs(np.load(tmp_path / "out" / VECTORS) - vectors).max() < 1e-6
    assert_same_masks(tmp_path / "out", guide_run)
    assert read_manifest(tmp_path / "out")["encoding"]["renormalized_texts"] == len(vectors)


@pytest.mark.parametrize("text_type", ["dictionary", "string_view"])
def test_parquet_text_column_dictionary_or_string_view(text_type, guide_run, triplets, tmp_path):
    """A `text` column as a pandas `category` writes it (dictionary-encoded) or as string_view is read as its strings."""
    texts, vectors = model_vectors(guide_run)
    column = pa.array(texts).dictionary_encode() if text_type == "dictionary" else pa.array(texts, pa.string_view())
    pq.write_table(pa.table({"text": column, "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])}),
                   tmp_path / "vectors.parquet")
    assert pq.read_schema(tmp_path / "vectors.parquet").field("text").type == column.type
    gist("precompute-guide", triplets, "--embeddings", tmp_path / "vectors.parquet", "--out", tmp_path / "out", *PLAN)
    assert np.array_equal(np.load(tmp_path / "out" / VECTORS), vectors)


def test_fixed_size_list_and_float16_storage(guide_run, triplets, tmp_path):
    texts, vectors = model_vectors(guide_run)
    write_text_vectors(tmp_path / "fixed.parquet", texts, vectors, fixed=True)
    gist("precompute-guide", triplets, "--embeddings", tmp_path / "fixed.parquet", "--out", tmp_path / "out", *PLAN, "--embedding-dtype", "float16")
    stored = np.load(tmp_path / "out" / VECTORS)
    assert stored.dtype == np.float16 and np.array_equal(stored, vectors.astype(np.float16))


def test_downstream_plan_report_train_distill(vectors_run, guide_run, triplets, tmp_path):
    """plan, report and train --distill read the vectors pass as any guide pass."""
    gist("plan", vectors_run, "--out", tmp_path / "plan", "--batch-size", "8", "--seed", "3")
    gist("plan", guide_run, "--out", tmp_path / "plan-model", "--batch-size", "8", "--seed", "3")
    assert_same_masks(tmp_path / "plan", tmp_path / "plan-model")
    gist("report", tmp_path / "plan", "--out", tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["guide"] == "served.parquet"
    out = tmp_path / "student"
    gist("train", triplets, "--masks", vectors_run / MASKS, "--student", STUDENT, "--out", out, "--max-steps", "2", "--save-steps", "100", "--distill", "embed")
    assert json.loads((out / "run.json").read_text())["distill"] == "embed" and (out / "final").is_dir()


def test_model_pass_does_not_reuse_vectors_pass(vectors_run, triplets, tmp_path):
    proc = gist("precompute-guide", triplets, "--guide", GUIDE_SAMEVOCAB, "--reuse", vectors_run, "--out", tmp_path / "out", check=False)
    assert_fails(proc, 1, "cannot be reused")


def _bad_files(guide_run, triplets, tmp_path):
    """name -> (VECTORS path, words of the expected error)."""
    texts, vectors = model_vectors(guide_run)
    cases = {}

    def parquet(name, texts_, vectors_, *words):
        write_text_vectors(tmp_path / f"{name}.parquet", texts_, vectors_)
        cases[name] = (tmp_path / f"{name}.parquet", words)

    def npy(name, array, *words):
        np.save(tmp_path / f"{name}.npy", array)
        cases[name] = (tmp_path / f"{name}.npy", words)

    parquet("missing-text", texts[1:], vectors[1:], "no vector for 1 of", texts[0][:20])
    nan, inf, zero = vectors.copy(), vectors.copy(), vectors.copy()
    nan[5, 0], inf[7, 3], zero[2] = np.nan, np.inf, 0
    parquet("nan", texts, nan, "NaN or inf", texts[5][:20])
    npy("inf", inf, "NaN or inf", texts[7][:20])
    npy("zero", zero, "zero vector", texts[2][:20])
    parquet("duplicate", texts + texts[:1], np.concatenate([vectors, vectors[:1]]), "more than once")
    npy("wrong-rows", vectors[:-1], f"{len(vectors) - 1} rows but DATA has {len(vectors)} unique texts")
    npy("one-dim", vectors[0], "(texts, dim) float array")
    npy("integers", vectors.astype(np.int64), "(texts, dim) float array")
    ragged = pa.ListArray.from_arrays(pa.array([0, *np.cumsum([vectors.shape[1]] * 3 + [vectors.shape[1] - 1] + [vectors.shape[1]] * (len(vectors) - 4))], pa.int32()),
                                      pa.array(vectors.reshape(-1)[:-1]))
    pq.write_table(pa.table({"text": texts, "vector": ragged}), tmp_path / "ragged.parquet")
    cases["ragged"] = (tmp_path / "ragged.parquet", ("row 3 has a", "same dimension"))
    pq.write_table(pa.table({"sentence": texts, "vector": pa.array(list(vectors))}), tmp_path / "no-text.parquet")
    cases["no-text-column"] = (tmp_path / "no-text.parquet", ("string column 'text'",))
    pq.write_table(pa.table({"text": texts, "a": pa.array(list(vectors)), "b": pa.array(list(vectors))}), tmp_path / "two.parquet")
    cases["two-vector-columns"] = (tmp_path / "two.parquet", ("several (a, b)",))
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not parquet at all")
    cases["unreadable-parquet"] = (tmp_path / "garbage.parquet", ("cannot read it as Parquet",))
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    cases["unreadable-npy"] = (tmp_path / "garbage.npy", ("cannot read it as .npy",))
    (tmp_path / "vectors.csv").write_text("text,vector\n")
    cases["other-format"] = (tmp_path / "vectors.csv", ("use a .parquet",))
    cases["absent"] = (tmp_path / "absent.parquet", ("no such file",))
    return cases


BAD = ["missing-text", "nan", "inf", "zero", "duplicate", "wrong-rows", "one-dim", "integers", "ragged", "no-text-column",
       "two-vector-columns", "unreadable-parquet", "unreadable-npy", "other-format", "absent"]


@pytest.mark.parametrize("case", BAD)
def test_bad_vectors_one_line_nothing_written(case, guide_run, triplets, tmp_path):
    path, words = _bad_files(guide_run, triplets, tmp_path)[case]
    proc = gist("precompute-guide", triplets, "--embeddings", path, "--out", tmp_path / "out", *PLAN, check=False)
    assert_fails(proc, 1, "--embeddings", *words)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, words", [
    (["--guide", str(GUIDE_SAMEVOCAB), "--embeddings", "{exported}"], ("--guide MODEL or --embeddings VECTORS",)),
    ([], ("--guide MODEL or --embeddings VECTORS",)),
    (["--embeddings", "{exported}", "--reuse", "{guide_run}"], ("--reuse: options of a guide model",)),
    (["--embeddings", "{exported}", "--guide-max-seq-length", "16"], ("--guide-max-seq-length: options of a guide model",)),
])
def test_guide_and_embeddings_exclusive(args, words, exported, guide_run, triplets, tmp_path):
    args = [a.format(exported=exported, guide_run=guide_run) for a in args]
    proc = gist("precompute-guide", triplets, *args, "--out", tmp_path / "out", check=False)
    assert_fails(proc, 1, *words)
    assert not (tmp_path / "out").exists()


def test_mine_and_filter_on_a_vectors_pass(vectors_run, guide_run, tmp_path):
    """gist mine (stored corpus, or a corpus file of the pass's texts) and gist filter give what they give on the
    model pass; a corpus file with texts the vectors lack is refused in one line (no model to encode them)."""
    for run, name in ((vectors_run, "vectors"), (guide_run, "model")):
        gist("mine", run, "--out", tmp_path / f"mined-{name}.parquet", "--corpus", "all", "--num-negatives", "2")
        gist("filter", run, "--out", tmp_path / f"kept-{name}.parquet", "--top-k", "3")
    for kind in ("mined", "kept"):
        ours, theirs = (pq.read_table(tmp_path / f"{kind}-{name}.parquet") for name in ("vectors", "model"))
        assert ours.num_rows > 0 and ours.equals(theirs), kind
    texts, _ = model_vectors(guide_run)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:200]))
    gist("mine", vectors_run, "--out", tmp_path / "mined-file.parquet", "--corpus", corpus, "--num-negatives", "1")
    assert json.loads(pq.read_table(tmp_path / "mined-file.parquet").schema.metadata[b"gist"])["encoded_texts"] == 0
    corpus.write_text(corpus.read_text() + json.dumps({"text": "a text no vector was served for"}) + "\n")
    proc = gist("mine", vectors_run, "--out", tmp_path / "mined-new.parquet", "--corpus", corpus, "--num-negatives", "1", check=False)
    assert_fails(proc, 1, "1 text(s) not in", "--embeddings served.parquet")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "mined-new.parquet").exists()


def test_vectors_pass_under_torchrun_equals_one_process(exported, triplets, tmp_path):
    """Two ranks: every rank checks the file, rank 0 stores the vectors, each computes every other row group of the
    masks (40 epochs: 2 row groups), rank 0 joins them: the files of one process."""
    args = ["precompute-guide", triplets, "--embeddings", exported, "--batch-size", "16", "--epochs", "40", "--margin", "0.05"]
    torchrun(shutil.which("gist") or ROOT / ".venv" / "bin" / "gist", *args, "--out", tmp_path / "two")
    gist(*args, "--out", tmp_path / "one")
    assert pq.ParquetFile(tmp_path / "two" / MASKS).num_row_groups == 2
    for name in (TEXTS, "examples.parquet", "embeddings.parquet", VECTORS, MASKS):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert read_manifest(tmp_path / "two")["world_size"] == 2

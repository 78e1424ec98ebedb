"""Bad input gives one readable line on stderr, no traceback, exit 1 (2 for usage errors), no output left behind."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import GUIDE_STATIC, SAMPLE, STUDENT, gist


def assert_fails(proc, code: int, *words: str) -> None:
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


@pytest.fixture
def sample(tmp_path):
    return pq.read_table(SAMPLE).slice(0, 100)


def stage1(tmp_path, data, *extra):
    return gist("precompute-guide", data, "--guide", GUIDE_STATIC, "--out", tmp_path / "out", *extra, check=False)


def test_missing_input_file(tmp_path):
    assert_fails(stage1(tmp_path, tmp_path / "nope.parquet"), 1, "nope.parquet: no such file")
    assert not (tmp_path / "out").exists()


def test_unknown_format(tmp_path):
    (tmp_path / "data.txt").write_text("anchor\tpositive\n")
    assert_fails(stage1(tmp_path, tmp_path / "data.txt"), 1, "unknown format")


def test_corrupt_file(tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"PAR1 this is not parquet")
    assert_fails(stage1(tmp_path, tmp_path / "data.parquet"), 1, "cannot read")


def test_missing_positive_column(tmp_path, sample):
    pq.write_table(sample.drop(["positive"]), tmp_path / "d.parquet")
    assert_fails(stage1(tmp_path, tmp_path / "d.parquet"), 1, "missing column 'positive'", "--columns")


def test_columns_naming_absent_column(tmp_path, sample):
    pq.write_table(sample, tmp_path / "d.parquet")
    assert_fails(stage1(tmp_path, tmp_path / "d.parquet", "--columns", "anchor=query"), 1, "'query', which is not a column")


def test_column_mapping_works(tmp_path, sample):
    pq.write_table(sample.rename_columns(["q", "doc", "negative", "task"]), tmp_path / "d.parquet")
    proc = stage1(tmp_path, tmp_path / "d.parquet", "--columns", "anchor=q,positive=doc", "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr


def test_empty_and_null_texts_report_rows(tmp_path, sample):
    anchors = sample.column("anchor").to_pylist()
    anchors[3], anchors[7], anchors[9] = "", None, "   "
    pq.write_table(sample.set_column(0, "anchor", pa.array(anchors)), tmp_path / "d.parquet")
    assert_fails(stage1(tmp_path, tmp_path / "d.parquet"), 1, "null or empty text in 3 row(s): 3, 7, 9")


def test_non_string_text(tmp_path, sample):
    pq.write_table(sample.set_column(1, "positive", pa.array(range(100))), tmp_path / "d.parquet")
    assert_fails(stage1(tmp_path, tmp_path / "d.parquet"), 1, "'positive' has type int64, expected strings")


def test_negative_count_varying_between_rows(tmp_path, sample):
    (tmp_path / "d.jsonl").write_text("".join(
        json.dumps({"anchor": a, "positive": p, "negative": [p] * (1 + i % 2)}) + "\n"
        for i, (a, p) in enumerate(zip(sample.column("anchor").to_pylist(), sample.column("positive").to_pylist()))
    ))
    assert_fails(stage1(tmp_path, tmp_path / "d.jsonl"), 1, "same number of negatives")


def test_fewer_examples_than_a_batch(tmp_path, sample):
    pq.write_table(sample.slice(0, 10), tmp_path / "d.parquet")
    assert_fails(stage1(tmp_path, tmp_path / "d.parquet"), 1, "10 examples are fewer than one batch of 32")
    assert not (tmp_path / "out").exists()


def test_batch_size_below_two_is_a_usage_error(tmp_path):
    assert_fails(stage1(tmp_path, SAMPLE, "--batch-size", "1"), 2, "--batch-size")


def test_guide_path_missing_or_not_a_model(tmp_path):
    proc = gist("precompute-guide", SAMPLE, "--guide", tmp_path / "no-guide", "--out", tmp_path / "out", check=False)
    assert_fails(proc, 1, "no such model directory")
    (tmp_path / "empty-dir").mkdir()
    proc = gist("precompute-guide", SAMPLE, "--guide", tmp_path / "empty-dir", "--out", tmp_path / "out", check=False)
    assert_fails(proc, 1, "not a sentence-transformers model")


def test_output_directory_not_writable(tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = gist("precompute-guide", SAMPLE, "--guide", GUIDE_STATIC, "--out", tmp_path / "a-file" / "out", check=False)
    assert_fails(proc, 1, "not writable")


def test_nan_embeddings_from_the_guide(tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    broken = tmp_path / "nan-guide"
    shutil.copytree(GUIDE_STATIC, broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v * float("nan") for k, v in weights.items()}, broken / "model.safetensors")
    proc = gist("precompute-guide", SAMPLE, "--guide", broken, "--out", tmp_path / "out", check=False)
    assert_fails(proc, 1, "NaN/inf embeddings")
    assert not (tmp_path / "out" / "embeddings.parquet").exists()


def test_finished_output_is_refused_without_overwrite(tmp_path, guide_run):
    gist("plan", guide_run, "--out", tmp_path / "plan", "--batch-size", "16")
    proc = gist("plan", guide_run, "--out", tmp_path / "plan", "--batch-size", "16", check=False)
    assert_fails(proc, 1, "already holds a finished plan output", "--overwrite")


def test_masks_for_other_data_are_refused(tmp_path, guide_run, pairs):
    proc = gist("train", pairs, "--masks", guide_run / "masks.parquet", "--student", STUDENT, "--out", tmp_path / "o", check=False)
    assert_fails(proc, 1, "planned for other data")


def test_masks_with_other_row_count_are_refused(tmp_path, guide_run, sample):
    pq.write_table(sample, tmp_path / "d.parquet")
    proc = gist("train", tmp_path / "d.parquet", "--masks", guide_run / "masks.parquet", "--student", STUDENT, "--out", tmp_path / "o", check=False)
    assert_fails(proc, 1, "planned for 512 examples, DATA has 100")


def test_truncated_or_corrupt_masks_are_refused(tmp_path, guide_run, triplets):
    blob = (guide_run / "masks.parquet").read_bytes()
    (tmp_path / "masks.parquet").write_bytes(blob[: len(blob) // 2])
    proc = gist("train", triplets, "--masks", tmp_path / "masks.parquet", "--student", STUDENT, "--out", tmp_path / "o", check=False)
    assert_fails(proc, 1, "truncated or corrupt")


def test_masks_of_another_format_version_are_refused(tmp_path, guide_run, triplets):
    table = pq.read_table(guide_run / "masks.parquet")
    meta = json.loads(table.schema.metadata[b"gist"])
    meta["format_version"] = 999
    pq.write_table(table.replace_schema_metadata({b"gist": json.dumps(meta).encode()}), tmp_path / "masks.parquet")
    proc = gist("train", triplets, "--masks", tmp_path / "masks.parquet", "--student", STUDENT, "--out", tmp_path / "o", check=False)
    assert_fails(proc, 1, "format version 999")


def test_student_path_missing(tmp_path, guide_run, triplets):
    proc = gist("train", triplets, "--masks", guide_run / "masks.parquet", "--student", tmp_path / "none", "--out", tmp_path / "o", check=False)
    assert_fails(proc, 1, "no such model directory")


def test_modified_embeddings_are_refused_by_plan(tmp_path, guide_run):
    import shutil

    copy = tmp_path / "guide"
    shutil.copytree(guide_run, copy)
    with open(copy / "embeddings.npy", "r+b") as f:  # the vectors plan memory-maps
        f.seek(200)
        f.write(b"\0\0\0\0")
    proc = gist("plan", copy, "--out", tmp_path / "p", check=False)
    assert_fails(proc, 1, "checksum does not match")


def test_overwrite_replaces_only_what_gist_wrote(tmp_path, guide_run):
    out = tmp_path / "plan"
    gist("plan", guide_run, "--out", out, "--batch-size", "16")
    (out / "notes.txt").write_text("mine")
    first = (out / "masks.parquet").read_bytes()
    gist("plan", guide_run, "--out", out, "--batch-size", "16", "--seed", "1", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "masks.parquet").read_bytes() != first and (out / "manifest.json").exists()


def test_training_into_a_finished_run_or_a_foreign_directory_is_refused(tmp_path, guide_run, triplets):
    args = ("train", triplets, "--masks", guide_run / "masks.parquet", "--student", STUDENT, "--max-steps", "1")
    gist(*args, "--out", tmp_path / "o")
    proc = gist(*args, "--out", tmp_path / "o", check=False)
    assert_fails(proc, 1, "already holds a finished training output", "choose another --out")
    assert "--overwrite" not in proc.stderr  # gist train has no --overwrite: never suggested
    (tmp_path / "mine" / "final").mkdir(parents=True)
    proc = gist(*args, "--out", tmp_path / "mine", check=False)
    assert_fails(proc, 1, "exists and is not written by gist")

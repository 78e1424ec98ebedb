"""Refuse what does not match, validate before the expensive work, never destroy a finished pass.

Each test covers one defect found in review (issue 14) and fails on the code before its fix.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.json
import pyarrow.parquet as pq
import pytest

from pipeline import GistError
from pipeline.data import TrainingData, load_training_data
from pipeline.masks import CHUNK_ENTRIES, PlanParams, batch_masks, check_sparse_sizes, write_masks
from tests.conftest import GUIDE_SAMEVOCAB, GUIDE_STATIC, SAMPLE, STUDENT, gist, small_data


def assert_fails(proc, *words: str, code: int = 1) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


# Defect 2: options are validated before the guide pass.
@pytest.mark.parametrize("extra, code, words", [
    (["--index", "ivfpq"], 2, ["--index", "auto, flat, ivf, hnsw"]),
    (["--strategy", "by-task", "--batch-size", "64"], 1, ["largest task has", "fewer than one batch of 64"]),
])
def test_bad_plan_options_fail_before_encoding(tmp_path, extra, code, words):
    table = pq.read_table(SAMPLE).slice(0, 120)
    tasks = pa.array([f"task{i % 3}" for i in range(120)])  # 40 examples per task
    pq.write_table(table.set_column(table.column_names.index("task"), "task", tasks), tmp_path / "d.parquet")
    proc = gist("precompute-guide", tmp_path / "d.parquet", "--guide", GUIDE_STATIC, "--out", tmp_path / "out", *extra, check=False)
    assert_fails(proc, *words, code=code)
    assert not (tmp_path / "out").exists(), "nothing encoded or written"


# Defect 3: `gist plan` never writes into the guide pass it reads.
@pytest.mark.parametrize("target", ["itself", "its parent"])
def test_plan_refuses_to_overwrite_its_source_pass(tmp_path, static_run, target):
    source = tmp_path / "runs" / "guide"
    shutil.copytree(static_run, source)
    out = source if target == "itself" else source.parent
    assert_fails(gist("plan", source, "--out", out, "--overwrite", check=False), "is, contains or lies inside GUIDE_DIR")
    gist("plan", source, "--out", tmp_path / "replanned", "--batch-size", "16")  # the pass is intact


# Defect 4: mask memory bounded by entries, not by a fixed number of batches.
def test_masks_are_computed_in_chunks_bounded_by_entries(tmp_path, monkeypatch):
    from pipeline import masks as masks_mod

    g, steps, rng = 128, 80, np.random.default_rng(0)
    n = g * steps
    embeddings = rng.standard_normal((2 * n + 7, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    data = TrainingData(
        texts=pa.array([str(i) for i in range(len(embeddings))], pa.large_string()), anchor_ids=np.arange(n), positive_ids=np.arange(n, 2 * n),
        negative_ids=rng.integers(0, len(embeddings), (n, 1)), tasks=None, fingerprint="synthetic", columns={},
    )
    plan = rng.permutation(n).reshape(1, steps, g)
    params = PlanParams(batch_size=g, margin=0.1)
    chunks = []

    mask_parts = masks_mod.mask_parts

    def recording(source, data, batches, params, device):
        chunks.append(len(batches))
        return mask_parts(source, data, batches, params, device)

    monkeypatch.setattr(masks_mod, "mask_parts", recording)
    write_masks(tmp_path / "masks.parquet", embeddings, data, plan, params, {})
    assert sum(chunks) == steps and len(chunks) > 1
    assert max(chunks) * g * g * 4 <= CHUNK_ENTRIES, chunks  # ap, aa, pp and one negative column
    stored = masks_mod.PlannedMasks(tmp_path / "masks.parquet")
    assert stored.num_batches == steps and pq.ParquetFile(tmp_path / "masks.parquet").num_row_groups == len(chunks)
    for row in (0, steps // 2, steps - 1):
        expected = batch_masks(embeddings, data, plan[0, row : row + 1], params)
        for block in masks_mod.BLOCKS:
            assert np.array_equal(stored.dense(block, row, row + 1, g, g), expected[block]), (row, block)


def test_batches_too_large_for_int32_positions_are_refused():
    check_sparse_sizes(16384, 3)
    with pytest.raises(GistError, match="int32"):
        check_sparse_sizes(30000, 3)


# Defect 6: the fingerprint hashes content, not chunk layout.
def test_fingerprint_ignores_row_groups_and_format(tmp_path):
    table = pq.read_table(SAMPLE).slice(0, 300).drop(["negative"])
    pq.write_table(table, tmp_path / "one.parquet")
    pq.write_table(table, tmp_path / "many.parquet", row_group_size=7)
    with open(tmp_path / "rows.jsonl", "w") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row) + "\n")
    assert pq.ParquetFile(tmp_path / "many.parquet").num_row_groups > 1
    prints = {name: load_training_data(tmp_path / name).fingerprint for name in ("one.parquet", "many.parquet", "rows.jsonl")}
    assert len(set(prints.values())) == 1, prints
    changed = table.set_column(0, "anchor", pa.array(["changed"] + table.column("anchor").to_pylist()[1:]))
    pq.write_table(changed, tmp_path / "changed.parquet")
    assert load_training_data(tmp_path / "changed.parquet").fingerprint != prints["one.parquet"]


# Defect 7: the guide's identity covers its configuration and the encoding settings.
def test_reuse_refuses_a_guide_with_other_settings(tmp_path):
    data = small_data(tmp_path / "d.parquet", 64)
    gist("precompute-guide", data, "--guide", GUIDE_SAMEVOCAB, "--out", tmp_path / "pass", "--batch-size", "16")
    other = tmp_path / "guide-8"  # same weights, another max_seq_length in its configuration
    shutil.copytree(GUIDE_SAMEVOCAB, other)
    config_file = other / "sentence_bert_config.json"
    config = json.loads(config_file.read_text())
    config_file.unlink()  # copied read-only
    config_file.write_text(json.dumps({**config, "max_seq_length": 8}))
    for guide, extra in ((other, []), (GUIDE_SAMEVOCAB, ["--guide-max-seq-length", "8"])):
        proc = gist("precompute-guide", data, "--guide", guide, "--out", tmp_path / "new", "--batch-size", "16", "--reuse", tmp_path / "pass", *extra, check=False)
        assert_fails(proc, "cannot be reused", "model files differ" if guide == other else "max_seq_length")
    gist("precompute-guide", data, "--guide", other, "--out", tmp_path / "own", "--batch-size", "16")
    stored = json.loads((tmp_path / "own" / "manifest.json").read_text())["guide"]
    assert stored["max_seq_length"] == 8


# Defect 8: a training OUT belongs to one run.
def test_train_refuses_to_mix_runs_in_one_out(tmp_path, guide_run, triplets):
    from tests.conftest import interrupted_training

    args = ["train", triplets, "--masks", guide_run / "masks.parquet", "--student", STUDENT, "--save-steps", "1", "--max-steps", "2"]
    gist(*args, "--out", tmp_path / "a", "--lr", "1e-4")
    stage = interrupted_training(tmp_path / "a", tmp_path / "run")  # as if run A had been stopped after its checkpoints
    assert_fails(gist(*args, "--out", tmp_path / "run", "--lr", "1e-3", check=False), "interrupted training run with other settings", "lr: 0.0001 -> 0.001")
    assert_fails(gist(*args, "--out", tmp_path / "run", "--lr", "1e-3", "--resume", check=False), "other settings", "lr: 0.0001 -> 0.001")
    assert_fails(gist(*args, "--out", tmp_path / "run", "--lr", "1e-4", check=False), "has checkpoints", "--resume")
    assert (stage / "new" / "checkpoints" / "checkpoint-2").is_dir(), "a refused run leaves the interrupted one as it was"
    assert_fails(gist(*args, "--out", tmp_path / "fresh", "--resume", check=False), "no interrupted run")
    assert not (tmp_path / "fresh").exists() and not any(tmp_path.glob(".fresh*")), "a refused --resume leaves no trace"


# Defect 9: an all-null task column means no tasks, in stage 1 as in `gist plan`.
def test_all_null_task_column_is_no_task_column_everywhere(tmp_path):
    table = pq.read_table(SAMPLE).slice(0, 64)
    table = table.set_column(table.column_names.index("task"), "task", pa.nulls(64, pa.string()))
    pq.write_table(table, tmp_path / "d.parquet")
    assert load_training_data(tmp_path / "d.parquet").tasks is None
    stage1 = ["precompute-guide", tmp_path / "d.parquet", "--guide", GUIDE_STATIC, "--batch-size", "16"]
    assert_fails(gist(*stage1, "--out", tmp_path / "bytask", "--strategy", "by-task", check=False), "no 'task' column or it is all null")
    gist(*stage1, "--out", tmp_path / "pass")
    assert_fails(gist("plan", tmp_path / "pass", "--out", tmp_path / "plan", "--strategy", "by-task", check=False), "no 'task' column or it is all null")


# Issue 24 item 1: opening a pass reads no large file whole; `gist verify` reads every file whole.
def _sampled_pass(tmp_path, run, monkeypatch):
    """A copy of `run` whose files all count as large (sampled at open: 64 blocks of 16 bytes), its
    manifest entries rewritten by the writer's own `file_record` under those settings."""
    from pipeline import artifacts

    monkeypatch.setattr(artifacts, "FULL_CHECK_BYTES", 0)
    monkeypatch.setattr(artifacts, "SAMPLE_BLOCK_BYTES", 16)
    copy = tmp_path / "pass"
    shutil.copytree(run, copy)
    manifest = json.loads((copy / artifacts.MANIFEST).read_text())
    manifest["files"] = {name: artifacts.file_record(copy / name) for name in manifest["files"]}
    artifacts.write_json(copy / artifacts.MANIFEST, manifest)
    return copy


def test_truncated_embeddings_are_refused_at_open(tmp_path, static_run, monkeypatch):
    from pipeline.guide import VECTORS, load_guide_pass

    copy = _sampled_pass(tmp_path, static_run, monkeypatch)
    load_guide_pass(copy)  # intact: opens
    with open(copy / VECTORS, "r+b") as f:
        f.truncate((copy / VECTORS).stat().st_size - 4)  # the last float: np.load alone may still map it
    with pytest.raises(GistError, match=r"checksum does not match manifest.json \(\d+ bytes, \d+ recorded\); the file was truncated"):
        load_guide_pass(copy)
    assert_fails(gist("plan", copy, "--out", tmp_path / "plan", check=False), "embeddings.npy", "truncated")


def test_verify_catches_a_flipped_byte_that_open_does_not_read(tmp_path, static_run, monkeypatch):
    from pipeline import artifacts
    from pipeline.guide import VECTORS, load_guide_pass

    copy = _sampled_pass(tmp_path, static_run, monkeypatch)
    ok = gist("verify", copy)
    assert "ok" in ok.stderr and f"{len(json.loads((copy / 'manifest.json').read_text())['files'])} files match" in ok.stderr
    path = copy / VECTORS
    sampled = artifacts.sampled_sha256(path)
    middle = path.stat().st_size // 2 + 7  # between two sampled blocks (checked below)
    data = bytearray(path.read_bytes())
    data[middle] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    assert artifacts.sampled_sha256(path) == sampled, "the flipped byte lies outside the sampled blocks"
    load_guide_pass(copy)  # the open-time check does not read it: no whole-file hash at open
    assert_fails(gist("verify", copy, check=False), str(path), "checksum does not match manifest.json")
    (copy / "texts.parquet").unlink()  # the first bad file in the manifest's order is named
    proc = gist("verify", copy, check=False)
    assert_fails(proc, str(path))
    assert "texts.parquet" not in proc.stderr
    assert_fails(gist("verify", copy / "plan-nowhere", check=False), "no manifest.json")

"""DATA beyond a local file: a Hub dataset (through datasets.load_dataset, exercised on a local dataset repository
folder: the same code path), and several datasets trained together (a DatasetDict directory, or name=source pairs)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import HubSource, Mixture, data_source, load_training_data
from pipeline.masks import MASKS, PlannedMasks
from tests.conftest import GUIDE_STATIC, STUDENT, gist, small_data

CARD = """---
configs:
- config_name: triplets
  data_files:
  - split: train
    path: triplets/train-*.parquet
- config_name: pairs
  data_files:
  - split: train
    path: pairs/train-*.parquet
---
# A dataset repository, laid out as on the Hub
"""


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """Two datasets without a task column (rows 0-63 and 64-127 of the sample), and the single file with their rows and a task column."""
    root = tmp_path_factory.mktemp("mixture")
    table = pq.read_table(small_data(root / "all.parquet", 128)).drop(["task"])
    nli, qa = table.slice(0, 64), table.slice(64, 64)
    single = root / "single.parquet"
    pq.write_table(table.append_column("task", pa.array(["nli"] * 64 + ["qa"] * 64)), single)
    return root, nli, qa, single


def stage1(data, out, *args):
    gist("precompute-guide", data, "--guide", GUIDE_STATIC, "--out", out, "--batch-size", "16", "--epochs", "2", "--strategy", "by-task", *args)
    return json.loads((out / "manifest.json").read_text())


def test_dataset_dict_trains_as_tasks_like_a_single_file_with_a_task_column(tmp_path, halves):
    import datasets

    root, nli, qa, single = halves
    dd = root / "dd"
    datasets.DatasetDict({"nli": datasets.Dataset(nli), "qa": datasets.Dataset(qa)}).save_to_disk(str(dd))
    assert isinstance(data_source(dd), Mixture) and data_source(dd).names == ("nli", "qa")
    mixed = stage1(dd, tmp_path / "dd-pass")
    plain = stage1(single, tmp_path / "single-pass")
    assert mixed["dataset"]["fingerprint"] == plain["dataset"]["fingerprint"]
    assert mixed["dataset"]["path"] == str(dd.resolve()) and set(mixed["dataset"]["datasets"]) == {"nli", "qa"}
    ours, theirs = pq.read_table(tmp_path / "dd-pass" / MASKS), pq.read_table(tmp_path / "single-pass" / MASKS)
    assert ours.equals(theirs), "the same plan and masks"
    batches = PlannedMasks(tmp_path / "dd-pass" / MASKS).batches
    assert len(batches) and all(len(set(np.asarray(b) // 64)) == 1 for b in batches), "by-task: every batch is one dataset"
    # the comma form: name=source pairs (files here; a source may be a Hub id)
    nli_path, qa_path = root / "nli.parquet", root / "qa.jsonl"
    pq.write_table(nli, nli_path)
    qa_path.write_text("".join(json.dumps(row) + "\n" for row in qa.to_pylist()))
    pairs = stage1(f"nli={nli_path},qa={qa_path}", tmp_path / "pairs-pass")
    assert pairs["dataset"]["fingerprint"] == plain["dataset"]["fingerprint"]
    assert pq.read_table(tmp_path / "pairs-pass" / MASKS).equals(theirs)
    # stage 2 takes the single file for the mixture's masks: the fingerprint decides
    out = tmp_path / "run"
    gist("train", single, "--masks", tmp_path / "dd-pass" / MASKS, "--student", STUDENT, "--out", out, "--max-steps", "1", "--device", "cpu")
    assert (out / "final").is_dir()


def test_mixture_refusals(tmp_path, halves):
    root, nli, qa, single = halves
    pq.write_table(nli, root / "nli2.parquet")
    pq.write_table(qa.drop(["negative"]), root / "qa-pairs.parquet")
    for data, message in [(f"nli={root / 'nli2.parquet'},qa={root / 'qa-pairs.parquet'}", "every dataset needs the same columns"),
                          (f"nli={root / 'nli2.parquet'},nli={root / 'nli2.parquet'}", "given twice"),
                          (f"nli={root / 'missing.parquet'}", "no such file")]:
        proc = gist("precompute-guide", data, "--guide", GUIDE_STATIC, "--out", tmp_path / "x", check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "x").exists()
    proc = gist("precompute-guide", single, "--guide", GUIDE_STATIC, "--out", tmp_path / "x", "--split", "train", check=False)
    assert proc.returncode == 1 and "--split: options of a Hub dataset" in proc.stderr


def test_hub_dataset_through_load_dataset(tmp_path, halves, monkeypatch):
    """A dataset repository folder (Parquet files, a README.md card with `configs:`) loads through datasets.load_dataset, the Hub's
    code path; subset, split and revision go into the manifest; stage 2 takes the same rows from a local file."""
    root, nli, qa, single = halves
    repo = tmp_path / "repo"
    (repo / "triplets").mkdir(parents=True)
    (repo / "pairs").mkdir()
    table = pq.read_table(single)
    pq.write_table(table.slice(0, 64), repo / "triplets" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(64), repo / "triplets" / "train-00001-of-00002.parquet")
    pq.write_table(table.drop(["negative"]), repo / "pairs" / "train-00000-of-00001.parquet")
    (repo / "README.md").write_text(CARD)
    assert isinstance(data_source(repo), HubSource)
    assert load_training_data(HubSource(str(repo), "triplets")).fingerprint == load_training_data(single).fingerprint
    assert load_training_data(HubSource(str(repo), "pairs")).num_negatives == 0
    manifest = stage1(repo, tmp_path / "hub-pass", "--subset", "triplets", "--split", "train")
    assert manifest["dataset"]["subset"] == "triplets" and manifest["dataset"]["split"] == "train" and manifest["dataset"]["revision"] is None
    assert manifest["dataset"]["fingerprint"] == load_training_data(single).fingerprint
    out = tmp_path / "run"
    gist("train", single, "--masks", tmp_path / "hub-pass" / MASKS, "--student", STUDENT, "--out", out, "--max-steps", "1", "--device", "cpu")
    # a Hub id that is not in the cache, offline: one line, nothing written
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    proc = gist("precompute-guide", "no-such-org/no-such-dataset", "--guide", GUIDE_STATIC, "--out", tmp_path / "y", check=False)
    assert proc.returncode == 1 and "cannot load with datasets.load_dataset" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "y").exists()


def test_per_dataset_prompts_reach_each_dataset_batch(tmp_path, halves):
    """Prompts keyed by dataset ({dataset: {column: prompt}}, as sentence-transformers takes them for a DatasetDict) prompt each
    by-task batch with its own dataset's strings; a plan whose batches mix datasets is refused before OUT is touched."""
    from pipeline.loss import GuidedMaskLoss
    from pipeline.prompts import training_prompts
    from pipeline.train import build_trainer, planned_training_data
    from tests.conftest import load_student

    root, _, _, single = halves
    stage1(single, tmp_path / "pass")
    masks = PlannedMasks(tmp_path / "pass" / MASKS)
    data = planned_training_data(single, masks)
    prompts = training_prompts('{"nli": {"anchor": "title: "}, "qa": "query: "}', data.num_negatives, ("nli", "qa"))
    assert prompts == {"nli": {"anchor": "title: "}, "qa": "query: "}
    student = load_student()
    trainer = build_trainer(student, data, masks, GuidedMaskLoss(student, masks), tmp_path / "t", prompts=prompts, use_cpu=True, save_strategy="no")
    tasks = data.task_labels()
    seen = set()
    for example_ids in masks.batches[:6]:
        batch = trainer.data_collator([trainer.train_dataset[int(i)] for i in example_ids])
        dataset = tasks[example_ids[0]]
        anchor = student.tokenizer.convert_ids_to_tokens(batch["anchor_input_ids"][0].tolist())[1:3]
        positive = student.tokenizer.convert_ids_to_tokens(batch["positive_input_ids"][0].tolist())[1:3]
        assert anchor == [{"nli": "title", "qa": "query"}[dataset], ":"], (dataset, anchor)
        assert (positive == ["query", ":"]) == (dataset == "qa"), (dataset, positive)
        seen.add(dataset)
    assert seen == {"nli", "qa"}

    out = tmp_path / "run"
    gist("train", single, "--masks", masks.path, "--student", STUDENT, "--out", out, "--max-steps", "2", "--device", "cpu",
         "--prompts", '{"nli": {"anchor": "title: "}, "qa": "query: "}')
    assert json.loads((out / "run.json").read_text())["training_prompts"] == {"nli": {"anchor": "title: "}, "qa": "query: "}
    gist("precompute-guide", single, "--guide", GUIDE_STATIC, "--out", tmp_path / "random", "--batch-size", "16")
    proc = gist("train", single, "--masks", tmp_path / "random" / MASKS, "--student", STUDENT, "--out", tmp_path / "refused", "--max-steps", "1",
                "--device", "cpu", "--prompts", '{"nli": {"anchor": "title: "}}', check=False)
    assert proc.returncode == 1 and "mixes datasets" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "refused").exists()


def test_filter_of_a_mixture_pass_asks_for_one_file(tmp_path, halves):
    """gist filter writes DATA's own rows in its format: a pass over a mixture is refused in one line, naming --data, and
    filtered when given the single file of the same rows."""
    import datasets

    root, nli, qa, single = halves
    dd = root / "dd-filter"
    datasets.DatasetDict({"nli": datasets.Dataset(nli), "qa": datasets.Dataset(qa)}).save_to_disk(str(dd))
    stage1(dd, tmp_path / "pass")
    pq.write_table(nli, tmp_path / "nli.parquet")
    pq.write_table(qa, tmp_path / "qa.parquet")
    for extra in ((), ("--data", dd), ("--data", f"nli={tmp_path / 'nli.parquet'},qa={tmp_path / 'qa.parquet'}")):
        proc = gist("filter", tmp_path / "pass", "--out", tmp_path / "kept.parquet", "--top-k", "5", *extra, check=False)
        assert proc.returncode == 1 and "needs DATA as one local file" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    gist("filter", tmp_path / "pass", "--out", tmp_path / "kept.parquet", "--top-k", "5", "--data", single)
    assert pq.read_table(tmp_path / "kept.parquet").num_rows > 0

"""`pipeline.report.write_report`: numbers against an independent count of masks.parquet, plots,
report.md, injected duplicates among the most similar masked pairs, plan directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import cli

from pipeline import GistError
from pipeline.artifacts import file_record
from pipeline.guide import gather, load_guide_pass
from pipeline.mask_check import rounding_band
from pipeline.masks import PlannedMasks, PlanParams
from pipeline.report import PLOTS, write_report
from pipeline.stage1 import replan
from tests.conftest import GUIDE_STATIC, SAMPLE, gist

BATCH = 16
DUP_TASK = "dup"
DUP_ROWS = {"positive": (3, 15), "anchor": (2, 14)}  # (original, copy) rows within the dup task


def report_rows() -> list[dict]:
    """Sample rows whose texts are all unique, plus a task of exactly one batch with two injected duplicates:
    row 15 repeats row 3's positive and row 14 repeats row 2's anchor. by-task batching puts them in one batch."""
    rows = pq.read_table(SAMPLE).to_pylist()
    seen, unique = set(), []
    for row in rows:
        texts = {row["anchor"], row["positive"], row["negative"]}
        if len(texts) == 3 and not texts & seen:
            seen |= texts
            unique.append(row)
    base, dup = unique[:240], [dict(r, task=DUP_TASK) for r in unique[240 : 240 + BATCH]]
    for column, (original, copy) in DUP_ROWS.items():
        dup[copy][column] = dup[original][column]
    return base + dup


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return report_rows()


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, rows) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    data = tmp / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    out = tmp / "guide"
    gist("precompute-guide", data, "--guide", GUIDE_STATIC, "--out", out, "--batch-size", BATCH,
         "--epochs", "2", "--strategy", "by-task", "--margin", "0.02")
    return out


@pytest.fixture(scope="module")
def report(report_run, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report-out")
    return write_report(report_run, out, examples=10), out


def independent_counts(run_dir: Path) -> dict:
    """Masked entries per block, per (epoch, block) and per (task, block) straight from masks.parquet."""
    table = pq.read_table(run_dir / "masks.parquet").to_pydict()
    tasks = pq.read_table(run_dir / "examples.parquet").column("task").to_pylist()
    total, epoch, task = {}, {}, {}
    for e, example_ids, *blocks in zip(table["epoch"], table["example_ids"], *(table[b] for b in ("ap", "aa", "pp", "an"))):
        for name, positions in zip(("ap", "aa", "pp", "an"), blocks):
            total[name] = total.get(name, 0) + len(positions)
            epoch[e, name] = epoch.get((e, name), 0) + len(positions)
            for pos in positions:
                key = (tasks[example_ids[pos // BATCH]], name)  # every block has G columns here (one negative)
                task[key] = task.get(key, 0) + 1
    return {"total": total, "epoch": epoch, "task": task, "batches": len(table["epoch"])}


def test_numbers_equal_an_independent_count(report, report_run):
    numbers, _ = report
    counts = independent_counts(report_run)
    g, batches = BATCH, counts["batches"]
    assert numbers["counts"]["batches"] == batches and numbers["counts"]["examples"] == 240 + BATCH
    assert numbers["mask_check"]["mismatched_entries"] == 0
    assert numbers["blocks"]["ap"]["rate"] == pytest.approx(counts["total"]["ap"] / (batches * g * (g - 1)))
    for block in ("aa", "pp", "an"):
        assert numbers["blocks"][block]["masked"] == counts["total"][block]
        assert numbers["blocks"][block]["rate"] == pytest.approx(counts["total"][block] / (batches * g * g))
    steps = numbers["counts"]["steps_per_epoch"]
    for row in numbers["by_epoch"]:
        assert row["rate"]["ap"] == pytest.approx(counts["epoch"][row["epoch"], "ap"] / (steps * g * (g - 1)))
    manifest = json.loads((report_run / "manifest.json").read_text())
    assert {b: numbers["blocks"][b]["masked"] for b in ("ap", "aa", "pp", "an")} == manifest["plan"]["masked_entries"]
    assert DUP_TASK in numbers["by_task"]
    for name, row in numbers["by_task"].items():
        for block in ("ap", "an"):
            assert row["masked"][block] == counts["task"].get((name, block), 0), (name, block)
        assert row["rate"]["ap"] == pytest.approx(row["masked"]["ap"] / (row["anchor_rows"] * (g - 1)))
    # every row of the one-batch dup task is in exactly one batch per epoch
    assert numbers["by_task"][DUP_TASK]["anchor_rows"] == 2 * BATCH
    assert json.loads((report[1] / "report.json").read_text()) == json.loads(json.dumps(numbers))


def test_plots_and_markdown(report):
    _, out = report
    assert sorted(p.name for p in out.iterdir()) == sorted([*PLOTS.values(), "report.json", "report.md"])  # no temp files
    markdown = (out / "report.md").read_text()
    for name in PLOTS.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as image:
            image.verify()
            assert min(image.size) > 200
        assert f"]({name})" in markdown
    assert "| ap |" in markdown and DUP_TASK in markdown


def test_injected_duplicates_are_the_most_similar_masked_pairs(report, rows):
    numbers, _ = report
    dup_start = 240
    for column, (original, copy) in DUP_ROWS.items():
        text = rows[dup_start + copy][column]
        examples = {dup_start + original, dup_start + copy}
        block = "pp" if column == "positive" else "aa"
        found = [p for p in numbers["top_masked_pairs"]
                 if p["block"] == block and {p["anchor_example"], p["candidate_example"]} == examples]
        assert found, (column, numbers["top_masked_pairs"][:3])
        assert found[0]["identical_text"] and found[0]["similarity"] > 0.999 and found[0]["candidate"] == text
        assert found[0]["task"] == DUP_TASK
    assert numbers["blocks"]["pp"]["identical_text_masked"] >= 2 and numbers["blocks"]["aa"]["identical_text_masked"] >= 2
    distinct = numbers["top_masked_distinct_pairs"]
    assert distinct and not any(p["identical_text"] for p in distinct)
    assert [p["similarity"] for p in distinct] == sorted((p["similarity"] for p in distinct), reverse=True)


def test_plan_directory_and_checksums(report_run, tmp_path):
    plan = tmp_path / "plan"
    # In-process (torch is already imported here): a second interpreter would double the test's time.
    result = CliRunner().invoke(cli.app, ["plan", str(report_run), "--out", str(plan), "--strategy", "random", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    numbers = write_report(plan, tmp_path / "out", examples=3)
    manifest = json.loads((plan / "manifest.json").read_text())
    assert numbers["kind"] == "report" and numbers["run_kind"] == "plan" and numbers["guide_dir"] == str(report_run.resolve())
    assert {b: numbers["blocks"][b]["masked"] for b in ("ap", "aa", "pp", "an")} == manifest["plan"]["masked_entries"]
    assert numbers["counts"]["batch_size"] == 32 and len(numbers["top_masked_pairs"]) == 3
    broken = tmp_path / "broken"
    shutil.copytree(plan, broken)
    with open(broken / "masks.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(GistError, match="checksum"):
        write_report(broken, tmp_path / "out2")


def toggle_masks(run_dir: Path, entries: list[tuple[int, str, int]]) -> None:
    """Flip the stored mask of each (plan row, block, flat position) in run_dir's masks.parquet and
    record the new checksum, as masks computed elsewhere (another device's rounding) would store them."""
    path = run_dir / "masks.parquet"
    table = pq.read_table(path)
    for row, block, position in entries:
        column = table.column(block).to_pylist()
        column[row] = sorted(set(column[row]) ^ {position})
        table = table.set_column(table.schema.get_field_index(block), block, pa.array(column, table.schema.field(block).type))
    pq.write_table(table, path)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["files"]["masks.parquet"] = file_record(path)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def test_mask_check_tells_rounding_at_the_threshold_from_real_differences(report_run, tmp_path):
    """Issue 22 item 11: masks made on a GPU differ from the report's CPU recomputation where float32
    rounding decides an entry at its threshold. Made here by planning with a margin that puts one
    `ap` entry exactly on its boundary (t - m == g to the last bit or so) and flipping that entry, as
    another summation order may: the report counts it near the threshold, not as a mismatch (before,
    "differ in 1 entries from the mask rule"). A flipped entry far from its threshold stays a mismatch."""
    first = replan(report_run, tmp_path / "p0", PlanParams(batch_size=BATCH, strategy="random"))
    batch = PlannedMasks(first.masks).batch_rows(0, 2)
    _, data, embeddings = load_guide_pass(report_run)
    sims = gather(embeddings, data.anchor_ids[batch]) @ gather(embeddings, data.positive_ids[batch]).transpose(0, 2, 1)
    t = sims[0, 0, 0]
    j = max((j for j in range(1, BATCH) if sims[0, 0, j] < t), key=lambda j: sims[0, 0, j])
    margin = float(t - sims[0, 0, j])  # the boundary t - m of row 0 is g(a_0, p_j), within float32 rounding
    run = replan(report_run, tmp_path / "p1", PlanParams(batch_size=BATCH, strategy="random", margin=margin)).dir
    assert np.array_equal(PlannedMasks(run / "masks.parquet").batch_rows(0, 2), batch)
    band = rounding_band(embeddings.shape[1], PlanParams(margin=margin))
    far = int(np.argmin(sims[1, 1]))
    assert sims[1, 1, far] < sims[1, 1, 1] - margin - 100 * band  # far below its boundary: the rule keeps it
    toggle_masks(run, [(0, "ap", j)])
    near = write_report(run, tmp_path / "near", examples=0)
    assert near["mask_check"] == {"mismatched_entries": 0, "near_threshold_entries": 1, "rounding_band": band}
    assert near["blocks"]["ap"]["near_threshold_vs_rule"] == 1 and near["blocks"]["ap"]["mismatched_vs_rule"] == 0
    markdown = (tmp_path / "near" / "report.md").read_text()
    assert "not an integrity problem" in markdown and "**differ" not in markdown
    toggle_masks(run, [(1, "ap", BATCH + far)])
    real = write_report(run, tmp_path / "real", examples=0)
    assert real["mask_check"]["mismatched_entries"] == 1 and real["mask_check"]["near_threshold_entries"] == 1
    assert "**differ in 1 entries from**" in (tmp_path / "real" / "report.md").read_text()


def test_rounding_band_covers_float32_summation_orders():
    """The band bounds the float32 error of a unit-vector similarity against its threshold in any
    summation order: a float64 reference and float32 products in several orders stay within it."""
    rng = np.random.default_rng(0)
    dim = 768
    x = rng.standard_normal((64, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = x.astype(np.float64) @ x.T.astype(np.float64)
    orders = [x @ x.T, np.cumsum(x[:, None, :] * x[None, :, :], axis=-1, dtype=np.float32)[..., -1],
              sum(x[:, k : k + 96] @ x[:, k : k + 96].T for k in range(0, dim, 96))]  # pairwise, sequential, in 8 blocks
    band = rounding_band(dim, PlanParams())
    assert 1e-4 < band < 3e-4
    for sims in orders:
        assert np.abs(sims - exact).max() < band / 4

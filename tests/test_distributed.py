"""Data parallel stage 2 under torchrun (2 CPU processes, gloo): the plan's batch is the global batch."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pyarrow.parquet as pq
from safetensors.torch import load_file

from tests.conftest import ROOT, STUDENT, gist


def torchrun(*args, check=True, timeout=300):
    """`torchrun --standalone --nproc-per-node 2 ARGS`. A run that hangs is stopped after `timeout`
    seconds by SIGABRT to the agent and its workers (each in a session of its own): with
    PYTHONFAULTHANDLER set, each prints every thread's Python stack first, so the failure shows where
    each process waited, and no worker outlives the test."""
    import psutil  # accelerate's dependency

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        agent = psutil.Process(proc.pid)
        # The agent first (aborted, it no longer stops the workers), then each worker: one at a time, so stacks do not interleave.
        for process in [agent, *agent.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGABRT)
                if psutil.wait_procs([process], timeout=10)[1]:  # still alive
                    process.kill()
        stdout, stderr = proc.communicate()
        stacks = [line for line in stderr.splitlines() if line.lstrip().startswith(("Fatal Python error", "Thread 0x", "Current thread", 'File "'))]
        raise AssertionError(f"torchrun hung for {timeout} s; the stacks of its processes:\n" + "\n".join(stacks)) from None
    if check and proc.returncode != 0:
        raise AssertionError(stderr[-4000:])
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_two_ranks_equal_gist_embed_loss_gathered(tmp_path, guide_run, triplets):
    torchrun(ROOT / "tests" / "distributed_worker.py", guide_run / "masks.parquet", triplets, tmp_path)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["loss_diff"] < 1e-5 and report["grad_diff"] < 1e-5, report
    assert reports[0]["losses"] != reports[1]["losses"]  # each rank scored its own anchors


def test_two_processes_train_like_one_process_with_the_global_batch(tmp_path, monkeypatch):
    """2 ranks x 8 per device with --no-contrast-anchors = 1 process x 16: the same weights, with
    --distill embed from a guide of another dimension (48, the student 64), whose learned projection
    is a module of the student, so DDP all-reduces its gradients (on the loss it was not: 6e-3 apart).
    Each rank leaves the process group with no DDP wrapper alive (one that outlived the group
    deadlocked gist train at exit now and then: tests/gist_counting_ddp.py).
    Sized for a busy machine: 64 examples, 3 steps."""
    from tests.conftest import GUIDE_RETOKENIZE, small_data

    data = small_data(tmp_path / "data.parquet", 64)
    gist("precompute-guide", data, "--guide", GUIDE_RETOKENIZE, "--out", tmp_path / "guide", "--batch-size", "16", "--no-contrast-anchors", "--margin", "0.05")
    student = tmp_path / "student"  # dropout off: two processes draw other dropout masks than one
    shutil.copytree(STUDENT, student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    args = ["train", data, "--masks", tmp_path / "guide" / "masks.parquet", "--student", student, "--max-steps", "3", "--lr", "1e-3",
            "--distill", "embed", "--device", "cpu"]
    gist(*args, "--out", tmp_path / "one")
    monkeypatch.setenv("GIST_DDP_COUNTS", str(tmp_path))
    torchrun(ROOT / "tests" / "gist_counting_ddp.py", *args, "--out", tmp_path / "two")
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["0", "0"], "DDP wrappers alive when the process group goes"
    one, two = load_file(tmp_path / "one" / "final" / "model.safetensors"), load_file(tmp_path / "two" / "final" / "model.safetensors")
    moved = max((one[name] - load_file(student / "model.safetensors")[name]).abs().max().item() for name in one)
    assert moved > 1e-3
    projection = "checkpoints/checkpoint-3/3_GuideProjection/model.safetensors"  # the checkpoint at the last step holds it
    one.update({f"projection.{k}": v for k, v in load_file(tmp_path / "one" / projection).items()})
    two.update({f"projection.{k}": v for k, v in load_file(tmp_path / "two" / projection).items()})
    # Adam divides by sqrt(v): float32 noise in a near-zero gradient (a rare token's embedding) can
    # become an lr-sized step; measured: one of 1.95M entries off by 3.5e-5; the worst mean over a
    # tensor 1.0e-7 (two ranks sum the positives' gradient in another order than one process).
    for name in one:
        difference = (two[name] - one[name]).abs()
        assert difference.max() < 1e-4 and difference.mean() < 1e-6, (name, difference.max().item())


def test_stage1_sharded_over_two_processes_equals_one(tmp_path, triplets):
    """Each rank encodes every other chunk and computes every other row group of the masks (40 epochs:
    1280 batches, 2 row groups of 1024); rank 0 joins both and indexes: the same files. With guide
    prompts per role (two views), so a chunk holding both views' rows is encoded a view at a time."""
    prompts = ("--guide-prompts", "anchor=query: ,positive=passage: ,negative=passage: ")
    torchrun(shutil.which("gist") or ROOT / ".venv" / "bin" / "gist", "precompute-guide", triplets, "--guide", ROOT.parent / "shared/models/tiny-guide-bert-samevocab",
             "--out", tmp_path / "two", "--batch-size", "16", "--epochs", "40", "--margin", "0.05", "--rows-per-group", "256", *prompts)
    gist("precompute-guide", triplets, "--guide", ROOT.parent / "shared/models/tiny-guide-bert-samevocab", "--out", tmp_path / "one",
         "--batch-size", "16", "--epochs", "40", "--margin", "0.05", "--rows-per-group", "256", *prompts)
    assert pq.ParquetFile(tmp_path / "two" / "masks.parquet").num_row_groups == 2 and not (tmp_path / "two" / ".masks.parts").exists()
    for name in ("texts.parquet", "examples.parquet", "embeddings.parquet", "embeddings.npy", "masks.parquet"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    one, two = (json.loads((tmp_path / run / "manifest.json").read_text()) for run in ("one", "two"))
    assert two["world_size"] == 2 and two["encoding"]["encoded_texts"] == one["encoding"]["encoded_texts"] == 1504
    assert two["plan"] == one["plan"] and two["dataset"] == one["dataset"] and len(two["guide"]["views"]["views"]) == 2


def test_replan_sharded_over_two_processes_equals_one(tmp_path, guide_run):
    """`gist plan` under torchrun: each rank computes every other row group of the masks, rank 0 joins them."""
    args = ["plan", guide_run, "--batch-size", "16", "--epochs", "40", "--seed", "3", "--margin", "0.05", "--device", "cpu"]
    torchrun(shutil.which("gist") or ROOT / ".venv" / "bin" / "gist", *args, "--out", tmp_path / "two")
    gist(*args, "--out", tmp_path / "one")
    assert pq.ParquetFile(tmp_path / "two" / "masks.parquet").num_row_groups == 2 and not (tmp_path / "two" / ".masks.parts").exists()
    assert (tmp_path / "two" / "masks.parquet").read_bytes() == (tmp_path / "one" / "masks.parquet").read_bytes()
    one, two = (json.loads((tmp_path / run / "manifest.json").read_text()) for run in ("one", "two"))
    assert two["plan"] == one["plan"] and two["plan"]["num_batches"] == 40 * 32

"""Crash safety with real process kills: a SIGKILLed stage 1 or training run, started again, ends
exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline.outputs import stage_dir
from tests.conftest import GUIDE_SAMEVOCAB, ROOT, STUDENT, gist, interrupted_training

FILES = ("texts.parquet", "examples.parquet", "embeddings.parquet", "embeddings.npy", "index.faiss", "masks.parquet")


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 120, sig=signal.SIGKILL) -> bool:
    """Send `sig` (SIGKILL) to `proc` as soon as `condition()` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            os.kill(proc.pid, sig)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("condition never held")


def stage1_args(data, out):
    return ("precompute-guide", data, "--guide", GUIDE_SAMEVOCAB, "--out", out, "--batch-size", "16", "--epochs", "3",
            "--rows-per-group", "32", "--encode-batch-size", "8")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, triplets):
    out = tmp_path_factory.mktemp("stage1") / "full"
    gist(*stage1_args(triplets, out))
    return out


@pytest.mark.parametrize("parts", [1, 20])
def test_stage1_killed_while_encoding_resumes_to_identical_files(tmp_path, triplets, uninterrupted, parts):
    out = tmp_path / "run"
    parts_dir = stage_dir(out) / "work" / "embeddings.parts"
    proc = start(*stage1_args(triplets, out))
    assert kill_when(proc, lambda: len(list(parts_dir.glob("part-*.parquet"))) >= parts), proc.stderr.read()
    assert not out.exists(), "OUT appears only when the pass is complete"
    done = len(list(parts_dir.glob("part-*.parquet")))
    result = gist(*stage1_args(triplets, out))
    assert f"{min(done * 32, 1504)} resumed" in result.stderr  # finished chunks were not encoded again
    for name in FILES:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert not stage_dir(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_stage1_killed_while_writing_masks_resumes_to_identical_files(tmp_path, triplets, uninterrupted):
    out = tmp_path / "run"
    proc = start(*stage1_args(triplets, out))
    assert kill_when(proc, lambda: (stage_dir(out) / "new" / "index.faiss").exists()), proc.stderr.read()
    assert not out.exists()
    gist(*stage1_args(triplets, out))
    for name in FILES:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_training_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, triplets, guide_run):
    args = ("train", triplets, "--masks", guide_run / "masks.parquet", "--student", STUDENT, "--max-steps", "12",
            "--save-steps", "2", "--logging-steps", "1", "--lr", "1e-4", "--seed", "5")
    gist(*args, "--out", tmp_path / "full")
    out = tmp_path / "killed"
    proc = start(*args, "--out", out)
    assert kill_when(proc, lambda: (stage_dir(out) / "new" / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()), proc.stderr.read()
    assert not out.exists()
    gist(*args, "--out", out, "--resume")
    full, resumed = load_file(tmp_path / "full" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0, msg=name)
    steps = [line.split('"step": ')[1].split(",")[0] for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [str(i) for i in range(1, 13)], "each step logged exactly once"


def test_stage1_killed_after_the_join_encodes_nothing_again(tmp_path, triplets, uninterrupted):
    """Encoding is finished work once joined: a run killed while indexing, planning or writing masks
    keeps embeddings.parquet, and the re-run encodes no text."""
    out = tmp_path / "run"
    proc = start(*stage1_args(triplets, out))
    assert kill_when(proc, lambda: (stage_dir(out) / "new" / "embeddings.parquet").exists()), proc.stderr.read()
    assert not out.exists()
    result = gist(*stage1_args(triplets, out))
    assert "(0 encoded, 0 reused, 1504 resumed)" in result.stderr, result.stderr
    for name in FILES:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert not stage_dir(out).exists(), "the resume state goes once the pass is complete"


def test_two_process_resume_in_epoch_2_equals_an_uninterrupted_run(tmp_path):
    """2 gloo processes, 64 examples, batch 16, 2 planned epochs of 4 steps; the run resumed from
    checkpoint 6 (mid-epoch 2) must train plan rows 6 and 7, as the uninterrupted run does: the same
    losses at steps 7-8 and the same final weights (transformers' epoch never reaches the sampler there)."""
    from tests.conftest import small_data
    from tests.test_distributed import torchrun

    data = small_data(tmp_path / "data.parquet", 64)
    gist("precompute-guide", data, "--guide", GUIDE_SAMEVOCAB, "--out", tmp_path / "guide", "--batch-size", "16", "--epochs", "2", "--margin", "0.05")
    args = ["train", data, "--masks", tmp_path / "guide" / "masks.parquet", "--student", STUDENT, "--max-steps", "8",
            "--save-steps", "2", "--logging-steps", "1", "--lr", "1e-4", "--seed", "5", "--device", "cpu"]
    gist_script = shutil.which("gist") or ROOT / ".venv" / "bin" / "gist"
    full = tmp_path / "full"
    torchrun(gist_script, *args, "--out", full)
    # A run killed right after checkpoint 6: the uninterrupted run's directory as it was then.
    resumed = tmp_path / "resumed"
    interrupted_training(full, resumed, "checkpoints/checkpoint-8")
    torchrun(gist_script, *args, "--out", resumed, "--resume")

    def losses(out):
        return {entry["step"]: entry["loss"] for entry in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in entry}

    assert sorted(losses(full)) == sorted(losses(resumed)) == list(range(1, 9))
    assert losses(resumed) == pytest.approx(losses(full), abs=2e-4)  # the trainer logs losses rounded to 4 digits
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)


def test_second_writer_is_refused_and_sigterm_leaves_a_resumable_run(tmp_path, triplets, uninterrupted):
    """While a gist holds --out, another into it is refused; SIGTERM stops a stage 1 (exit 130, one
    line, no traceback), and the same command resumes to identical files (the lock died with it)."""
    import fcntl

    out = tmp_path / "run"
    stage_dir(out).mkdir()
    with open(stage_dir(out) / ".lock", "w") as lock:  # this test process plays the first gist
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        second = gist(*stage1_args(triplets, out), check=False)
    assert second.returncode == 1 and f"is being written by another gist (pid {os.getpid()}" in second.stderr, second.stderr
    assert stage_dir(out).is_dir(), "the other gist's stage is left alone"
    parts_dir = stage_dir(out) / "work" / "embeddings.parts"
    proc = start(*stage1_args(triplets, out))
    assert kill_when(proc, lambda: len(list(parts_dir.glob("part-*.parquet"))) >= 2, sig=signal.SIGTERM), proc.stderr.read()
    assert proc.returncode == 130
    stderr = proc.stderr.read()
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists()
    result = gist(*stage1_args(triplets, out))
    assert "resumed" in result.stderr
    for name in FILES:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_resume_restores_the_distillation_projection(tmp_path):
    """--distill embed with a guide of another dimension (48, the student 64) learns a projection; it is
    a module of the student, so a checkpoint holds it and --resume continues with the trained one (it
    was rebuilt from initialisation while Adam's state was the trained one's: other losses from the
    first resumed step on, final weights 2e-3 apart). The run resumed from checkpoint 3 is a copy of
    the uninterrupted run's directory as it was then."""
    from tests.conftest import GUIDE_RETOKENIZE, small_data

    data = small_data(tmp_path / "data.parquet", 64)
    gist("precompute-guide", data, "--guide", GUIDE_RETOKENIZE, "--out", tmp_path / "guide", "--batch-size", "16", "--epochs", "2")
    args = ("train", data, "--masks", tmp_path / "guide" / "masks.parquet", "--student", STUDENT, "--max-steps", "5", "--save-steps", "3",
            "--logging-steps", "1", "--lr", "1e-3", "--seed", "5", "--distill", "embed", "--device", "cpu")
    full = tmp_path / "full"
    gist(*args, "--out", full)
    assert (full / "checkpoints" / "checkpoint-3" / "3_GuideProjection" / "model.safetensors").exists()
    assert not (full / "final" / "3_GuideProjection").exists()  # the trained student, without the projection
    resumed = tmp_path / "resumed"
    interrupted_training(full, resumed, "checkpoints/checkpoint-5")
    gist(*args, "--out", resumed, "--resume")

    def losses(out):
        return {entry["step"]: entry["loss"] for entry in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in entry}

    assert sorted(losses(resumed)) == list(range(1, 6))
    assert losses(resumed) == pytest.approx(losses(full), abs=2e-4)  # the trainer logs losses rounded to 4 digits
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)

"""Crash safety with real process kills: a SIGKILLed stage 1 or training run, started again, ends
exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import GUIDE_SAMEVOCAB, ROOT, STUDENT, gist

FILES = ("texts.parquet", "examples.parquet", "embeddings.parquet", "index.faiss", "masks.parquet")


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 120) -> bool:
    """SIGKILL `proc` as soon as `condition()` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
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
    parts_dir = out / ".embeddings.parts"
    proc = start(*stage1_args(triplets, out))
    assert kill_when(proc, lambda: len(list(parts_dir.glob("part-*.parquet"))) >= parts), proc.stderr.read()
    assert not (out / "manifest.json").exists() and not (out / "embeddings.parquet").exists()
    done = len(list(parts_dir.glob("part-*.parquet")))
    result = gist(*stage1_args(triplets, out))
    assert f"{min(done * 32, 1504)} resumed" in result.stderr  # finished chunks were not encoded again
    for name in FILES:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert not parts_dir.exists()


def test_stage1_killed_while_writing_masks_resumes_to_identical_files(tmp_path, triplets, uninterrupted):
    out = tmp_path / "run"
    proc = start(*stage1_args(triplets, out))
    assert kill_when(proc, lambda: (out / "index.faiss").exists()), proc.stderr.read()
    assert not (out / "manifest.json").exists()
    gist(*stage1_args(triplets, out))
    for name in FILES:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name


def test_training_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, triplets, guide_run):
    args = ("train", triplets, "--masks", guide_run / "masks.parquet", "--student", STUDENT, "--max-steps", "12",
            "--save-steps", "2", "--logging-steps", "1", "--lr", "1e-4", "--seed", "5")
    gist(*args, "--out", tmp_path / "full")
    out = tmp_path / "killed"
    proc = start(*args, "--out", out)
    assert kill_when(proc, lambda: (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()), proc.stderr.read()
    assert not (out / "final").exists()
    gist(*args, "--out", out, "--resume")
    full, resumed = load_file(tmp_path / "full" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0, msg=name)
    steps = [line.split('"step": ')[1].split(",")[0] for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [str(i) for i in range(1, 13)], "each step logged exactly once"

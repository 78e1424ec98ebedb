"""examples/train_with_gist.py, the script a sentence-transformers user adapts, runs end to end on the tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import GUIDE_SAMEVOCAB, ROOT, STUDENT, small_data


def test_example_script_trains_with_matryoshka_evaluator_and_checkpoints(tmp_path):
    """The cached variant (CachedGuidedMaskLoss inside MatryoshkaLoss); the plain loss's path differs by one line."""
    data = small_data(tmp_path / "train.parquet", 96)
    args = [sys.executable, ROOT / "examples" / "train_with_gist.py", "--data", data, "--guide", GUIDE_SAMEVOCAB,
            "--student", STUDENT, "--sts", ROOT / "data" / "stsb_dev.parquet", "--out", tmp_path / "run",
            "--batch-size", "16", "--epochs", "2", "--dims", "32,16", "--max-steps", "8", "--eval-steps", "4", "--mini-batch-size", "4"]
    proc = subprocess.run(list(map(str, args)), cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final STS Spearman" in proc.stdout
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    evals = [entry for entry in state["log_history"] if "eval_sts_spearman_cosine" in entry]
    assert [entry["step"] for entry in evals] == [4, 8], "the evaluator ran during training"
    assert state["best_model_checkpoint"].endswith(("checkpoint-4", "checkpoint-8"))
    assert state["global_step"] == 8 and (tmp_path / "run" / "final" / "model.safetensors").exists()

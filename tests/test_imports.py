"""Commands that do not train start without the training stack: `gist plan`, `mine`, `filter`, `report`
and every `--help` load neither transformers nor sentence-transformers (1.4 s of imports on this CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

TRAINING_STACK = ("transformers", "sentence_transformers")

# Runs the given gist command lines in one fresh interpreter, then reports what they imported.
PROBE = """
import json, sys
import cli
for argv in json.loads(sys.argv[1]):
    sys.argv = ["gist", *argv]
    try:
        cli.main()
    except SystemExit as e:
        assert not e.code, (argv, e.code)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {stack!r})))
"""


def loaded_by(*commands: list[str]) -> list[str]:
    probe = PROBE.format(stack=set(TRAINING_STACK))
    proc = subprocess.run([sys.executable, "-c", probe, json.dumps([list(map(str, c)) for c in commands])], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_commands_that_do_not_train_do_not_import_the_training_stack(tmp_path, guide_run):
    commands = [["--help"], *([name, "--help"] for name in ("precompute-guide", "plan", "mine", "filter", "report", "train", "evaluate")),
                ["plan", guide_run, "--out", tmp_path / "plan", "--batch-size", "32", "--device", "cpu"],
                ["mine", guide_run, "--out", tmp_path / "mined.parquet", "--num-negatives", "1"],
                ["filter", guide_run, "--out", tmp_path / "kept.parquet", "--top-k", "5"],
                ["report", tmp_path / "plan", "--out", tmp_path / "report", "--examples", "2"]]
    assert loaded_by(*commands) == []


def test_the_masks_reader_alone_does_not_import_the_trainer(guide_run):
    """Opening masks.parquet and reading its plan (tools, tests) stays light; the plan cursor, made on
    first use, is what brings the trainer in."""
    probe = ("import json, sys; from pipeline.masks import PlannedMasks; m = PlannedMasks(sys.argv[1]); m.batches; m.dense('ap', 0, 1, 16, 16)\n"
             f"before = sorted(x for x in sys.modules if x.split('.')[0] in {set(TRAINING_STACK)!r}); m.cursor\n"
             "print(json.dumps([before, 'transformers' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", probe, str(guide_run / "masks.parquet")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [[], True]

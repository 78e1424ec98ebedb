"""One output lifecycle for every command (pipeline/outputs.py, issue 29): inputs first, OUT never an
input, nothing replaced before the new result is complete, resume only what the same guide made.
Each test reproduces a defect of the review; the tiny static guide keeps them fast."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import outputs
from pipeline.artifacts import verify_run
from pipeline.outputs import stage_dir
from tests.conftest import GUIDE_STATIC, ROOT, STUDENT, gist, small_data
from tests.test_errors import assert_fails

PLAN = ("--batch-size", "16", "--epochs", "2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_data(tmp_path_factory.mktemp("data") / "d.parquet", 64)


@pytest.fixture(scope="module")
def model_pass(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("passes") / "model"
    gist("precompute-guide", data, "--guide", GUIDE_STATIC, "--out", out, *PLAN)
    return out


def killed_before_the_swap(monkeypatch, *args):
    """Run `gist ARGS` as if SIGKILLed just before its result was swapped in: the stage stays as a kill leaves it."""
    with monkeypatch.context() as patch:
        def killed(self, stage):
            raise KeyboardInterrupt

        patch.setattr(outputs.Output, "_commit", killed)
        patch.setattr(outputs, "_remove_empty", lambda paths, whole=False: None)
        assert gist(*args, check=False).returncode == 130


def test_a_stage_of_another_guide_is_never_resumed(model_pass, data, tmp_path, monkeypatch):
    """Reproduced: a model run interrupted, an --embeddings run interrupted in the same OUT, the model
    run again resumed the random vectors ("0 encoded, ... resumed") and named the model in the manifest."""
    out = tmp_path / "run"
    killed_before_the_swap(monkeypatch, "precompute-guide", data, "--guide", GUIDE_STATIC, "--out", out, *PLAN)
    random = np.random.default_rng(0).standard_normal((len(pq.read_table(model_pass / "texts.parquet")), 16)).astype(np.float32)
    np.save(tmp_path / "random.npy", random)
    killed_before_the_swap(monkeypatch, "precompute-guide", data, "--embeddings", tmp_path / "random.npy", "--out", out, *PLAN)
    (stage_dir(out) / "new" / ".masks.parquet.tmp-999").write_bytes(b"a killed run's temporary file")
    result = gist("precompute-guide", data, "--guide", GUIDE_STATIC, "--out", out, *PLAN)
    assert "192 encoded, 0 reused, 0 resumed" in result.stderr, result.stderr
    for name in ("embeddings.npy", "masks.parquet"):
        assert (out / name).read_bytes() == (model_pass / name).read_bytes(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")] and not stage_dir(out).exists()


def test_a_stage_of_the_same_guide_is_resumed_without_its_temporary_files(model_pass, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ("precompute-guide", data, "--guide", GUIDE_STATIC, "--out", out, *PLAN)
    killed_before_the_swap(monkeypatch, *args)
    (stage_dir(out) / "new" / ".masks.parquet.tmp-999").write_bytes(b"a killed run's temporary file")
    assert "(0 encoded, 0 reused, 192 resumed)" in gist(*args).stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in model_pass.iterdir())
    assert (out / "masks.parquet").read_bytes() == (model_pass / "masks.parquet").read_bytes()


@pytest.mark.parametrize("case", ["reuse", "embeddings", "plan over a pass", "mine into a pass", "filter over DATA", "report into a pass"])
def test_overwrite_never_touches_an_input_or_another_kind(case, model_pass, data, tmp_path):
    """Reproduced: `--reuse X --out X --overwrite` and `--embeddings X/embeddings.npy --out X --overwrite`
    deleted the input before reading it; `plan G --out OTHER_PASS --overwrite` destroyed another pass's
    masks; `mine --out G/texts.parquet --overwrite` corrupted a pass."""
    import shutil

    pass_ = tmp_path / "pass"
    shutil.copytree(model_pass, pass_)
    other = tmp_path / "other"
    shutil.copytree(model_pass, other)
    before = {p: p.read_bytes() for d in (pass_, other) for p in d.iterdir()}
    args, words = {
        "reuse": (("precompute-guide", data, "--guide", GUIDE_STATIC, "--reuse", pass_, "--out", pass_), "lies inside --reuse"),
        "embeddings": (("precompute-guide", data, "--embeddings", pass_ / "embeddings.npy", "--out", pass_), "--embeddings"),
        "plan over a pass": (("plan", pass_, "--out", other), "is a gist guide-pass output, not a gist plan output"),
        "mine into a pass": (("mine", pass_, "--out", pass_ / "texts.parquet"), "lies inside GUIDE_DIR"),
        "filter over DATA": (("filter", pass_, "--data", data, "--top-k", "1", "--out", data), "DATA"),
        "report into a pass": (("report", pass_, "--out", other), "not a gist report output"),
    }[case]
    assert_fails(gist(*args, "--overwrite", check=False), 1, words, "choose another --out")
    assert {p: p.read_bytes() for d in (pass_, other) for p in d.iterdir()} == before
    assert verify_run(pass_) and verify_run(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "pass"], "no stage left behind"


def test_a_typo_leaves_no_trace_and_the_corrected_command_runs(model_pass, data, tmp_path):
    """Reproduced: `gist train` wrote run.json before loading the student and checking the settings, so
    the corrected command was refused ("holds another training run's checkpoints")."""
    out = tmp_path / "runs" / "student"
    args = ("train", data, "--masks", model_pass / "masks.parquet", "--out", out, "--max-steps", "1")
    for typo, words in (
        (("--student", tmp_path / "no-such-student"), "no such model directory"),
        (("--student", STUDENT, "--matryoshka-dims", "9999"), "--matryoshka-dims 9999"),
    ):
        assert_fails(gist(*args, *typo, check=False), 1, words)
        assert not (tmp_path / "runs").exists(), "nothing created, not even OUT's parent"
    result = gist(*args, "--student", STUDENT, "--gradient-checkpointing")
    assert (out / "final" / "config.json").is_file() and (out / "run.json").is_file()
    assert "deprecated" not in result.stderr, result.stderr  # gradient_checkpointing's FutureWarning


@pytest.mark.parametrize("args, words", [
    (("plan", "{pass}", "--batch-size", "5000"), "fewer than one batch of 5000"),
    (("precompute-guide", "{data}", "--guide", GUIDE_STATIC, "--guide-max-seq-length", "16"), "takes no sequence length"),
    (("precompute-guide", "{data}", "--guide", GUIDE_STATIC, "--reuse", "{vectors}"), "--reuse"),
])
def test_a_late_refusal_leaves_nothing(args, words, model_pass, data, tmp_path):
    """Reproduced: each left an OUT holding only `.gist.lock`."""
    np.save(tmp_path / "v.npy", np.load(model_pass / "embeddings.npy"))
    gist("precompute-guide", data, "--embeddings", tmp_path / "v.npy", "--out", tmp_path / "vectors", *PLAN)
    filled = [str(a).format(**{"pass": model_pass, "data": data, "vectors": tmp_path / "vectors"}) for a in args]
    assert_fails(gist(*filled, "--out", tmp_path / "x", check=False), 1, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy", "vectors"]


def test_report_refuses_an_existing_file_before_the_sweep(model_pass, tmp_path):
    (tmp_path / "notes.md").write_text("the user's")
    proc = gist("report", model_pass, "--out", tmp_path / "notes.md", "--margins", "0", check=False)
    assert_fails(proc, 1, "exists and is not written by gist")
    assert (tmp_path / "notes.md").read_text() == "the user's"
    gist("report", model_pass, "--out", tmp_path / "sweep", "--margins", "0")
    assert_fails(gist("report", model_pass, "--out", tmp_path / "sweep", "--margins", "0,0.1", check=False), 1, "--overwrite")
    gist("report", model_pass, "--out", tmp_path / "sweep", "--margins", "0,0.1", "--overwrite")


def test_user_data_is_printed_as_plain_text(model_pass, data, tmp_path):
    """Reproduced: `runs/[exp1]/guide` printed as `runs//guide`; a corpus text holding `[/b]` turned the
    one-line error into a 17-line MarkupError traceback."""
    out = tmp_path / "[exp1]" / "plan"
    assert f"{out}/masks.parquet" in gist("plan", model_pass, "--out", out, *PLAN).stderr
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "[/b] a text the guide pass never saw"}\n')
    vectors = tmp_path / "vectors"
    np.save(tmp_path / "v.npy", np.load(model_pass / "embeddings.npy"))
    gist("precompute-guide", data, "--embeddings", tmp_path / "v.npy", "--out", vectors, *PLAN)
    proc = gist("mine", vectors, "--corpus", corpus, "--out", tmp_path / "mined.parquet", check=False)
    assert_fails(proc, 1, "[/b] a text")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_masks_contract_does_not_import_the_trainer():
    code = "import sys, pipeline.masks; sys.exit('pipeline.train' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# Found by review of the lifecycle itself.
def test_a_refused_run_never_removes_another_runs_stage(model_pass, data, tmp_path):
    """A refusal reached through another spelling of OUT (`run/../run`, where `run` did not exist) or
    while another gist holds the stage removed that stage: an interrupted run's checkpoints, or a live run's."""
    import fcntl

    from tests.conftest import interrupted_training

    args = ("train", data, "--masks", model_pass / "masks.parquet", "--student", STUDENT, "--max-steps", "2", "--save-steps", "1")
    gist(*args, "--out", tmp_path / "a")
    stage = interrupted_training(tmp_path / "a", tmp_path / "run")
    def contents():
        return sorted(p.relative_to(stage) for p in stage.rglob("*") if p.name != ".lock")

    before = contents()
    assert_fails(gist(*args, "--lr", "1e-3", "--out", tmp_path / "run" / ".." / "run", check=False), 1, "other settings")
    with open(stage / ".lock", "a+") as lock:  # a live gist holds the stage
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert_fails(gist(*args, "--out", tmp_path / "run" / ".." / "run", "--resume", check=False), 1, "being written by another gist")
    assert contents() == before
    gist(*args, "--out", tmp_path / "run", "--resume")
    assert (tmp_path / "run" / "final").is_dir() and not stage.exists()


def test_a_failed_swap_puts_everything_back(model_pass, tmp_path, monkeypatch):
    """A failure (or Ctrl-C) between the swap's renames lost the user's files, the old output and the new."""
    out = tmp_path / "plan"
    gist("plan", model_pass, "--out", out, *PLAN)
    (out / "notes.txt").write_text("the user's")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = outputs.os.replace, []

    def failing(source, target):
        calls.append(source)
        if len(calls) == 3:  # notes carried over, the old plan moved aside: the new one cannot be moved in
            raise OSError(28, "No space left on device")
        real(source, target)

    monkeypatch.setattr(outputs.os, "replace", failing)
    assert_fails(gist("plan", model_pass, "--out", out, *PLAN, "--seed", "1", "--overwrite", check=False), 1, "No space left")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]


def test_a_ctrl_c_during_the_swap_leaves_the_complete_output_and_no_stage(model_pass, tmp_path, monkeypatch):
    """Ctrl-C is held back while the swap renames; let through after it, it left the stage (with the old
    output moved aside) behind the complete new one."""
    import signal

    out = tmp_path / "plan"
    gist("plan", model_pass, "--out", out, *PLAN)
    real = outputs.os.replace

    def interrupted(source, target):
        if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []):  # within the swap: pending until it is done
            signal.raise_signal(signal.SIGINT)
        real(source, target)

    monkeypatch.setattr(outputs.os, "replace", interrupted)
    proc = gist("plan", model_pass, "--out", out, *PLAN, "--seed", "1", "--overwrite", check=False)
    assert proc.returncode == 130 and "replaced whole" in proc.stderr, proc.stderr
    verify_run(out)
    assert json.loads((out / "manifest.json").read_text())["plan"]["params"]["seed"] == 1, "the new plan is in place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"], "no stage left behind"


def test_an_empty_directory_or_a_link_is_written_through(model_pass, tmp_path, monkeypatch):
    """An empty directory given as OUT (a mount point) was replaced, not filled; a symlink was replaced by
    a directory; `--out .` failed after all the work."""
    (tmp_path / "mounted").mkdir()
    gist("plan", model_pass, "--out", tmp_path / "mounted", *PLAN)
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    gist("plan", model_pass, "--out", tmp_path / "link", *PLAN)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "masks.parquet").is_file()
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    gist("plan", model_pass, "--out", ".", *PLAN)
    for out in ("mounted", "target", "here"):
        verify_run(tmp_path / out)
        assert (tmp_path / out / "masks.parquet").read_bytes() == (tmp_path / "mounted" / "masks.parquet").read_bytes()
    assert_fails(gist("mine", model_pass, "--out", tmp_path / "here", check=False), 1, "write a .parquet file")
    (tmp_path / "dir.parquet").mkdir()
    assert_fails(gist("mine", model_pass, "--out", tmp_path / "dir.parquet", check=False), 1, "not written by gist")


def test_a_run_killed_in_its_first_checkpoint_starts_afresh(model_pass, data, tmp_path):
    """A killed run without a complete checkpoint has nothing to resume: --resume is refused, and the
    same or other settings start afresh in its place; another command's killed run is left alone."""
    from tests.conftest import interrupted_training

    args = ("train", data, "--masks", model_pass / "masks.parquet", "--student", STUDENT, "--max-steps", "2", "--save-steps", "1")
    gist(*args, "--out", tmp_path / "a")
    for out in ("run", "other"):
        stage = interrupted_training(tmp_path / "a", tmp_path / out, "checkpoints/checkpoint-2")
        (stage / "new" / "checkpoints" / "checkpoint-1" / "trainer_state.json").unlink()  # killed while saving its first checkpoint
    assert_fails(gist(*args, "--out", tmp_path / "run", "--resume", check=False), 1, "no interrupted run")
    gist(*args, "--out", tmp_path / "run")
    assert (tmp_path / "run" / "final").is_dir()
    gist(*args, "--out", tmp_path / "other", "--lr", "1e-3")  # other settings, but nothing to resume: not refused
    assert json.loads((tmp_path / "other" / "run.json").read_text())["lr"] == 1e-3
    # Another command's killed run (a guide pass) is no training checkpoint, but not training's to discard.
    pass_stage = stage_dir(tmp_path / "pass")
    (pass_stage / "new").mkdir(parents=True)
    (pass_stage / "new" / "texts.parquet").write_bytes(b"encoded work")
    (pass_stage / outputs.STAGE_RECORD).write_text(json.dumps({"kind": "guide-pass", "key": {"fingerprint": "f"}}))
    assert_fails(gist(*args, "--out", tmp_path / "pass", check=False), 1, "holds an interrupted gist guide-pass run")
    assert (pass_stage / "new" / "texts.parquet").read_bytes() == b"encoded work"


def test_training_never_writes_into_the_guide_pass_it_distils_from(model_pass, data, tmp_path):
    gist("plan", model_pass, "--out", tmp_path / "plan", *PLAN)
    proc = gist("train", data, "--masks", tmp_path / "plan" / "masks.parquet", "--student", STUDENT, "--distill", "kl", "--max-steps", "1",
                "--out", model_pass / "student", check=False)
    assert_fails(proc, 1, "lies inside its guide pass")
    assert not (model_pass / "student").exists()


def test_a_filter_summary_names_its_own_output(model_pass, tmp_path):
    gist("filter", model_pass, "--out", tmp_path / "kept.parquet", "--top-k", "3")
    proc = gist("filter", model_pass, "--out", tmp_path / "kept.jsonl", "--top-k", "3", "--overwrite", check=False)
    assert_fails(proc, 1, "is the record of another gist filter output (kept.parquet)")

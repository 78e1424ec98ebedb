"""Shared fixtures: paths to ../shared (tiny models, data), stage-1 runs built once per session."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GIST_SHARED", ROOT.parent / "shared"))
MODELS = SHARED / "models"
STUDENT = MODELS / "tiny-student"
GUIDE_SAMEVOCAB = MODELS / "tiny-guide-bert-samevocab"  # shares the student's tokenizer
GUIDE_RETOKENIZE = MODELS / "tiny-guide-bert"  # other vocabulary: GISTEmbedLoss retokenizes
GUIDE_STATIC = MODELS / "tiny-guide-static"  # meaningful similarities, stage 1 only
SAMPLE = ROOT / "data" / "train.parquet"


def gist(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `gist ARGS` through the console script's entry point `cli.main()`, in this process (the
    interpreter start and imports of a subprocess were the suite's largest cost); returns its exit
    status, stdout and stderr as a CompletedProcess. Tests that kill or launch processes
    (test_resume, torchrun) start real ones."""
    import cli

    out, err = io.StringIO(), io.StringIO()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    argv, code = sys.argv, 0
    sys.argv = ["gist", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    proc = subprocess.CompletedProcess(["gist", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"gist {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def small_data(path: Path, rows: int, negatives: bool = True) -> Path:
    """The first `rows` rows of the embedded sample, with or without its negative column."""
    table = pq.read_table(SAMPLE).slice(0, rows)
    if not negatives:
        table = table.drop(["negative"])
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="session")
def triplets(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory.mktemp("data") / "triplets.parquet", 512)


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory.mktemp("data") / "pairs.parquet", 512, negatives=False)


@pytest.fixture(scope="session")
def guide_run(tmp_path_factory, triplets) -> Path:
    """Stage 1 over 512 triplets with the same-vocabulary guide, batch 16, 2 epochs, margin 0.05."""
    out = tmp_path_factory.mktemp("runs") / "guide"
    gist("precompute-guide", triplets, "--guide", GUIDE_SAMEVOCAB, "--out", out, "--batch-size", "16", "--epochs", "2", "--margin", "0.05")
    return out


@pytest.fixture(scope="session")
def static_run(tmp_path_factory, triplets) -> Path:
    """Stage 1 over the 512 triplets with the static guide (meaningful similarities, fast): batch 16, 2 epochs, fn-aware."""
    out = tmp_path_factory.mktemp("runs") / "static"
    gist("precompute-guide", triplets, "--guide", GUIDE_STATIC, "--out", out, "--batch-size", "16", "--epochs", "2", "--strategy", "fn-aware")
    return out


@pytest.fixture(scope="session")
def pairs_run(tmp_path_factory, pairs) -> Path:
    out = tmp_path_factory.mktemp("runs") / "pairs"
    # GISTEmbedLoss's exact rule (margin 0: duplicate masking would change entries), for the equivalence tests
    gist("precompute-guide", pairs, "--guide", GUIDE_SAMEVOCAB, "--out", out, "--batch-size", "16", "--strategy", "by-task", "--no-mask-duplicates")
    return out


@pytest.fixture(scope="session")
def guide():
    """The same-vocabulary guide, loaded once, for the online GISTEmbedLoss references."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(GUIDE_SAMEVOCAB), device="cpu")


def load_student(dropout: bool = False):
    """tiny-student; dropout off by default so two runs of the same step are comparable."""
    from sentence_transformers import SentenceTransformer

    config = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return SentenceTransformer(str(STUDENT), device="cpu", config_kwargs=config)


def interrupted_training(finished: Path, out: Path, *drop: str) -> Path:
    """Lay `out` out as a training run killed after its checkpoints: a copy of the finished run
    `finished` without final/ (and without the entries `drop`, e.g. "checkpoints/checkpoint-8"),
    in OUT's stage keyed by its run record, where a killed `gist train` leaves it. Returns the stage."""
    import json
    import shutil

    from pipeline.outputs import STAGE_RECORD, stage_dir

    stage = stage_dir(out)
    shutil.copytree(finished, stage / "new")
    for name in ("final", "eval.json", *drop):
        target = stage / "new" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    (stage / "work").mkdir()
    record = json.loads((finished / "run.json").read_text())
    (stage / STAGE_RECORD).write_text(json.dumps({"kind": record["kind"], "key": record}))
    return stage

"""Random sequences of gist commands over one workspace (issue 29): the output lifecycle holds whatever
the order, the OUT chosen (new, an earlier output, or an input of the command), the flags
(--overwrite, --reuse, --resume) and interruptions (SIGKILL at a random point).

A seeded generator draws each step; after every step it checks:
- no file gist did not write (the data, the vectors, the user's notes) was removed or changed;
- no input of the command was changed by it (every file under each input path, hashed);
- every finished pass or plan opens and `gist verify` passes; no OUT holds a stage's leftovers;
- a killed precompute-guide, run again, writes the bytes an uninterrupted run writes;
- every command exits 0, or refuses with status 1 and one `error:` line (no traceback).

GIST_SEQUENCE_STEPS (default 36) and GIST_SEQUENCE_SEED (default 0) size it; CI runs the default.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.artifacts import MANIFEST, verify_run
from pipeline.outputs import STAGE_SUFFIX, stage_dir
from tests.conftest import GUIDE_STATIC, ROOT, STUDENT, gist, small_data

STEPS = int(os.environ.get("GIST_SEQUENCE_STEPS", 36))
SEED = int(os.environ.get("GIST_SEQUENCE_SEED", 0))
PASS_FILES = ("texts.parquet", "examples.parquet", "embeddings.parquet", "embeddings.npy", "index.faiss", "masks.parquet")


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), by path."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


class Workspace:
    """The files of one sequence: user files (never written by gist), and the outputs gist made."""

    def __init__(self, root: Path, rng: random.Random):
        self.root, self.rng = root, rng
        self.data = small_data(root / "data.parquet", 48)
        small = pq.read_table(self.data).slice(0, 32)
        pq.write_table(small, root / "small.parquet")
        self.small = root / "small.parquet"
        texts = gist_texts(self.data)
        np.save(root / "vectors.npy", np.random.default_rng(0).standard_normal((len(texts), 8)).astype(np.float32))
        self.vectors = root / "vectors.npy"
        (root / "notes").mkdir()
        (root / "notes" / "todo.txt").write_text("the user's own file")
        self.user = [self.data, self.small, self.vectors, root / "notes"]
        self.references: dict[tuple, Path] = {}
        self.log: list[str] = []

    def user_hashes(self) -> dict[str, str]:
        return {k: v for p in self.user for k, v in tree_hashes(p).items()}

    def passes(self, kind: str | None = None) -> list[Path]:
        found = []
        for manifest in sorted(self.root.glob(f"*/{MANIFEST}")):
            stored = json.loads(manifest.read_text()).get("kind")
            if kind is None or stored == kind:
                found.append(manifest.parent)
        return found

    def out(self, suffix: str = "") -> Path:
        """A new name, an earlier output, or one of the inputs: OUT as a careless user picks it, sometimes
        spelled another way (`x/../NAME`), which must name the same place."""
        existing = [p for p in self.root.iterdir() if not p.name.startswith(".") and p.name != "refs"]
        out = self.rng.choice(existing) if self.rng.random() < 0.4 and existing else self.root / f"out{self.rng.randrange(4)}{suffix}"
        return out.parent / "x" / ".." / out.name if self.rng.random() < 0.15 else out


def gist_texts(data: Path) -> list[str]:
    from pipeline.data import load_training_data

    return load_training_data(data).texts.to_pylist()


def run_checked(ws: Workspace, args: list, inputs: list[Path]) -> int:
    """Run one command in this process and check the invariants that hold for any command."""
    before_user, before_inputs = ws.user_hashes(), {k: v for p in inputs for k, v in tree_hashes(p).items()}
    proc = gist(*args, check=False)
    ws.log.append(f"{proc.returncode} gist {' '.join(map(str, args))}")
    assert proc.returncode in (0, 1), (ws.log, proc.stderr[-2000:])
    if proc.returncode == 1:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, (ws.log, proc.stderr[-2000:])
    assert ws.user_hashes() == before_user, ws.log
    after = {k: v for p in inputs for k, v in tree_hashes(p).items()}
    assert after == before_inputs, (ws.log, "an input changed")
    return proc.returncode


def check_workspace(ws: Workspace) -> None:
    for run_dir in ws.passes():
        verify_run(run_dir)
        assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")], (ws.log, run_dir)
    for stage in ws.root.glob(f".*{STAGE_SUFFIX}"):  # only a killed or failed resumable run leaves one
        assert (stage / "stage.json").is_file(), (ws.log, stage)


def precompute_args(ws: Workspace) -> tuple[list, list[Path], tuple]:
    data = ws.rng.choice([ws.data, ws.small])
    seed = str(ws.rng.randrange(2))
    plan = ["--batch-size", "8", "--seed", seed, "--rows-per-group", "16", "--encode-batch-size", "8"]
    if data == ws.data and ws.rng.random() < 0.3:
        source, inputs = ["--embeddings", ws.vectors], [data, ws.vectors]
    else:
        source, inputs = ["--guide", GUIDE_STATIC], [data]
        reuse = ws.passes("guide-pass")
        if reuse and ws.rng.random() < 0.3:
            chosen = ws.rng.choice(reuse)
            source += ["--reuse", chosen]
            inputs.append(chosen)
    key = (str(data), *map(str, source[:2]), *plan)
    return ["precompute-guide", data, *source, *plan], inputs, key


def reference(ws: Workspace, args: list, key: tuple) -> Path:
    """The pass an uninterrupted run of `args` writes (made once per key, outside the workspace's outputs)."""
    if key not in ws.references:
        out = ws.root / "refs" / f"ref{len(ws.references)}"
        clean = [a for i, a in enumerate(args) if not (str(args[i - 1]) == "--reuse" or a == "--reuse")]
        gist(*clean, "--out", out)
        ws.references[key] = out
    return ws.references[key]


def step_precompute(ws: Workspace) -> None:
    args, inputs, key = precompute_args(ws)
    out = ws.out()
    extra = ["--overwrite"] if ws.rng.random() < 0.5 else []
    code = run_checked(ws, [*args, "--out", out, *extra], inputs)
    if code == 0:
        ref = reference(ws, args, key)
        for name in PASS_FILES:
            assert (out / name).read_bytes() == (ref / name).read_bytes(), (ws.log, name)


def step_killed_precompute(ws: Workspace) -> None:
    """A real SIGKILL at a random point of a precompute-guide into a new OUT; the same command run
    again must give the uninterrupted bytes."""
    args, inputs, key = precompute_args(ws)
    out = ws.root / f"killed{ws.rng.randrange(2)}"
    if out.exists():
        return
    before = ws.user_hashes()
    proc = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", *map(str, args), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not stage_dir(out).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(ws.rng.random() * 0.3)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ws.log.append(f"killed gist {' '.join(map(str, args))} --out {out}")
    assert ws.user_hashes() == before, ws.log
    ref = reference(ws, args, key)
    if out.exists():  # killed after the swap (or it finished first): then OUT is the whole pass
        verify_run(out)
        for name in PASS_FILES:
            assert (out / name).read_bytes() == (ref / name).read_bytes(), (ws.log, "a killed run left a partial OUT", name)
    assert run_checked(ws, [*args, "--out", out, "--overwrite"], inputs) == 0
    for name in PASS_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), (ws.log, name)


def step_plan(ws: Workspace) -> None:
    sources = ws.passes("guide-pass")
    if not sources:
        return
    source = ws.rng.choice(sources)
    extra = ["--overwrite"] if ws.rng.random() < 0.5 else []
    run_checked(ws, ["plan", source, "--out", ws.out(), "--batch-size", "8", "--seed", str(ws.rng.randrange(3)), *extra], [source])


def step_mine(ws: Workspace) -> None:
    sources = ws.passes("guide-pass")
    if not sources:
        return
    source = ws.rng.choice(sources)
    out = ws.out(".parquet") if ws.rng.random() < 0.7 else source / "texts.parquet"
    extra = ["--overwrite"] if ws.rng.random() < 0.5 else []
    run_checked(ws, ["mine", source, "--out", out, "--num-negatives", "1", *extra], [source])


def step_filter(ws: Workspace) -> None:
    sources = ws.passes("guide-pass")
    if not sources:
        return
    source = ws.rng.choice(sources)
    data = Path(json.loads((source / MANIFEST).read_text())["dataset"]["path"])
    extra = ["--overwrite"] if ws.rng.random() < 0.5 else []
    run_checked(ws, ["filter", source, "--data", data, "--top-k", "3", "--out", ws.out(".parquet"), *extra], [source, data])


def step_train(ws: Workspace) -> None:
    runs = [*ws.passes("guide-pass"), *ws.passes("plan")]
    if not runs:
        return
    run = ws.rng.choice(runs)
    manifest = json.loads((run / MANIFEST).read_text())
    data = Path(manifest["dataset"]["path"])
    extra = ["--resume"] if ws.rng.random() < 0.2 else []
    run_checked(ws, ["train", data, "--masks", run / "masks.parquet", "--student", STUDENT, "--max-steps", "1", "--out", ws.out(), *extra],
                [data, run])


STEPS_BY_WEIGHT = [(step_precompute, 5), (step_plan, 4), (step_mine, 3), (step_filter, 3), (step_train, 1), (step_killed_precompute, 1)]


def test_random_command_sequences_keep_every_invariant(tmp_path):
    rng = random.Random(SEED)
    ws = Workspace(tmp_path, rng)
    steps, weights = zip(*STEPS_BY_WEIGHT)
    ran = {step.__name__: 0 for step in steps}
    for _ in range(STEPS):
        step = rng.choices(steps, weights)[0]
        step(ws)
        ran[step.__name__] += 1
        check_workspace(ws)
    refused = sum(line.startswith("1 ") for line in ws.log)
    print(f"{STEPS} steps (seed {SEED}): {ran}; {len(ws.log)} commands, {refused} refused")
    assert refused and len(ws.log) - refused >= STEPS // 10, ws.log  # both outcomes were exercised (refusals grow as OUTs fill up)

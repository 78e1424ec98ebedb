"""scale: the post-encoding path as a user runs it, from 100k to 10M examples.

For each size a synthetic guide pass is written in the guide-pass format (`bench.synthetic.write_pass`:
data file, texts/examples tables, embeddings.npy + embeddings.parquet, manifest), then:

- `gist plan --strategy S --epochs E` runs as a subprocess, polled every 50 ms for its resident
  anonymous memory (RssAnon: the embeddings are memory-mapped, so their file pages are RssFile, not
  counted) and file pages; time, peak RssAnon, masks.parquet size. clustered is run at 100k and 300k,
  fn-aware at 30k and 100k (k-means over n/128 clusters and the conflict search grow ~n^1.5-2 on a
  CPU: fn-aware at 300k would take ~30 min here); their 1M figures are extrapolated along the power
  law through those two sizes, and labelled so.
- `gist train --max-steps 1` (tiny student) with the 1-epoch and 80-epoch plans of a 1M x 64 pass
  (the plan's length, not the dim, is what a training process reads; 80 epochs of masks at dim 768
  would take ~40 min of this CPU): wall time and peak RssAnon; their difference is what the plan's
  length costs a training process.
- 10M examples in float16 (random, by-task): at dim 64 unless `--rows 10000000` (dim 768, 30.7 GB of
  vectors: more than this machine's page cache); the anonymous memory is the dim-independent part.

Targets (issue 15; the mask kernel's are bench/mask_kernel.py's): the 10M x 768 float16 plan + masks (random, by-task) in <= 6 GB of anonymous memory; a training
process's masks-related memory <= 200 MB and start-up <= 10 s with the 1M x 80-epoch plan.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench import synthetic
from bench.common import MIB, SHARED, Context, print_table

NAME = "scale"
POLL_S = 0.05
# 10M examples are 20M texts: 30.7 GB of float16 vectors at dim 768 (61 GB with embeddings.parquet), more than
# this machine's page cache, so random gathers turn into disk reads; run with --rows 10000000 where it fits.
# Without it the 10M plans run at dim 64: the anonymous memory (ids, tasks, texts, plan, masks writer) is the
# same at any dim but for one chunk's gathered vectors (CHUNK_ENTRIES-bounded); the vectors are file pages.
TEN_MILLION = 10_000_000


@dataclass(frozen=True)
class Size:
    examples: int
    dim: int
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.examples}x{self.dim}-{self.dtype}"


def matrix(ctx: Context) -> list[tuple[Size, list[tuple[str, int]]]]:
    """(pass, [(strategy, epochs)]) in the order they run."""
    if ctx.quick:
        return [(Size(40_000, 64, "float32"), [("random", 1), ("by-task", 1)]),
                (Size(10_000, 64, "float32"), [("random", 1), ("random", 4), ("clustered", 1), ("fn-aware", 1)]),
                (Size(20_000, 64, "float32"), [("clustered", 1), ("fn-aware", 1)]),
                (Size(20_000, 64, "float16"), [("random", 1)])]
    return [(Size(1_000_000, 768, "float32"), [("random", 1), ("by-task", 1)]),
            (Size(1_000_000, 64, "float32"), [("random", 1), ("random", 80)]),
            (Size(30_000, 768, "float32"), [("fn-aware", 1)]),
            (Size(100_000, 768, "float32"), [("clustered", 1), ("fn-aware", 1)]),
            (Size(300_000, 768, "float32"), [("clustered", 1)]),
            (Size(TEN_MILLION, 768 if ctx.rows == TEN_MILLION else 64, "float16"), [("random", 1), ("by-task", 1)])]


def gist_command() -> str:
    return str(Path(sys.executable).parent / "gist")


def polled(args: list[str]) -> dict:
    """Run a command; its wall time and the peaks of RssAnon and RssFile, sampled every POLL_S."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0}
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]))
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(POLL_S)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({proc.returncode}): {err[-2000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_anon_mb": round(peak["RssAnon"] / 1024, 1),
            "peak_rss_file_mb": round(peak["RssFile"] / 1024, 1)}


def plan_case(pass_dir: Path, out: Path, size: Size, strategy: str, epochs: int) -> dict:
    from pipeline.artifacts import read_manifest

    measured = polled([gist_command(), "plan", str(pass_dir), "--out", str(out), "--strategy", strategy, "--epochs", str(epochs),
                       "--batch-size", "32", "--device", "cpu", "--overwrite"])
    plan = read_manifest(out)["plan"]
    record = {**asdict(size), "strategy": strategy, "epochs": epochs, "batches": plan["num_batches"], "extrapolated": False, **measured,
              "masks_mb": round((out / "masks.parquet").stat().st_size / MIB, 1),
              "us_per_example": round(measured["wall_s"] / (size.examples * epochs) * 1e6, 3)}
    print(f"scale plan {size.name} {strategy} x{epochs}: {measured['wall_s']} s, RssAnon {measured['peak_rss_anon_mb']} MB", file=sys.stderr)
    return record


def train_case(pass_dir: Path, plan_dir: Path, out: Path, epochs: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    measured = polled([gist_command(), "train", str(pass_dir / "data.parquet"), "--masks", str(plan_dir / "masks.parquet"),
                       "--student", str(SHARED / "models" / "tiny-student"), "--out", str(out), "--max-steps", "1",
                       "--save-steps", "1000000", "--device", "cpu"])
    shutil.rmtree(out, ignore_errors=True)
    print(f"scale train with the {epochs}-epoch plan: {measured['wall_s']} s, RssAnon {measured['peak_rss_anon_mb']} MB", file=sys.stderr)
    return {"plan_epochs": epochs, **measured}


def imports_case() -> dict:
    """The floor of any `gist train` start-up: a process that only imports what training imports
    (sentence-transformers, transformers, torch, datasets), measured beside the train cases."""
    measured = polled([sys.executable, "-c", "import cli, pipeline.train"])
    print(f"scale imports of gist train: {measured['wall_s']} s, RssAnon {measured['peak_rss_anon_mb']} MB", file=sys.stderr)
    return {"plan_epochs": None, "imports_only": True, **measured}


def extrapolate(records: list[dict], strategy: str, examples: int, dim: int) -> dict | None:
    """Power law through the two largest measured sizes of `strategy` at `dim` (1 epoch)."""
    base = sorted((r for r in records if r["strategy"] == strategy and r["dim"] == dim and r["epochs"] == 1 and not r["extrapolated"]),
                  key=lambda r: r["examples"])[-2:]
    if len(base) < 2:
        return None
    (n1, t1), (n2, t2) = [(r["examples"], r["wall_s"]) for r in base]
    exponent = np.log(t2 / t1) / np.log(n2 / n1)
    wall = t2 * (examples / n2) ** exponent
    return {"examples": examples, "dim": dim, "dtype": base[-1]["dtype"], "strategy": strategy, "epochs": 1, "extrapolated": True,
            "extrapolated_from": [n1, n2], "exponent": round(float(exponent), 2), "wall_s": round(float(wall), 1),
            "us_per_example": round(float(wall) / examples * 1e6, 3)}


def run(ctx: Context) -> dict:
    work = ctx.work_dir(NAME)
    passes, plans, trains = [], [], []
    for size, cases in matrix(ctx):
        pass_dir = work / size.name
        t0 = time.perf_counter()
        disk = synthetic.write_pass(pass_dir, size.examples, size.dim, size.dtype)
        passes.append({**asdict(size), "write_s": round(time.perf_counter() - t0, 1), "disk_mb": {k: round(v / MIB, 1) for k, v in disk.items()}})
        print(f"scale pass {size.name}: written in {passes[-1]['write_s']} s", file=sys.stderr)
        for strategy, epochs in cases:
            plans.append(plan_case(pass_dir, work / f"{size.name}-{strategy}-e{epochs}", size, strategy, epochs))
        longest = max(e for s, e in cases if s == "random") if any(s == "random" for s, _ in cases) else 1
        if longest > 1:  # the pass with a long plan: training start-up with its 1-epoch and long plans
            trains = [train_case(pass_dir, work / f"{size.name}-random-e{e}", work / "train", e) for e in (1, longest)] + [imports_case()]
        for path in pass_dir.parent.glob(f"{size.name}-*"):
            shutil.rmtree(path)  # disk: only one pass and its plans at a time
        shutil.rmtree(pass_dir)
    first = matrix(ctx)[0][0]
    for strategy in ("clustered", "fn-aware"):
        if not any(r["strategy"] == strategy and r["examples"] == first.examples for r in plans):
            record = extrapolate(plans, strategy, first.examples, first.dim)
            if record:
                plans.append(record)
    return {
        "definitions": {
            "wall_s": "the `gist plan` (or `gist train --max-steps 1`) process, start to exit: imports, loading and checksums included",
            "train_beyond_imports_s": "gist train --max-steps 1 with the long plan minus a process that only imports what it imports",
            "peak_rss_anon_mb": "highest RssAnon sampled every 50 ms: anonymous memory; the memory-mapped embeddings are file pages (RssFile)",
            "us_per_example": "wall_s / (examples x epochs)",
            "extrapolated": "not run at this size on this CPU: power law through the two largest measured sizes",
        },
        "passes": passes, "plans": plans, "train": trains,
        "train_plan_length_cost": trains and {"wall_s": round(trains[1]["wall_s"] - trains[0]["wall_s"], 2),
                                             "rss_anon_mb": round(trains[1]["peak_rss_anon_mb"] - trains[0]["peak_rss_anon_mb"], 1)},
        "train_beyond_imports_s": trains and round(trains[1]["wall_s"] - trains[2]["wall_s"], 2),
    }


def table(result: dict) -> None:
    rows = [[f"{r['examples']:,}", r["dim"], r["dtype"], r["strategy"], r["epochs"], "extrapolated" if r["extrapolated"] else "measured",
             r["wall_s"], r["us_per_example"], r.get("peak_rss_anon_mb", "–"), r.get("peak_rss_file_mb", "–"), r.get("masks_mb", "–")]
            for r in result["plans"]]
    print_table(f"scale ({result['mode']}): gist plan, batch 32",
                ["examples", "dim", "dtype", "strategy", "epochs", "", "wall s", "µs/example", "RssAnon MB", "RssFile MB", "masks MB"], rows)
    if result["train"]:
        print_table("gist train --max-steps 1 start-up", ["plan epochs", "wall s", "RssAnon MB"],
                    [[t["plan_epochs"] or "imports only", t["wall_s"], t["peak_rss_anon_mb"]] for t in result["train"]])

"""scale: the post-encoding path as a user runs it, from 100k to 10M examples.

For each size a synthetic guide pass is written in the guide-pass format (`bench.synthetic.write_pass`:
data file, texts/examples tables, embeddings.npy + embeddings.parquet, manifest), then:

- `gist plan --strategy S --epochs E` runs as a subprocess, polled every 50 ms for its resident
  anonymous memory (RssAnon: the embeddings are memory-mapped, so their file pages are RssFile, not
  counted) and file pages; time, peak RssAnon, masks.parquet size. clustered is run at 100k and 300k
  (k-means over n/128 clusters grows ~n^1.5-2 on a CPU); its 1M figure is extrapolated along the
  power law through those two sizes, and labelled so. fn-aware runs at 100k and 1M, each with the
  recall of its conflict search on a seeded sample of examples (bench.fn_aware_recall.sampled_recall).
- opening the 1M x 768 pass (`load_guide_pass`, after the imports): as now (sizes and sampled
  checksums) and as before (the same plus the whole-file sha256 of texts, examples and
  embeddings.npy that every open computed), and `gist verify` (every file hashed whole).
- `gist train --max-steps 1` (tiny student) with the 1-epoch and 80-epoch plans of a 1M x 64 pass
  (the plan's length, not the dim, is what a training process reads; 80 epochs of masks at dim 768
  would take ~40 min of this CPU): wall time and peak RssAnon; their difference is what the plan's
  length costs a training process.
- 10M examples in float16 (random, by-task): at dim 64 unless `--rows 10000000` (dim 768, 30.7 GB of
  vectors: more than this machine's page cache); the anonymous memory is the dim-independent part.

Targets (issue 15; the mask kernel's are bench/mask_kernel.py's): the 10M x 768 float16 plan + masks (random, by-task) in <= 6 GB of anonymous memory; a training
process's masks-related memory <= 200 MB and start-up <= 10 s with the 1M x 80-epoch plan.
Issue 24: fn-aware at 1M x 768 in <= 5 min, recall of the exact conflict edges >= 0.9 at 100k.

`python -m bench.scale --leftovers` runs only issue 24's cases (open times, fn-aware at 100k and
1M) and writes bench/results/scale-leftovers.json, the load average beside each figure.
"""

from __future__ import annotations

import json
import os
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
RECALL_SAMPLES = {100_000: 2000, 1_000_000: 500}  # examples searched exhaustively for fn-aware's recall (others: 200)


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
    return [(Size(1_000_000, 768, "float32"), [("random", 1), ("by-task", 1), ("fn-aware", 1)]),
            (Size(1_000_000, 64, "float32"), [("random", 1), ("random", 80)]),
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

    load = os.getloadavg()[0]
    measured = polled([gist_command(), "plan", str(pass_dir), "--out", str(out), "--strategy", strategy, "--epochs", str(epochs),
                       "--batch-size", "32", "--device", "cpu", "--overwrite"])
    plan = read_manifest(out)["plan"]
    record = {**asdict(size), "strategy": strategy, "epochs": epochs, "batches": plan["num_batches"], "extrapolated": False, **measured,
              "masks_mb": round((out / "masks.parquet").stat().st_size / MIB, 1),
              "us_per_example": round(measured["wall_s"] / (size.examples * epochs) * 1e6, 3),
              "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)]}
    print(f"scale plan {size.name} {strategy} x{epochs}: {measured['wall_s']} s, RssAnon {measured['peak_rss_anon_mb']} MB", file=sys.stderr)
    if strategy == "fn-aware":
        from bench.fn_aware_recall import sampled_recall
        from pipeline.guide import load_guide_pass

        _, data, embeddings = load_guide_pass(pass_dir)
        load = os.getloadavg()[0]
        record["recall"] = {**sampled_recall(data, embeddings, RECALL_SAMPLES.get(size.examples, 200)),
                            "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)]}
        print(f"scale fn-aware {size.name}: recall {record['recall']['recall']} on {record['recall']['sampled_examples']} examples", file=sys.stderr)
    return record


OPEN_SCRIPT = """
import json, sys, time
from pathlib import Path
from pipeline import artifacts, data, guide
run = Path(sys.argv[1])
start = time.perf_counter()
if sys.argv[2] == "before":  # what every open hashed whole before sampled checksums
    manifest = artifacts.read_manifest(run)
    for name in (data.TEXTS, data.EXAMPLES, guide.VECTORS):
        artifacts.verify_checksum(run, name, manifest, full=True)
guide.load_guide_pass(run)
print(json.dumps({"open_s": round(time.perf_counter() - start, 3)}))
"""


def open_case(pass_dir: Path) -> dict:
    """Opening a pass after the imports, now and as before, each in a fresh process (the pass's
    pages are in the page cache: it was just written), and `gist verify`'s wall time."""
    record = {"after": {"open_s": [], "load_avg_1m": []}, "before": {"open_s": [], "load_avg_1m": []}}
    for when in ("after", "before", "before", "after"):  # twice each, interleaved; the fastest is kept
        load = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, "-c", OPEN_SCRIPT, str(pass_dir), when], capture_output=True, text=True, check=True)
        record[when]["open_s"].append(json.loads(proc.stdout)["open_s"])
        record[when]["load_avg_1m"].append([round(load, 2), round(os.getloadavg()[0], 2)])
    for when in ("after", "before"):
        record[when]["fastest_s"] = min(record[when]["open_s"])
    load = os.getloadavg()[0]
    record["gist_verify"] = {**polled([gist_command(), "verify", str(pass_dir)]), "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)]}
    print(f"scale open {pass_dir.name}: {record['after']['fastest_s']} s (before: {record['before']['fastest_s']} s), gist verify {record['gist_verify']['wall_s']} s", file=sys.stderr)
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


def run(ctx: Context, cases_of=matrix) -> dict:
    work = ctx.work_dir(NAME)
    passes, plans, trains, opens = [], [], [], {}
    for size, cases in cases_of(ctx):
        pass_dir = work / size.name
        t0 = time.perf_counter()
        disk = synthetic.write_pass(pass_dir, size.examples, size.dim, size.dtype)
        passes.append({**asdict(size), "write_s": round(time.perf_counter() - t0, 1), "disk_mb": {k: round(v / MIB, 1) for k, v in disk.items()}})
        print(f"scale pass {size.name}: written in {passes[-1]['write_s']} s", file=sys.stderr)
        if size == cases_of(ctx)[0][0]:
            opens[size.name] = open_case(pass_dir)
        for strategy, epochs in cases:
            plans.append(plan_case(pass_dir, work / f"{size.name}-{strategy}-e{epochs}", size, strategy, epochs))
        longest = max(e for s, e in cases if s == "random") if any(s == "random" for s, _ in cases) else 1
        if longest > 1:  # the pass with a long plan: training start-up with its 1-epoch and long plans
            trains = [train_case(pass_dir, work / f"{size.name}-random-e{e}", work / "train", e) for e in (1, longest)] + [imports_case()]
        for path in pass_dir.parent.glob(f"{size.name}-*"):
            shutil.rmtree(path)  # disk: only one pass and its plans at a time
        shutil.rmtree(pass_dir)
    first = cases_of(ctx)[0][0]
    for strategy in ("clustered",):
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
            "recall": "fn-aware: conflict edges of a seeded sample of examples found by the plan's search / found exhaustively (bench.fn_aware_recall.sampled_recall)",
            "open": "load_guide_pass in a fresh process after its imports; before = the same plus the whole-file checksums every open computed until issue 24",
            "load_avg_1m": "1-minute load average before and after the figure: this CPU is shared, times under load are pessimistic",
        },
        "passes": passes, "plans": plans, "train": trains, "open": opens,
        "train_plan_length_cost": trains and {"wall_s": round(trains[1]["wall_s"] - trains[0]["wall_s"], 2),
                                             "rss_anon_mb": round(trains[1]["peak_rss_anon_mb"] - trains[0]["peak_rss_anon_mb"], 1)},
        "train_beyond_imports_s": trains and round(trains[1]["wall_s"] - trains[2]["wall_s"], 2),
    }


def leftovers(ctx: Context) -> list[tuple[Size, list[tuple[str, int]]]]:
    """Issue 24's cases alone: open times and fn-aware at 1M x 768, fn-aware at 100k."""
    if ctx.quick:
        return [(Size(20_000, 64, "float32"), [("fn-aware", 1)]), (Size(10_000, 64, "float32"), [("fn-aware", 1)])]
    return [(Size(1_000_000, 768, "float32"), [("fn-aware", 1)]), (Size(100_000, 768, "float32"), [("fn-aware", 1)])]


def table(result: dict) -> None:
    rows = [[f"{r['examples']:,}", r["dim"], r["dtype"], r["strategy"], r["epochs"], "extrapolated" if r["extrapolated"] else "measured",
             r["wall_s"], r["us_per_example"], r.get("peak_rss_anon_mb", "–"), r.get("peak_rss_file_mb", "–"), r.get("masks_mb", "–")]
            for r in result["plans"]]
    print_table(f"scale ({result['mode']}): gist plan, batch 32",
                ["examples", "dim", "dtype", "strategy", "epochs", "", "wall s", "µs/example", "RssAnon MB", "RssFile MB", "masks MB"], rows)
    for name, opened in result.get("open", {}).items():
        print_table(f"opening the {name} pass", ["", "seconds"], [["open (sizes, sampled checksums)", opened["after"]["fastest_s"]],
                    ["open as before (whole-file checksums)", opened["before"]["fastest_s"]], ["gist verify (wall)", opened["gist_verify"]["wall_s"]]])
    if result["train"]:
        print_table("gist train --max-steps 1 start-up", ["plan epochs", "wall s", "RssAnon MB"],
                    [[t["plan_epochs"] or "imports only", t["wall_s"], t["peak_rss_anon_mb"]] for t in result["train"]])


if __name__ == "__main__":
    import argparse

    from bench.common import ROOT, write_result

    parser = argparse.ArgumentParser(prog="python -m bench.scale", description="issue 24's cases of bench scale alone")
    parser.add_argument("--leftovers", action="store_true", required=True)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test); results under bench/results/quick/")
    args = parser.parse_args()
    context = Context("quick" if args.quick else "full", ROOT / ".cache" / "models")
    started, load = time.perf_counter(), os.getloadavg()[0]
    outcome = write_result(f"{NAME}-leftovers", context, run(context, leftovers), started, load)
    table(outcome)

"""What every benchmark shares: its settings, the machine record, results files, tables, fresh
processes for memory measurements, and the peak-memory probe."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GIST_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / ".work"  # stage-1 outputs and data slices; gitignored
SAMPLE = ROOT / "data" / "train.parquet"  # the 2000-triplet sample shipped with the project
FULL_TRAIN = SHARED / "data" / "train.parquet"  # the 10156-triplet training set
MIB = 1 << 20

# Imported once by the fork server, so each fresh measurement process starts without ~10 s of imports.
PRELOAD = ["pipeline.train", "pipeline.loss", "pipeline.masks", "pipeline.guide", "sentence_transformers"]


@dataclass
class Context:
    """The run's mode and model directory, plus hidden overrides (for smoke runs of the full path)."""

    mode: str  # "quick" (tiny models, CI smoke test) or "full" (real models)
    models: Path
    reps: int | None = None
    steps: int | None = None
    rows: int | None = None

    @property
    def quick(self) -> bool:
        return self.mode == "quick"

    @property
    def results(self) -> Path:
        """bench/results for --full (committed); bench/results/quick for smoke runs (gitignored), so
        CI never overwrites the full results."""
        return RESULTS / "quick" if self.quick else RESULTS

    @property
    def student(self) -> Path:
        return SHARED / "models" / "tiny-student" if self.quick else self.models / "all-MiniLM-L6-v2"

    @property
    def guide(self) -> Path:
        return SHARED / "models" / "tiny-guide-bert-samevocab" if self.quick else self.models / "all-mpnet-base-v2"

    def pick(self, quick, full):
        return quick if self.quick else full

    def repetitions(self, quick: int, full: int) -> int:
        return self.reps or self.pick(quick, full)

    def work_dir(self, name: str) -> Path:
        """An empty scratch directory for one benchmark in this mode."""
        path = WORK / name / self.mode
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def sample(self, quick_rows: int | None) -> Path:
        """The 2000-row sample, or its first rows (quick mode's default, or --rows) as a Parquet file."""
        rows = self.rows or self.pick(quick_rows, None)
        if rows is None:
            return SAMPLE
        from pipeline.artifacts import atomic_path

        path = WORK / f"sample-{rows}.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                pq.write_table(pq.read_table(SAMPLE).slice(0, rows), tmp)
        return path


def median(values) -> float:
    return float(statistics.median(values))


def machine_info() -> dict:
    """CPU, cores, torch threads, CUDA, memory and load: what the timings depend on."""
    import torch

    from pipeline.artifacts import package_versions

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    info = {
        "cpu": next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown"),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),  # unset: numpy's OpenBLAS uses every core
        "cuda": torch.cuda.is_available(),
        "memory_gib": round(int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal"))) / MIB, 1),
        "versions": package_versions(),
    }
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_result(name: str, ctx: Context, payload: dict, started: float, load_before: float) -> dict:
    """Write `<ctx.results>/<name>.json` with the mode, the machine and the load around the run; return it."""
    from pipeline.artifacts import write_json

    ctx.results.mkdir(parents=True, exist_ok=True)
    machine = {**machine_info(), "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)}
    result = {"benchmark": name, "mode": ctx.mode, "machine": machine, "duration_s": round(time.perf_counter() - started, 1), **payload}
    overrides = {k: v for k, v in (("reps", ctx.reps), ("steps", ctx.steps), ("rows", ctx.rows)) if v is not None}
    if overrides:
        result["overrides"] = overrides  # a smoke run: not the benchmark's own counts
    write_json(ctx.results / f"{name}.json", result)
    return result


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    Console(width=200).print(table)  # not squeezed to 80 columns when stdout is not a terminal


def run_isolated(fn, *args):
    """Run `fn(*args)` in a fresh process (forked from a server that has only imported PRELOAD).

    Peak memory is a property of a process, so each measured configuration gets its own.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def _proc_status_mib(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


class PeakMemory:
    """Peak memory added by a block, in MiB: the CUDA allocator's on GPU, resident set size on CPU.

    On CPU the kernel's high-water mark (VmHWM) is reset on entry by writing 5 to
    /proc/self/clear_refs, so memory touched before the block (model loading) does not count.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / MIB
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.before = _proc_status_mib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / MIB
        else:
            self.peak = _proc_status_mib("VmHWM")

    def report(self) -> dict:
        return {
            "kind": "cuda_max_memory_allocated" if self.cuda else "rss_high_water_mark",
            "before_mb": round(self.before, 1),
            "peak_mb": round(self.peak, 1),
            "increase_mb": round(self.peak - self.before, 1),
        }

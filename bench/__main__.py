"""`python -m bench --quick | --full [--models DIR] [--only NAME[,NAME]]`.

Runs the benchmarks in order, writes `bench/results/<name>.json` for each (`bench/results/quick/`
for --quick, gitignored) and prints its table.
--quick (tiny models from ../shared/models) is a CI smoke test of the code paths, not of the
targets; --full uses the real student and guide from --models.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from bench.common import ROOT, Context, write_result

# train_step before amortization (which cross-checks its online guide cost against it); stage1 before mine (which reads its guide pass).
BENCHMARKS = ("train_step", "stage1", "mine", "amortization", "scale", "mask_kernel", "cached_loss", "static_step", "guide_prompts")
USE_MODELS = {"train_step", "stage1", "mine", "amortization", "cached_loss", "static_step", "guide_prompts"}  # scale and mask_kernel need no model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Run the benchmarks; write bench/results/<name>.json and print a table for each.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="tiny models, small sizes (CI smoke test, ~1-2 min)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="real models (all-MiniLM-L6-v2, all-mpnet-base-v2)")
    parser.add_argument("--models", type=Path, metavar="DIR", default=ROOT / ".cache" / "models", help="directory of the real models (default .cache/models)")
    parser.add_argument("--only", metavar="NAME[,NAME]", default=",".join(BENCHMARKS), help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    # Hidden overrides for smoke runs of the full path: repetitions, timed steps / sampled batches, data rows / sampled texts.
    for hidden in ("--reps", "--steps", "--rows"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.only = [name for name in BENCHMARKS if name in args.only]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = Context(args.mode, args.models.resolve(), args.reps, args.steps, args.rows)
    for model in (ctx.student, ctx.guide) if USE_MODELS & set(args.only) else ():
        if not model.is_dir():
            sys.exit(f"bench: no model at {model} (for --full, run `make models` or pass --models DIR)")
    t0 = time.perf_counter()
    for name in args.only:
        module = importlib.import_module(f"bench.{name}")
        started, load = time.perf_counter(), os.getloadavg()[0]
        result = write_result(name, ctx, module.run(ctx), started, load)
        module.table(result)
    print(f"bench --{ctx.mode}: {', '.join(args.only)} in {time.perf_counter() - t0:.0f} s; results in {ctx.results.relative_to(ROOT)}/", file=sys.stderr)


if __name__ == "__main__":
    main()

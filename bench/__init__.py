"""Benchmarks of the claims gist makes about cost: `python -m bench --quick | --full`.

- train_step: a GuidedMaskLoss step costs what an MNRL step costs; online GISTEmbedLoss costs more.
- stage1: `gist precompute-guide` runs at the speed of a bare guide encode; planning is a rounding error.
- amortization: one offline guide pass against the guide re-run on every step of every epoch and run.
- scale: how planning and mask writing grow from 100k to 10M examples.

Each writes `bench/results/<name>.json` and prints a short table. Models are local only.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no weight-loading bars between the tables
# OpenMP threads that spin while waiting make a torch step several times slower whenever other work
# shares the CPU (measured here: 0.5-3.5 s instead of ~0.15 s for a tiny-student step under load);
# passive waiting keeps the timings stable. Set before torch is imported; recorded in each result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

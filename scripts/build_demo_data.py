"""Build data/demo_train.parquet, the demo's training pairs, from ../shared/data/train_pairs.parquet.

`make demo` trains where in-batch false negatives are frequent, so that the guide's masks matter:
224 SciFact *train* claim -> cited abstract pairs (never the test claims the demo evaluates on) and
224 SciTail hypothesis -> entailing premise pairs taken as whole hypothesis groups (a hypothesis with
several entailing premises puts true positives of one anchor into the same clustered batch).
Deterministic (seed 0): `python scripts/build_demo_data.py [SHARED_DATA_DIR]`.
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data"
pairs = pd.read_parquet(source / "train_pairs.parquet")
rng = np.random.default_rng(0)
scifact = pairs[pairs.task == "scifact"]
scifact = scifact.iloc[np.sort(rng.permutation(len(scifact))[:224])]
scitail = pairs[pairs.task == "scitail"]
groups = scitail.groupby("anchor", sort=True).size()
chosen, total = [], 0
for anchor in groups.index.to_numpy()[rng.permutation(len(groups))]:
    if total >= 224:
        break
    chosen.append(anchor)
    total += groups[anchor]
scitail = scitail[scitail.anchor.isin(set(chosen))].iloc[:224]
selected = pd.concat([scifact, scitail])[["anchor", "positive", "task"]]
selected = selected.iloc[rng.permutation(len(selected))].reset_index(drop=True)
pq.write_table(pa.Table.from_pandas(selected, preserve_index=False), ROOT / "data" / "demo_train.parquet")
print(f"data/demo_train.parquet: {len(selected)} pairs {selected.task.value_counts().to_dict()}")

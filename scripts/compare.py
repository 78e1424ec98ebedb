"""Print the demo's students side by side from `gist evaluate --out` / `gist train` eval.json files.

Usage: compare.py LABEL=RESULTS.json [LABEL=RESULTS.json ...]; the first is the reference that the
others' changes are measured from.
"""

import json
import sys

from rich.console import Console
from rich.table import Table

runs = [(label, json.loads(open(path).read())) for label, _, path in (arg.partition("=") for arg in sys.argv[1:])]
(first_label, first), others = runs[0], runs[1:]
metrics = [k for k, v in first.items() if isinstance(v, float)]
table = Table("metric", first_label, *(f"{label} (change)" for label, _ in others), title="gist demo: the same student, the same planned batches")
for metric in metrics:
    table.add_row(metric, f"{first[metric]:.4f}", *(f"{r[metric]:.4f} ({r[metric] - first[metric]:+.4f})" for _, r in others))
Console().print(table)

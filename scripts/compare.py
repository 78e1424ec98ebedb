"""Print a before/after table of two `gist evaluate --out` JSON files. Usage: compare.py BEFORE AFTER"""

import json
import sys

from rich.console import Console
from rich.table import Table

before, after = (json.loads(open(path).read()) for path in sys.argv[1:3])
table = Table("metric", "before", "after", "change", title="gist demo: student before and after guided training")
for metric in (k for k in before if k != "model"):
    table.add_row(metric, f"{before[metric]:.4f}", f"{after[metric]:.4f}", f"{after[metric] - before[metric]:+.4f}")
Console().print(table)

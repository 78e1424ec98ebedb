"""fn_aware_recall: how many exact conflict edges fn-aware's IVF search finds, by probe count.

`python -m bench.fn_aware_recall` encodes the 10156-triplet training set with the static tiny
guide (its similarities are meaningful and it is fast), builds the conflict graph exhaustively,
then with IVF forced (EXACT_SEARCH_MADDS = 0) at several IVF_NPROBE values, and prints recall and
seconds, written to bench/results/fn_aware_recall.json with the machine record. The README's
figures (pipeline/conflicts.py's IVF_NPROBE) come from it.
"""

from __future__ import annotations

import json
import time

import numpy as np

from bench.common import FULL_TRAIN, RESULTS, SHARED, machine_info
from pipeline import conflicts
from pipeline.data import load_training_data
from pipeline.guide import load_model


def edges(data, graph) -> set:
    indptr, neighbours = graph
    return set((np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)) * data.num_examples + neighbours).tolist())


def main() -> None:
    data = load_training_data(FULL_TRAIN)
    model = load_model(str(SHARED / "models" / "tiny-guide-static"), "cpu")
    embeddings = model.encode(data.texts.to_pylist(), batch_size=256, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    result = {"machine": machine_info(), "data": str(FULL_TRAIN), "guide": "tiny-guide-static", "examples": data.num_examples}
    start = time.perf_counter()
    exact = edges(data, conflicts.conflict_graph(data, embeddings))
    result["exhaustive"] = {"edges": len(exact), "seconds": round(time.perf_counter() - start, 2)}
    print(f"exhaustive: {len(exact)} edges, {result['exhaustive']['seconds']}s")
    conflicts.EXACT_SEARCH_MADDS = 0
    result["ivf"] = {}
    for nprobe in (8, 16, 32, 64):
        conflicts.IVF_NPROBE = nprobe
        start = time.perf_counter()
        found = edges(data, conflicts.conflict_graph(data, embeddings))
        result["ivf"][nprobe] = {"recall": round(len(found & exact) / len(exact), 3), "seconds": round(time.perf_counter() - start, 2)}
        print(f"IVF, {nprobe} probes: recall {result['ivf'][nprobe]['recall']}, {result['ivf'][nprobe]['seconds']}s")
    (RESULTS / "fn_aware_recall.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

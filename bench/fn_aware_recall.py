"""fn_aware_recall: how many exact conflict edges fn-aware's IVF search finds, by probe count.

`python -m bench.fn_aware_recall` encodes the 10156-triplet training set with the static tiny
guide (its similarities are meaningful and it is fast), builds the conflict graph exhaustively,
then with IVF forced (EXACT_SEARCH_MADDS = 0) at several IVF_NPROBE values, and prints recall and
seconds. The README's figures (pipeline/conflicts.py's IVF_NPROBE) come from it.
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import FULL_TRAIN, SHARED
from pipeline import conflicts
from pipeline.data import load_training_data
from pipeline.guide import load_model


def edges(data, graph) -> set:
    indptr, neighbours = graph
    return set((np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)) * data.num_examples + neighbours).tolist())


def main() -> None:
    data = load_training_data(FULL_TRAIN)
    model = load_model(str(SHARED / "models" / "tiny-guide-static"), "cpu")
    embeddings = model.encode(data.texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    start = time.perf_counter()
    exact = edges(data, conflicts.conflict_graph(data, embeddings))
    print(f"exhaustive: {len(exact)} edges, {time.perf_counter() - start:.2f}s")
    conflicts.EXACT_SEARCH_MADDS = 0
    for nprobe in (8, 16, 32, 64):
        conflicts.IVF_NPROBE = nprobe
        start = time.perf_counter()
        found = edges(data, conflicts.conflict_graph(data, embeddings))
        print(f"IVF, {nprobe} probes: recall {len(found & exact) / len(exact):.3f}, {time.perf_counter() - start:.2f}s")


if __name__ == "__main__":
    main()

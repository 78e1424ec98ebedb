"""Synthetic stage-1 inputs for timing planning and masking without running a guide.

Mask cost does not depend on what the vectors mean, but the size of masks.parquet depends on how
many entries are masked. Random vectors would give random thresholds and mask about half of every
block, so each positive is made its anchor plus equal-norm noise (cosine ~0.71, far above the
~1/sqrt(dim) spread of unrelated pairs): masks stay sparse, mostly the self-pairs of `aa`/`pp`.
"""

from __future__ import annotations

import numpy as np

from pipeline.data import TrainingData

CHUNK_BYTES = 1 << 26  # vectors generated at a time: temporaries stay ~64 MiB at any size and dim


def triplets(num_examples: int, seed: int = 0) -> TrainingData:
    """Example i: anchor text i, positive text n + i, one negative drawn from the other positives.

    `texts` stays empty: planning and masking read only ids; the text count is 2 * num_examples.
    """
    n = num_examples
    rng = np.random.default_rng(seed)
    return TrainingData(
        texts=[],
        anchor_ids=np.arange(n, dtype=np.int64),
        positive_ids=np.arange(n, 2 * n, dtype=np.int64),
        negative_ids=rng.integers(n, 2 * n, size=(n, 1), dtype=np.int64),
        tasks=None,
        fingerprint=f"synthetic-{n}-{seed}",
        columns={"anchor": "anchor", "positive": "positive", "negative": "negative"},
    )


def _normalize(rows: np.ndarray) -> None:
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)


def guide_embeddings(data: TrainingData, num_texts: int, dim: int, seed: int = 0) -> np.ndarray:
    """float32 (num_texts, dim) unit vectors; each positive = normalize(its anchor + noise)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_BYTES // (4 * dim))
    embeddings = np.empty((num_texts, dim), dtype=np.float32)
    for start in range(0, num_texts, chunk):
        rows = embeddings[start : start + chunk]
        rows[:] = rng.standard_normal(rows.shape, dtype=np.float32)
        _normalize(rows)
    for start in range(0, data.num_examples, chunk):
        anchors, positives = data.anchor_ids[start : start + chunk], data.positive_ids[start : start + chunk]
        moved = embeddings[anchors] + embeddings[positives]
        _normalize(moved)
        embeddings[positives] = moved
    return embeddings

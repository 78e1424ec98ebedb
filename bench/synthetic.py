"""Synthetic stage-1 inputs for timing planning and masking without running a guide.

Mask cost does not depend on what the vectors mean, but the size of masks.parquet depends on how
many entries are masked. Random vectors would give random thresholds and mask about half of every
block, so each positive is made its anchor plus equal-norm noise (cosine ~0.71, far above the
~1/sqrt(dim) spread of unrelated pairs): masks stay sparse, mostly the self-pairs of `aa`/`pp`.

`write_pass` also gives the anchors paraphrase families, as training sets hold repeated and
reworded queries: FAMILY consecutive anchors around one random direction, at a pairwise cosine
drawn per family from FAMILY_COSINES. Their `aa` pairs beat the ~0.71 threshold, so fn-aware's
conflict graph has similarity edges to find (without them isotropic random vectors have none at
margin 0, and the search would be timed on an empty graph). A random batch of 32 of 100k
examples rarely holds two of a family: masks stay sparse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data import TrainingData

CHUNK_BYTES = 1 << 26  # vectors generated at a time: temporaries stay ~64 MiB at any size and dim


def triplets(num_examples: int, seed: int = 0) -> TrainingData:
    """Example i: anchor text i, positive text n + i, one negative drawn from the other positives.

    `texts` stays empty: planning and masking read only ids; the text count is 2 * num_examples.
    """
    n = num_examples
    rng = np.random.default_rng(seed)
    return TrainingData(
        texts=pa.array([], pa.large_string()),
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


TASKS = 8  # synthetic tasks (round robin), for by-task plans
FAMILY = 4  # write_pass: consecutive anchors sharing a direction (paraphrases)...
FAMILY_COSINES = (0.75, 0.95)  # ... at a pairwise cosine drawn uniformly from this range per family


def _family_anchors(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """`rows` (a multiple of FAMILY, but for the last chunk) unit anchors, FAMILY at a time around a
    random direction: centre + s u (u a random unit vector) has cosine 1 / (1 + s^2) with another."""
    families = -(-rows // FAMILY)
    centres = rng.standard_normal((families, dim), dtype=np.float32)
    _normalize(centres)
    cosine = rng.uniform(*FAMILY_COSINES, size=(families, 1)).astype(np.float32)
    spread = rng.standard_normal((families * FAMILY, dim), dtype=np.float32)
    _normalize(spread)
    anchors = np.repeat(centres, FAMILY, axis=0) + np.repeat(np.sqrt(1 / cosine - 1), FAMILY, axis=0) * spread
    _normalize(anchors)
    return anchors[:rows]


def write_pass(out: Path, num_examples: int, dim: int, dtype: str = "float32", seed: int = 0) -> dict:
    """A synthetic guide pass in the guide-pass format, as `precompute-guide` would leave it.

    DATA (`out/data.parquet`): anchor `a<i>`, positive `p<i>`, negative `p<j>` (j random), task
    `t<i mod 8>`; texts and examples tables written by the pipeline's own writer from its own loader;
    `embeddings.npy` (unit vectors: anchors in paraphrase families, positive = normalize(anchor +
    noise), generated a chunk at a time into the memory map) and `embeddings.parquet` from it; a manifest with checksums. No index
    (nothing after encoding needs one for `gist plan`, except fn-aware's own search). Returns sizes.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline import artifacts, data as data_mod, guide as guide_mod
    from pipeline.views import SINGLE_VIEW

    out.mkdir(parents=True, exist_ok=True)
    n = num_examples
    rng = np.random.default_rng(seed)
    ids = pa.array(np.arange(n)).cast(pa.string())
    table = pa.table({
        "anchor": pc.binary_join_element_wise("a", ids, ""),
        "positive": pc.binary_join_element_wise("p", ids, ""),
        "negative": pc.binary_join_element_wise("p", pa.array(rng.integers(0, n, n)).cast(pa.string()), ""),
        "task": pc.binary_join_element_wise("t", pa.array(np.arange(n) % TASKS).cast(pa.string()), ""),
    })
    pq.write_table(table, out / "data.parquet")
    del table
    data = data_mod.load_training_data(out / "data.parquet")
    assert np.array_equal(data.anchor_ids, np.arange(n)) and np.array_equal(data.positive_ids, np.arange(n, 2 * n))
    data_mod.write_data_tables(out, data)
    vectors = np.lib.format.open_memmap(out / guide_mod.VECTORS, mode="w+", dtype=dtype, shape=(2 * n, dim))
    chunk = max(FAMILY, CHUNK_BYTES // (4 * dim) // FAMILY * FAMILY)  # families never straddle chunks
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        anchors = _family_anchors(rng, stop - start, dim)
        positives = anchors + rng.standard_normal(anchors.shape, dtype=np.float32) / np.sqrt(dim, dtype=np.float32)
        _normalize(positives)
        vectors[start:stop], vectors[n + start : n + stop] = anchors, positives
    vectors.flush()
    schema = guide_mod.embeddings_schema(dim, dtype)
    with pq.ParquetWriter(out / guide_mod.EMBEDDINGS, schema) as writer:
        for start in range(0, 2 * n, 4 * chunk):
            rows = np.asarray(vectors[start : start + 4 * chunk])
            writer.write_table(guide_mod.embeddings_table(data.rows, start, rows, schema))
    del vectors
    files = [data_mod.TEXTS, data_mod.EXAMPLES, guide_mod.EMBEDDINGS, guide_mod.VECTORS]
    guide = {"name": "synthetic", "path": "synthetic", "sha256": f"synthetic-{seed}", "dtype": "float32", "max_seq_length": None, "dim": dim,
             "views": SINGLE_VIEW.record()}
    artifacts.write_manifest(
        out, files, kind="guide-pass", world_size=1, guide=guide,
        dataset={"path": str((out / "data.parquet").resolve()), "fingerprint": data.fingerprint, "columns": data.columns,
                 "num_examples": n, "num_texts": 2 * n, "num_vectors": 2 * n, "num_negatives": 1},
        encoding={"embedding_dtype": dtype, "synthetic": True}, index=None, plan=None, timings={},
    )
    return {name: (out / name).stat().st_size for name in [*files, "data.parquet"]}

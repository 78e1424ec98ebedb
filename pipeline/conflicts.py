"""The conflict graph behind `--strategy fn-aware`: which examples must not share a batch.

Example j conflicts with example i when a batch holding both would get a mask entry: the mask rule
(pipeline.masks.false_negative_mask, with the plan's margin and contrast flags) flags j's positive,
anchor or a negative for i's anchor, or j's positive for i's positive. A FAISS range search over
the guide embeddings proposes the candidates; the rule alone decides. The search is exhaustive
while affordable (EXACT_SEARCH_MADDS); above, IVF serves all rows but the EXHAUSTIVE_SHARE with the
lowest thresholds (whose flagged texts lie far from the query) and may miss a few conflicts.
"""

from __future__ import annotations

import numpy as np

from pipeline.data import TrainingData
from pipeline.guide import ADD_ROWS, IVF_NPROBE, faiss_single_thread, gather, ivf_lists, training_sample
from pipeline.masks import false_negative_mask

RADIUS_SLACK = 1e-3  # FAISS radius below a chunk's lowest bound: FAISS rounding (~1e-5) cannot lose a candidate
MAX_FLAGGED_TEXTS = 256  # per anchor (positive for pp): the most similar flagged texts kept; bounds memory on bad rows
RESULTS_PER_SEARCH = 1 << 22  # range-search results aimed at per FAISS call (the chunk size adapts)
EXACT_SEARCH_MADDS = 5e10  # queries x texts x dim up to which the search is exhaustive (IndexFlatIP), IVF above
EXHAUSTIVE_SHARE = 0.05  # above that: this share of rows (lowest thresholds) exhaustive, the rest IVF
GATHER_VALUES = 1 << 24  # floats gathered at a time when recomputing similarities

def _pair_dots(embeddings: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """float32 g(left[k], right[k]) for text ids, row by row (the same value wherever a pair sits)."""
    out = np.empty(len(left), dtype=np.float32)
    step = max(1, GATHER_VALUES // embeddings.shape[1])
    for start in range(0, len(left), step):
        end = start + step
        out[start:end] = np.einsum("ij,ij->i", gather(embeddings, left[start:end]), gather(embeddings, right[start:end]))
    return out


def _csr(keys: np.ndarray, values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Group `values` by `keys` (ints below `size`): values of key k are indices[indptr[k]:indptr[k + 1]]."""
    indptr = np.zeros(size + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=size), out=indptr[1:])
    return indptr, values[np.argsort(keys, kind="stable")]


def _expand(rows: np.ndarray, keys: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (row, value) with value among key's values in the CSR map, for each (row, key) pair."""
    counts = indptr[keys + 1] - indptr[keys]
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    positions = np.arange(total, dtype=np.int64) + np.repeat(indptr[keys] - ends + counts, counts)
    return np.repeat(rows, counts), indices[positions]


def _add(index, embeddings: np.ndarray, ids: np.ndarray):
    """Add the rows `ids` to `index` a chunk at a time (widened to float32 chunk by chunk); returns it."""
    for start in range(0, len(ids), ADD_ROWS):
        index.add(gather(embeddings, ids[start : start + ADD_ROWS]))
    return index


def _ivf_index(embeddings: np.ndarray, ids: np.ndarray):
    """IVF inner-product index over rows `ids` (approximate: a query scans the IVF_NPROBE lists nearest to it)."""
    import faiss

    dim = embeddings.shape[1]
    nlist = ivf_lists(len(ids))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    index.cp.min_points_per_centroid = 1
    with faiss_single_thread():  # k-means on a seeded sample of 16 vectors per list: training stays cheap
        index.train(gather(embeddings, ids[training_sample(len(ids), 16 * nlist)]))
    index.nprobe = min(nlist, IVF_NPROBE)
    return _add(index, embeddings, ids)


def _flagged_texts(
    embeddings: np.ndarray, query_ids: np.ndarray, thresholds: np.ndarray, candidates: np.ndarray,
    margin_strategy: str, margin: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(row, text) pairs where the mask rule flags candidate text for the row's query text.

    Row r queries text `query_ids[r]` with threshold `thresholds[r]`; `candidates` are the text ids
    searched. FAISS only proposes: every proposal is re-scored with `_pair_dots` and kept iff
    `false_negative_mask` says so. Each row keeps its MAX_FLAGGED_TEXTS most similar flagged texts.
    """
    import faiss

    flat = _add(faiss.IndexFlatIP(embeddings.shape[1]), embeddings, candidates)
    # Exhaustive search costs queries x texts x dim; above EXACT_SEARCH_MADDS only the rows with the
    # lowest thresholds (many flagged texts, far from the query: IVF misses them) are searched
    # exhaustively, the others with IVF.
    ivf, exhaustive_rows = None, len(query_ids)
    if len(query_ids) * len(candidates) * embeddings.shape[1] > EXACT_SEARCH_MADDS:
        ivf, exhaustive_rows = _ivf_index(embeddings, candidates), int(np.ceil(EXHAUSTIVE_SHARE * len(query_ids)))
    # One radius per FAISS call: rows sorted by threshold, each chunk searched just below its lowest
    # bound. The rule's bound is never below t - |m| (t - m, or t - |t| m with |t| <= 1).
    order = np.argsort(thresholds, kind="stable")
    rows_out, texts_out = [], []
    start, size = 0, 64
    while start < len(order):
        chunk = order[start : start + min(size, max(exhaustive_rows - start, 0) or size)]
        radius = float(thresholds[chunk[0]]) - abs(margin) - RADIUS_SLACK
        queries = gather(embeddings, query_ids[chunk])
        lims, _, found = (flat if start < exhaustive_rows else ivf).range_search(queries, radius)
        local = np.repeat(np.arange(len(chunk)), np.diff(lims).astype(np.int64))
        rows, texts = chunk[local], candidates[found]
        sims = _pair_dots(embeddings, query_ids[rows], texts)
        keep = false_negative_mask(sims, thresholds[rows], margin_strategy, margin)
        local, rows, texts, sims = local[keep], rows[keep], texts[keep], sims[keep]
        if len(local) and np.bincount(local).max() > MAX_FLAGGED_TEXTS:
            by_row = np.lexsort((texts, -sims, local))  # most similar first, ties by text id
            local, rows, texts = local[by_row], rows[by_row], texts[by_row]
            rank = np.arange(len(local)) - np.searchsorted(local, local)  # position within its row
            rows, texts = rows[rank < MAX_FLAGGED_TEXTS], texts[rank < MAX_FLAGGED_TEXTS]
        rows_out.append(rows)
        texts_out.append(texts)
        start += len(chunk)
        # rows further on have higher thresholds, so at most this many results per row
        size = int(np.clip(RESULTS_PER_SEARCH / max(len(found) / len(chunk), 1.0), 16, 4096))
    return np.concatenate(rows_out), np.concatenate(texts_out)


def conflict_graph(
    data: TrainingData, embeddings: np.ndarray, margin_strategy: str = "absolute", margin: float = 0.0,
    contrast_anchors: bool = True, contrast_positives: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Which examples must not share a batch: a symmetric CSR (indptr, indices) over example ids.

    j is a neighbour of i (i != j) when a batch holding both gets a mask entry in row i or row j:
    false_negative_mask(g, t_i) with t_i = g(a_i, p_i) flags p_j (ap), a_j (aa, if
    contrast_anchors), a negative of j (an), or, for p_i, p_j (pp, if contrast_positives).
    """
    n = data.num_examples
    examples = np.arange(n, dtype=np.int64)
    thresholds = _pair_dots(embeddings, data.anchor_ids, data.positive_ids)
    # text id -> the examples holding it where an anchor meets it: positive, anchor, negative
    keys = [data.positive_ids] + ([data.anchor_ids] if contrast_anchors else []) + [data.negative_ids.reshape(-1)]
    values = [examples] + ([examples] if contrast_anchors else []) + [np.repeat(examples, data.num_negatives)]
    searches = [(data.anchor_ids, _csr(np.concatenate(keys), np.concatenate(values), len(embeddings)))]
    if contrast_positives:
        searches.append((data.positive_ids, _csr(data.positive_ids, examples, len(embeddings))))
    pairs = []
    for query_ids, (indptr, holders) in searches:
        candidates = np.flatnonzero(np.diff(indptr))
        rows, texts = _flagged_texts(embeddings, query_ids, thresholds, candidates, margin_strategy, margin)
        pairs.append(_expand(rows, texts, indptr, holders))
    left = np.concatenate([p[0] for p in pairs] + [p[1] for p in pairs])
    right = np.concatenate([p[1] for p in pairs] + [p[0] for p in pairs])
    edges = np.unique(left[left != right] * n + right[left != right])
    return _csr(edges // n, edges % n, n)

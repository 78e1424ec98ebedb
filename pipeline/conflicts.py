"""The conflict graph behind `--strategy fn-aware`: which examples must not share a batch.

Example j conflicts with example i when a batch holding both would get a mask entry: the mask rule
(pipeline.masks.false_negative_mask, with the plan's margin and contrast flags) flags j's positive,
anchor or a negative for i's anchor, or j's positive for i's positive. A search over the guide
embeddings proposes candidate texts for each row; the rule alone decides, on similarities
recomputed the same way wherever a pair sits. Each row's own texts (its anchor, positive and
negatives) are always proposed and every flagged text is kept, so a text shared by two examples (a
duplicate positive, an anchor that is another's negative) never escapes the search: the pair
conflicts whenever the rule (or duplicate masking) flags it. Rows are searched ROWS_PER_BLOCK at a
time and each block's edges merged as found, so memory holds one block's proposals beside the graph.

Everything here is in stored-row space (pipeline.views): a "text" below is a stored vector, a text
under the view of the role it plays (anchors as queries, the others as documents); duplicate masking
compares the text ids behind the rows, and a row's own texts include its anchor's and positive's
rows in every view, so a text shared across roles is found as the rule's duplicate whatever its view.

The search is a join of inner products against a per-row bound (each query vector carries
-bound as one more coordinate, so one FAISS range search at radius 0 applies every row's own
bound, in BLAS blocks). While affordable (EXACT_SEARCH_MADDS) it is exhaustive over the full
vectors, so the graph is the rule's exactly (bench/fn_aware_recall.py checks it against a numpy
brute force). Above, it is bounded: the vectors are projected on their SEARCH_DIM leading principal
directions (uncentred, from a seeded sample; any rank) and normalised; spherical k-means cuts the
texts into 2 sqrt(texts) lists; each query is joined with the members of its PROBES nearest lists
at a bound PROJECTION_SLACK lower (work ~ queries x PROBES x sqrt(texts)), and every proposal is
scored exactly. It may miss a conflict, never invent one; bench/fn_aware_recall.py measures how many.
"""

from __future__ import annotations

import numpy as np

from pipeline.data import TrainingData
from pipeline.guide import ADD_ROWS, faiss_single_thread, gather, training_sample
from pipeline.masks import false_negative_mask
from pipeline.views import VectorRows

RADIUS_SLACK = 1e-3  # search bound below the rule's lowest: float32 rounding (~1e-5) cannot lose a candidate
ROWS_PER_BLOCK = 1 << 14  # rows (anchors, or positives for pp) searched at a time: bounds the proposals held
EXACT_SEARCH_MADDS = 5e10  # queries x texts x dim up to which the search is exhaustive, bounded above
SEARCH_DIM = 64  # bounded search: dimensions of the projection the candidates are proposed in
PROJECTION_SLACK = 0.1  # ... at a bound this much lower (projected cosines err ~0.02-0.06 at 768 -> 64 dims)
LISTS_PER_SQRT = 2  # ... in 2 sqrt(texts) k-means lists
PROBES = 16  # ... joining each query with the members of the lists nearest to it
PCA_SAMPLE = 1 << 14  # texts the projection is fitted on
KMEANS_POINTS_PER_LIST = 40  # k-means training sample per list (FAISS warns below 39)
GATHER_VALUES = 1 << 24  # floats gathered at a time when recomputing similarities


def pair_dots(embeddings: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """float32 g(left[k], right[k]) for stored rows (text ids under one view), pair by pair (the same value wherever a pair sits)."""
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


def _leading_directions(sample: np.ndarray, k: int) -> np.ndarray:
    """float32 (dim, k): the k leading eigenvectors of the sample's uncentred second moments (the
    projection that keeps inner products best), by LAPACK's symmetric eigensolver in float64.

    Any rank: vectors in a subspace narrower than k (zero-padded embedder output) get k - rank
    directions of eigenvalue 0, on which they project to 0 (a subspace iteration orthonormalised by
    Cholesky failed there). Deterministic: same sample, same directions. Not faiss.PCAMatrix: it
    centres the vectors (dropping the common direction inner products need) and refuses k above
    its training size."""
    moments = (sample.T @ sample).astype(np.float64)
    return np.linalg.eigh(moments)[1][:, ::-1][:, :k].astype(np.float32)


class SearchSpace:
    """The vectors the search compares and the lists it joins, for the texts `text_ids` (sorted).

    Exhaustive (`exact`): the stored vectors, gathered a list at a time; list k holds the texts at
    positions k * ADD_ROWS onwards, every query joins every list. Bounded: unit vectors of the
    SEARCH_DIM-dim projection (the stored vectors where they have no more dimensions), held; each
    text's nearest k-means lists (its own first), of which a query joins all and a member sits in one.
    """

    def __init__(self, embeddings: np.ndarray, text_ids: np.ndarray, exact: bool, seed: int = 0):
        self.embeddings, self.text_ids, self.exact = embeddings, text_ids, exact
        self.slack, self.lists = 0.0, None
        if exact:
            self.num_lists = max(1, -(-len(text_ids) // ADD_ROWS))
            return
        import faiss

        dim = embeddings.shape[1]
        basis = None
        if dim > SEARCH_DIM:  # leading directions of the uncentred second moments: inner products kept best
            sample = gather(embeddings, text_ids[training_sample(len(text_ids), PCA_SAMPLE, seed)])
            basis = _leading_directions(sample, SEARCH_DIM)
            self.slack = PROJECTION_SLACK
        self.vectors = np.empty((len(text_ids), min(dim, SEARCH_DIM)), dtype=np.float32)
        for start in range(0, len(text_ids), ADD_ROWS):
            rows = gather(embeddings, text_ids[start : start + ADD_ROWS])
            self.vectors[start : start + ADD_ROWS] = rows if basis is None else rows @ basis
        if basis is not None:
            self.vectors /= np.maximum(np.linalg.norm(self.vectors, axis=1, keepdims=True), 1e-12)
        self.num_lists = max(1, min(len(text_ids) // KMEANS_POINTS_PER_LIST, int(LISTS_PER_SQRT * np.sqrt(len(text_ids)))))
        probes = min(self.num_lists, PROBES)
        kmeans = faiss.Kmeans(self.vectors.shape[1], self.num_lists, niter=10, seed=seed, spherical=True)
        with faiss_single_thread():  # k-means sums in a fixed order: the same lists on every run
            kmeans.train(self.vectors[training_sample(len(text_ids), KMEANS_POINTS_PER_LIST * self.num_lists, seed)])
        self.lists = np.empty((len(text_ids), probes), dtype=np.int32)
        for start in range(0, len(text_ids), ADD_ROWS):
            self.lists[start : start + ADD_ROWS] = kmeans.index.search(self.vectors[start : start + ADD_ROWS], probes)[1]

    def _vectors(self, positions: np.ndarray) -> np.ndarray:
        return gather(self.embeddings, self.text_ids[positions]) if self.exact else self.vectors[positions]

    def proposals(self, query_ids: np.ndarray, bounds: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, candidate text) pairs whose compared similarity beats the row's bound less the
        slack, each row against the candidates of the lists it joins. One FAISS range search per
        list at radius 0: members carry a 1 and queries -(bound - slack) as one more coordinate."""
        import faiss

        queries, members = np.searchsorted(self.text_ids, query_ids), np.searchsorted(self.text_ids, candidates)
        member_ptr, member_order = _csr(members // ADD_ROWS if self.exact else self.lists[members, 0], np.arange(len(members)), self.num_lists)
        if not self.exact:
            probes = self.lists[queries]
            row_ptr, row_order = _csr(probes.reshape(-1), np.repeat(np.arange(len(queries)), probes.shape[1]), self.num_lists)
        shifted = (bounds - self.slack).astype(np.float32)[:, None]
        rows_out, texts_out = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for c in range(self.num_lists):
            found = member_order[member_ptr[c] : member_ptr[c + 1]]
            rows = np.arange(len(queries)) if self.exact else row_order[row_ptr[c] : row_ptr[c + 1]]
            if not len(found) or not len(rows):
                continue
            vectors = self._vectors(members[found])
            index = faiss.IndexFlatIP(vectors.shape[1] + 1)
            index.add(np.hstack([vectors, np.ones((len(found), 1), np.float32)]))
            for start in range(0, len(rows), ADD_ROWS):
                block = rows[start : start + ADD_ROWS]
                lims, _, hits = index.range_search(np.hstack([self._vectors(queries[block]), -shifted[block]]), 0.0)
                rows_out.append(block[np.repeat(np.arange(len(block)), np.diff(lims).astype(np.int64))])
                texts_out.append(candidates[found[hits]])
        return np.concatenate(rows_out), np.concatenate(texts_out)


def flagged_texts(
    embeddings: np.ndarray, space: SearchSpace, query_ids: np.ndarray, own_ids: np.ndarray, thresholds: np.ndarray,
    candidates: np.ndarray, margin_strategy: str, margin: float, duplicate_ids: np.ndarray | None = None, stored: VectorRows | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(row, text) pairs where the mask rule flags candidate text for the row's query text.

    Row r queries stored row `query_ids[r]` with threshold `thresholds[r]` against `candidates` (stored rows);
    `own_ids[r]` (the row's own texts) are proposed besides what `space` proposes. Every proposal
    is re-scored with `pair_dots` and kept iff `false_negative_mask` says so, or iff it is one of
    `duplicate_ids[r]` (duplicate masking: the row's anchor and positive texts). Every flagged text
    is returned: memory grows with the rows given (conflict_graph passes ROWS_PER_BLOCK at a time).
    `stored`: the pass's VectorRows, whose text ids duplicate masking compares (None: rows are text ids).
    """
    # The rule's bound is never below t - max(m, 0): t - m (absolute); t - |t| m (relative) is at
    # least t - m for m >= 0 (|t| <= 1) and at least t for m < 0. A negative margin only raises it.
    bounds = thresholds - max(float(margin), 0.0) - RADIUS_SLACK
    rows, texts = space.proposals(query_ids, bounds, candidates)
    own_rows = np.repeat(np.arange(len(query_ids)), own_ids.shape[1])
    own_texts = own_ids.reshape(-1)
    is_candidate = np.isin(own_texts, candidates)
    pairs = np.unique(np.concatenate([rows, own_rows[is_candidate]]) * len(embeddings) + np.concatenate([texts, own_texts[is_candidate]]))
    rows, texts = pairs // len(embeddings), pairs % len(embeddings)
    sims = pair_dots(embeddings, query_ids[rows], texts)
    keep = false_negative_mask(sims, thresholds[rows], margin_strategy, margin)
    if duplicate_ids is not None:
        keep |= (duplicate_ids[rows] == (texts if stored is None else stored.text(texts))[:, None]).any(axis=1)
    return rows[keep], texts[keep]


def searches(data: TrainingData, contrast_anchors: bool = True, contrast_positives: bool = True) -> list[tuple]:
    """(query rows, own rows (rows, k), holders CSR: stored row -> examples) of each search: anchors
    against the rows an anchor meets (positives, anchors if contrast_anchors, negatives), and, if
    contrast_positives, positives against positives. Rows are `data.rows`' (pipeline.views)."""
    n, rows = data.num_examples, data.rows
    examples = np.arange(n, dtype=np.int64)
    keys = [rows.positive] + ([rows.anchor] if contrast_anchors else []) + [rows.negative.reshape(-1)]
    values = [examples] + ([examples] if contrast_anchors else []) + [np.repeat(examples, data.num_negatives)]
    own = [rows.anchor[:, None], rows.positive[:, None], rows.negative]
    if rows.num_views > 1:  # the anchor's and positive's texts in every view: a duplicate in another role is proposed
        own += [rows.all_views_of(data.anchor_ids), rows.all_views_of(data.positive_ids)]
    found = [(rows.anchor, np.hstack(own), _csr(np.concatenate(keys), np.concatenate(values), rows.num_rows))]
    if contrast_positives:
        found.append((rows.positive, rows.positive[:, None], _csr(rows.positive, examples, rows.num_rows)))
    return found


def search_space(embeddings: np.ndarray, data: TrainingData, found: list[tuple], exact: bool | None = None) -> SearchSpace:
    """One SearchSpace over every text the searches query or meet; exhaustive while the largest
    search's queries x texts x dim stays within EXACT_SEARCH_MADDS (unless `exact` says)."""
    texts = np.unique(np.concatenate([np.concatenate([q, np.flatnonzero(np.diff(indptr))]) for q, _, (indptr, _) in found]))
    if exact is None:
        exact = len(data.anchor_ids) * len(texts) * embeddings.shape[1] <= EXACT_SEARCH_MADDS
    return SearchSpace(embeddings, texts, exact)


def conflict_graph(
    data: TrainingData, embeddings: np.ndarray, margin_strategy: str = "absolute", margin: float = 0.0,
    contrast_anchors: bool = True, contrast_positives: bool = True, mask_duplicates: bool = False, space: SearchSpace | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Which examples must not share a batch: a symmetric CSR (indptr, indices) over example ids.

    j is a neighbour of i (i != j) when a batch holding both gets a mask entry in row i or row j:
    false_negative_mask(g, t_i) with t_i = g(a_i, p_i) flags p_j (ap), a_j (aa, if
    contrast_anchors), a negative of j (an), or, for p_i, p_j (pp, if contrast_positives); with
    `mask_duplicates`, also when a text of j is a_i's or p_i's own text (pipeline.masks.duplicate_masks).
    `space`: the search_space of these searches, if already built (bench.fn_aware_recall).
    Rows are searched ROWS_PER_BLOCK at a time and the edges deduplicated as found (whenever the
    unmerged outgrow the merged): the peak is then set by the graph's size, not by a block's
    proposals (+1.1 GB RSS for the 14.3M directed edges of the 10156-triplet set, with 512 to
    16384 rows per block alike; bench/results/fn_aware_recall.json).
    """
    n = data.num_examples
    thresholds = pair_dots(embeddings, data.rows.anchor, data.rows.positive)
    found = searches(data, contrast_anchors, contrast_positives)
    space = space or search_space(embeddings, data, found)
    duplicate_ids = np.column_stack([data.anchor_ids, data.positive_ids]) if mask_duplicates else None  # one row per example
    merged, pending = np.empty(0, np.int64), []
    for query_ids, own_ids, (indptr, holders) in found:
        candidates = np.flatnonzero(np.diff(indptr))
        for start in range(0, n, ROWS_PER_BLOCK):
            block = slice(start, start + ROWS_PER_BLOCK)
            rows, texts = flagged_texts(embeddings, space, query_ids[block], own_ids[block], thresholds[block], candidates,
                                        margin_strategy, margin, None if duplicate_ids is None else duplicate_ids[block], data.rows)
            left, right = _expand(rows + start, texts, indptr, holders)
            left, right = left[left != right], right[left != right]
            pending.append(np.unique(np.concatenate([left * n + right, right * n + left])))
            if sum(map(len, pending)) > len(merged):
                merged, pending = np.unique(np.concatenate([merged, *pending])), []
    edges = np.unique(np.concatenate([merged, *pending]))  # sorted by (i, j): already CSR order
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(edges // n, minlength=n), out=indptr[1:])
    edges %= n
    return indptr, edges

"""Any embedder's vectors as the guide pass (`gist precompute-guide DATA --embeddings VECTORS`).

The strongest guides are often served outside sentence-transformers (API models, LLM embedders
behind an inference server). Their vectors, computed once by whatever serves them, make the same
guide pass a model would: nothing is loaded, nothing is encoded. VECTORS is one of

- Parquet with a `text` column (strings, dictionary-encoded or string_view too) and one vector
  column (list or fixed-size list of floats): looked up by text, so it may hold more texts than
  DATA, in any order; each text once. An optional `role` column (`query` / `document`) gives a
  served embedder's two views of a text (pipeline.views): anchors are then looked up among the
  `query` rows, positives and negatives among the `document` rows; each (text, role) once.
- NumPy `.npy`, a 2-d float array with one row per unique text of DATA in gist's text-id order:
  DATA's distinct texts in order of first appearance, reading the anchor column top to bottom,
  then the positive column, then negative_1, negative_2, ... (after `--columns`). That is the
  order of `pipeline.data.load_training_data(DATA).texts`, and of `texts.parquet` in any guide
  pass of DATA.

`ExternalVectors` checks everything before anything is written (`check`: coverage, one dimension,
finite, non-zero), then `write` stores them as a model pass stores its vectors: unit norm (the
mask rule compares dot products as cosines), `embeddings.npy` and `embeddings.parquet`. Rows
already of unit norm within float32 rounding (`UNIT_TOLERANCE`) are stored as given, so vectors a
gist pass wrote reproduce that pass bit for bit; others are divided by their norm (in float64, after
scaling each row by its largest |value|, so that rows of any finite magnitude normalise alike).
The file's name and sha256 are the guide's identity in the manifest and the masks' metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import GistError
from pipeline.artifacts import atomic_path, sha256_file
from pipeline.data import TrainingData, decoded
from pipeline.guide import EMBEDDINGS, VECTORS, embeddings_schema, embeddings_table
from pipeline.views import SINGLE_VIEW, role_views

FORMATS = {".parquet": "parquet", ".npy": "npy"}
BLOCK_ROWS = 1 << 16  # vectors read, checked and normalised at a time
UNIT_TOLERANCE = 1e-5  # |norm - 1| below this: already unit (float32 rounding of a normalised vector); stored as given
SHOWN = 3  # texts named in an error
ROLE_COLUMN = "role"  # optional: which view of its text a row is
ROLE_VIEWS = ("query", "document")


def _quote(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def _named(texts: list[str]) -> str:
    return ", ".join(_quote(t) for t in texts[:SHOWN]) + (", ..." if len(texts) > SHOWN else "")


class ExternalVectors:
    """VECTORS opened against DATA's texts: which row of the file holds each stored vector (a text, or
    with a role column a text in a view), its dimension. Opening sets `training`'s rows for its views.

    Opening reads the file's metadata and, for Parquet, its text (and role) column (the lookup); the
    vectors themselves are read in blocks by `check` and `write`, so a file larger than memory works.
    """

    def __init__(self, path: str | Path, training: TrainingData):
        self.path = Path(path)
        self.texts = training.texts
        self.num_texts = len(training.texts)
        self.views = training.views = SINGLE_VIEW  # one vector per text; a role column replaces it
        self.stored = training.rows
        self.format = FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise GistError(f"--embeddings {self.path}: use a .parquet (text + vector columns) or .npy (rows in text-id order) file")
        if not self.path.is_file():
            raise GistError(f"--embeddings {self.path}: no such file")
        if self.format == "npy":
            self._open_npy()
        else:
            self._open_parquet(training)

    def _open_npy(self) -> None:
        try:
            self.array = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise GistError(f"--embeddings {self.path}: cannot read it as .npy ({str(e).splitlines()[0]})") from None
        if self.array.ndim != 2 or not np.issubdtype(self.array.dtype, np.floating):
            raise GistError(f"--embeddings {self.path}: a (texts, dim) float array is needed, it holds {self.array.dtype} {self.array.shape}")
        if len(self.array) != self.num_texts:
            raise GistError(
                f"--embeddings {self.path}: {len(self.array)} rows but DATA has {self.num_texts} unique texts; a .npy holds one row "
                "per text in text-id order (see `gist precompute-guide --help`), or use Parquet with a text column"
            )
        self.dim, self.dtype, self.column = self.array.shape[1], self.array.dtype.name, None

    def _open_parquet(self, training: TrainingData) -> None:
        try:
            self.file = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            raise GistError(f"--embeddings {self.path}: cannot read it as Parquet ({str(e).splitlines()[0]})") from None
        schema = self.file.schema_arrow
        needs_text = f"--embeddings {self.path}: needs a string column 'text' beside the vectors (columns: {', '.join(schema.names)})"
        if "text" not in schema.names:
            raise GistError(needs_text)
        vector_columns = [f.name for f in schema if f.name not in ("text", ROLE_COLUMN) and (pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type))]
        if len(vector_columns) != 1:
            found = f"several ({', '.join(vector_columns)}): keep one" if vector_columns else f"none among {', '.join(schema.names)}"
            raise GistError(f"--embeddings {self.path}: needs one vector column (a list of floats) beside 'text', found {found}")
        self.column = vector_columns[0]
        value_type = schema.field(self.column).type.value_type
        if not pa.types.is_floating(value_type):
            raise GistError(f"--embeddings {self.path}: column {self.column!r} holds lists of {value_type}, not of floats")
        self.dtype = value_type.to_pandas_dtype().__name__
        try:
            texts = decoded(self.file.read(columns=["text"]).column("text"))
        except (pa.ArrowException, OSError) as e:
            raise GistError(f"--embeddings {self.path}: cannot read its text column ({str(e).splitlines()[0]})") from None
        if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
            raise GistError(needs_text)
        texts = texts.cast(pa.large_string())
        if texts.null_count:
            raise GistError(f"--embeddings {self.path}: {texts.null_count} null text(s)")
        ids = pc.index_in(texts, value_set=training.texts).fill_null(-1).to_numpy().astype(np.int64)  # text id of each file row
        view = np.zeros(len(ids), dtype=np.int64)
        if ROLE_COLUMN in schema.names:
            self.views = training.views = role_views()
            self.stored = training.rows
            view = self._role_views(ids)
        used = ids >= 0
        stored = np.full(len(ids), -1, dtype=np.int64)  # stored row of each file row, -1: DATA does not need it
        stored[used] = self.stored.rows_of(ids[used], view[used])
        counts = np.bincount(stored[stored >= 0], minlength=self.stored.num_rows)
        missing, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
        what = "(text, role)" if ROLE_COLUMN in schema.names else "text"
        if len(missing):
            raise GistError(f"--embeddings {self.path}: no vector for {len(missing)} of DATA's {self.stored.num_rows} {what}s, e.g. "
                            f"{self._named(missing)} (texts must match exactly)")
        if len(repeated):
            raise GistError(f"--embeddings {self.path}: {len(repeated)} {what}(s) appear more than once, e.g. {self._named(repeated)}; keep one vector per {what}")
        self.file_rows = stored
        first = next(self.file.iter_batches(batch_size=BLOCK_ROWS, columns=[self.column])).column(0)
        dims = self._parquet_dims(first)[first.is_valid().to_numpy(zero_copy_only=False)]
        self.dim = int(dims[0]) if len(dims) else 0  # of the first vector; every other must have it

    def _role_views(self, ids: np.ndarray) -> np.ndarray:
        """The view of each file row from its role (query: the anchors' view, document: the others'),
        with Arrow kernels (no Python object per row)."""
        roles = decoded(self.file.read(columns=[ROLE_COLUMN]).column(ROLE_COLUMN))
        if not (pa.types.is_string(roles.type) or pa.types.is_large_string(roles.type)):
            raise GistError(f"--embeddings {self.path}: column {ROLE_COLUMN!r} must hold strings (query or document), not {roles.type}")
        known = pc.is_in(roles, value_set=pa.array(ROLE_VIEWS, roles.type)).fill_null(False).to_numpy(zero_copy_only=False)
        if not known.all():
            bad = pc.unique(roles.filter(pa.array(~known))).to_pylist()[:SHOWN]
            raise GistError(f"--embeddings {self.path}: column {ROLE_COLUMN!r} holds {', '.join(map(repr, bad))}; use query or document")
        is_query = pc.equal(roles, "query").to_numpy(zero_copy_only=False)
        return np.where(is_query, self.views.roles["anchor"], self.views.roles["positive"]).astype(np.int64)

    def _named(self, rows: np.ndarray) -> str:
        """Up to SHOWN stored rows named by their text (and, with a role column, their role)."""
        if self.views.view_of("anchor").task is None:
            return _named(self._texts(rows[:SHOWN + 1]))
        shown = [f"{_quote(text)} as {'query' if view == self.views.roles['anchor'] else 'document'}"
                 for view, text in zip(self.stored.view(rows[:SHOWN]), self._texts(rows[:SHOWN]))]
        return ", ".join(shown) + (", ..." if len(rows) > SHOWN else "")

    @staticmethod
    def _parquet_dims(vectors: pa.Array) -> np.ndarray:
        if pa.types.is_fixed_size_list(vectors.type):
            return np.full(len(vectors), vectors.type.list_size)
        return pc.list_value_length(vectors).fill_null(0).to_numpy()

    def _raw_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(stored rows, their vectors as read) block by block; Parquet rows DATA does not need are skipped."""
        if self.format == "npy":
            for start in range(0, self.num_texts, BLOCK_ROWS):
                yield np.arange(start, min(start + BLOCK_ROWS, self.num_texts)), np.asarray(self.array[start : start + BLOCK_ROWS])
            return
        start = 0
        for batch in self.file.iter_batches(batch_size=BLOCK_ROWS, columns=[self.column]):
            vectors, ids = batch.column(0), self.file_rows[start : start + batch.num_rows]
            start += batch.num_rows
            dims = self._parquet_dims(vectors)
            bad = np.flatnonzero((dims != self.dim) | ~vectors.is_valid().to_numpy(zero_copy_only=False))
            if len(bad):
                row = int(bad[0])
                what = "no vector" if not vectors[row].is_valid else f"a {dims[row]}-dim vector"
                raise GistError(f"--embeddings {self.path}: row {start - batch.num_rows + row} has {what}, the first vector {self.dim} dims; every vector needs the same dimension")
            values = vectors.flatten()
            if values.null_count:
                raise GistError(f"--embeddings {self.path}: null values inside the vectors of column {self.column!r}")
            keep = ids >= 0
            yield ids[keep], values.to_numpy(zero_copy_only=False).reshape(-1, self.dim)[keep]

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """(stored rows, unit float32 vectors, how many were renormalised), checked block by block."""
        if self.dim == 0:
            raise GistError(f"--embeddings {self.path}: the vectors are empty (dimension 0)")
        for ids, raw in self._raw_blocks():
            wide = raw.astype(np.float64)
            finite = np.isfinite(wide).all(axis=1)
            largest = np.abs(wide).max(axis=1)
            for bad, what in ((~finite, "NaN or inf values"), (finite & ~(largest > 0), "a zero vector")):
                if bad.any():
                    texts = self._texts(ids[np.flatnonzero(bad)[:SHOWN + 1]])
                    raise GistError(f"--embeddings {self.path}: {int(bad.sum())} vector(s) with {what}, e.g. for {_named(texts)}; cosine similarity needs finite non-zero vectors")
            # Each row divided by its largest |value| first: the squares of values in [-1, 1] with one of
            # them 1 neither overflow (rows of ~1e200) nor underflow to a zero norm (rows of ~1e-200).
            scaled = wide / largest[:, None]
            scaled_norms = np.linalg.norm(scaled, axis=1)
            off = np.abs(largest * scaled_norms - 1) > UNIT_TOLERANCE
            vectors = np.empty(raw.shape, dtype=np.float32)
            vectors[~off] = raw[~off]
            vectors[off] = scaled[off] / scaled_norms[off, None]
            yield ids, vectors, int(off.sum())

    def _texts(self, rows: np.ndarray) -> list[str]:
        """The texts of stored rows."""
        return [self.texts[int(t)].as_py() for t in self.stored.text(rows)]

    def check(self) -> None:
        """Every check, reading the whole file, writing nothing: a bad file fails here, before --out is touched."""
        for _ in self.blocks():
            pass

    def write(self, out_dir: Path, embedding_dtype: str, rows_per_group: int) -> dict:
        """Store the unit vectors by stored row as `embeddings.npy` and `embeddings.parquet` (as a model pass
        does); returns the encoding counts for the manifest."""
        renormalized = 0
        num_rows = self.stored.num_rows
        with atomic_path(out_dir / VECTORS) as raw:
            array = np.lib.format.open_memmap(raw, mode="w+", dtype=embedding_dtype, shape=(num_rows, self.dim))
            for ids, vectors, off in self.blocks():
                array[ids] = vectors.astype(embedding_dtype)
                renormalized += off
            array.flush()
            del array
        stored = np.load(out_dir / VECTORS, mmap_mode="r")
        schema = embeddings_schema(self.dim, embedding_dtype)
        with atomic_path(out_dir / EMBEDDINGS) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, num_rows, rows_per_group):
                writer.write_table(embeddings_table(self.stored, start, np.asarray(stored[start : start + rows_per_group]), schema))
        return {"dim": self.dim, "encoded_texts": 0, "reused_texts": 0, "resumed_texts": 0, "vector_texts": num_rows,
                "renormalized_texts": renormalized, "encode_seconds": 0.0}

    def identity(self) -> dict:
        """The guide's identity for the manifest and the masks' metadata: the file's name, path and sha256
        (and ENCODING_KEYS: the file's float type, no sequence length)."""
        return {"source": "embeddings", "path": str(self.path.resolve()), "name": self.path.name, "sha256": sha256_file(self.path),
                "format": self.format, "column": self.column, "dtype": self.dtype, "max_seq_length": None}

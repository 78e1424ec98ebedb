"""Load (anchor, positive[, negatives][, task]) training data, validate it, dedupe texts, fingerprint it.

Reads Parquet, JSONL, CSV, a directory written by `datasets.save_to_disk`, or a dataset loaded with
`datasets.load_dataset` (a Hub id, or a local dataset repository folder) into a pyarrow table,
maps user column names onto the canonical ones, checks every text, and assigns each unique text
an id (order of first appearance, column by column). The fingerprint is a sha256 over the used
columns in canonical order; stage 2 compares it with the one stored in the masks.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq

from pipeline import GistError
from pipeline.pairs import name_value_pairs

NEGATIVE_COLUMN = re.compile(r"^negative(_\d+)?$")
MAX_REPORTED_ROWS = 5


NO_TASK = "(none)"  # the task label of an example with a null task, or of data without tasks

@dataclass
class TrainingData:
    """Deduplicated training examples: every text once, examples as text ids.

    The texts stay one Arrow array and the tasks an array of references to a few strings, never a
    Python object per row: at 10M examples that is what keeps loading fast and memory flat.

    Attributes:
        texts: unique texts, a pyarrow large_string array; the index is the text id.
        anchor_ids, positive_ids: (N,) int64 text ids, one per example (example id = row of DATA).
        negative_ids: (N, k) int64 text ids, k negative columns (k may be 0).
        tasks: (N,) object array of task names (one str object per distinct task), or None when
            the data has no task column.
        fingerprint: sha256 over the used columns, in canonical order.
        columns: canonical column name -> source column name.
        views: the guide pass's views of the texts (pipeline.views.GuideViews); None: one view,
            a vector per text. `rows` derives where each role's texts sit among the stored vectors.
    """

    texts: pa.LargeStringArray
    anchor_ids: np.ndarray
    positive_ids: np.ndarray
    negative_ids: np.ndarray
    tasks: np.ndarray | None
    fingerprint: str
    columns: dict[str, str]
    views: object = None
    _rows: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def rows(self):
        """The guide pass's rows of each role's texts (pipeline.views.VectorRows): what every
        consumer of the stored vectors gathers by, while duplicates compare text ids. Derived once
        for these id arrays and views (a copy with other ids derives its own)."""
        from pipeline.views import SINGLE_VIEW, vector_rows

        basis = (self.anchor_ids, self.positive_ids, self.negative_ids, self.views)
        if self._rows is None or any(a is not b for a, b in zip(self._rows[0], basis)):
            self._rows = (basis, vector_rows(self, self.views or SINGLE_VIEW))
        return self._rows[1]

    @property
    def num_examples(self) -> int:
        return len(self.anchor_ids)

    @property
    def num_negatives(self) -> int:
        return self.negative_ids.shape[1]

    def task_labels(self) -> np.ndarray:
        """Each example's task name, a null task (or no task column) as NO_TASK: how reports and
        summaries group examples."""
        if self.tasks is None:
            return np.full(self.num_examples, NO_TASK, dtype=object)
        return np.where(np.equal(self.tasks, None), NO_TASK, self.tasks)

    def text(self, text_id) -> str:
        """One text by its id."""
        return self.texts[int(text_id)].as_py()

    def text_columns(self) -> dict[str, pa.Array]:
        """The example texts by canonical column (anchor, positive, negative_1..k), in DATA order (Arrow arrays)."""
        columns = {"anchor": self.texts.take(self.anchor_ids), "positive": self.texts.take(self.positive_ids)}
        for c in range(self.num_negatives):
            columns[f"negative_{c + 1}"] = self.texts.take(self.negative_ids[:, c])
        return columns


def parse_column_mapping(spec: str | None) -> dict[str, str]:
    """Parse `anchor=query,positive=doc` into {"anchor": "query", "positive": "doc"}."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        canonical, sep, source = item.partition("=")
        if not sep or not canonical.strip() or not source.strip():
            raise GistError(f"--columns: expected canonical=source pairs like anchor=query, got {item!r}")
        canonical = canonical.strip()
        if canonical not in ("anchor", "positive", "task") and not NEGATIVE_COLUMN.match(canonical):
            raise GistError(f"--columns: unknown column {canonical!r}; use anchor, positive, negative[_k] or task")
        mapping[canonical] = source.strip()
    return mapping


DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".gz")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class HubSource:
    """A dataset `datasets.load_dataset` loads: a Hub id (offline with HF_DATASETS_OFFLINE=1, from the
    cache) or a local dataset repository folder (data files and a README.md card with `configs:`)."""

    id: str
    subset: str | None = None
    split: str = "train"
    revision: str | None = None

    def table(self) -> pa.Table:
        import datasets

        try:
            loaded = datasets.load_dataset(self.id, self.subset, split=self.split, revision=self.revision)
        except Exception as e:  # noqa: BLE001 - not found, offline, no such split or subset: one line
            detail = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
            raise GistError(f"{self.id}: cannot load with datasets.load_dataset (subset {self.subset}, split {self.split}, "
                            f"revision {self.revision}): {type(e).__name__}: {detail}") from None
        if not isinstance(loaded, datasets.Dataset):
            raise GistError(f"{self.id}: datasets.load_dataset gave a {type(loaded).__name__}; name one split with --split")
        return loaded.with_format("arrow")[:]

    def record(self) -> dict:
        local = Path(self.id).exists()
        return {"path": str(Path(self.id).resolve()) if local else self.id, "hub_id": None if local else self.id,
                "subset": self.subset, "split": self.split, "revision": self.revision}


@dataclass(frozen=True)
class Mixture:
    """Several datasets trained together, as sentence-transformers trains a dict of datasets: their rows
    one after the other in the given order, each dataset a task when it has no task column."""

    sources: tuple[tuple[str, object], ...]  # (name, path | HubSource | datasets.Dataset)
    path: Path | None = None  # the DatasetDict directory it was loaded from

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sources)

    def tables(self, mapping: dict[str, str]) -> tuple[pa.Table, dict[str, str]]:
        """The datasets' canonical columns concatenated (tasks: the task column, else the dataset's name), and the mapping used."""
        parts, first = [], None
        for name, source in self.sources:
            table = read_table(source)
            try:
                columns = _select_columns(table, mapping)
            except GistError as e:
                raise GistError(f"dataset {name!r}: {e}") from None
            texts = [c for c in columns if c != "task"]
            if first is None:
                first = (texts, columns)
            elif texts != first[0]:
                raise GistError(f"dataset {name!r} has columns {texts}, dataset {self.sources[0][0]!r} {first[0]}: every dataset needs the same columns "
                                "(the same number of negatives)")
            arrays = {}
            for c in texts:
                arrays[c] = decoded(table.column(columns[c]))
                check_texts(f"{name}: {columns[c]}", arrays[c])  # before any cast: a column of numbers is refused, not converted
                arrays[c] = arrays[c].cast(pa.large_string())
            if "task" in columns:
                arrays["task"] = decoded(table.column(columns["task"])).cast(pa.string())
            else:
                arrays["task"] = pa.chunked_array([pa.array([name] * table.num_rows, pa.string())])
            parts.append(pa.table(arrays))
        return pa.concat_tables(parts), {**first[1], "task": first[1].get("task", "task")}

    def record(self) -> dict:
        return {"path": str(self.path.resolve()) if self.path else None, "datasets": {name: source_record(source) for name, source in self.sources}}


def source_record(source) -> dict:
    """What the manifest says about where DATA came from: its path, or its Hub id, subset, split and
    revision, or each dataset of a mixture."""
    if isinstance(source, (HubSource, Mixture)):
        return source.record()
    if isinstance(source, (str, Path)):
        return {"path": str(Path(source).resolve())}
    return {"path": None}  # an in-memory datasets.Dataset


def local_inputs(source) -> dict:
    """The local files and directories a source reads, named for pipeline.outputs (OUT must not overlap them)."""
    if isinstance(source, Mixture):
        return {**({"DATA": source.path} if source.path else {}), **{f"DATA {name}": path for name, inner in source.sources for path in local_inputs(inner).values()}}
    if isinstance(source, HubSource):
        return {"DATA": Path(source.id)} if Path(source.id).exists() else {}
    return {"DATA": source} if isinstance(source, (str, Path)) else {}


def data_source(data, subset: str | None = None, split: str | None = None, revision: str | None = None):
    """What DATA names: a local file or save_to_disk directory (returned as a Path), a DatasetDict
    directory (a Mixture of its splits), a local dataset repository folder or a Hub id (a HubSource,
    loaded with `subset`, `split` (default train) and `revision`), or several datasets as
    `name=source,name=source` (a Mixture; each source any of the above). A `datasets.Dataset` is
    returned as it is, a `datasets.DatasetDict` as a Mixture."""
    hub = {"subset": subset, "split": split, "revision": revision}
    if isinstance(data, (HubSource, Mixture)):
        return data
    if not isinstance(data, (str, Path)):
        import datasets

        if isinstance(data, datasets.DatasetDict):
            return Mixture(tuple(data.items()))
        return data
    text = str(data)
    path = Path(data)
    if path.exists():
        if path.is_dir() and (path / "dataset_dict.json").exists():
            import datasets

            loaded = datasets.load_from_disk(str(path))
            _no_hub_options(hub, text)
            return Mixture(tuple(loaded.items()), path)
        if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            return HubSource(str(path), subset, split or "train", revision)  # a dataset repository folder: load_dataset's own path
        _no_hub_options(hub, text)
        return path
    pairs = name_value_pairs(text)
    if pairs and all(source.strip() for _, source in pairs):
        sources = []
        for name, source in pairs:
            source = source.strip()
            if name in dict(sources):
                raise GistError(f"DATA: dataset name {name!r} given twice")
            resolved = data_source(source, subset, split, revision)
            if isinstance(resolved, Mixture):
                raise GistError(f"DATA: dataset {name!r} is itself several datasets; name each split")
            sources.append((name, resolved))
        return Mixture(tuple(sources))
    if HUB_ID.match(text) and not text.endswith(DATA_SUFFIXES):
        return HubSource(text, subset, split or "train", revision)
    raise GistError(f"{path}: no such file or directory")


def _no_hub_options(hub: dict, data: str) -> None:
    given = [f"--{k}" for k, v in hub.items() if v is not None]
    if given:
        raise GistError(f"{', '.join(given)}: options of a Hub dataset or dataset repository; {data} is a local file")


def read_table(path) -> pa.Table:
    """Read a Parquet/JSONL/CSV file, a `datasets.save_to_disk` directory, a HubSource or an in-memory
    `datasets.Dataset` (its rows as selected, shuffled or filtered) into a pyarrow table."""
    if isinstance(path, HubSource):
        return path.table()
    if not isinstance(path, (str, Path)):
        import datasets

        if isinstance(path, datasets.Dataset):
            return path.with_format("arrow")[:]
        raise GistError(f"DATA must be a path or a datasets.Dataset, not {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise GistError(f"{path}: no such file or directory")
    try:
        if path.is_dir():
            import datasets

            if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
                raise GistError(f"{path}: a directory, but not one written by datasets.save_to_disk")
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                raise GistError(f"{path}: a DatasetDict with splits {list(loaded)}; point at one split's directory")
            return loaded.data.table
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix in (".jsonl", ".json", ".jsonl.gz", ".json.gz"):
            return pyarrow.json.read_json(path)
        if suffix in (".csv", ".csv.gz"):
            return _read_csv(path)
    except GistError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        raise GistError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    raise GistError(f"{path}: unknown format {path.suffix!r}; use .parquet, .jsonl, .csv or a save_to_disk directory")


def _read_csv(path: Path) -> pa.Table:
    """Every column as strings (CSV holds no types: a text of digits stays that text, never an int),
    newlines inside quoted values parsed (pyarrow.csv.write_csv writes them so), an empty cell null
    (write_csv writes a null so; an empty text is refused either way)."""
    parse = pyarrow.csv.ParseOptions(newlines_in_values=True)
    names = pyarrow.csv.open_csv(path, parse_options=parse).schema.names
    convert = pyarrow.csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True, null_values=[""])
    return pyarrow.csv.read_csv(path, parse_options=parse, convert_options=convert)


def write_table(table: pa.Table, path: Path, into: Path | None = None) -> None:
    """Write `table` in the format `path` names, as read_table reads it back: .parquet, .jsonl, .csv
    (optionally .gz), or else a `datasets.save_to_disk` directory. Written to `into` when given (a
    temporary name the caller renames), else to a temporary name renamed to `path` when complete."""
    from pipeline.artifacts import atomic_path

    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    with contextlib.nullcontext(Path(into)) if into is not None else atomic_path(path) as tmp:
        if suffix == ".parquet":
            pq.write_table(table, tmp)
        elif suffix in (".jsonl", ".json", ".jsonl.gz", ".json.gz"):
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in table.to_pylist())
            opener = gzip.open if suffix.endswith(".gz") else open
            with opener(tmp, "wt", encoding="utf-8") as f:
                f.write(lines)
        elif suffix in (".csv", ".csv.gz"):
            with pa.CompressedOutputStream(str(tmp), "gzip") if suffix.endswith(".gz") else pa.OSFile(str(tmp), "wb") as f:
                pyarrow.csv.write_csv(table, f)
        elif suffix == "":
            import datasets

            datasets.Dataset(table).save_to_disk(str(tmp))
        else:
            raise GistError(f"{path}: cannot write {suffix!r}; use .parquet, .jsonl, .csv or a directory name (save_to_disk)")


def _select_columns(table: pa.Table, mapping: dict[str, str]) -> dict[str, str]:
    """Resolve canonical -> source names: explicit mapping first, then same-named columns."""
    for canonical, source in mapping.items():
        if source not in table.column_names:
            raise GistError(f"--columns maps {canonical} to {source!r}, which is not a column (columns: {table.column_names})")
    columns = dict(mapping)
    for name in table.column_names:
        if (name in ("anchor", "positive", "task") or NEGATIVE_COLUMN.match(name)) and name not in columns:
            if name not in columns.values():
                columns[name] = name
    for required in ("anchor", "positive"):
        if required not in columns:
            raise GistError(
                f"missing column {required!r} (columns: {table.column_names}); rename it or map it with --columns {required}=NAME"
            )
    negatives = sorted((c for c in columns if NEGATIVE_COLUMN.match(c)), key=lambda c: int(c.split("_")[1]) if "_" in c else 0)
    if "negative" in negatives and len(negatives) > 1:
        raise GistError("use either one 'negative' column or 'negative_1..negative_k', not both")
    ordered = {"anchor": columns["anchor"], "positive": columns["positive"]}
    ordered.update({c: columns[c] for c in negatives})
    if "task" in columns:
        ordered["task"] = columns["task"]
    return ordered


def decoded(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as the plain type its values have, for the string checks and text lookups of DATA, corpus
    and VECTORS files: dictionary-encoded (a pandas `category` written to Parquet) as its values,
    string_view as large_string; any other as it is."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column.cast(pa.large_string()) if pa.types.is_string_view(column.type) else column


def check_texts(name: str, array: pa.ChunkedArray) -> None:
    """Refuse non-string, null, empty or whitespace-only texts, naming the first offending rows."""
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            raise GistError(
                f"column {name!r} holds lists; give each negative its own column (negative_1..negative_k) "
                "so every row has the same number of negatives"
            )
        raise GistError(f"column {name!r} has type {array.type}, expected strings")
    bad = pc.or_(pc.is_null(array), pc.equal(pc.utf8_trim_whitespace(array), "")).fill_null(True)
    if pc.any(bad).as_py():
        rows = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
        shown = ", ".join(str(r) for r in rows[:MAX_REPORTED_ROWS])
        more = f" and {len(rows) - MAX_REPORTED_ROWS} more" if len(rows) > MAX_REPORTED_ROWS else ""
        raise GistError(f"column {name!r} has null or empty text in {len(rows)} row(s): {shown}{more} (0-based)")


def fingerprint_columns(arrays: dict[str, pa.ChunkedArray]) -> str:
    """sha256 over the canonical column names and their values, column by column, in order.

    Only the content counts, never how it is chunked: the same rows read from one Parquet row
    group, many, or JSONL give one fingerprint. Each column feeds three streams (validity, value
    lengths, value bytes) chunk by chunk; the column's digest combines the three.
    """
    digest = hashlib.sha256()
    for name, array in arrays.items():
        streams = {"validity": hashlib.sha256(), "lengths": hashlib.sha256(), "data": hashlib.sha256()}
        for chunk in array.cast(pa.large_string()).chunks:
            streams["validity"].update(chunk.is_null().to_numpy(zero_copy_only=False).astype(np.uint8).tobytes())
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
            streams["lengths"].update(np.diff(offsets).tobytes())
            data = chunk.buffers()[2]
            if data is not None:
                streams["data"].update(memoryview(data)[offsets[0] : offsets[-1]])
        digest.update(f"{name}\0{len(array)}\0".encode())
        for stream in streams.values():
            digest.update(stream.digest())
    return digest.hexdigest()


def _dictionary_codes(column: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """(distinct values in order of first appearance, each row's code; nulls: len(values)), in one hash
    pass: dictionary encoding a chunked array gives every chunk the same, final dictionary."""
    encoded = pc.dictionary_encode(column)
    values = encoded.chunks[-1].dictionary if encoded.num_chunks else pa.array([], column.type)
    codes = [chunk.indices.fill_null(len(values)).to_numpy() for chunk in encoded.chunks]
    return values, np.concatenate(codes).astype(np.int64) if codes else np.zeros(0, dtype=np.int64)


def _tasks(column: pa.ChunkedArray | None) -> np.ndarray | None:
    """Task names per example as an object array sharing one str per task (nulls: None); None without
    a task column or when it is all null (no task is known), in stage 1 as in every command that
    reads the stored examples back."""
    if column is None or column.null_count == len(column):
        return None
    names, codes = _dictionary_codes(column.cast(pa.string()))
    return np.asarray(names.to_pylist() + [None], dtype=object)[codes]


def load_training_data(path, column_spec: str | None = None) -> TrainingData:
    """Load and validate DATA (a path, a datasets.Dataset, a HubSource or a Mixture: see data_source);
    dedupe texts across all text columns; compute the fingerprint. A Mixture is its datasets' rows
    in order with a task column (each dataset's name where it has none): the fingerprint and ids of the
    single file holding those rows."""
    if isinstance(path, Mixture):
        table, mapping = path.tables(parse_column_mapping(column_spec))
        columns = _select_columns(table, {})
        training = load_training_data_from(table, columns)
        training.columns = mapping
        return training
    if not isinstance(path, HubSource):
        resolved = data_source(path)
        if isinstance(resolved, (HubSource, Mixture)):
            return load_training_data(resolved, column_spec)
    table = read_table(path)
    return load_training_data_from(table, _select_columns(table, parse_column_mapping(column_spec)))


def load_training_data_from(table: pa.Table, columns: dict[str, str]) -> TrainingData:
    """TrainingData from a table and its resolved canonical -> source columns."""
    arrays = {canonical: decoded(table.column(source)) for canonical, source in columns.items()}
    text_names = [c for c in arrays if c != "task"]
    for canonical in text_names:
        check_texts(columns[canonical], arrays[canonical])
    if "task" in arrays:
        arrays["task"] = arrays["task"].cast(pa.string())

    # Unique texts in order of first appearance, column by column, and each row's text id.
    unique, ids = _dictionary_codes(pa.chunked_array([chunk for c in text_names for chunk in arrays[c].cast(pa.large_string()).chunks], pa.large_string()))
    ids = ids.reshape(len(text_names), -1)
    return TrainingData(
        texts=unique,
        anchor_ids=ids[0],
        positive_ids=ids[1],
        negative_ids=np.ascontiguousarray(ids[2:].T),
        tasks=_tasks(arrays.get("task")),
        fingerprint=fingerprint_columns(arrays),
        columns=columns,
    )


def read_corpus(path: Path, column: str = "text") -> list[str]:
    """The unique texts of a corpus file's `column`, in order of first appearance, validated like DATA's."""
    table = read_table(path)
    if column not in table.column_names:
        raise GistError(f"{path}: missing column {column!r} (columns: {table.column_names}); name it with --corpus-column")
    texts = decoded(table.column(column))
    check_texts(column, texts)
    return pc.unique(texts.cast(pa.large_string())).to_pylist()


TEXTS = "texts.parquet"
EXAMPLES = "examples.parquet"


def write_data_tables(out_dir: Path, data: TrainingData) -> None:
    """Write `texts.parquet` (text_id, text) and `examples.parquet` (example_id, ids of its texts, task)."""
    from pipeline.artifacts import atomic_path

    n, k = data.negative_ids.shape
    texts = pa.table({"text_id": pa.array(np.arange(len(data.texts), dtype=np.int64)), "text": data.texts})
    examples = pa.table(
        {
            "example_id": pa.array(np.arange(n, dtype=np.int64)),
            "anchor_id": pa.array(data.anchor_ids),
            "positive_id": pa.array(data.positive_ids),
            "negative_ids": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k), pa.array(data.negative_ids.reshape(-1), pa.int64())),
            "task": pa.array(data.tasks, pa.string()) if data.tasks is not None else pa.nulls(n, pa.string()),
        }
    )
    for name, table in ((TEXTS, texts), (EXAMPLES, examples)):
        with atomic_path(out_dir / name) as tmp:
            pq.write_table(table, tmp)


def read_data_tables(run_dir: Path, manifest: dict) -> TrainingData:
    """Rebuild TrainingData from a stage-1 directory (no DATA file needed), e.g. for `gist plan`."""
    from pipeline.artifacts import verify_checksum
    from pipeline.views import GuideViews

    texts = pq.read_table(verify_checksum(run_dir, TEXTS, manifest)).column("text").cast(pa.large_string()).combine_chunks()
    examples = pq.read_table(verify_checksum(run_dir, EXAMPLES, manifest))
    negatives = examples.column("negative_ids").combine_chunks()
    n = examples.num_rows
    data = TrainingData(
        texts=texts,
        anchor_ids=examples.column("anchor_id").to_numpy(),
        positive_ids=examples.column("positive_id").to_numpy(),
        negative_ids=negatives.values.to_numpy().reshape(n, -1),
        tasks=_tasks(examples.column("task")),
        fingerprint=manifest["dataset"]["fingerprint"],
        columns=manifest["dataset"]["columns"],
    )
    data.views = GuideViews.from_record(manifest["guide"]["views"])  # the pass's views of each role
    return data

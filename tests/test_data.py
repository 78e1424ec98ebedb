"""Reading DATA: CSV with multi-line texts past pyarrow's first block, CSV columns as strings, and
dictionary-encoded (pandas `category`) and string_view columns, each read as the same examples as a plain Parquet file."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import load_training_data, read_corpus, write_table


def assert_same_examples(left, right):
    assert left.texts.equals(right.texts) and left.fingerprint == right.fingerprint
    assert (left.anchor_ids == right.anchor_ids).all() and (left.positive_ids == right.positive_ids).all()
    assert (left.tasks == right.tasks).all()


@pytest.mark.parametrize("name", ["data.csv", "data.csv.gz"])
def test_csv_with_newlines_in_values_reads_past_the_first_block(tmp_path, name):
    """gist's own CSV output (pyarrow's write_csv quotes a value holding a newline) over 1 MB: pyarrow
    reads CSV in 1 MB blocks split at newlines unless told that values hold them."""
    rows = 2000
    table = pa.table({
        "anchor": [f"question {i}\nits second line {'x' * 300}" for i in range(rows)],
        "positive": [f'answer {i},\r\n"quoted" {"y" * 300}' for i in range(rows)],
        "task": ["qa", "nli"] * (rows // 2),
    })
    assert table.nbytes > 1 << 20
    pq.write_table(table, tmp_path / "data.parquet")
    write_table(table, tmp_path / name)
    assert_same_examples(load_training_data(tmp_path / name), load_training_data(tmp_path / "data.parquet"))


def test_csv_columns_are_read_as_strings(tmp_path):
    """A text of digits stays that text (not int64, refused, or "0042" turned into 42); an empty task
    cell is a null task, as write_csv writes one."""
    (tmp_path / "data.csv").write_text('anchor,positive,task\n0042,7,1\n17,3.50,\n"5",12,2\n')
    data = load_training_data(tmp_path / "data.csv")
    assert [data.text(i) for i in data.anchor_ids] == ["0042", "17", "5"]
    assert [data.text(i) for i in data.positive_ids] == ["7", "3.50", "12"]
    assert data.tasks.tolist() == ["1", None, "2"]
    assert read_corpus(tmp_path / "data.csv", "anchor") == ["0042", "17", "5"]


def test_dictionary_encoded_columns_are_decoded(tmp_path):
    """pandas `category` columns written to Parquet come back dictionary-encoded: read as their values."""
    frame = pd.DataFrame({"anchor": ["a", "b", "a", "c"], "positive": ["p", "q", "r", "p"], "task": ["t", "u", "t", None]})
    frame.to_parquet(tmp_path / "plain.parquet")
    frame.astype("category").to_parquet(tmp_path / "category.parquet")
    assert pa.types.is_dictionary(pq.read_table(tmp_path / "category.parquet").schema.field("anchor").type)
    assert_same_examples(load_training_data(tmp_path / "category.parquet"), load_training_data(tmp_path / "plain.parquet"))
    assert read_corpus(tmp_path / "category.parquet", "positive") == ["p", "q", "r"]


def test_string_view_columns_are_decoded(tmp_path):
    """string_view text columns (pyarrow keeps the type through Parquet) are read as their strings: the same examples, fingerprint included."""
    table = pa.table({"anchor": ["a", "b", "a", "c"], "positive": ["p", "q", "r", "p"], "task": ["t", "u", "t", None]})
    pq.write_table(table, tmp_path / "plain.parquet")
    pq.write_table(table.cast(pa.schema([(name, pa.string_view()) for name in table.column_names])), tmp_path / "view.parquet")
    assert pa.types.is_string_view(pq.read_table(tmp_path / "view.parquet").schema.field("anchor").type)
    assert_same_examples(load_training_data(tmp_path / "view.parquet"), load_training_data(tmp_path / "plain.parquet"))
    assert read_corpus(tmp_path / "view.parquet", "positive") == ["p", "q", "r"]

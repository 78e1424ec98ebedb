"""The `name=value,name=value` form of the command line, shared by DATA mixtures (`nli=a.parquet,qa=b.parquet`)
and the prompt options (`anchor=query: ,positive=passage: `).

A comma belongs to a value unless a `name=` follows it, so values may hold commas; values are kept as
written (a prompt's trailing space matters). Names may start with a digit (dataset names do).
"""

from __future__ import annotations

import re

_NAME = r"[A-Za-z0-9_][\w.-]*"
_FIRST_PAIR = re.compile(rf"^\s*{_NAME}\s*=")
_BETWEEN_PAIRS = re.compile(rf",(?=\s*{_NAME}\s*=)")


def name_value_pairs(text: str) -> list[tuple[str, str]] | None:
    """`text` as (name, value) pairs in order (names stripped, values as written), or None when it
    does not start with `name=` (one value, or a path)."""
    if not _FIRST_PAIR.match(text):
        return None
    return [(name.strip(), value) for name, _, value in (item.partition("=") for item in _BETWEEN_PAIRS.split(text))]

"""Prompts, in sentence-transformers' own terms: the student's training prompts and the evaluators'.

Training prompts are what `SentenceTransformerTrainingArguments(prompts=...)` takes: one string for
every column, a mapping column -> prompt, or (with several datasets) dataset name -> either of those.
gist's training dataset names its columns canonically (anchor, positive, negative_1..k), so a
prompt for `negative` applies to every negative column. Prompt *names* (`query`, `document`, ...)
are resolved through the student's own `prompts` (config_sentence_transformers.json) into strings.

On the command line (`--prompts`, `--prompt-names`) a value is one of:

- a single prompt (name) for every column: `--prompts "query: "`;
- `column=prompt` pairs separated by commas: `--prompts "anchor=query: ,positive=passage: "`
  (values are kept as written, spaces included; a comma inside a prompt is fine unless it is
  followed by `column=`);
- a JSON object, any form sentence-transformers takes, e.g. per dataset:
  `--prompts '{"nli": {"anchor": "query: "}, "qa": "query: "}'`.

Datasets are DATA's tasks: a mixture's dataset names (each dataset a task), or the task column's
values. Per-dataset prompts reach sentence-transformers' collator as a `DatasetDict`'s do, through a
`dataset_name` per row of which the collator reads each batch's first: every planned batch must then
hold one dataset (`--strategy by-task`, as the GISTEmbed recipe batches).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from pipeline import GistError
from pipeline.pairs import name_value_pairs

COLUMN_KEY = re.compile(r"^(anchor|positive|negative(_\d+)?)$")

Prompts = str | dict  # str, {column: str}, {dataset: str | {column: str}}


def split_prompt_spec(spec, option: str):
    """A CLI prompt value (or a str/dict from the Python API) as None, one string, or a non-empty dict:
    `name=value` pairs (keys not checked here) or a JSON object."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec.lstrip().startswith("{"):
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise GistError(f"{option}: not a valid JSON object ({e})") from None
        else:
            pairs = name_value_pairs(spec)
            if pairs is None:
                return spec
            spec = dict(pairs)  # `name=...`: pairs, whose keys are checked below (a typo is refused, not taken as one prompt)
    if not isinstance(spec, (str, dict)) or not spec and isinstance(spec, dict):
        raise GistError(f"{option}: expected a prompt, name=prompt pairs or a JSON object of them, got {spec!r}")
    return spec


def parse_prompt_spec(spec, option: str = "--prompts", datasets: tuple[str, ...] = ()):
    """`spec` (a CLI string, or already a str/dict from the Python API) as sentence-transformers'
    prompts form: None, one string, {column: str}, or {dataset: str | {column: str}}. Keys are checked:
    columns are anchor, positive, negative, negative_k; dataset keys must name one of `datasets`."""
    spec = split_prompt_spec(spec, option)
    if spec is None or isinstance(spec, str):
        return spec
    checked = {}
    for key, value in spec.items():
        if key in datasets and COLUMN_KEY.match(key):
            raise GistError(f"{option}: {key!r} names both a column and a dataset of DATA; rename the dataset (its task)")
        if isinstance(value, dict):
            if key not in datasets:
                raise GistError(f"{option}: {key!r} is not a dataset of DATA (datasets: {', '.join(datasets) or 'none: DATA is one dataset'})")
            checked[key] = _column_prompts(value, option)
        elif isinstance(value, str):
            if not COLUMN_KEY.match(key) and key not in datasets:
                raise GistError(f"{option}: unknown key {key!r}; use anchor, positive, negative, negative_k"
                                + (f" or a dataset name ({', '.join(datasets)})" if datasets else ""))
            checked[key] = value
        else:
            raise GistError(f"{option}: the prompt for {key!r} must be a string, not {type(value).__name__}")
    return checked


def _column_prompts(mapping: dict, option: str) -> dict[str, str]:
    for key, value in mapping.items():
        if not COLUMN_KEY.match(str(key)):
            raise GistError(f"{option}: unknown column {key!r}; use anchor, positive, negative, negative_k")
        if not isinstance(value, str):
            raise GistError(f"{option}: the prompt for {key!r} must be a string, not {type(value).__name__}")
    return dict(mapping)


def _expand_columns(prompts: dict[str, str], num_negatives: int, option: str) -> dict[str, str]:
    """{column: prompt} over the training dataset's columns: `negative` gives every negative_k its prompt."""
    expanded = {}
    for key, value in prompts.items():
        if key == "negative":
            expanded.update({f"negative_{c + 1}": value for c in range(num_negatives) if f"negative_{c + 1}" not in prompts})
        elif key.startswith("negative_") and int(key.split("_")[1]) not in range(1, num_negatives + 1):
            raise GistError(f"{option}: column {key!r}, but DATA has {num_negatives} negative column(s)")
        else:
            expanded[key] = value
    return expanded


def training_prompts(prompts, num_negatives: int, datasets: tuple[str, ...] = (), option: str = "--prompts"):
    """The `prompts` training argument for gist's training dataset (columns anchor, positive, negative_1..k)."""
    prompts = parse_prompt_spec(prompts, option, datasets)
    if prompts is None or isinstance(prompts, str):
        return prompts
    if all(isinstance(v, str) for v in prompts.values()) and not any(k in datasets for k in prompts):
        return _expand_columns(prompts, num_negatives, option)
    return {k: v if isinstance(v, str) else _expand_columns(v, num_negatives, option) for k, v in prompts.items()}


def resolve_prompt_names(names, model_prompts: dict[str, str], num_negatives: int, datasets: tuple[str, ...] = (),
                         option: str = "--prompt-names", who: str = "the student"):
    """Prompt names (same forms as prompts) resolved through `model_prompts` into training prompts."""
    names = parse_prompt_spec(names, option, datasets)
    if names is None:
        return None

    def lookup(name: str) -> str:
        if name not in model_prompts:
            raise GistError(f"{option}: {who} defines no prompt named {name!r} (its prompts: {', '.join(sorted(model_prompts)) or 'none'})")
        return model_prompts[name]

    if isinstance(names, str):
        resolved = lookup(names)
    else:
        resolved = {k: lookup(v) if isinstance(v, str) else {c: lookup(n) for c, n in v.items()} for k, v in names.items()}
    return training_prompts(resolved, num_negatives, datasets, option)


def student_prompts(prompts, prompt_names, model, num_negatives: int, datasets: tuple[str, ...] = ()):
    """The student's training prompts from `--prompts` or `--prompt-names` (not both); None without either."""
    if prompts is not None and prompt_names is not None:
        raise GistError("--prompts and --prompt-names: give one of them")
    if prompt_names is not None:
        return resolve_prompt_names(prompt_names, dict(getattr(model, "prompts", None) or {}), num_negatives, datasets)
    return training_prompts(prompts, num_negatives, datasets)


def dataset_names(data) -> tuple[str, ...]:
    """The datasets per-dataset prompts may name: DATA's tasks in order of first appearance (none without tasks)."""
    return tuple(dict.fromkeys(data.task_labels().tolist())) if data.tasks is not None else ()


def dataset_column(prompts, data, masks) -> list[str] | None:
    """Each example's dataset name when `prompts` are per dataset (None otherwise), after checking that
    every batch planned in `masks` (a PlannedMasks) holds one dataset."""
    datasets = dataset_names(data)
    if not isinstance(prompts, dict) or not any(key in datasets for key in prompts):
        return None
    labels, batches = data.task_labels(), masks.batches
    mixed = np.flatnonzero((labels[batches] != labels[batches[:, :1]]).any(axis=1))
    if len(mixed):
        raise GistError(f"--prompts per dataset: planned batch {int(mixed[0])} (of {len(mixed)}) mixes datasets, and sentence-transformers "
                        "applies one dataset's prompts to a whole batch; plan with --strategy by-task (one dataset per batch)")
    return labels.tolist()


@dataclass(frozen=True)
class EvalPrompts:
    """The evaluators' prompts: InformationRetrievalEvaluator's query_prompt/corpus_prompt (or their
    names, resolved by the model); STS sentences get the query prompt, both of them (a symmetric task
    is encoded as queries, as E5 and BGE do). `gist mine` takes its query/corpus prompts in this form
    too (mine_hard_negatives' query_prompt/corpus_prompt), names resolved by the guide's prompts."""

    query: str | None = None
    corpus: str | None = None
    query_name: str | None = None
    corpus_name: str | None = None

    def check(self) -> None:
        if self.query is not None and self.query_name is not None:
            raise GistError("--query-prompt and --query-prompt-name: give one of them")
        if self.corpus is not None and self.corpus_name is not None:
            raise GistError("--corpus-prompt and --corpus-prompt-name: give one of them")

    def check_model(self, model) -> None:
        """Refuse a prompt name the model does not define (the evaluator would fail only when it runs)."""
        self.resolve(dict(getattr(model, "prompts", None) or {}), "the model")

    def resolve(self, defined: dict, owner: str) -> tuple[str | None, str | None]:
        """The query and corpus prompt strings, names looked up in `defined` (the prompts `owner` defines);
        both a prompt and its name, or a name `owner` does not define, are refused."""
        self.check()
        for option, name in (("--query-prompt-name", self.query_name), ("--corpus-prompt-name", self.corpus_name)):
            if name is not None and name not in defined:
                raise GistError(f"{option}: {owner} defines no prompt named {name!r} (its prompts: {', '.join(sorted(defined)) or 'none'})")
        return (defined[self.query_name] if self.query_name is not None else self.query,
                defined[self.corpus_name] if self.corpus_name is not None else self.corpus)

    def ir_kwargs(self) -> dict:
        return dict(query_prompt=self.query, corpus_prompt=self.corpus, query_prompt_name=self.query_name, corpus_prompt_name=self.corpus_name)

    def sts_kwargs(self) -> dict:
        return {k: v for k, v in (("prompt", self.query), ("prompt_name", self.query_name)) if v is not None}

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.query, self.corpus, self.query_name, self.corpus_name))


def describe(prompts) -> str:
    """A prompts value for the model card, quoted so spaces show."""
    if prompts is None:
        return "none"
    if isinstance(prompts, str):
        return f"{prompts!r} on every column"
    return ", ".join(f"{k}: {describe(v) if isinstance(v, dict) else repr(v)}" for k, v in prompts.items())

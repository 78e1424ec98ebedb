"""The guide's views of a text: each role encoded as the guide itself is meant to encode it.

A prompt-based guide (E5, BGE, GTE, Nomic, Qwen3-Embedding) embeds a query and a document
differently: `encode_query` prepends its `query` prompt, `encode_document` its `document` (or
`passage`, `corpus`) prompt, and a guide with a Router module even runs other modules. Stage 1
encodes each role so: anchors as queries, positives and negatives as documents, with the guide's own
prompts unless `--guide-prompts` / `--guide-prompt-names` say otherwise per role (`--guide-prompts ''`:
no prompt at all). `GISTEmbedLoss` cannot do this: its guide sees the student's prompted tokens.
Giving the guide the student's prompt strings (`--guide-prompts` as the student's `--prompts`)
reproduces it exactly.

A *view* is what a text becomes before the guide reads it: a prompt and, for a guide that routes by
task (or an `--embeddings` file with a role column), a task. Roles with the same view share it, so a
guide without prompts has one view and stores one vector per text, as before prompts existed.

Storage (format 5): the pass stores one vector per (text, view) that some role of the text needs,
in text-id order and, within a text, in view order (`VectorRows`). A text that is both an anchor and
a positive under two views is two vectors; a text in one role, or any text under one view, is one.
Every consumer reads a role's vector through the rows of `TrainingData.rows`: `ap`/`an` compare
query-view anchors with document-view candidates, `aa` anchors with anchors, `pp` documents with
documents. Duplicate masking, `texts.parquet` and the fingerprint keep comparing raw texts (text ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import GistError
from pipeline.prompts import split_prompt_spec

ROLES = ("anchor", "positive", "negative")  # every negative column takes the negative role's view
ROLE_TASKS = {"anchor": "query", "positive": "document", "negative": "document"}
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")  # encode_document's search order


@dataclass(frozen=True)
class View:
    """How a text is given to the guide: prepended `prompt` ("" for none; None for vectors served
    by another embedder), and `task` ("query" / "document") when the guide routes by task."""

    prompt: str | None
    task: str | None = None

    def encode_kwargs(self) -> dict:
        """`SentenceTransformer.encode` arguments of this view (an explicit prompt, "" for none, so
        that the model's default prompt never applies unasked)."""
        return {"prompt": self.prompt, **({"task": self.task} if self.task else {})}

    def describe(self) -> str:
        """In words, for reports: its prompt and task, or the served vectors it stands for."""
        if self.prompt is None:
            return f"the {self.task} vectors of --embeddings" if self.task else "the vectors of --embeddings"
        return ("no prompt" if not self.prompt else f"prompt {self.prompt!r}") + (f", task {self.task}" if self.task else "")


@dataclass(frozen=True)
class GuideViews:
    """The distinct views of a pass and the view each role (anchor, positive, negative) reads."""

    views: tuple[View, ...]
    roles: dict  # role -> index into views

    def view_of(self, role: str) -> View:
        return self.views[self.roles[role]]

    def describe(self) -> str:
        """How the guide read each role, in words (reports, model cards)."""
        if len(self.views) == 1:
            return f"every role read with {self.views[0].describe()}"
        return ", ".join(f"{role}: {self.view_of(role).describe()}" for role in ROLES)

    def record(self) -> dict:
        """As the manifest stores it: the views and each role's view."""
        return {"views": [{"prompt": v.prompt, "task": v.task} for v in self.views], "roles": dict(self.roles)}

    @classmethod
    def from_record(cls, record: dict | None) -> "GuideViews":
        if record is None:
            return SINGLE_VIEW
        return cls(tuple(View(v["prompt"], v["task"]) for v in record["views"]), dict(record["roles"]))

    @classmethod
    def of(cls, role_views: dict[str, View]) -> "GuideViews":
        """Views in order of first use by anchor, positive, negative; roles with equal views share one."""
        views = list(dict.fromkeys(role_views[role] for role in ROLES))
        return cls(tuple(views), {role: views.index(role_views[role]) for role in ROLES})


SINGLE_VIEW = GuideViews((View(None),), {role: 0 for role in ROLES})  # every role one vector per text


def routes_by_task(model) -> bool:
    """Whether the model holds a Router module (its query and document inputs run other modules)."""
    from sentence_transformers.base.modules.router import Router

    return any(isinstance(module, Router) for module in model.modules())


def guide_views(model, prompts=None, prompt_names=None) -> GuideViews:
    """The views a guide model encodes each role with.

    Default: `encode_query` semantics for anchors (the guide's `query` prompt, else its default
    prompt), `encode_document` semantics for positives and negatives (its `document`, `passage` or
    `corpus` prompt, else the default). `prompts` / `prompt_names` (one string for every role, or
    role=value pairs, as `--guide-prompts` / `--guide-prompt-names` take them) override per role.
    """
    if prompts is not None and prompt_names is not None:
        raise GistError("--guide-prompts and --guide-prompt-names: give one of them")
    own = dict(getattr(model, "prompts", None) or {})
    default = own.get(model.default_prompt_name) if getattr(model, "default_prompt_name", None) else None
    chosen = {"anchor": own.get("query", default)}
    document = next((own[name] for name in DOCUMENT_PROMPT_NAMES if name in own), default)
    chosen.update(positive=document, negative=document)
    option = "--guide-prompts" if prompts is not None else "--guide-prompt-names"
    spec = split_prompt_spec(prompts if prompts is not None else prompt_names, option)
    if spec is not None:
        given = {role: spec for role in ROLES} if isinstance(spec, str) else spec
        for role, value in given.items():
            if role not in ROLES:
                raise GistError(f"{option}: unknown key {role!r}: {role!r} is not a role of the guide pass; use anchor, positive, negative "
                                "(every negative column is one role; guide prompts are not per dataset)")
            if not isinstance(value, str):
                raise GistError(f"{option}: the prompt for {role!r} must be a string, not {type(value).__name__}")
            if prompt_names is not None:
                if value not in own:
                    raise GistError(f"{option}: the guide defines no prompt named {value!r} (its prompts: {', '.join(sorted(own)) or 'none'})")
                value = own[value]
            chosen[role] = value
    routed = routes_by_task(model)
    return GuideViews.of({role: View(chosen[role] or "", ROLE_TASKS[role] if routed else None) for role in ROLES})


def role_views() -> GuideViews:
    """The views of an `--embeddings` file with a role column: anchors its `query` rows, positives and
    negatives its `document` rows."""
    return GuideViews.of({role: View(None, ROLE_TASKS[role]) for role in ROLES})


@dataclass(frozen=True)
class VectorRows:
    """Where each example's texts sit among a pass's stored vectors (rows of `embeddings.npy`).

    Under one view a row is a text id and nothing is materialised beyond the examples' own id
    arrays (a 10M-example pass keeps its memory); under several, `stored` lists the (text, view)
    pair of each row as `text * num_views + view`.

    Attributes:
        anchor: (N,) the row of each example's anchor in the anchor role's view.
        positive: (N,) the row of each positive in the positive role's view.
        negative: (N, k) the rows of the negatives in the negative role's view.
        roles: role -> view index (GuideViews.roles).
        num_views: how many views the pass stores.
        num_texts: how many unique texts.
        stored: (rows,) `text * num_views + view` of each stored row; None under one view.
        by_view: (texts, views) the row of each text in each view, -1 where no role of it needs that
            view; None under one view.
    """

    anchor: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    roles: dict
    num_views: int
    num_texts: int
    stored: np.ndarray | None = None
    by_view: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return self.num_texts if self.stored is None else len(self.stored)

    def _index(self, rows) -> np.ndarray:
        return np.arange(*rows.indices(self.num_rows)) if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)

    def text(self, rows) -> np.ndarray:
        """The text id of stored `rows` (an index array or a slice)."""
        return self._index(rows) if self.stored is None else self.stored[rows] // self.num_views

    def view(self, rows) -> np.ndarray:
        """The view of stored `rows` (an index array or a slice)."""
        return np.zeros(len(self._index(rows)), np.int8) if self.stored is None else (self.stored[rows] % self.num_views).astype(np.int8)

    def rows_of(self, text_ids: np.ndarray, views) -> np.ndarray:
        """The rows of `text_ids` in `views` (broadcast against them), -1 where a text has no row in that view."""
        text_ids = np.asarray(text_ids, dtype=np.int64)
        return text_ids + 0 * np.asarray(views) if self.by_view is None else self.by_view[text_ids, views]

    def of(self, role: str, text_ids: np.ndarray) -> np.ndarray:
        """Rows of `text_ids` in `role`'s view (-1 where a text has no row in it)."""
        return self.rows_of(text_ids, self.roles[role])

    def all_views_of(self, text_ids: np.ndarray) -> np.ndarray:
        """(len(text_ids), num_views): every row of each text, -1 where it has none in a view."""
        return self.rows_of(np.asarray(text_ids)[:, None], np.arange(self.num_views)[None, :])


def vector_rows(data, views: GuideViews) -> VectorRows:
    """The stored rows of `data`'s texts under `views`: a row per (text, view) some role needs, by
    text id, then view. Under one view the rows are the text ids themselves (no copies)."""
    num_texts, num_views = len(data.texts), len(views.views)
    if num_views == 1:
        return VectorRows(data.anchor_ids, data.positive_ids, data.negative_ids, dict(views.roles), 1, num_texts)
    used = np.zeros((num_texts, num_views), dtype=bool)
    used[data.anchor_ids, views.roles["anchor"]] = True
    used[data.positive_ids, views.roles["positive"]] = True
    used[data.negative_ids.reshape(-1), views.roles["negative"]] = True
    stored = np.flatnonzero(used.reshape(-1))
    by_view = np.full(used.size, -1, dtype=np.int64)
    by_view[stored] = np.arange(len(stored))
    by_view = by_view.reshape(used.shape)
    return VectorRows(
        anchor=by_view[data.anchor_ids, views.roles["anchor"]],
        positive=by_view[data.positive_ids, views.roles["positive"]],
        negative=by_view[data.negative_ids, views.roles["negative"]],
        roles=dict(views.roles), num_views=num_views, num_texts=num_texts, stored=stored, by_view=by_view,
    )


def served_prompt(views: GuideViews, role: str, requested: str | None, option: str) -> None:
    """Refuse a `gist mine` query/corpus prompt that the pass's stored view of `role` was not encoded with."""
    if requested is None:
        return
    view = views.view_of(role)
    if view.prompt is None:
        raise GistError(f"{option} {requested!r}: the pass's {role} vectors came from --embeddings, as served (no prompt applies); "
                        "mining reads them as stored: leave the option out, or embed with that prompt and pass those vectors")
    if view.prompt != requested:
        raise GistError(f"{option} {requested!r}: the pass stores its {role}s with {view.prompt!r}; mining reads the stored views only "
                        f"(re-run precompute-guide with --guide-prompts {role}={requested!r} for such vectors)")

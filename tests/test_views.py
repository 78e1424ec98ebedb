"""The guide's views (pipeline.views): each role encoded as the guide itself encodes it, anchors with
its query prompt and the other roles with its document prompt; a text in two roles stored twice."""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import GistError
from pipeline.artifacts import read_manifest
from pipeline.guide import load_guide_pass, read_embeddings
from pipeline.masks import MASKS, PlanParams, PlannedMasks, batch_masks
from pipeline.mine import MiningParams, mine_from_pass, mine_negatives
from pipeline.plan import plan_batches
from pipeline.stage1 import precompute_guide
from tests.conftest import GUIDE_SAMEVOCAB, GUIDE_STATIC, gist, small_data
from tests.test_mine import assert_same_negatives
from tests.test_outputs import killed_before_the_swap
from pipeline.outputs import stage_dir

QUERY, DOCUMENT = "query: ", "passage: "
PLAN = PlanParams(batch_size=16, epochs=2, margin=0.02)


def prompted(model: str, where) -> str:
    """A copy of `model` whose config defines the E5-style prompts query / document."""
    copy = where / model.name
    shutil.copytree(model, copy)
    config_path = copy / "config_sentence_transformers.json"
    config = json.loads(config_path.read_text())
    config["prompts"] = {"query": QUERY, "document": DOCUMENT}
    config_path.write_text(json.dumps(config))
    return copy


@pytest.fixture(scope="module")
def guides(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompted-guides")
    return {"bert": prompted(GUIDE_SAMEVOCAB, root), "static": prompted(GUIDE_STATIC, root)}


@pytest.fixture(scope="module")
def two_roles(tmp_path_factory):
    """96 triplets in which 8 anchors are also the positives, and 4 the negatives, of other examples."""
    path = small_data(tmp_path_factory.mktemp("views") / "two-roles.parquet", 96)
    table = pq.read_table(path).to_pydict()
    for i in range(8):
        table["positive"][40 + i] = table["anchor"][i]
    for i in range(4):
        table["negative"][60 + i] = table["anchor"][10 + i]
    pq.write_table(pa.table(table), path)
    return path


@pytest.fixture(scope="module")
def bert_pass(guides, two_roles, tmp_path_factory):
    out = tmp_path_factory.mktemp("passes") / "bert"
    precompute_guide(two_roles, guides["bert"], out, PLAN, device="cpu")
    return out


def test_stored_views_equal_encode_query_and_encode_document(bert_pass, guides):
    """Anchors are stored as the guide's encode_query gives them, the other roles as encode_document, bit for bit;
    a text in both roles is two vectors, every other text one."""
    from sentence_transformers import SentenceTransformer

    manifest, data, stored = load_guide_pass(bert_pass)
    assert manifest["guide"]["views"] == {"views": [{"prompt": QUERY, "task": None}, {"prompt": DOCUMENT, "task": None}],
                                          "roles": {"anchor": 0, "positive": 1, "negative": 1}}
    anchors = set(data.anchor_ids.tolist())
    documents = set(data.positive_ids.tolist()) | set(data.negative_ids.ravel().tolist())
    assert len(anchors & documents) == 12
    assert manifest["dataset"]["num_vectors"] == len(data.texts) + 12 == len(stored)
    np.testing.assert_array_equal(read_embeddings(bert_pass / "embeddings.parquet"), stored)
    guide = SentenceTransformer(str(guides["bert"]), device="cpu")
    rows = data.rows
    for view, encode in ((0, guide.encode_query), (1, guide.encode_document)):
        here = np.flatnonzero(rows.view(slice(None)) == view)
        texts = data.texts.take(rows.text(here)).to_pylist()
        expected = encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        assert np.array_equal(stored[here], expected), f"view {view} differs from {encode.__name__}"
    assert np.array_equal(rows.text(rows.anchor), data.anchor_ids) and (rows.view(rows.anchor) == 0).all()
    assert (rows.view(rows.positive) == 1).all() and (rows.view(rows.negative.ravel()) == 1).all()


def test_masks_compare_query_anchors_with_document_candidates(bert_pass, guides):
    """Every block of the stored masks is the rule on the right views: ap/an query x document, aa query x query,
    pp document x document (recomputed here from encode_query / encode_document, not from the pass)."""
    from sentence_transformers import SentenceTransformer

    _, data, stored = load_guide_pass(bert_pass)
    guide = SentenceTransformer(str(guides["bert"]), device="cpu")
    texts = data.texts.to_pylist()
    query = guide.encode_query(texts, normalize_embeddings=True, convert_to_numpy=True)
    document = guide.encode_document(texts, normalize_embeddings=True, convert_to_numpy=True)
    batches = plan_batches(data, 16, 1, 0, "random")[0]
    ours = batch_masks(stored, data, batches, PLAN)
    a, p, n = data.anchor_ids[batches], data.positive_ids[batches], data.negative_ids[batches][..., 0]
    threshold = np.einsum("bgd,bgd->bg", query[a], document[p])[..., None]
    expected = {"ap": np.einsum("bid,bjd->bij", query[a], document[p]), "aa": np.einsum("bid,bjd->bij", query[a], query[a]),
                "pp": np.einsum("bid,bjd->bij", document[p], document[p]), "an": np.einsum("bid,bjd->bij", query[a], document[n])}
    for block, sims in expected.items():
        rule = sims > threshold - PLAN.margin
        duplicate = (np.stack([a, p], -1)[:, :, None, :] == {"ap": p, "aa": a, "pp": p, "an": n}[block][:, None, :, None]).any(-1)
        mask = rule | duplicate
        if block == "ap":
            mask[:, np.arange(16), np.arange(16)] = False
        near = np.abs(sims - (threshold - PLAN.margin)) < 1e-5  # other batching of the products: rounding at the bound
        assert ((ours[block] == mask) | near).all(), block
        assert ours[block].any(), f"{block}: the compared batches mask nothing"


def test_one_view_without_prompts_and_exact_overrides(bert_pass, guides, two_roles, tmp_path):
    """--guide-prompts '' stores one vector per text: the unprompted guide's own pass, bit for bit. Prompt names and
    per-role strings override the guide's; roles given the same prompt share one view."""
    plain, none = tmp_path / "plain", tmp_path / "none"
    precompute_guide(two_roles, GUIDE_SAMEVOCAB, plain, PLAN, device="cpu")
    precompute_guide(two_roles, guides["bert"], none, PLAN, device="cpu", guide_prompts="")
    assert read_manifest(none)["guide"]["views"]["views"] == [{"prompt": "", "task": None}]
    assert (none / "embeddings.npy").read_bytes() == (plain / "embeddings.npy").read_bytes()
    assert pq.read_table(none / MASKS).select(["ap", "aa", "pp", "an"]).equals(pq.read_table(plain / MASKS).select(["ap", "aa", "pp", "an"]))
    both = tmp_path / "both"
    precompute_guide(two_roles, guides["bert"], both, PLAN, device="cpu", guide_prompt_names="anchor=document")
    assert read_manifest(both)["guide"]["views"] == {"views": [{"prompt": DOCUMENT, "task": None}], "roles": {"anchor": 0, "positive": 0, "negative": 0}}
    swapped = tmp_path / "swapped"
    precompute_guide(two_roles, guides["bert"], swapped, PLAN, device="cpu", guide_prompts=f"anchor=Q: ,negative={QUERY}")
    assert [v["prompt"] for v in read_manifest(swapped)["guide"]["views"]["views"]] == ["Q: ", DOCUMENT, QUERY]


def test_reuse_and_resume_never_mix_views(bert_pass, guides, two_roles, tmp_path, monkeypatch):
    """--reuse serves only the views a source stored (same prompt): a pass without prompts reuses nothing from a
    prompted one, a pass sharing the document view reuses those vectors; a killed stage of other prompts is never resumed."""
    def encoding(out):
        return {k: read_manifest(out)["encoding"][k] for k in ("encoded_texts", "reused_texts", "resumed_texts")}

    none = tmp_path / "none"
    precompute_guide(two_roles, guides["bert"], none, PLAN, device="cpu", guide_prompts="", reuse=[bert_pass])
    assert encoding(none)["reused_texts"] == 0
    again = tmp_path / "again"
    precompute_guide(two_roles, guides["bert"], again, PLAN, device="cpu", reuse=[bert_pass])
    assert encoding(again) == {"encoded_texts": 0, "reused_texts": len(np.load(bert_pass / "embeddings.npy")), "resumed_texts": 0}
    assert (again / "embeddings.npy").read_bytes() == (bert_pass / "embeddings.npy").read_bytes()
    shared = tmp_path / "shared"
    precompute_guide(two_roles, guides["bert"], shared, PLAN, device="cpu", reuse=[bert_pass], guide_prompts="anchor=Q: ")
    _, data, _ = load_guide_pass(shared)
    assert encoding(shared)["reused_texts"] == int((data.rows.view(slice(None)) == 1).sum()) and encoding(shared)["encoded_texts"] == int((data.rows.view(slice(None)) == 0).sum())

    out = tmp_path / "killed"
    killed_before_the_swap(monkeypatch, "precompute-guide", two_roles, "--guide", guides["bert"], "--out", out, "--batch-size", "16",
                           "--epochs", "2", "--margin", "0.02", "--device", "cpu", "--guide-prompts", "")
    assert stage_dir(out).exists()
    precompute_guide(two_roles, guides["bert"], out, PLAN, device="cpu")
    assert encoding(out)["resumed_texts"] == 0
    assert (out / "embeddings.npy").read_bytes() == (bert_pass / "embeddings.npy").read_bytes()


def test_external_vectors_with_a_role_column(bert_pass, guides, two_roles, tmp_path):
    """--embeddings with a role column: anchors read the `query` rows, the others the `document` rows; a served
    embedder's views make the same pass as the model's. A missing (text, role) or an unknown role is refused."""
    from sentence_transformers import SentenceTransformer

    _, data, stored = load_guide_pass(bert_pass)
    guide = SentenceTransformer(str(guides["bert"]), device="cpu")
    texts = data.texts.to_pylist()
    query = guide.encode_query(texts, normalize_embeddings=True, convert_to_numpy=True)
    document = guide.encode_document(texts, normalize_embeddings=True, convert_to_numpy=True)
    vectors = tmp_path / "served.parquet"
    pq.write_table(pa.table({"text": texts * 2, "role": ["query"] * len(texts) + ["document"] * len(texts),
                             "vector": list(np.concatenate([query, document]))}), vectors)
    out = tmp_path / "served"
    precompute_guide(two_roles, None, out, PLAN, embeddings=vectors)
    manifest = read_manifest(out)
    assert manifest["guide"]["views"]["roles"] == {"anchor": 0, "positive": 1, "negative": 1}
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), stored, atol=2e-6)  # other batches than the pass's own encoding
    ours, theirs = (pq.read_table(d / MASKS).select(["ap", "aa", "pp", "an"]) for d in (out, bert_pass))
    differing = sum(a != b for block in ours.column_names for a, b in zip(ours.column(block).to_pylist(), theirs.column(block).to_pylist()))
    assert differing <= 2, "masks of the served views and of the model's views"

    with pytest.raises(GistError, match="came from --embeddings, as served"):
        mine_from_pass(out, tmp_path / "refused.parquet", MiningParams(), query_prompt=QUERY)

    anchors_only = sorted(set(data.anchor_ids.tolist()) - set(data.positive_ids.tolist()) - set(data.negative_ids.ravel().tolist()))
    keep = [i for i in range(2 * len(texts)) if not (i < len(texts) and i == anchors_only[0])]
    table = pq.read_table(vectors).take(keep)
    pq.write_table(table, tmp_path / "missing.parquet")
    with pytest.raises(GistError, match=r"no vector for 1 of DATA's \d+ \(text, role\)s, e.g. '.*' as query"):
        precompute_guide(two_roles, None, tmp_path / "refused", PLAN, embeddings=tmp_path / "missing.parquet")
    bad = pq.read_table(vectors)
    pq.write_table(bad.set_column(1, "role", pa.array(["question"] * bad.num_rows)), tmp_path / "bad.parquet")
    with pytest.raises(GistError, match="'question'; use query or document"):
        precompute_guide(two_roles, None, tmp_path / "refused", PLAN, embeddings=tmp_path / "bad.parquet")
    assert not (tmp_path / "refused").exists()


def test_mining_with_prompts_equals_mine_hard_negatives(guides, tmp_path):
    """Mining from a prompted pass is mine_hard_negatives(query_prompt=, corpus_prompt=) with the guide's prompts;
    a prompt the pass did not store is refused."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    data_path = small_data(tmp_path / "pairs.parquet", 256, negatives=False)
    run = tmp_path / "pass"
    precompute_guide(data_path, guides["static"], run, PlanParams(batch_size=16), device="cpu")
    out = tmp_path / "mined.parquet"
    mine_from_pass(run, out, MiningParams(num_negatives=3), query_prompt=QUERY, corpus_prompt_name="document", device="cpu")
    got = pq.read_table(out).to_pydict()
    _, data, _ = load_guide_pass(run)
    columns = data.text_columns()
    reference = mine_hard_negatives(
        Dataset.from_dict({"anchor": columns["anchor"].to_pylist(), "positive": columns["positive"].to_pylist()}),
        SentenceTransformer(str(guides["static"]), device="cpu"), use_faiss=True, output_format="n-tuple", output_scores=True,
        verbose=False, num_negatives=3, query_prompt=QUERY, corpus_prompt=DOCUMENT,
    )
    _, _, embeddings = load_guide_pass(run)
    mined = mine_negatives(embeddings, data.anchor_ids, data.positive_ids, data.positive_ids, MiningParams(num_negatives=3),
                           data.rows.of("anchor", np.arange(len(data.texts))), data.rows.of("positive", np.arange(len(data.texts))))
    texts = np.asarray(data.texts.to_pylist(), dtype=object)
    ours = {(texts[data.anchor_ids[i]], texts[data.positive_ids[i]]): (texts[mined.negative_ids[i]].tolist(), mined.scores[i].tolist())
            for i in np.flatnonzero(mined.complete)}
    expected = {(row["anchor"], row["positive"]): ([row[f"negative_{c}"] for c in (1, 2, 3)], row["scores"][1:]) for row in reference}
    assert len(expected) > 100
    assert_same_negatives(ours, expected)
    assert {(a, p) for a, p in zip(got["anchor"], got["positive"])} == set(ours)
    result = gist("mine", run, "--out", tmp_path / "cli.parquet", "--query-prompt-name", "query", "--num-negatives", "2")
    hint = shlex.split(result.stderr.split("next: gist precompute-guide ")[1].split("...")[0])
    assert hint[1:3] == ["--reuse", str(run)] and hint[3] == "--guide-prompts"
    again = tmp_path / "again"
    gist("precompute-guide", tmp_path / "cli.parquet", "--guide", guides["static"], "--out", again, "--batch-size", "16", *hint[1:])
    assert read_manifest(again)["encoding"]["encoded_texts"] == 0, "the mined rows' views are all in the pass"
    with pytest.raises(GistError, match="stores its anchors with 'query: '"):
        mine_from_pass(run, tmp_path / "refused.parquet", MiningParams(), query_prompt=DOCUMENT)
    with pytest.raises(GistError, match="the guide of .* defines no prompt named"):
        mine_from_pass(run, tmp_path / "refused.parquet", MiningParams(), corpus_prompt_name="passage")
    with pytest.raises(GistError, match="give one of them"):
        mine_from_pass(run, tmp_path / "refused.parquet", MiningParams(), query_prompt="query: ", query_prompt_name="query")


def test_fn_aware_graph_under_two_views_is_the_rule_on_every_pair(guides, two_roles, tmp_path):
    """The conflict graph of a two-view pass (anchors shared with positives and negatives, duplicate masking on) equals
    putting every pair of examples in a batch of two and asking the mask rule: the graph's rows are the views' rows."""
    from pipeline.conflicts import conflict_graph

    run = tmp_path / "pass"
    precompute_guide(two_roles, guides["static"], run, PlanParams(batch_size=16), device="cpu")
    _, data, stored = load_guide_pass(run)
    n = data.num_examples
    i, j = np.triu_indices(n, 1)
    params = PlanParams(batch_size=2, margin=0.0, mask_duplicates=True)
    masks = batch_masks(stored, data, np.stack([i, j], 1), params)
    masks["ap"][:, [0, 1], [0, 1]] = False
    k = data.num_negatives
    an = masks["an"].reshape(len(i), 2, k, 2)
    cross = (masks["ap"][:, 0, 1] | masks["ap"][:, 1, 0] | masks["aa"][:, 0, 1] | masks["aa"][:, 1, 0] | masks["pp"][:, 0, 1] | masks["pp"][:, 1, 0]
             | an[:, 0, :, 1].any(1) | an[:, 1, :, 0].any(1))
    expected = np.zeros((n, n), dtype=bool)
    expected[i[cross], j[cross]] = expected[j[cross], i[cross]] = True
    indptr, neighbours = conflict_graph(data, stored, margin=0.0, mask_duplicates=True)
    graph = np.zeros((n, n), dtype=bool)
    graph[np.repeat(np.arange(n), np.diff(indptr)), neighbours] = True
    assert expected.sum() > n, "the data must conflict somewhere"
    assert (graph == expected).all(), f"{int((graph & ~expected).sum())} extra, {int((~graph & expected).sum())} missing edges"


def test_guide_prompt_refusals(guides, two_roles, tmp_path):
    for kwargs, message in [
        (dict(guide_prompts="query=q: "), "unknown key 'query'"),
        (dict(guide_prompts="negative_1=q: "), "'negative_1' is not a role"),
        (dict(guide_prompt_names="anchor=instruction"), "no prompt named 'instruction'"),
        (dict(guide_prompts="q: ", guide_prompt_names="query"), "give one of them"),
    ]:
        with pytest.raises(GistError, match=message):
            precompute_guide(two_roles, guides["bert"], tmp_path / "refused", PLAN, device="cpu", **kwargs)
    with pytest.raises(GistError, match="guide prompts are not per dataset"):
        precompute_guide(two_roles, guides["bert"], tmp_path / "refused", PLAN, device="cpu", guide_prompts='{"snli": {"anchor": "q: "}}')
    np.save(tmp_path / "v.npy", np.ones((3, 4), np.float32))
    with pytest.raises(GistError, match="--guide-prompts: options of a guide model"):
        precompute_guide(two_roles, None, tmp_path / "refused", PLAN, embeddings=tmp_path / "v.npy", guide_prompts="q: ")
    assert not (tmp_path / "refused").exists()


def test_filter_distill_and_report_read_each_roles_view(bert_pass, guides, tmp_path):
    """gist filter ranks positives by query-view anchors against document-view candidates, --distill's teacher labels
    are each column's view, and the report's mask check recomputes the stored masks from the views."""
    from sentence_transformers import SentenceTransformer

    from pipeline.distill import GuideTeacher
    from pipeline.filter import positive_ranks
    from pipeline.report import write_report

    _, data, stored = load_guide_pass(bert_pass)
    guide = SentenceTransformer(str(guides["bert"]), device="cpu")
    texts = data.texts.to_pylist()
    query = guide.encode_query(texts, normalize_embeddings=True, convert_to_numpy=True)
    document = guide.encode_document(texts, normalize_embeddings=True, convert_to_numpy=True)

    ranks = positive_ranks(stored, data, depth=200)
    candidates = np.unique(data.positive_ids)
    for i in range(data.num_examples):
        a = data.anchor_ids[i]
        others = candidates[(candidates != a) & ~np.isin(candidates, data.positive_ids[data.anchor_ids == a])]
        score = query[a] @ document[data.positive_ids[i]]
        expected = 1 + int((document[others] @ query[a] > score + 1e-5).sum())
        assert abs(ranks.ranks[i] - expected) <= int((np.abs(document[others] @ query[a] - score) <= 1e-5).sum()), i

    labels = GuideTeacher(bert_pass).labels(np.arange(data.num_examples), 3).numpy()
    np.testing.assert_allclose(labels[:, 0], query[data.anchor_ids], atol=1e-5)
    np.testing.assert_allclose(labels[:, 1], document[data.positive_ids], atol=1e-5)
    np.testing.assert_allclose(labels[:, 2], document[data.negative_ids[:, 0]], atol=1e-5)

    report = write_report(bert_pass, tmp_path / "report", examples=3)
    assert report["mask_check"]["mismatched_entries"] == 0
    assert "anchor: prompt 'query: ', positive: prompt 'passage: ', negative: prompt 'passage: '" in (tmp_path / "report" / "report.md").read_text()


def test_a_plan_of_a_replaced_pass_is_refused(two_roles, guides, tmp_path):
    """A plan keeps pointing at its guide pass; once that pass is replaced (--overwrite) with other guide prompts, the plan's
    masks no longer come from the vectors it holds: report and --distill refuse them, naming gist plan."""
    from pipeline.distill import GuideTeacher
    from pipeline.report import write_report
    from pipeline.stage1 import replan

    run = tmp_path / "pass"
    precompute_guide(two_roles, guides["static"], run, PLAN, device="cpu")
    replan(run, tmp_path / "plan", PLAN, device="cpu")
    precompute_guide(two_roles, guides["static"], run, PLAN, device="cpu", guide_prompts="", overwrite=True)
    for call in (lambda: write_report(tmp_path / "plan", tmp_path / "report"),
                 lambda: GuideTeacher.for_masks(PlannedMasks(tmp_path / "plan" / MASKS))):
        with pytest.raises(GistError, match="planned from other guide vectors .*gist plan"):
            call()
    assert write_report(run, tmp_path / "fresh")["mask_check"]["mismatched_entries"] == 0


def test_a_guide_that_routes_by_task_stores_query_and_document_views(two_roles, tmp_path):
    """A guide with a Router module (other modules for queries and documents, no prompts): anchors are stored as its
    encode_query runs them, the other roles as encode_document, bit for bit; the views differ by task alone."""
    import copy

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.router import Router
    from sentence_transformers.sentence_transformer.modules import Normalize

    static = SentenceTransformer(str(GUIDE_STATIC), device="cpu")[0]
    document = copy.deepcopy(static)
    with torch.no_grad():  # the document side weighs the dimensions otherwise: its vectors differ from the query side's
        document.embedding.weight.mul_(torch.linspace(0.5, 1.5, document.embedding.weight.shape[1]))
    SentenceTransformer(modules=[Router.for_query_document(query_modules=[static], document_modules=[document]), Normalize()],
                        device="cpu").save(str(tmp_path / "router-guide"))
    guide = SentenceTransformer(str(tmp_path / "router-guide"), device="cpu")
    run = tmp_path / "pass"
    precompute_guide(two_roles, tmp_path / "router-guide", run, PLAN, device="cpu")
    manifest, data, stored = load_guide_pass(run)
    assert manifest["guide"]["views"] == {"views": [{"prompt": "", "task": "query"}, {"prompt": "", "task": "document"}],
                                          "roles": {"anchor": 0, "positive": 1, "negative": 1}}
    rows = data.rows
    for view, encode in ((0, guide.encode_query), (1, guide.encode_document)):
        here = np.flatnonzero(rows.view(slice(None)) == view)
        expected = encode(data.texts.take(rows.text(here)).to_pylist(), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        assert np.array_equal(stored[here], expected), encode.__name__
    every = rows.all_views_of(np.arange(len(data.texts)))
    both = np.flatnonzero((every >= 0).all(axis=1))
    assert len(both) == 12 and not np.allclose(stored[every[both, 0]], stored[every[both, 1]])

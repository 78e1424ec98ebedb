"""Stage 1: artifacts, masks against a brute-force recomputation, determinism, planners."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import load_training_data
from pipeline.guide import read_embeddings
from pipeline.masks import PlannedMasks, PlanParams, false_negative_mask
from pipeline.plan import plan_batches
from tests.conftest import GUIDE_STATIC, gist

NEAR = 1e-6  # a mask entry may differ from a recomputation only this close to its threshold


def brute_force_masks(emb, data, example_ids, params: PlanParams):
    """Entry by entry, straight from DESIGN.md: mask x of row i iff g(a_i, x) beats t_i with the margin."""
    g = len(example_ids)
    a = [emb[data.anchor_ids[e]] for e in example_ids]
    p = [emb[data.positive_ids[e]] for e in example_ids]
    negs = [emb[data.negative_ids[e, c]] for c in range(data.num_negatives) for e in example_ids]
    blocks = {"ap": (a, p), "aa": (a, a), "pp": (p, p), "an": (a, negs)}
    out = {}
    for name, (rows, cols) in blocks.items():
        sims = np.array([[float(np.dot(r, c)) for c in cols] for r in rows], dtype=np.float64).reshape(g, len(cols))
        t = np.array([float(np.dot(a[i], p[i])) for i in range(g)])[:, None]
        bound = t - params.margin if params.margin_strategy == "absolute" else t - np.abs(t) * params.margin
        mask = sims > bound
        if name == "ap":
            np.fill_diagonal(mask, False)
        if (name == "aa" and not params.contrast_anchors) or (name == "pp" and not params.contrast_positives):
            mask[:] = False
        out[name] = (mask, np.abs(sims - bound) < NEAR)
    return out


def test_masks_equal_brute_force_recomputation(guide_run, triplets):
    masks = PlannedMasks(guide_run / "masks.parquet")
    emb = read_embeddings(guide_run / "embeddings.parquet")
    data = load_training_data(triplets)
    total_masked = 0
    for row, example_ids in enumerate(masks.batches):
        for block, (expected, near) in brute_force_masks(emb, data, example_ids, masks.params).items():
            stored = masks.dense(block, row, row + 1, *expected.shape)[0]
            assert not ((stored != expected) & ~near).any(), (row, block)
            total_masked += stored.sum()
    assert total_masked > 0


def test_artifact_schemas_and_manifest(guide_run, triplets):
    texts = pq.read_table(guide_run / "texts.parquet")
    assert texts.schema.field("text_id").type == "int64" and texts.schema.field("text").type == "large_string"
    examples = pq.read_table(guide_run / "examples.parquet")
    assert examples.column_names == ["example_id", "anchor_id", "positive_id", "negative_ids", "task"]
    emb_schema = pq.read_schema(guide_run / "embeddings.parquet")
    assert emb_schema.field("embedding").type == pa.list_(pa.float32(), 64)
    masks_table = pq.read_table(guide_run / "masks.parquet")
    assert masks_table.column_names == ["epoch", "step", "example_ids", "ap", "aa", "pp", "an"]
    assert all(masks_table.schema.field(b).type == pa.list_(pa.int32()) for b in ("ap", "aa", "pp", "an"))
    meta = json.loads(masks_table.schema.metadata[b"gist"])
    data = load_training_data(triplets)
    assert meta["dataset_fingerprint"] == data.fingerprint and meta["plan"]["margin"] == 0.05
    assert masks_table.column("step").to_pylist() == list(range(masks_table.num_rows))
    assert masks_table.num_rows == 2 * (512 // 16)

    manifest = json.loads((guide_run / "manifest.json").read_text())
    assert manifest["dataset"]["num_texts"] == texts.num_rows == len(data.texts)
    assert set(manifest["files"]) == {"texts.parquet", "examples.parquet", "embeddings.parquet", "embeddings.npy", "index.faiss", "masks.parquet"}
    # the memory-mapped raw copy holds exactly the interchange file's vectors
    np.testing.assert_array_equal(np.load(guide_run / "embeddings.npy", mmap_mode="r"), read_embeddings(guide_run / "embeddings.parquet"))
    assert manifest["plan"]["params"]["batch_size"] == 16 and "torch" in manifest["versions"]
    # every unique text encoded exactly once, and texts round-trip through the ids
    assert pq.read_table(guide_run / "embeddings.parquet").num_rows == len(set(data.texts.to_pylist()))
    ids = examples.column("anchor_id").to_numpy()
    assert [texts.column("text")[i].as_py() for i in ids[:5]] == pq.read_table(triplets).column("anchor").to_pylist()[:5]


def test_faiss_index_finds_each_text_itself(guide_run):
    import faiss

    index = faiss.read_index(str(guide_run / "index.faiss"))
    emb = read_embeddings(guide_run / "embeddings.parquet")
    assert index.ntotal == len(emb)
    _, found = index.search(emb[:20], 1)
    sims = (emb[found[:, 0]] * emb[:20]).sum(1)
    assert np.allclose(sims, 1.0, atol=1e-5)


def test_ivf_index_built_in_chunks_from_a_float16_map(tmp_path, static_run):
    """--index ivf (the large-corpus default): IVF-SQ8 trained on a sample, added chunk by chunk from
    the memory map (here float16, widened per chunk); it still finds each text as its own neighbour."""
    import faiss

    from pipeline import guide as guide_mod

    emb = np.load(static_run / "embeddings.npy").astype(np.float16)
    info = guide_mod.build_index(emb, tmp_path / "index.faiss", "ivf")
    assert info["kind"] == "ivf" and info["nlist"] == guide_mod.ivf_lists(len(emb)) and info["nprobe"] == min(info["nlist"], 32)
    index = faiss.read_index(str(tmp_path / "index.faiss"))
    assert index.ntotal == len(emb) and faiss.extract_index_ivf(index).nprobe == info["nprobe"]
    queries = emb[:200].astype(np.float32)
    _, found = index.search(queries, 1)
    assert (found[:, 0] == np.arange(200)).mean() > 0.95
    again = tmp_path / "again.faiss"
    guide_mod.build_index(emb, again, "ivf")
    assert again.read_bytes() == (tmp_path / "index.faiss").read_bytes()  # deterministic


def test_two_runs_are_byte_identical(tmp_path, triplets):
    for name in ("a", "b"):
        gist("precompute-guide", triplets, "--guide", GUIDE_STATIC, "--out", tmp_path / name, "--batch-size", "16", "--strategy", "no-duplicates")
    for name in ("texts.parquet", "examples.parquet", "embeddings.parquet", "index.faiss", "masks.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_plan_equals_precompute_with_same_options(tmp_path, guide_run):
    """`gist plan` from stored embeddings writes the same masks as stage 1 with those options."""
    gist("plan", guide_run, "--out", tmp_path, "--batch-size", "16", "--epochs", "2", "--margin", "0.05")
    assert (tmp_path / "masks.parquet").read_bytes() == (guide_run / "masks.parquet").read_bytes()


@pytest.mark.parametrize("strategy", ["random", "no-duplicates", "by-task", "clustered", "fn-aware"])
def test_planners(triplets, guide_run, strategy):
    data = load_training_data(triplets)
    emb = read_embeddings(guide_run / "embeddings.parquet")
    plan = plan_batches(data, 16, 3, seed=7, strategy=strategy, embeddings=emb)
    assert plan.shape[0] == 3 and plan.shape[2] == 16
    assert plan.shape[1] >= 512 // 16 - 3  # at most one partial batch per task is dropped
    assert np.array_equal(plan, plan_batches(data, 16, 3, seed=7, strategy=strategy, embeddings=emb))
    assert not np.array_equal(plan[0], plan[1]), "epochs should be shuffled differently"
    for epoch in plan:
        assert len(np.unique(epoch)) == epoch.size  # no example twice in an epoch
    if strategy == "no-duplicates":
        for batch in plan.reshape(-1, 16):
            texts = np.concatenate([data.anchor_ids[batch], data.positive_ids[batch], data.negative_ids[batch].ravel()])
            assert len(np.unique(texts)) == texts.size
    if strategy in ("by-task", "clustered", "fn-aware"):
        tasks = np.asarray(data.tasks)
        assert all(len(set(tasks[batch])) == 1 for batch in plan.reshape(-1, 16))


def test_clustered_batches_hold_more_false_negatives(tmp_path, guide_run):
    """Hard batches: the guide vetoes more in-batch candidates than in random batches of the same data."""
    fractions = {}
    for strategy in ("random", "clustered"):
        gist("plan", guide_run, "--out", tmp_path / strategy, "--batch-size", "16", "--strategy", strategy, "--margin", "0.05")
        fractions[strategy] = json.loads((tmp_path / strategy / "manifest.json").read_text())["plan"]["masked_fraction"]["ap"]
    assert fractions["clustered"] > 1.2 * fractions["random"], fractions  # measured 0.250 vs 0.174


def test_mask_rule_margins():
    t = np.array([[0.8], [-0.5]], dtype=np.float32)
    g = np.array([[0.79, 0.75], [-0.53, -0.45]], dtype=np.float32)
    assert false_negative_mask(g, t, "absolute", 0.0).tolist() == [[False, False], [False, True]]
    assert false_negative_mask(g, t, "absolute", 0.02).tolist() == [[True, False], [False, True]]
    # relative: t - |t| * m, so for a negative t the bound moves down (the old t * (1 - m) moved it up)
    assert false_negative_mask(g, t, "relative", 0.1).tolist() == [[True, True], [True, True]]
    assert false_negative_mask(g, t, "relative", 0.01).tolist() == [[False, False], [False, True]]


def test_candidate_identical_to_the_positive_is_kept_at_margin_zero():
    """g(a_i, p_j) == t_i exactly when p_j is p_i's text: strict > keeps it, as in GISTEmbedLoss
    (--no-mask-duplicates); duplicate masking (the default) masks every such candidate."""
    from pipeline.data import TrainingData
    from pipeline.masks import batch_masks

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 48)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    n = 16
    data = TrainingData(texts=pa.array([str(i) for i in range(40)], pa.large_string()), anchor_ids=np.arange(1, n + 1), positive_ids=np.zeros(n, dtype=np.int64),
                        negative_ids=np.zeros((n, 0), dtype=np.int64), tasks=None, fingerprint="", columns={})
    masks = batch_masks(emb, data, np.arange(n)[None, :], PlanParams(batch_size=n, mask_duplicates=False))
    assert not masks["ap"].any()  # every candidate is the row's own positive text
    masks = batch_masks(emb, data, np.arange(n)[None, :], PlanParams(batch_size=n))
    assert np.array_equal(masks["ap"][0], ~np.eye(n, dtype=bool))  # all but the true pair


@pytest.mark.parametrize("margin_strategy", ["absolute", "relative"])
def test_torch_masks_equal_the_rule_in_float64_up_to_1e6_of_the_threshold(tmp_path, static_run, margin_strategy):
    """The stored masks (torch batched products, all cores) against the mask rule evaluated in float64
    with numpy: an entry may differ only where the guide similarity lies within 1e-6 of its threshold."""
    from pipeline.guide import load_guide_pass
    from pipeline.masks import BLOCKS
    from pipeline.stage1 import replan

    params = PlanParams(batch_size=16, epochs=2, seed=3, strategy="random", margin_strategy=margin_strategy, margin=0.05)
    replan(static_run, tmp_path, params, device="cpu")
    stored = PlannedMasks(tmp_path / "masks.parquet")
    _, data, emb = load_guide_pass(static_run)
    e64 = emb.astype(np.float64)
    batches = stored.batches
    a, p = e64[data.anchor_ids[batches]], e64[data.positive_ids[batches]]
    n = e64[data.negative_ids[batches].transpose(0, 2, 1).reshape(len(batches), -1)]
    t = np.einsum("bgd,bgd->bg", a, p)[..., None]
    cut = t - 0.05 if margin_strategy == "absolute" else t - np.abs(t) * 0.05
    sims = {"ap": a @ p.transpose(0, 2, 1), "aa": a @ a.transpose(0, 2, 1), "pp": p @ p.transpose(0, 2, 1), "an": a @ n.transpose(0, 2, 1)}
    differing = 0
    for block in BLOCKS:
        expected = sims[block] > cut
        if block == "ap":
            expected[:, np.arange(16), np.arange(16)] = False
        got = stored.dense(block, 0, stored.num_batches, 16, sims[block].shape[2])
        wrong = got != expected
        assert (np.abs(sims[block] - cut)[wrong] < 1e-6).all(), block
        differing += int(wrong.sum())
    print(f"entries differing from the float64 rule (all within 1e-6 of the threshold): {differing}")


def test_float16_storage_halves_the_vectors_and_masks_move_only_near_thresholds(tmp_path, triplets, static_run):
    """--embedding-dtype float16: both embedding files hold float16; masks are computed from the
    widened vectors and differ from the float32 pass's only where float16 rounding (~1e-3) can tip
    the rule; --reuse across storage dtypes is refused."""
    from pipeline.guide import load_guide_pass

    out = tmp_path / "half"
    gist("precompute-guide", triplets, "--guide", GUIDE_STATIC, "--out", out, "--batch-size", "16", "--epochs", "2",
         "--strategy", "fn-aware", "--embedding-dtype", "float16")
    assert pq.read_schema(out / "embeddings.parquet").field("embedding").type == pa.list_(pa.float16(), 64)
    _, data, half = load_guide_pass(out)
    _, _, full = load_guide_pass(static_run)
    assert half.dtype == np.float16 and (out / "embeddings.npy").stat().st_size < 0.55 * (static_run / "embeddings.npy").stat().st_size
    np.testing.assert_array_equal(half, full.astype(np.float16))
    replan_half, replan_full = tmp_path / "ph", tmp_path / "pf"
    for source, dest in ((out, replan_half), (static_run, replan_full)):
        gist("plan", source, "--out", dest, "--batch-size", "16", "--strategy", "random", "--margin", "0.02")
    a, b = PlannedMasks(replan_half / "masks.parquet"), PlannedMasks(replan_full / "masks.parquet")
    np.testing.assert_array_equal(a.batches, b.batches)
    e = full.astype(np.float64)
    batches = a.batches
    anchors, positives = e[data.anchor_ids[batches]], e[data.positive_ids[batches]]
    cut = np.einsum("bgd,bgd->bg", anchors, positives)[..., None] - 0.02
    sims = {"ap": anchors @ positives.transpose(0, 2, 1), "aa": anchors @ anchors.transpose(0, 2, 1), "pp": positives @ positives.transpose(0, 2, 1)}
    for block in ("ap", "aa", "pp"):
        differ = a.dense(block, 0, a.num_batches, 16, 16) != b.dense(block, 0, b.num_batches, 16, 16)
        assert (np.abs(sims[block] - cut)[differ] < 4e-3).all(), block
    proc = gist("precompute-guide", triplets, "--guide", GUIDE_STATIC, "--out", tmp_path / "r", "--reuse", static_run,
                "--embedding-dtype", "float16", check=False)
    assert proc.returncode == 1 and "use the same --embedding-dtype" in proc.stderr

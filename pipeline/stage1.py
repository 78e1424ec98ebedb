"""Stage 1 as functions: the guide pass (`precompute_guide`) and re-planning from it (`replan`).

These are what `gist precompute-guide` and `gist plan` run; a training script calls them directly:

    from pipeline import PlanParams, precompute_guide
    guide_pass = precompute_guide("train.parquet", "models/mpnet", "runs/guide", plan=PlanParams(batch_size=64, epochs=3))
    masks = PlannedMasks(guide_pass.masks)

Every input and option is checked before OUT is touched; the pass is built in OUT's stage and
swapped in when complete (pipeline.outputs). Finished work (encoded chunks, the joined embeddings)
survives a failure or a kill and is resumed by the same call run again, with the same guide only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import GistError, artifacts, data as data_mod, guide as guide_mod, masks as masks_mod, vectors as vectors_mod
from pipeline.masks import PlanParams
from pipeline.outputs import Kind, Output
from pipeline.plan import check_plan, check_rule, plan_batches, rule_options
from pipeline.views import guide_views


# What precompute-guide and plan write (pipeline.outputs): a guide pass, and a plan of one.
GUIDE_PASS = Kind("guide-pass", directory=True, record=artifacts.MANIFEST, owned=(
    data_mod.TEXTS, data_mod.EXAMPLES, guide_mod.EMBEDDINGS, guide_mod.VECTORS, guide_mod.INDEX, masks_mod.MASKS, artifacts.MANIFEST))
PLAN = Kind("plan", directory=True, record=artifacts.MANIFEST, owned=(masks_mod.MASKS, artifacts.MANIFEST))


@dataclass(frozen=True)
class GuidePass:
    """A finished guide pass (or plan) directory and its manifest."""

    dir: Path
    manifest: dict

    @property
    def masks(self) -> Path:
        """Path of its `masks.parquet`, for `PlannedMasks` and `gist train --masks`."""
        return self.dir / masks_mod.MASKS


def precompute_guide(
    data: str | Path, guide: str | Path | None, out: str | Path, plan: PlanParams = PlanParams(), *, embeddings: str | Path | None = None,
    columns: str | None = None, encode_batch_size: int = 64, device: str = "auto", index: str = "auto",
    guide_max_seq_length: int | None = None, embedding_dtype: str = "float32", rows_per_group: int = 4096, reuse: list[Path] | tuple = (),
    trust_remote_code: bool = False, overwrite: bool = False, guide_dtype: str = "float32",
    subset: str | None = None, split: str | None = None, revision: str | None = None,
    guide_prompts: str | dict | None = None, guide_prompt_names: str | dict | None = None,
) -> GuidePass | None:
    """Encode every unique text of DATA with the guide once (once per view its roles need), index it, plan the batches, store their masks.

    Args:
        data: Parquet, JSONL or CSV file, a `datasets.save_to_disk` directory (a DatasetDict: its splits
            are a mixture), a Hub dataset id or dataset repository folder (`datasets.load_dataset`), or
            several datasets `name=source,name=source` (pipeline.data.data_source).
        subset: `datasets.load_dataset`'s configuration name of a Hub dataset (each Hub dataset of a mixture).
        split: its split (default train).
        revision: its revision; the three are recorded in the manifest.
        guide: the guide's sentence-transformers model directory; None with `embeddings`.
        embeddings: instead of a guide model, any embedder's vectors of DATA's texts (Parquet text +
            vector columns, or .npy rows in text-id order; see pipeline/vectors.py): checked, normalised
            and stored as the guide pass, no model loaded; the file's name and sha256 are the guide's identity.
        out: the guide pass directory to write.
        plan: batch size, epochs, seed, strategy and the mask rule's options.
        guide_prompts: the guide's prompt per role, overriding its own (pipeline.views): one string for
            every role, or anchor=/positive=/negative= pairs; "" for no prompt at all. The same strings
            as the student's training prompts reproduce `GISTEmbedLoss` (its guide sees them).
        guide_prompt_names: the same, as names of the guide's own prompts (`query`, `document`, ...).
            Without either, anchors are encoded as `encode_query` and the rest as `encode_document` would.
        guide_max_seq_length: truncate the guide's inputs at this many tokens (GISTEmbedLoss with a
            guide sharing the student's tokenizer cuts them at the student's max_seq_length).
        embedding_dtype: float32 (exact, the default) or float16 (half the disk and page cache) storage.
        reuse: earlier guide passes of the same guide and settings whose vectors are copied.
        guide_dtype: the guide's dtype on any device: float32 (the default: the masks of a float32
            GISTEmbedLoss), float16 or bfloat16 (faster on a GPU; entries near a threshold flip).
        columns: rename DATA's columns, e.g. "anchor=query,positive=doc".
        encode_batch_size: the guide's encoding batch size.
        device: auto (CUDA when present), cpu, cuda or cuda:N.
        index: the FAISS index kind: auto, flat, ivf or hnsw.
        rows_per_group: texts per embeddings row group, the unit a killed run resumes from.
        trust_remote_code: allow the guide's own Python code to run.
        overwrite: replace an earlier guide pass at `out` once the new one is complete.

    Returns the finished pass; under torchrun, ranks other than 0 (which encode and compute their
    share of the masks) get None.
    """
    out = Path(out)
    t_start = time.perf_counter()
    if embedding_dtype not in guide_mod.EMBEDDING_DTYPES:
        raise GistError(f"--embedding-dtype {embedding_dtype}: use one of {', '.join(guide_mod.EMBEDDING_DTYPES)}")
    guide_mod.check_guide_dtype(guide_dtype)
    if index not in guide_mod.INDEX_KINDS:
        raise GistError(f"--index {index}: use one of {', '.join(guide_mod.INDEX_KINDS)}")
    check_rule(plan)
    if (guide is None) == (embeddings is None):
        raise GistError("precompute-guide: pass either --guide MODEL or --embeddings VECTORS (one of them)")
    model_only = {"--reuse": bool(reuse), "--guide-max-seq-length": guide_max_seq_length is not None, "--guide-dtype": guide_dtype != "float32",
                  "--trust-remote-code": trust_remote_code, "--guide-prompts": guide_prompts is not None, "--guide-prompt-names": guide_prompt_names is not None}
    if embeddings is not None and any(model_only.values()):
        raise GistError(f"{', '.join(k for k, given in model_only.items() if given)}: options of a guide model; with --embeddings every vector comes from VECTORS "
                        "(a Parquet text -> vector file serves any subset of its texts: pass it again; a 'role' column gives queries and documents their own vectors)")
    dataset_source = data_mod.data_source(data, subset, split, revision)
    output = Output(out, GUIDE_PASS, overwrite=overwrite, inputs={
        **data_mod.local_inputs(dataset_source), "--guide": guide, "--embeddings": embeddings, **{f"--reuse {r}": r for r in reuse}})
    output.check()  # read-only: a refused OUT fails before the data is read or the guide loaded
    training = data_mod.load_training_data(dataset_source, columns)
    check_plan(training, plan.batch_size, plan.epochs, plan.strategy)  # every check that needs no guide, before the guide pass
    rank, world_size = guide_mod.init_distributed()  # under torchrun each rank encodes a share of the texts
    t_data = time.perf_counter()
    if embeddings is not None:
        source = vectors_mod.ExternalVectors(embeddings, training)  # sets training's rows: one view, or a view per role column value
        source.check()  # coverage, dimension, finiteness: a bad file fails here, before OUT is touched
        identity = {**source.identity(), "views": source.views.record()}
        encoding_key = {"guide": identity}
    else:
        source = _GuideEncoder(guide, device, guide_dtype, guide_max_seq_length, trust_remote_code, reuse, embedding_dtype, guide_prompts, guide_prompt_names)
        identity = source.identity
        training.views = source.views
        encoding_key = {"guide": {key: identity[key] for key in (*guide_mod.ENCODING_KEYS, "views")}, "reuse": source.stored.key if source.stored else [],
                        "batch_size": encode_batch_size}
    t_load = time.perf_counter()  # the guide loaded and hashed, or VECTORS checked
    # A killed pass resumes only the vectors of the same guide, encoding settings and data.
    key = {**encoding_key, "fingerprint": training.fingerprint, "rows_per_group": rows_per_group, "embedding_dtype": embedding_dtype}
    with output.stage(key, rank=rank, world_size=world_size) as stage:
        if rank == 0:
            data_mod.write_data_tables(stage.dir, training)
        if embeddings is not None:  # the checked vectors stored as a model pass stores its own
            device = guide_mod.resolve_device(device)
            counts = source.write(stage.dir, embedding_dtype, rows_per_group) if rank == 0 else {"dim": source.dim}
            encoding = {"rows_per_group": rows_per_group, "embedding_dtype": embedding_dtype, "reused_from": [], **counts}
            guide_info = {**identity, "dim": source.dim, "device": None}
        else:
            stage.keep_when(lambda: guide_mod.encoding_started(stage))
            counts = guide_mod.encode_to_parquet(source.model, training, source.views, stage, encode_batch_size, rows_per_group, rank, world_size, source.stored, embedding_dtype)
            encoding = {"batch_size": encode_batch_size, "rows_per_group": rows_per_group, "embedding_dtype": embedding_dtype,
                        "reused_from": [str(Path(r).resolve()) for r in reuse], **(counts or {})}
            device = str(source.model.device)
            guide_info = {**identity, "dim": source.model.get_embedding_dimension(), "device": device, "trust_remote_code": trust_remote_code}
        guide_mod.barrier(world_size)  # rank 0 has joined (or written) the vectors: every rank maps the embeddings
        t_encode = time.perf_counter()
        vectors = guide_mod.open_embeddings(stage.dir / guide_mod.VECTORS)
        index_info = guide_mod.build_index(vectors, stage.dir / guide_mod.INDEX, index, device) if rank == 0 else None
        t_index = time.perf_counter()
        batch_plan = plan_batches(training, plan.batch_size, plan.epochs, plan.seed, plan.strategy, vectors, **rule_options(plan), device=device)
        t_plan = time.perf_counter()
        # Every rank plans (deterministic: the same plan) and computes every W-th row group of the masks.
        summary = masks_mod.write_plan_masks(stage.dir, vectors, training, batch_plan, plan, identity, device, rank, world_size)
        if rank != 0:
            guide_mod.leave_distributed(world_size)  # rank 0 joined the masks; wait until it has written the manifest
            return None
        t_masks = time.perf_counter()
        manifest = artifacts.write_manifest(
            stage.dir, list(GUIDE_PASS.owned[:-1]),
            kind=GUIDE_PASS.name,
            world_size=world_size,
            guide=guide_info,
            dataset={**data_mod.source_record(dataset_source), "fingerprint": training.fingerprint, "columns": training.columns, "num_examples": training.num_examples,
                     "num_texts": len(training.texts), "num_vectors": training.rows.num_rows, "num_negatives": training.num_negatives},
            encoding=encoding,
            index=index_info,
            plan=summary,
            timings={"data_s": round(t_data - t_start, 3), "load_s": round(t_load - t_data, 3), "encode_s": round(t_encode - t_load, 3), "index_s": round(t_index - t_encode, 3), "plan_s": round(t_plan - t_index, 3), "masks_s": round(t_masks - t_plan, 3), "total_s": round(time.perf_counter() - t_start, 3)},
        )
    guide_mod.leave_distributed(world_size)
    return GuidePass(out, manifest)


class _GuideEncoder:
    """The guide model of a pass, loaded and set up as the pass encodes (dtype, sequence length,
    the view of each role: pipeline.views), with its identity and the --reuse passes it may copy
    vectors from: every input of the model's half of a guide pass, opened before OUT is touched."""

    def __init__(self, guide, device, guide_dtype, guide_max_seq_length, trust_remote_code, reuse, embedding_dtype, guide_prompts, guide_prompt_names):
        self.model = guide_mod.load_guide(guide, device, guide_dtype, guide_max_seq_length, trust_remote_code)
        self.views = guide_views(self.model, guide_prompts, guide_prompt_names)
        self.identity = {**guide_mod.encoding_identity(guide_mod.model_identity(str(guide)), self.model, guide_dtype),
                         "views": self.views.record(), "prompts": dict(self.model.prompts or {})}
        self.stored = guide_mod.StoredEmbeddings(list(reuse), self.identity, embedding_dtype) if reuse else None


def replan(guide_dir: str | Path, out: str | Path, plan: PlanParams = PlanParams(), *, device: str = "auto", overwrite: bool = False) -> GuidePass | None:
    """Plan batches and write their masks from a stored guide pass, without loading the guide;
    the masks are computed on `device` (auto: CUDA when present).

    Writes `masks.parquet` and a manifest (kind "plan") pointing at `guide_dir` into `out`, which
    must not be, contain or lie inside the guide pass. Under torchrun every rank plans (deterministic)
    and computes every W-th row group of the masks, rank 0 joins them and returns the plan; the
    other ranks return None.
    """
    guide_dir, out = Path(guide_dir), Path(out)
    check_rule(plan)
    output = Output(out, PLAN, inputs={"GUIDE_DIR": guide_dir}, overwrite=overwrite)
    output.check()
    t_start = time.perf_counter()
    manifest, training, embeddings = guide_mod.load_guide_pass(guide_dir)
    check_plan(training, plan.batch_size, plan.epochs, plan.strategy)
    rank, world_size = guide_mod.init_distributed()
    device = guide_mod.resolve_device(device)
    with output.stage(rank=rank, world_size=world_size) as stage:
        batch_plan = plan_batches(training, plan.batch_size, plan.epochs, plan.seed, plan.strategy, embeddings, **rule_options(plan), device=device)
        summary = masks_mod.write_plan_masks(stage.dir, embeddings, training, batch_plan, plan, manifest["guide"], device, rank, world_size)
        if rank != 0:  # rank 0 joined the masks
            guide_mod.leave_distributed(world_size)  # wait until rank 0 has written the manifest
            return None
        written = artifacts.write_manifest(
            stage.dir, [masks_mod.MASKS], kind=PLAN.name, guide_dir=str(guide_dir.resolve()), guide=manifest["guide"],
            dataset=manifest["dataset"], plan=summary, timings={"total_s": round(time.perf_counter() - t_start, 3)},
        )
    guide_mod.leave_distributed(world_size)
    return GuidePass(out, written)

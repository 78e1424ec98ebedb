"""Stage 1 as functions: the guide pass (`precompute_guide`) and re-planning from it (`replan`).

These are what `gist precompute-guide` and `gist plan` run; a training script calls them directly:

    from pipeline import PlanParams, precompute_guide
    guide_pass = precompute_guide("train.parquet", "models/mpnet", "runs/guide", plan=PlanParams(batch_size=64, epochs=3))
    masks = PlannedMasks(guide_pass.masks)

Every option is checked before the guide is loaded; finished work (encoded chunks, the joined
embeddings) survives a failure and is reused by the same call run again.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import GistError, artifacts, data as data_mod, guide as guide_mod, masks as masks_mod, vectors as vectors_mod
from pipeline.masks import PlanParams
from pipeline.plan import check_plan, check_rule, plan_batches, rule_options


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
) -> GuidePass | None:
    """Encode every unique text of DATA with the guide once, index it, plan the batches, store their masks.

    Args:
        data: Parquet, JSONL or CSV file, or a `datasets.save_to_disk` directory.
        guide: the guide's sentence-transformers model directory; None with `embeddings`.
        embeddings: instead of a guide model, any embedder's vectors of DATA's texts (Parquet text +
            vector columns, or .npy rows in text-id order; see pipeline/vectors.py): checked, normalised
            and stored as the guide pass, no model loaded; the file's name and sha256 are the guide's identity.
        out: the guide pass directory to write.
        plan: batch size, epochs, seed, strategy and the mask rule's options.
        guide_max_seq_length: truncate the guide's inputs at this many tokens (GISTEmbedLoss with a
            guide sharing the student's tokenizer cuts them at the student's max_seq_length).
        embedding_dtype: float32 (exact, the default) or float16 (half the disk and page cache) storage.
        reuse: earlier guide passes of the same guide and settings whose vectors are copied.
        guide_dtype: the guide's dtype on any device: float32 (the default: the masks of a float32
            GISTEmbedLoss), float16 or bfloat16 (faster on a GPU; entries near a threshold flip).
        Others as `gist precompute-guide --help`.

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
    model_only = {"--reuse": bool(reuse), "--guide-max-seq-length": guide_max_seq_length is not None, "--guide-dtype": guide_dtype != "float32", "--trust-remote-code": trust_remote_code}
    if embeddings is not None and any(model_only.values()):
        raise GistError(f"{', '.join(k for k, given in model_only.items() if given)}: options of a guide model; with --embeddings every vector comes from VECTORS "
                        "(a Parquet text -> vector file serves any subset of its texts: pass it again)")
    training = data_mod.load_training_data(Path(data), columns)
    check_plan(training, plan.batch_size, plan.epochs, plan.strategy)  # every check that needs no guide, before the guide pass
    vectors = None
    if embeddings is not None:
        vectors = vectors_mod.ExternalVectors(embeddings, training)
        vectors.check()  # coverage, dimension, finiteness: a bad file fails here, before OUT is touched
    t_data = time.perf_counter()
    rank, world_size = guide_mod.init_distributed()  # under torchrun each rank encodes a share of the texts
    model = guide_mod.load_model(str(guide), device, trust_remote_code) if vectors is None else None
    with artifacts.exclusive(out) if rank == 0 else contextlib.nullcontext():  # rank 0 writes OUT; a second gist is refused
        owned = [data_mod.TEXTS, data_mod.EXAMPLES, guide_mod.EMBEDDINGS, guide_mod.VECTORS, guide_mod.INDEX, masks_mod.MASKS]
        if rank == 0:
            artifacts.prepare_out_dir(out, overwrite, owned)
        if vectors is None:
            identity, guide_info, encoding, t_load = _encode(model, guide, training, out, encode_batch_size=encode_batch_size, guide_max_seq_length=guide_max_seq_length,
                                                             embedding_dtype=embedding_dtype, rows_per_group=rows_per_group, reuse=reuse, trust_remote_code=trust_remote_code,
                                                             guide_dtype=guide_dtype, rank=rank, world_size=world_size)
            device = str(model.device)
        else:  # --embeddings: the checked vectors stored as a model pass stores its own
            identity, device, t_load = vectors.identity(), guide_mod.resolve_device(device), time.perf_counter()
            if rank == 0:
                data_mod.write_data_tables(out, training)
            encoding = {"rows_per_group": rows_per_group, "embedding_dtype": embedding_dtype, "reused_from": [],
                        **(vectors.write(out, embedding_dtype, rows_per_group) if rank == 0 else {"dim": vectors.dim})}
            guide_info = {**identity, "dim": vectors.dim, "device": None}
        guide_mod.barrier(world_size)  # rank 0 has joined (or written) the vectors: every rank maps the embeddings
        t_encode = time.perf_counter()
        embeddings = guide_mod.open_embeddings(out / guide_mod.VECTORS)
        index_info = guide_mod.build_index(embeddings, out / guide_mod.INDEX, index, device) if rank == 0 else None
        t_index = time.perf_counter()
        batch_plan = plan_batches(training, plan.batch_size, plan.epochs, plan.seed, plan.strategy, embeddings, **rule_options(plan), device=device)
        t_plan = time.perf_counter()
        # Every rank plans (deterministic: the same plan) and computes every W-th row group of the masks.
        summary = masks_mod.write_plan_masks(out, embeddings, training, batch_plan, plan, identity, device, rank, world_size)
        if rank != 0:
            guide_mod.leave_distributed(world_size)  # rank 0 joined the masks; wait until it has written the manifest
            return None
        t_masks = time.perf_counter()
        manifest = artifacts.write_manifest(
            out, owned,
            kind="guide-pass",
            world_size=world_size,
            guide=guide_info,
            dataset={"path": str(Path(data).resolve()), "fingerprint": training.fingerprint, "columns": training.columns, "num_examples": training.num_examples, "num_texts": len(training.texts), "num_negatives": training.num_negatives},
            encoding=encoding,
            index=index_info,
            plan=summary,
            timings={"data_s": round(t_data - t_start, 3), "load_s": round(t_load - t_data, 3), "encode_s": round(t_encode - t_load, 3), "index_s": round(t_index - t_encode, 3), "plan_s": round(t_plan - t_index, 3), "masks_s": round(t_masks - t_plan, 3), "total_s": round(time.perf_counter() - t_start, 3)},
        )
        guide_mod.finish_encoding(out)
        guide_mod.leave_distributed(world_size)
        return GuidePass(out, manifest)


def _encode(model, guide, training, out: Path, *, encode_batch_size, guide_max_seq_length, embedding_dtype, rows_per_group, reuse, trust_remote_code,
            guide_dtype, rank, world_size) -> tuple[dict, dict, dict | None, float]:
    """The model's half of a guide pass: encode DATA's texts into OUT (resuming, reusing --reuse passes).
    Returns the guide's identity, its manifest record, the encoding's record and when the model was ready."""
    guide_mod.set_guide_dtype(model, guide_dtype)
    if guide_max_seq_length:
        try:
            model.max_seq_length = guide_max_seq_length
        except AttributeError:
            raise GistError(f"--guide-max-seq-length: {guide} takes no sequence length (a static embedding model?)") from None
    identity = guide_mod.encoding_identity(guide_mod.model_identity(str(guide)), model, guide_dtype)
    stored = guide_mod.StoredEmbeddings(list(reuse), identity, embedding_dtype) if reuse else None
    t_load = time.perf_counter()
    if rank == 0:
        data_mod.write_data_tables(out, training)
    run_key = {"guide": {key: identity[key] for key in guide_mod.ENCODING_KEYS}, "fingerprint": training.fingerprint}
    counts = guide_mod.encode_to_parquet(model, training.texts, out, encode_batch_size, run_key, rows_per_group, rank, world_size, stored, embedding_dtype)
    encoding = {"batch_size": encode_batch_size, "rows_per_group": rows_per_group, "embedding_dtype": embedding_dtype,
                "reused_from": [str(Path(r).resolve()) for r in reuse], **(counts or {})}
    guide_info = {**identity, "dim": model.get_embedding_dimension(), "device": str(model.device), "trust_remote_code": trust_remote_code}
    return identity, guide_info, encoding, t_load


def replan(guide_dir: str | Path, out: str | Path, plan: PlanParams = PlanParams(), *, device: str = "auto", overwrite: bool = False) -> GuidePass | None:
    """Plan batches and write their masks from a stored guide pass, without loading the guide;
    the masks are computed on `device` (auto: CUDA when present).

    Writes `masks.parquet` and a manifest (kind "plan") pointing at `guide_dir` into `out`, which
    must not be (or contain) the guide pass itself. Under torchrun every rank plans (deterministic)
    and computes every W-th row group of the masks, rank 0 joins them and returns the plan; the
    other ranks return None.
    """
    guide_dir, out = Path(guide_dir), Path(out)
    check_rule(plan)
    if out.resolve() == guide_dir.resolve() or out.resolve() in guide_dir.resolve().parents:
        raise GistError(f"--out {out} is (or contains) the guide pass {guide_dir}; writing there would destroy it: choose another --out")
    t_start = time.perf_counter()
    manifest, training, embeddings = guide_mod.load_guide_pass(guide_dir)
    rank, world_size = guide_mod.init_distributed()
    device = guide_mod.resolve_device(device)
    with artifacts.exclusive(out) if rank == 0 else contextlib.nullcontext():  # a second gist writing into OUT is refused
        batch_plan = plan_batches(training, plan.batch_size, plan.epochs, plan.seed, plan.strategy, embeddings, **rule_options(plan), device=device)
        if rank == 0:
            artifacts.prepare_out_dir(out, overwrite, [masks_mod.MASKS])  # before write_masks' barrier: the other ranks wait
        summary = masks_mod.write_plan_masks(out, embeddings, training, batch_plan, plan, manifest["guide"], device, rank, world_size)
        written = artifacts.write_manifest(
            out, [masks_mod.MASKS], kind="plan", guide_dir=str(guide_dir.resolve()), guide=manifest["guide"],
            dataset=manifest["dataset"], plan=summary, timings={"total_s": round(time.perf_counter() - t_start, 3)},
        ) if rank == 0 else None  # rank 0 joined the masks
    guide_mod.leave_distributed(world_size)  # the other ranks wait until rank 0 has written the manifest
    return GuidePass(out, written) if rank == 0 else None

"""Stage 1 encoding: run the guide once over every unique text, store embeddings and a FAISS index.

Texts are encoded in fixed chunks (one Parquet row group each) by `SentenceTransformer.encode`,
which sorts each chunk by length before batching. Every finished chunk is saved as its own part
file, so a killed run resumes at the first missing chunk; the parts are then joined into
`embeddings.parquet` (the interchange format) and `embeddings.npy`, the same vectors as one raw
array that every later step memory-maps: random access to the vectors (masks, planning, mining,
reports, --reuse) then reads file pages, and no second copy is made in anonymous memory. The chunk
boundaries never change, so a resumed run writes the same bytes. Vectors are stored in float32
(exact, the default) or float16 (`embedding_dtype`: half the disk and page cache; every consumer
widens the rows it reads to float32).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline import GistError
from pipeline.artifacts import atomic_path
from pipeline.data import TrainingData
from pipeline.views import GuideViews, VectorRows, View

EMBEDDINGS = "embeddings.parquet"
VECTORS = "embeddings.npy"  # the same vectors as a raw array, memory-mapped by every consumer
EMBEDDING_DTYPES = ("float32", "float16")
INDEX = "index.faiss"
FLAT_INDEX_MAX = 200_000  # above this many texts, "auto" builds an IVF index instead of a flat one
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
IVF_LISTS_PER_SQRT = 4  # IVF lists of index.faiss: 4 sqrt(texts)
IVF_TRAIN_PER_LIST = 64  # training sample: this many vectors per list (FAISS warns below 39)
IVF_NPROBE = 32  # lists of index.faiss scanned per query (its nprobe, for mining and reports)
ADD_ROWS = 1 << 16  # vectors widened to float32 and added at a time: no full float32 copy of a float16 pass


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun, join the process group: NCCL on GPUs, gloo on CPU."""
    import os

    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world_size) if world_size > 1 else (0, 1)


def barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def share(value, world_size: int):
    """Rank 0's `value` on every rank (a collective: every rank calls it; the others pass None)."""
    if world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def leave_distributed(world_size: int) -> None:
    """Under torchrun, every rank leaves together: wait for the others (rank 0 writing the manifest),
    then close the process group. A rank that exits while another still holds its gloo connections
    can be aborted (SIGABRT), failing the whole torchrun job.

    Every DistributedDataParallel wrapper must be gone before (gist train drops its trainer and loss):
    torch's DDP Reducer releases its process group holding the GIL, and when it holds the last
    reference, the group's destructor joins gloo's threads while one of them waits for the GIL to
    free a finished all_gather's tensor: a deadlock (a rank of `gist train` hung at exit in ~1 of 70 runs)."""
    if world_size > 1:
        import torch.distributed as dist

        barrier(world_size)
        dist.destroy_process_group()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GistError(f"--device {device}: CUDA is not available on this machine")
    return device


def load_model(path: str, device: str = "auto", trust_remote_code: bool = False):
    """Load a sentence-transformers model from a local directory, with a clear error if it is not one.

    A `gist train --distill embed` checkpoint lists gist's own GuideProjection in its modules.json, a
    class sentence-transformers imports only under trust_remote_code: exactly that class is handed over
    as already imported (as the trainer does to resume), every other module resolves as usual, and the
    projection is taken out: what loads is the student (its sentence_embedding is the same).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import fullname

    from pipeline.distill import GuideProjection, remove_guide_projection

    model_dir = Path(path)
    if not model_dir.is_dir():
        raise GistError(f"{path}: no such model directory")
    if not (model_dir / "modules.json").is_file() and not (model_dir / "config.json").is_file():
        raise GistError(f"{path}: not a sentence-transformers model (no modules.json or config.json)")
    try:
        model = SentenceTransformer._load_with_module_classes(str(model_dir), {fullname(GuideProjection): GuideProjection},
                                                              device=resolve_device(device), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise GistError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    remove_guide_projection(model)
    return model


GUIDE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_guide_dtype(dtype: str) -> None:
    if dtype not in GUIDE_DTYPES:
        raise GistError(f"--guide-dtype {dtype}: use one of {', '.join(GUIDE_DTYPES)}")


def set_guide_dtype(model, dtype: str) -> None:
    """Run the guide's weights and arithmetic in `dtype` on whatever device it is on: float32 (the
    default: the masks a float32 `GISTEmbedLoss` makes), or float16 / bfloat16 (faster on a GPU;
    similarities move by ~1e-3, so entries near a threshold flip). The dtype is part of the guide's
    encoding identity (ENCODING_KEYS): passes of different dtypes never reuse each other's vectors."""
    check_guide_dtype(dtype)
    model.to(GUIDE_DTYPES[dtype])


def load_guide(path, device: str, dtype: str, max_seq_length: int | None = None, trust_remote_code: bool = False):
    """The guide model set up to encode as a guide pass does: loaded on `device`, its weights in
    `dtype` (set_guide_dtype), truncating at `max_seq_length` (None: the model's own). Stage 1 sets it
    up from its options, `gist mine` from the pass's manifest, so both encode alike."""
    model = load_model(str(path), device, trust_remote_code)
    set_guide_dtype(model, dtype)
    if max_seq_length:
        try:
            model.max_seq_length = max_seq_length
        except AttributeError:
            raise GistError(f"--guide-max-seq-length: {path} takes no sequence length (a static embedding model?)") from None
    return model


def model_identity(path: str) -> dict:
    """Name and content hash of a model directory, for the manifest: sha256 over every file that can
    change its vectors (weights, configuration, tokenizer, pooling and normalization modules). Only
    hidden files and README.md are left out."""
    import hashlib

    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if file.name == "README.md" or any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return {"path": str(root.resolve()), "name": root.resolve().name, "sha256": digest.hexdigest()}


# What decides a stored vector besides the text and its view: the model's files and how it was run.
# Two passes agreeing on these store the same vector for a text under the same view (pipeline.views),
# so one can reuse or resume the other's work.
ENCODING_KEYS = ("sha256", "dtype", "max_seq_length")


def encoding_identity(identity: dict, model, dtype: str) -> dict:
    """The model identity plus the encoding settings of ENCODING_KEYS, as stored in the manifest."""
    max_len = model.max_seq_length
    return {**identity, "dtype": dtype, "max_seq_length": int(max_len) if max_len is not None and math.isfinite(max_len) else None}


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False
    )


def embeddings_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """`embeddings.parquet`: a row per stored vector, its text, its view (pipeline.views) and the vector."""
    return pa.schema([("text_id", pa.int64()), ("view", pa.int8()), ("embedding", pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), dim))])


def embeddings_table(rows: VectorRows, start: int, vectors: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Stored rows start.. (their text ids and views) with their vectors, as `embeddings.parquet` holds them."""
    stop = start + len(vectors)
    return pa.table({"text_id": rows.text(slice(start, stop)), "view": rows.view(slice(start, stop)),
                     "embedding": pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), vectors.shape[1])}, schema=schema)


def gather(embeddings: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float32 rows `ids` (any shape) of stored embeddings (a float16 or float32 memory map)."""
    return np.asarray(embeddings[ids], dtype=np.float32)


class StoredEmbeddings:
    """Embeddings of earlier guide passes (`--reuse DIR`), looked up by view and text, so no text is encoded twice.

    Only passes of the same guide files and encoding settings (ENCODING_KEYS of `guide`) are
    accepted: their vectors are what this guide would store. A text is found in a view of a source
    equal to the asked view (same prompt and task): a pass made with other prompts serves only the
    views it shares. `key` identifies the sources (their embeddings' checksums) for the resume key.
    """

    def __init__(self, run_dirs: list[Path], guide: dict, embedding_dtype: str = "float32"):
        from pipeline.artifacts import read_manifest, verify_checksum
        from pipeline.data import TEXTS

        self.sources, self.key = [], []
        by_view: dict[View, tuple[list, list]] = {}  # view -> (texts, rows in the sources laid end to end), per source
        start = 0
        for run_dir in run_dirs:
            manifest = read_manifest(run_dir)
            stored = manifest.get("guide", {})
            if manifest.get("kind") != "guide-pass":
                raise GistError(f"--reuse {run_dir}: not a precompute-guide directory")
            if manifest["encoding"].get("embedding_dtype") != embedding_dtype:
                raise GistError(f"--reuse {run_dir}: stores {manifest['encoding'].get('embedding_dtype')} embeddings, this pass {embedding_dtype}; use the same --embedding-dtype")
            differ = [key for key in ENCODING_KEYS if stored.get(key) != guide[key]]
            if differ:
                shown = ", ".join("model files differ" if key == "sha256" else f"{key} {stored.get(key)} != {guide[key]}" for key in differ)
                raise GistError(
                    f"--reuse {run_dir}: encoded by {stored.get('name')} otherwise than by this guide {guide['name']} ({shown}); its embeddings cannot be reused"
                )
            texts = pq.read_table(verify_checksum(run_dir, TEXTS, manifest)).column("text").cast(pa.large_string()).combine_chunks()
            stored = pq.read_table(verify_checksum(run_dir, EMBEDDINGS, manifest), columns=["text_id", "view"])
            text_of_row, view_of_row = stored.column("text_id").to_numpy(), stored.column("view").to_numpy()
            for index, view in enumerate(GuideViews.from_record(manifest["guide"]["views"]).views):
                here = np.flatnonzero(view_of_row == index)
                found = by_view.setdefault(view, ([], []))
                found[0].append(texts.take(text_of_row[here]))
                found[1].append(here + start)
            self.sources.append(open_embeddings(verify_checksum(run_dir, VECTORS, manifest)))
            self.key.append(manifest["files"][VECTORS]["sha256"])
            start += len(self.sources[-1])
        self.views = {view: (pa.chunked_array(texts, pa.large_string()).combine_chunks(), np.concatenate(rows)) for view, (texts, rows) in by_view.items()}
        self.starts = np.cumsum([0] + [len(v) for v in self.sources])

    def lookup(self, texts: list[str], view: View) -> np.ndarray:
        """Row of each text's `view` in the sources laid end to end (the first source holding it), -1 where none has it."""
        if view not in self.views:
            return np.full(len(texts), -1, dtype=np.int64)
        stored_texts, rows = self.views[view]
        found = pc.index_in(pa.array(texts, pa.large_string()), value_set=stored_texts).fill_null(-1).to_numpy().astype(np.int64)
        return np.where(found >= 0, rows[found], -1)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors of `rows` (from `lookup`), read from each source's memory map."""
        out = np.empty((len(rows), self.sources[0].shape[1]), dtype=np.float32)
        source = np.searchsorted(self.starts, rows, side="right") - 1
        for s, vectors in enumerate(self.sources):
            here = source == s
            out[here] = gather(vectors, rows[here] - self.starts[s])
        return out


def embed(model, texts: list[str], view: View, batch_size: int, stored: StoredEmbeddings | None = None) -> tuple[np.ndarray, int]:
    """Normalized float32 guide embeddings of `texts` seen through `view` (its prompt, its task);
    texts found in `stored` under the same view are copied, not encoded. Returns the vectors and how
    many came from `stored`.
    """
    rows = stored.lookup(texts, view) if stored is not None else np.full(len(texts), -1, dtype=np.int64)
    found, missing = np.flatnonzero(rows >= 0), np.flatnonzero(rows < 0)
    vectors = np.empty((len(texts), model.get_embedding_dimension()), dtype=np.float32)
    if len(found):
        vectors[found] = stored.take(rows[found])
    if len(missing):
        vectors[missing] = model.encode(
            [texts[i] for i in missing], batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False,
            **view.encode_kwargs(),
        )
    if not np.isfinite(vectors).all():
        bad = [texts[i][:60] for i in np.flatnonzero(~np.isfinite(vectors).all(axis=1))[:3]]
        raise GistError(f"the guide produced NaN/inf embeddings (e.g. for {bad}); check the model (a float16 guide overflowing? try --guide-dtype float32 or bfloat16)")
    return vectors, len(found)


PARTS = "embeddings.parts"  # in the stage's work directory: one Parquet file per finished chunk


def encoding_started(stage) -> bool:
    """Whether the stage holds encoding work worth resuming (finished chunks or their join)."""
    return any((stage.work / PARTS).glob("part-*.parquet")) or (stage.dir / VECTORS).exists()


def encode_to_parquet(
    model, data: TrainingData, views: GuideViews, stage, batch_size: int, rows_per_group: int, rank: int = 0, world_size: int = 1,
    stored: StoredEmbeddings | None = None, embedding_dtype: str = "float32",
) -> dict | None:
    """Encode every stored row of `data` (a text under a view, `data.rows`; normalized) into the
    stage's `embeddings.parquet` and `embeddings.npy`, stored as `embedding_dtype`, resuming finished work.
    A chunk's rows are encoded a view at a time (each with its prompt and task).

    Finished chunks are part files in the stage's work directory (`pipeline.outputs`: a stage is
    resumed only by a run of the same guide, encoding settings and data); once joined the parts are
    deleted and the joined files stay, so a run that fails later (indexing, planning, masks) keeps
    its embeddings and a re-run encodes nothing. Texts held by `stored` are copied from there. Under
    torchrun, rank r encodes chunks r, r + W, ...; rank 0 joins the parts and returns the counts for
    the manifest (encoded, reused from `stored`, resumed), the other ranks return None.
    """
    parts_dir = stage.work / PARTS
    joined = [stage.dir / EMBEDDINGS, stage.dir / VECTORS]
    if rank == 0:
        parts_dir.mkdir(exist_ok=True)
    barrier(world_size)

    dim = model.get_embedding_dimension()
    rows = data.rows
    num_rows = rows.num_rows
    counts = {"dim": dim, "encoded_texts": 0, "reused_texts": 0, "resumed_texts": num_rows, "encode_seconds": 0.0}
    if all(path.exists() for path in joined):  # joined by an earlier run of this stage: all finished
        return counts if rank == 0 else None
    schema = embeddings_schema(dim, embedding_dtype)
    n_chunks = (num_rows + rows_per_group - 1) // rows_per_group
    resumed = reused = encoded = 0
    encode_seconds = 0.0
    with _progress() as progress:
        mine = range(rank, n_chunks, world_size)
        task = progress.add_task("guide: encoding texts" + (f" (rank {rank})" if world_size > 1 else ""), total=sum(min(num_rows, (c + 1) * rows_per_group) - c * rows_per_group for c in mine))
        # The bar moves per encoded batch: a hook on the model's forward, which encode calls once per batch.
        hook = model.register_forward_hook(lambda module, args, output: progress.advance(task, len(output["sentence_embedding"])))
        try:
            for chunk in mine:
                start, stop = chunk * rows_per_group, min(num_rows, (chunk + 1) * rows_per_group)
                part = parts_dir / f"part-{chunk:06d}.parquet"
                if part.exists():
                    resumed += stop - start
                    progress.advance(task, stop - start)
                    continue
                t0 = time.perf_counter()
                vectors, from_stored = np.empty((stop - start, dim), dtype=np.float32), 0
                chunk_views = rows.view(slice(start, stop))
                for index, view in enumerate(views.views):  # the chunk's rows of each view, in row order
                    here = np.flatnonzero(chunk_views == index)
                    if len(here):
                        vectors[here], copied = embed(model, data.texts.take(rows.text(start + here)).to_pylist(), view, batch_size, stored)
                        from_stored += copied
                encode_seconds += time.perf_counter() - t0
                table = embeddings_table(rows, start, vectors.astype(embedding_dtype), schema)
                with atomic_path(part) as tmp:
                    pq.write_table(table, tmp)
                reused += from_stored
                encoded += stop - start - from_stored
                progress.advance(task, from_stored)  # copied from --reuse passes, not encoded
        finally:
            hook.remove()

    if world_size > 1:
        import torch.distributed as dist

        totals = torch.tensor([encoded, reused, resumed], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(totals)
        encoded, reused, resumed = totals.tolist()
    barrier(world_size)
    if rank != 0:
        return None
    with atomic_path(joined[0]) as tmp, pq.ParquetWriter(tmp, schema) as writer, atomic_path(joined[1]) as raw:
        array = np.lib.format.open_memmap(raw, mode="w+", dtype=embedding_dtype, shape=(num_rows, dim))
        for chunk in range(n_chunks):
            table = pq.read_table(parts_dir / f"part-{chunk:06d}.parquet")
            writer.write_table(table, row_group_size=rows_per_group)
            values = table.column("embedding").combine_chunks().values.to_numpy()
            array[chunk * rows_per_group : chunk * rows_per_group + table.num_rows] = values.reshape(-1, dim)
        array.flush()
        del array
    shutil.rmtree(parts_dir)
    return {**counts, "encoded_texts": encoded, "reused_texts": reused, "resumed_texts": resumed, "encode_seconds": round(encode_seconds, 3)}


def open_embeddings(path: Path) -> np.ndarray:
    """Memory-map `embeddings.npy`: a read-only (stored rows, dim) float16/float32 array, a row per text
    and view (`TrainingData.rows` says which; under one view, row = text id)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise GistError(f"{path}: cannot map the embeddings ({str(e).splitlines()[0]})") from None
    if array.ndim != 2 or array.dtype.name not in EMBEDDING_DTYPES:
        raise GistError(f"{path}: not a gist embeddings array ({array.dtype} {array.shape})")
    return array


def read_embeddings(path: Path) -> np.ndarray:
    """Read `embeddings.parquet` (the interchange format) into a (rows, dim) array in stored-row order:
    by text id, then view (under one view, row = text id)."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise GistError(f"{path}: cannot read embeddings ({str(e).splitlines()[0]})") from None
    ids = table.column("text_id").to_numpy()
    if len(ids) and (ids[0] != 0 or np.any(np.diff(ids) < 0) or np.any(np.diff(ids) > 1)):
        raise GistError(f"{path}: text ids are not in stored-row order; the file is not from gist")
    emb = table.column("embedding").combine_chunks()
    return emb.values.to_numpy().reshape(len(ids), emb.type.list_size)


def load_guide_pass(run_dir: Path) -> tuple[dict, TrainingData, np.ndarray]:
    """A finished precompute-guide directory: its manifest, data and embeddings (memory-mapped), each
    file checked against the manifest's checksum first. What `gist plan`, `gist mine` and `gist report` start from."""
    from pipeline.artifacts import read_manifest, verify_checksum
    from pipeline.data import read_data_tables

    manifest = read_manifest(run_dir)
    if manifest.get("kind") != "guide-pass":
        raise GistError(f"{run_dir}: not a precompute-guide directory (kind {manifest.get('kind')!r})")
    return manifest, read_data_tables(run_dir, manifest), open_embeddings(verify_checksum(run_dir, VECTORS, manifest))


@contextlib.contextmanager
def faiss_single_thread():
    """Run FAISS on one thread inside the block (parallel k-means sums and HNSW insertion order are
    not reproducible), restoring its thread count after."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def faiss_gpu(device: str):
    """GPU FAISS resources when `device` is CUDA and faiss-gpu is installed (the `gpu` extra), else None.

    Index building, k-means and search then run on the GPU through the same calls as on the CPU.
    """
    import faiss

    if not str(device).startswith("cuda") or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    return faiss.StandardGpuResources()


def ivf_lists(num_vectors: int) -> int:
    return max(1, min(num_vectors, int(IVF_LISTS_PER_SQRT * np.sqrt(num_vectors))))


def training_sample(num_vectors: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted ids of a seeded random sample of `size` of `num_vectors` rows (all of them if fewer)."""
    if size >= num_vectors:
        return np.arange(num_vectors)
    return np.sort(np.random.default_rng(seed).choice(num_vectors, size, replace=False))


def build_index(embeddings: np.ndarray, out_path: Path, kind: str = "auto", device: str = "cpu") -> dict:
    """Write a FAISS inner-product index over the (unit) embeddings; returns its description.

    flat (exact), ivf (IVF with 8-bit scalar quantization: 4 sqrt(n) lists trained on a seeded sample
    of 64 vectors per list, a quarter of flat's memory; on the GPU with faiss-gpu) or hnsw. Vectors are
    added in chunks from the memory map, so a float16 pass is never widened whole.
    """
    import faiss

    num, dim = embeddings.shape
    if kind == "auto":
        kind = "flat" if num <= FLAT_INDEX_MAX else "ivf"
    if kind not in INDEX_KINDS:
        raise GistError(f"--index {kind}: use one of {', '.join(INDEX_KINDS)}")
    info = {"kind": kind, "metric": "inner_product"}
    gpu = None
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        nlist = ivf_lists(num)
        index = faiss.index_factory(dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
        gpu = faiss_gpu(device)
        if gpu is not None:
            index = faiss.index_cpu_to_gpu(gpu, 0, index)
        sample = training_sample(num, IVF_TRAIN_PER_LIST * nlist)
        with faiss_single_thread():  # k-means sums in a fixed order: the same index on every run
            index.train(gather(embeddings, sample))
        info.update(nlist=nlist, nprobe=min(nlist, IVF_NPROBE), trained_on=len(sample), device="cuda" if gpu is not None else "cpu")
    with faiss_single_thread():  # a flat index's add is a copy; HNSW's insertion order must not vary
        for start in range(0, num, ADD_ROWS):
            index.add(gather(embeddings, slice(start, start + ADD_ROWS)))
    if gpu is not None:
        index = faiss.index_gpu_to_cpu(index)
    if kind == "ivf":
        index.nprobe = info["nprobe"]
    with atomic_path(out_path) as tmp:
        faiss.write_index(index, str(tmp))
    return info

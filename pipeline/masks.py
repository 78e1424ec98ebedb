"""The false-negative mask rule and `masks.parquet`, the contract between stage 1 and stage 2.

For planned batch of G examples, guide similarities g and thresholds t_i = g(a_i, p_i), a candidate
x of row i is masked iff g(a_i, x) > t_i - m (absolute) or g(a_i, x) > t_i - |t_i| * m (relative),
exactly as sentence-transformers `GISTEmbedLoss`. Blocks: `ap` (a_i vs p_j; the true pair (i, i)
is never masked), `aa` (a_i vs a_j), `pp` (p_i vs p_j), `an` (a_i vs negative c of example j at
column c * G + j). Each block is stored as the flat positions `i * ncols + j` of its masked entries.

Document-side blocks, planned only when asked (for the `doc_to_query` / `doc_to_doc` directions of
the guided loss): `pa` (row i is the positive p_i, candidates the anchors a_j: g(p_i, a_j) > t_i - m;
the true pair (i, i) is never masked; `contrast_doc_query`) and `pn` (p_i vs negative c of example j,
columns as `an`: g(p_i, n_j^c) > t_i - m; `contrast_doc_negatives`). Same rule, same threshold t_i.

Exact duplicates (`mask_duplicates`, on by default): a candidate whose text *is* the row's anchor or
positive text (same text id) is masked too. With margin 0 the guide rule keeps a candidate equal to
the positive (g == t, strict >), so the student would be asked to rank a text above itself; such a
candidate is never a true negative. `mask_duplicates=False` reproduces `GISTEmbedLoss` exactly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress
import torch

from pipeline import FORMAT_VERSION, GistError
from pipeline.artifacts import atomic_path
from pipeline.data import TrainingData
from pipeline.guide import gather

MASKS = "masks.parquet"
MASK_PARTS = ".masks.parts"  # under torchrun: each rank's row groups, joined by rank 0
BLOCKS = ("ap", "aa", "pp", "an")
DOC_BLOCKS = ("pa", "pn")  # stored only when the plan asks (contrast_doc_query, contrast_doc_negatives)
ALL_BLOCKS = (*BLOCKS, *DOC_BLOCKS)
COUNTS = (*ALL_BLOCKS, *(f"{block}_duplicates" for block in ALL_BLOCKS))  # masked entries; those only duplicate masking masked
MAX_CHUNK_BATCHES = 1024  # batches computed (and written as one row group) at once
CHUNK_ENTRIES = 1 << 22  # similarity entries of all blocks per chunk: bounds memory for large batches
METADATA_KEY = b"gist"
MARGIN_STRATEGIES = ("absolute", "relative")
INT32_MAX = np.iinfo(np.int32).max


def chunk_batches(batch_size: int, num_negatives: int, params: "PlanParams | None" = None) -> int:
    """Batches per chunk such that the chunk's similarity entries (ap, aa, pp, an, and the planned
    document-side blocks of `params`) stay within CHUNK_ENTRIES (at least one batch): the chunk's
    float32 similarities and boolean masks then take ~80 MB at most (plus one batch's blocks),
    whatever the batch size."""
    doc = 0 if params is None else int(params.contrast_doc_query) + int(params.contrast_doc_negatives) * num_negatives
    per_batch = batch_size * batch_size * (3 + num_negatives + doc)
    return max(1, min(MAX_CHUNK_BATCHES, CHUNK_ENTRIES // per_batch))


def check_sparse_sizes(batch_size: int, num_negatives: int) -> None:
    """Refuse a batch whose flat mask positions would overflow the int32 that masks.parquet stores them in."""
    cols = batch_size * max(1, num_negatives)
    if batch_size * cols > INT32_MAX:
        raise GistError(
            f"--batch-size {batch_size} with {num_negatives} negative column(s): a block has {batch_size * cols} entries, "
            f"more than masks.parquet's int32 positions address ({INT32_MAX}); lower --batch-size"
        )


@dataclass(frozen=True)
class PlanParams:
    """Everything that decides the batches and their masks; stored in the masks' metadata."""

    batch_size: int = 32
    epochs: int = 1
    seed: int = 0
    strategy: str = "random"
    margin_strategy: str = "absolute"
    margin: float = 0.0
    contrast_anchors: bool = True
    contrast_positives: bool = True
    mask_duplicates: bool = True
    contrast_doc_query: bool = False  # plan `pa` (p_i vs a_j): the guided loss's doc_to_query direction
    contrast_doc_negatives: bool = False  # plan `pn` (p_i vs negatives): doc_to_doc with negative columns

    def planned_blocks(self, num_negatives: int) -> tuple[str, ...]:
        """The blocks whose stored masks hold the guide's verdicts under these parameters."""
        enabled = {"ap": True, "aa": self.contrast_anchors, "pp": self.contrast_positives, "an": num_negatives > 0,
                   "pa": self.contrast_doc_query, "pn": self.contrast_doc_negatives and num_negatives > 0}
        return tuple(block for block in ALL_BLOCKS if enabled[block])

    def without_doc_blocks(self) -> "PlanParams":
        """These parameters with the document-side blocks off: what the report and the margin sweep
        recompute (ap, aa, pp, an), so `pa`/`pn` are neither computed nor counted in their chunks."""
        return replace(self, contrast_doc_query=False, contrast_doc_negatives=False)

    def stored_blocks(self) -> tuple[str, ...]:
        """The block columns of masks.parquet: the four GISTEmbedLoss blocks always, the document-side ones when planned."""
        return (*BLOCKS, *(block for block, on in zip(DOC_BLOCKS, (self.contrast_doc_query, self.contrast_doc_negatives)) if on))


@contextlib.contextmanager
def exact_float32_matmul():
    """Full float32 products inside (no TF32 on CUDA, no reduced precision on the CPU), whatever the
    caller's script set: TF32 would move similarities by ~1e-3 and flip mask entries."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def false_negative_mask(guide_sim, threshold, margin_strategy: str, margin: float):
    """True where a candidate is a false negative: its guide similarity beats the row's threshold.

    The one mask rule: stage 1, `gist plan`, planning and the report call it, on numpy arrays or
    torch tensors alike (the same float32 arithmetic).

    Args:
        guide_sim: guide cosine similarities, rows = anchors (or positives for `pp`).
        threshold: t_i = g(a_i, p_i), broadcastable against `guide_sim` (shape (..., G, 1)).
        margin_strategy: "absolute" (mask iff g > t - m) or "relative" (mask iff g > t - |t| * m).
        margin: m.
    """
    if margin_strategy == "absolute":
        return guide_sim > threshold - np.float32(margin)
    if margin_strategy == "relative":
        return guide_sim > threshold - abs(threshold) * np.float32(margin)
    raise GistError(f"--margin-strategy {margin_strategy}: use one of {', '.join(MARGIN_STRATEGIES)}")


def _gather(source, ids: list[np.ndarray], device: str) -> list[torch.Tensor]:
    """float32 vectors of each id array in `ids` (any shape) on `device`: from a tensor already there
    (indexed on the device), or from the stored (memory-mapped) array, widened from float16 when
    stored so. From the map the arrays are gathered on parallel threads (numpy copies without the
    GIL): on a CPU the random reads cost more than the products (bench/mask_kernel.py)."""
    if isinstance(source, torch.Tensor):
        return [source[torch.from_numpy(i).to(source.device)].float() for i in ids]
    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        return [torch.from_numpy(vectors).to(device) for vectors in pool.map(functools.partial(gather, source), ids)]


def guide_similarities(source, data: TrainingData, batches: np.ndarray, params: PlanParams, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The guide similarities of each enabled block for a stack of batches (nb, G) of example ids, on
    `device`, and "threshold": t_i (nb, G, 1).

    `source`: the stored embeddings (numpy / memory map) or a tensor of them on `device`. The
    similarities are batched matrix products in torch (every CPU core, or the GPU), in full float32.
    Blocks: "ap" (nb, G, G), "aa", "pp" (when the plan contrasts them), "an" (nb, G, k*G); "pa" (nb, G, G)
    and "pn" (nb, G, k*G) when the plan asks for the document-side blocks.
    """
    # Negative columns in column-major order: column c * G + j is negative c of example j. Each role's
    # vectors are its view's (pipeline.views): anchors as queries, positives and negatives as documents.
    rows = data.rows
    anchors, positives, negatives = _gather(  # (nb, G, d), (nb, G, d), (nb, k * G, d)
        source, [rows.anchor[batches], rows.positive[batches], negative_columns(rows.negative, batches)], device
    )
    with exact_float32_matmul():
        sims = {"ap": torch.bmm(anchors, positives.transpose(1, 2))}
        # t_i from the diagonal of the same product, as GISTEmbedLoss does: a candidate identical to the
        # positive then has g == t exactly and is kept (strict >), not masked by float rounding.
        sims["threshold"] = sims["ap"].diagonal(dim1=1, dim2=2).unsqueeze(-1)
        if params.contrast_anchors:
            sims["aa"] = torch.bmm(anchors, anchors.transpose(1, 2))
        if params.contrast_positives:
            sims["pp"] = torch.bmm(positives, positives.transpose(1, 2))
        sims["an"] = torch.bmm(anchors, negatives.transpose(1, 2))
        if params.contrast_doc_query:  # g(p_i, a_j) = g(a_j, p_i): the same products as ap, transposed (t_i on its diagonal)
            sims["pa"] = sims["ap"].transpose(1, 2)
        if params.contrast_doc_negatives:
            sims["pn"] = torch.bmm(positives, negatives.transpose(1, 2))
    return sims


def rule_masks(sims: dict[str, torch.Tensor], margin_strategy: str, margin: float) -> dict[str, torch.Tensor]:
    """The guide rule applied to `guide_similarities`' blocks: {"ap", "aa", "pp", "an"} boolean masks
    (and "pa", "pn" when computed); the true pairs ap[i, i] and pa[i, i] are never masked, a disabled
    aa/pp block is all False."""
    masks = {block: false_negative_mask(sims[block], sims["threshold"], margin_strategy, margin) for block in ALL_BLOCKS if block in sims}
    for block in ("ap", "pa"):
        if block in masks:
            masks[block].diagonal(dim1=1, dim2=2).fill_(False)
    for block in ("aa", "pp"):
        if block not in masks:
            masks[block] = torch.zeros_like(masks["ap"])
    return masks


def negative_columns(negative_ids: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """The `an` block's candidates (text ids, or stored rows) of `negative_ids` (N, k), (nb, k * G):
    column c * G + j is negative c of example j."""
    return negative_ids[batches].transpose(0, 2, 1).reshape(len(batches), -1)


def duplicate_masks(data: TrainingData, batches: np.ndarray, params: PlanParams, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Candidates whose text is the row's own anchor or positive text (equal text ids), per block,
    as `rule_masks` shapes them: never true negatives. The true pairs ap[i, i], pa[i, i] are not ones;
    disabled aa/pp blocks are all False, unplanned document-side blocks absent."""
    ids = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in
           (("a", data.anchor_ids[batches]), ("p", data.positive_ids[batches]), ("n", negative_columns(data.negative_ids, batches)))}
    own_a, own_p = ids["a"].unsqueeze(-1), ids["p"].unsqueeze(-1)  # (nb, G, 1): row i's texts

    def same_text(candidates: torch.Tensor) -> torch.Tensor:
        candidates = candidates.unsqueeze(1)  # (nb, 1, cols)
        return (candidates == own_a) | (candidates == own_p)

    off = torch.zeros((len(batches), batches.shape[1], batches.shape[1]), dtype=torch.bool, device=device)
    masks = {"ap": same_text(ids["p"])}
    masks["ap"].diagonal(dim1=1, dim2=2).fill_(False)
    masks["aa"] = same_text(ids["a"]) if params.contrast_anchors else off
    masks["pp"] = same_text(ids["p"]) if params.contrast_positives else off
    masks["an"] = same_text(ids["n"])
    if params.contrast_doc_query:
        masks["pa"] = same_text(ids["a"])
        masks["pa"].diagonal(dim1=1, dim2=2).fill_(False)
    if params.contrast_doc_negatives:
        masks["pn"] = same_text(ids["n"])
    return masks


def plan_masks(sims: dict[str, torch.Tensor], params: PlanParams, duplicates: dict[str, torch.Tensor] | None) -> tuple[dict, dict]:
    """The plan's masks from `guide_similarities`: the guide rule's, OR-ed with `duplicates` (the
    batches' `duplicate_masks`) when `params.mask_duplicates`; and, per block, the entries that duplicate
    masking added to the guide rule's."""
    masks = rule_masks(sims, params.margin_strategy, params.margin)
    if not params.mask_duplicates:
        return masks, {block: torch.zeros_like(mask) for block, mask in masks.items()}
    added = {block: duplicates[block] & ~masks[block] for block in masks}
    return {block: masks[block] | duplicates[block] for block in masks}, added


def mask_parts(source, data: TrainingData, batches: np.ndarray, params: PlanParams, device: str = "cpu"):
    """`plan_masks` of a stack of batches (nb, G): (the plan's masks, the entries duplicate masking added)."""
    sims = guide_similarities(source, data, batches, params, device)
    duplicates = duplicate_masks(data, batches, params, sims["ap"].device) if params.mask_duplicates else None
    return plan_masks(sims, params, duplicates)


def device_masks(source, data: TrainingData, batches: np.ndarray, params: PlanParams, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The plan's masks of each block for a stack of batches (nb, G): the guide rule's, and the exact
    duplicates' when `params.mask_duplicates`: {"ap": (nb, G, G), "aa", "pp", "an": (nb, G, k*G)} on `device`."""
    return mask_parts(source, data, batches, params, device)[0]


def batch_masks(embeddings: np.ndarray, data: TrainingData, batches: np.ndarray, params: PlanParams, device: str = "cpu") -> dict[str, np.ndarray]:
    """`device_masks` as dense numpy arrays (for the report and tests)."""
    return {block: mask.cpu().numpy() for block, mask in device_masks(embeddings, data, batches, params, device).items()}


def masks_source(embeddings: np.ndarray, device: str):
    """What the masks gather from: on a GPU with room for them, the embeddings copied there once (the
    gathers then run in GPU memory); on the CPU, the memory map itself (no copy)."""
    if not str(device).startswith("cuda"):
        return embeddings
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return torch.from_numpy(np.ascontiguousarray(embeddings)).to(device) if embeddings.nbytes < free // 2 else embeddings


def masks_schema(meta: dict, blocks: tuple[str, ...] = BLOCKS) -> pa.Schema:
    fields = [("epoch", pa.int32()), ("step", pa.int64()), ("example_ids", pa.list_(pa.int64()))]
    fields += [(block, pa.list_(pa.int32())) for block in blocks]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def _sparse(mask: torch.Tensor) -> pa.ListArray:
    """(nb, rows, cols) bool tensor -> list<int32> of flat masked positions per batch, found on the
    mask's device (only the positions travel). Offsets restart in every row group and a chunk holds
    at most max(CHUNK_ENTRIES, one block) entries, so they fit int32."""
    flat = mask.reshape(len(mask), -1)
    batch_of, position = flat.nonzero(as_tuple=True)  # row-major order, as numpy's
    counts = torch.bincount(batch_of, minlength=len(flat)).cpu().numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(position.to(torch.int32).cpu().numpy()))


def _chunk_table(source, data: TrainingData, batches: np.ndarray, first: int, steps: int, params: PlanParams,
                 schema: pa.Schema, device: str) -> tuple[pa.Table, dict]:
    """One row group of masks.parquet: the planned batches `batches` starting at plan row `first`."""
    g = batches.shape[1]
    masks, added = mask_parts(source, data, batches, params, device)
    step = np.arange(first, first + len(batches), dtype=np.int64)
    columns = {
        "epoch": pa.array((step // steps).astype(np.int32)),
        "step": pa.array(step),
        "example_ids": pa.ListArray.from_arrays(pa.array(np.arange(len(batches) + 1, dtype=np.int32) * g), pa.array(batches.reshape(-1))),
    }
    blocks = params.stored_blocks()
    for block in blocks:
        columns[block] = _sparse(masks[block])
    counts = {block: 0 for block in COUNTS}
    counts.update({block: len(columns[block].values) for block in blocks})
    counts.update({f"{block}_duplicates": int(added[block].sum()) for block in blocks})
    return pa.table(columns, schema=schema), counts


def write_masks(out_path: Path, embeddings: np.ndarray, data: TrainingData, plan: np.ndarray, params: PlanParams, meta: dict,
                device: str = "cpu", rank: int = 0, world_size: int = 1) -> dict | None:
    """Compute the masks of every planned batch (torch on `device`) and write `masks.parquet`
    (atomically, in row groups). Returns counts of masked entries per block (and, as "BLOCK_duplicates",
    of those that only duplicate masking masked), for the manifest and reports.

    Under torchrun (world_size > 1) rank r computes row groups r, r + W, ... into part files and
    rank 0 joins them in order (the bytes one process writes); ranks other than 0 return None.
    """
    from pipeline.guide import barrier

    epochs, steps, g = plan.shape
    check_sparse_sizes(g, data.num_negatives)
    batches = plan.reshape(-1, g)
    per_chunk = chunk_batches(g, data.num_negatives, params)
    starts = range(0, len(batches), per_chunk)
    schema = masks_schema({**meta, "format_version": FORMAT_VERSION, "plan": asdict(params), "num_negatives": data.num_negatives},
                          params.stored_blocks())
    counts = {key: 0 for key in COUNTS}
    parts = out_path.parent / MASK_PARTS
    source = masks_source(embeddings, device)
    if world_size > 1 and rank == 0:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
    barrier(world_size)
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(Progress(transient=True))
        task = progress.add_task("masks" + (f" (rank {rank})" if world_size > 1 else ""), total=len(batches))
        if world_size == 1:
            tmp = stack.enter_context(atomic_path(out_path))
            writer = stack.enter_context(pq.ParquetWriter(tmp, schema))
        for number, start in enumerate(starts):
            if number % world_size != rank:
                continue
            table, chunk_counts = _chunk_table(source, data, batches[start : start + per_chunk], start, steps, params, schema, device)
            if world_size == 1:
                writer.write_table(table)
            else:
                pq.write_table(table, parts / f"part-{number:06d}.parquet")
            counts = {key: counts[key] + chunk_counts[key] for key in COUNTS}
            progress.advance(task, table.num_rows)
            del table
            pa.default_memory_pool().release_unused()  # mimalloc keeps freed row groups otherwise: memory would grow with the plan
    if world_size == 1:
        return counts
    import torch.distributed as dist

    totals = torch.tensor([counts[key] for key in COUNTS], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(totals)
    barrier(world_size)
    if rank != 0:
        return None
    with atomic_path(out_path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for number in range(len(starts)):
            writer.write_table(pq.read_table(parts / f"part-{number:06d}.parquet", schema=schema))
    shutil.rmtree(parts)
    return dict(zip(COUNTS, totals.tolist()))


class PlannedMasks:
    """The planned batches and their masks in `masks.parquet`, read lazily.

    Opening reads only the file's metadata: `meta` (plan parameters, dataset fingerprint, guide),
    `params`, `num_batches`. The training path (sampler, loss) reads the row group holding the batch
    it needs (one cached per column), so a training process never holds the whole plan or all the
    masks. Plan row r is the batch of global step r; `cursor` follows the trainer's step, so the
    loss can check that each batch is the one planned for it. `plan` (epochs, steps, G) and
    `batches` (epochs * steps, G) read the whole plan, for tools and tests.
    """

    def __init__(self, path: Path):
        path = Path(path)
        if not path.is_file():
            raise GistError(f"{path}: no such masks file")
        try:
            self._file = pq.ParquetFile(path)
            meta = json.loads(self._file.schema_arrow.metadata[METADATA_KEY])
        except (pa.ArrowException, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise GistError(f"{path}: not a readable gist masks file; truncated or corrupt? ({str(e).splitlines()[0][:120]})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise GistError(f"{path}: masks format version {meta.get('format_version')}, this gist reads {FORMAT_VERSION}; re-plan with `gist plan`")
        self.path, self.meta = path, meta
        self.params = PlanParams(**meta["plan"])
        sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_batches = int(self._starts[-1])
        self.steps_per_epoch = self.num_batches // self.params.epochs
        self._cached: dict[str, tuple[int, pa.ListArray]] = {}

    @functools.cached_property
    def cursor(self):
        """The trainer-step cursor of this masks file (`pipeline.cursor.plan_cursor`): one per file in a
        process, shared by every PlannedMasks of it (the sampler's, and one a loss opened from the
        path). Made on first use: planning, mining and reports never import transformers."""
        from pipeline.cursor import plan_cursor

        return plan_cursor(self.path)

    def __reduce__(self):
        # Pickled (e.g. in the trainer's training_args.bin) as its path: no open file, no cached row groups.
        return (PlannedMasks, (self.path,))

    @property
    def num_negatives(self) -> int:
        return self.meta["num_negatives"]

    @property
    def planned_blocks(self) -> tuple[str, ...]:
        """The blocks whose stored masks hold the guide's verdicts (PlanParams.planned_blocks)."""
        return self.params.planned_blocks(self.num_negatives)

    def _chunks(self, column: str, start: int, stop: int):
        """The list arrays of `column` for plan rows start..stop, row group by row group (each one's
        offsets restart, so no combined array overflows int32); the last group read is cached."""
        group = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            first, end = int(self._starts[group]), int(self._starts[group + 1])
            cached = self._cached.get(column)
            if cached is None or cached[0] != group:
                cached = (group, self._file.read_row_group(group, columns=[column]).column(0).combine_chunks())
                self._cached[column] = cached
            take = min(stop, end) - start
            yield cached[1].slice(start - first, take)
            start, group = start + take, group + 1

    def batch_rows(self, start: int, stop: int) -> np.ndarray:
        """Example ids of plan rows start..stop, (stop - start, G) int64."""
        ids = [chunk.flatten().to_numpy() for chunk in self._chunks("example_ids", start, stop)]
        return np.concatenate(ids).reshape(-1, self.params.batch_size) if ids else np.zeros((0, self.params.batch_size), np.int64)

    @property
    def batches(self) -> np.ndarray:
        return self.batch_rows(0, self.num_batches)

    @property
    def plan(self) -> np.ndarray:
        return self.batches.reshape(self.params.epochs, -1, self.params.batch_size)

    def due_row(self, example_ids: np.ndarray) -> int:
        """The plan row of the trainer's current step, after checking that `example_ids` is its batch."""
        row = self.cursor.step
        if row >= self.num_batches or not np.array_equal(np.asarray(example_ids, dtype=np.int64), self.batch_rows(row, row + 1)[0]):
            raise GistError(
                f"batch with example ids {list(example_ids)[:6]}... is not the batch planned for step {row + 1} in {self.path}; "
                "train with the planned batch sampler and the same data, with `masks.cursor` among the trainer's callbacks "
                "(an eval_dataset's batches have no masks: evaluate with an evaluator)"
            )
        return row

    def positions(self, block: str, row: int) -> np.ndarray:
        """Flat positions `i * ncols + j` of the masked entries of `block` in plan row `row`."""
        (chunk,) = self._chunks(block, row, row + 1)
        return chunk.flatten().to_numpy()

    def dense(self, block: str, start: int, stop: int, rows: int, cols: int) -> np.ndarray:
        """Boolean (stop - start, rows, cols) masks of `block` for plan rows start..stop."""
        dense = np.zeros((stop - start, rows * cols), dtype=bool)
        first = 0
        for chunk in self._chunks(block, start, stop):
            offsets = chunk.offsets.to_numpy()
            batch = first + np.repeat(np.arange(len(chunk)), np.diff(offsets))
            dense[batch, chunk.values.to_numpy()[offsets[0] : offsets[-1]]] = True
            first += len(chunk)
        return dense.reshape(stop - start, rows, cols)


def check_planned_from(masks: "PlannedMasks", guide_manifest: dict, guide_dir: Path) -> None:
    """Refuse masks planned from other guide vectors than `guide_dir` holds now: another guide's, or
    the same guide's under other views (a pass replaced with --overwrite and other --guide-prompts)."""
    guide = guide_manifest["guide"]
    if masks.meta.get("guide_sha256") != guide["sha256"] or masks.meta.get("guide_views") != guide["views"]:
        raise GistError(f"{masks.path} was planned from other guide vectors than {guide_dir} holds now (another guide, or other --guide-prompts); "
                        f"re-plan with `gist plan {guide_dir}`")


def write_plan_masks(out_dir: Path, embeddings: np.ndarray, data: TrainingData, plan: np.ndarray, params: PlanParams, guide: dict,
                     device: str = "cpu", rank: int = 0, world_size: int = 1) -> dict | None:
    """Write the masks of a plan (from pipeline.plan) to `out_dir`, computed on `device` (under
    torchrun, a share per rank); returns the plan summary for the manifest (None on ranks other than
    0). `guide` is the guide's identity (name, sha256) as recorded in the manifest.
    """
    meta = {
        "dataset_fingerprint": data.fingerprint, "num_examples": data.num_examples, "columns": data.columns,
        "guide": guide["name"], "guide_sha256": guide["sha256"], "guide_views": guide["views"],
    }
    counts = write_masks(out_dir / MASKS, embeddings, data, plan, params, meta, device, rank, world_size)
    if counts is None:
        return None
    epochs, steps, g = plan.shape
    totals = {"ap": g * (g - 1), "aa": g * g, "pp": g * g, "an": g * g * data.num_negatives, "pa": g * (g - 1), "pn": g * g * data.num_negatives}
    blocks = params.stored_blocks()
    return {
        "params": asdict(params),
        "masks_device": device,
        "steps_per_epoch": steps,
        "num_batches": epochs * steps,
        "masked_entries": {b: counts[b] for b in blocks},
        "masked_fraction": {b: counts[b] / (totals[b] * epochs * steps) if totals[b] else 0.0 for b in blocks},
        # Entries masked because the candidate's text is the row's own anchor or positive text, that the
        # guide rule alone keeps (what `mask_duplicates` changes against GISTEmbedLoss).
        "duplicate_entries": {b: counts[f"{b}_duplicates"] for b in blocks},
    }

"""The false-negative mask rule and `masks.parquet`, the contract between stage 1 and stage 2.

For planned batch of G examples, guide similarities g and thresholds t_i = g(a_i, p_i), a candidate
x of row i is masked iff g(a_i, x) > t_i - m (absolute) or g(a_i, x) > t_i - |t_i| * m (relative),
exactly as sentence-transformers `GISTEmbedLoss`. Blocks: `ap` (a_i vs p_j; the true pair (i, i)
is never masked), `aa` (a_i vs a_j), `pp` (p_i vs p_j), `an` (a_i vs negative c of example j at
column c * G + j). Each block is stored as the flat positions `i * ncols + j` of its masked entries.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.progress import Progress
from threadpoolctl import threadpool_limits

from pipeline import FORMAT_VERSION, GistError
from pipeline.artifacts import atomic_path
from pipeline.data import TrainingData

MASKS = "masks.parquet"
BLOCKS = ("ap", "aa", "pp", "an")
BATCHES_PER_GROUP = 1024
METADATA_KEY = b"gist"


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


def false_negative_mask(guide_sim: np.ndarray, threshold: np.ndarray, margin_strategy: str, margin: float) -> np.ndarray:
    """True where a candidate is a false negative: its guide similarity beats the row's threshold.

    Args:
        guide_sim: guide cosine similarities, rows = anchors (or positives for `pp`).
        threshold: t_i = g(a_i, p_i), broadcastable against `guide_sim` (shape (..., G, 1)).
        margin_strategy: "absolute" (mask iff g > t - m) or "relative" (mask iff g > t - |t| * m).
        margin: m.
    """
    if margin_strategy == "absolute":
        return guide_sim > threshold - np.float32(margin)
    if margin_strategy == "relative":
        return guide_sim > threshold - np.abs(threshold) * np.float32(margin)
    raise GistError(f"--margin-strategy {margin_strategy}: use absolute or relative")


def batch_masks(embeddings: np.ndarray, data: TrainingData, batches: np.ndarray, params: PlanParams) -> dict[str, np.ndarray]:
    """Dense boolean masks of each block for a stack of batches (nb, G) of example ids.

    Returns {"ap": (nb, G, G), "aa": ..., "pp": ..., "an": (nb, G, k*G)}; disabled blocks are all False.
    """
    nb, g = batches.shape
    anchors = embeddings[data.anchor_ids[batches]]  # (nb, G, d)
    positives = embeddings[data.positive_ids[batches]]
    ap = anchors @ positives.transpose(0, 2, 1)
    # t_i from the diagonal of the same product, as GISTEmbedLoss does: a candidate identical to the
    # positive then has g == t exactly and is kept (strict >), not masked by float rounding.
    threshold = ap[:, np.arange(g), np.arange(g)][..., None]

    def rule(sim: np.ndarray) -> np.ndarray:
        return false_negative_mask(sim, threshold, params.margin_strategy, params.margin)

    masks = {"ap": rule(ap)}
    masks["ap"][:, np.arange(g), np.arange(g)] = False
    off = np.zeros((nb, g, g), dtype=bool)
    masks["aa"] = rule(anchors @ anchors.transpose(0, 2, 1)) if params.contrast_anchors else off
    masks["pp"] = rule(positives @ positives.transpose(0, 2, 1)) if params.contrast_positives else off
    # Negative columns in column-major order: column c * G + j is negative c of example j.
    negatives = embeddings[data.negative_ids[batches].transpose(0, 2, 1)].reshape(nb, -1, embeddings.shape[1])
    masks["an"] = rule(anchors @ negatives.transpose(0, 2, 1))
    return masks


def masks_schema(meta: dict) -> pa.Schema:
    fields = [("epoch", pa.int32()), ("step", pa.int64()), ("example_ids", pa.list_(pa.int64()))]
    fields += [(block, pa.list_(pa.int32())) for block in BLOCKS]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def _sparse(dense: np.ndarray) -> pa.ListArray:
    """(nb, rows, cols) bool -> list<int32> of flat masked positions per batch."""
    flat = dense.reshape(len(dense), -1)
    batch_of, position = np.nonzero(flat)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(batch_of, minlength=len(flat)))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(position.astype(np.int32)))


def write_masks(out_path: Path, embeddings: np.ndarray, data: TrainingData, plan: np.ndarray, params: PlanParams, meta: dict) -> dict:
    """Compute the masks of every planned batch and write `masks.parquet` (atomically, in row groups).

    Returns counts of masked entries per block, for the manifest and reports.
    """
    epochs, steps, g = plan.shape
    batches = plan.reshape(-1, g)
    schema = masks_schema({**meta, "format_version": FORMAT_VERSION, "plan": asdict(params), "num_negatives": data.num_negatives})
    counts = {block: 0 for block in BLOCKS}
    # The per-batch products are tiny (G x dim x G): multi-threaded BLAS spends more time waking
    # threads than multiplying (100k examples x 768 dims: 9-32 s threaded, 1.4 s on one thread).
    with atomic_path(out_path) as tmp, pq.ParquetWriter(tmp, schema) as writer, Progress(transient=True) as progress, threadpool_limits(1):
        task = progress.add_task("masks", total=len(batches))
        for start in range(0, len(batches), BATCHES_PER_GROUP):
            chunk = batches[start : start + BATCHES_PER_GROUP]
            dense = batch_masks(embeddings, data, chunk, params)
            step = np.arange(start, start + len(chunk), dtype=np.int64)
            columns = {
                "epoch": pa.array((step // steps).astype(np.int32)),
                "step": pa.array(step),
                "example_ids": pa.ListArray.from_arrays(pa.array(np.arange(len(chunk) + 1, dtype=np.int32) * g), pa.array(chunk.reshape(-1))),
            }
            for block in BLOCKS:
                columns[block] = _sparse(dense[block])
                counts[block] += int(dense[block].sum())
            writer.write_table(pa.table(columns, schema=schema))
            progress.advance(task, len(chunk))
    return counts


class PlannedMasks:
    """The planned batches and their masks, read from `masks.parquet`, looked up by example ids.

    `meta` holds the plan parameters, dataset fingerprint and guide; `plan` is (epochs, steps, G).
    """

    def __init__(self, path: Path):
        path = Path(path)
        if not path.is_file():
            raise GistError(f"{path}: no such masks file")
        try:
            table = pq.read_table(path)
            meta = json.loads(table.schema.metadata[METADATA_KEY])
        except (pa.ArrowException, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise GistError(f"{path}: not a readable gist masks file; truncated or corrupt? ({str(e).splitlines()[0][:120]})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise GistError(f"{path}: masks format version {meta.get('format_version')}, this gist reads {FORMAT_VERSION}; re-plan with `gist plan`")
        self.path, self.meta = path, meta
        self.params = PlanParams(**meta["plan"])
        g = self.params.batch_size
        example_ids = table.column("example_ids").combine_chunks()
        self.batches = example_ids.values.to_numpy().reshape(-1, g)
        self.plan = self.batches.reshape(self.params.epochs, -1, g)
        self.blocks = {block: table.column(block).combine_chunks() for block in BLOCKS}
        self._row_of = {batch.tobytes(): row for row, batch in enumerate(self.batches)}

    @property
    def num_negatives(self) -> int:
        return self.meta["num_negatives"]

    def row_of(self, example_ids: np.ndarray) -> int:
        """The plan row of a batch given its example ids in order; an unplanned batch is an error."""
        row = self._row_of.get(np.asarray(example_ids, dtype=np.int64).tobytes())
        if row is None:
            raise GistError(
                f"batch with example ids {list(example_ids)[:6]}... is not in the plan of {self.path}; "
                "train with the planned batch sampler (gist train) and the same data"
            )
        return row

    def dense(self, row: int, block: str, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean (rows, cols) mask of `block` for plan row `row`."""
        positions = self.blocks[block][row].values.to_numpy()
        mask = torch.zeros(rows * cols, dtype=torch.bool)
        mask[torch.from_numpy(positions.astype(np.int64))] = True
        return mask.view(rows, cols).to(device)


def write_plan_masks(out_dir: Path, embeddings: np.ndarray, data: TrainingData, plan: np.ndarray, params: PlanParams, guide: dict) -> dict:
    """Write the masks of a plan (from pipeline.plan) to `out_dir`; returns the plan summary for the manifest.

    `guide` is the guide's identity (name, weights_sha256) as recorded in the manifest.
    """
    meta = {
        "dataset_fingerprint": data.fingerprint, "num_examples": data.num_examples, "columns": data.columns,
        "guide": guide["name"], "guide_sha256": guide["weights_sha256"],
    }
    counts = write_masks(out_dir / MASKS, embeddings, data, plan, params, meta)
    epochs, steps, g = plan.shape
    totals = {"ap": g * (g - 1), "aa": g * g, "pp": g * g, "an": g * g * data.num_negatives}
    return {
        "params": asdict(params),
        "steps_per_epoch": steps,
        "num_batches": epochs * steps,
        "masked_entries": counts,
        "masked_fraction": {b: counts[b] / (totals[b] * epochs * steps) if totals[b] else 0.0 for b in BLOCKS},
    }

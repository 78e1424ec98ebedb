"""The experiment's definition: data, models, hyper-parameters, variants and seeds.

Everything here was fixed before any result of this experiment was seen; nothing is tuned on a
test split. The full setting is the CPU-sized one: 2204 training pairs (every SciFact train
claim -> cited abstract, every SciTail pair, 449 SNLI pairs in whole premise groups), batches of 32,
one planned epoch (68 steps), student max_seq_length 64 (training and evaluation), guide 128.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import ROOT, SHARED


@dataclass(frozen=True)
class Variant:
    """One training signal: the contrastive loss, on filtered data or not, with distillation or not."""

    name: str
    loss: str  # pipeline.train LOSSES: mnrl, unguided, guided
    filtered: bool = False
    distill: str | None = None
    distill_weight: float = 1.0
    dedup: bool = False  # masks planned with mask_duplicates (exact duplicates by text id); otherwise GISTEmbedLoss's exact rule
    guide_prompts: str | None = None  # stage 1's --guide-prompts (its own pass); None: the guide's own prompts (mpnet: none)
    hardness_mode: str | None = None  # MNRL's hardness weighting (TrainSettings), the same for the guided loss and MNRL
    hardness_strength: float = 0.0


VARIANTS = {
    v.name: v
    for v in (
        Variant("mnrl", "mnrl"),
        Variant("unguided", "unguided"),
        Variant("guided", "guided"),
        Variant("guided+filter", "guided", filtered=True),
        Variant("guided+distill", "guided", distill="kl"),
        Variant("guided+dedup", "guided", dedup=True),
        # E5-style strings given to a guide trained without prompts (all-mpnet-base-v2): what a prompt costs or buys
        Variant("guided+e5-guide", "guided", guide_prompts="anchor=query: ,positive=passage: ,negative=passage: "),
        # Hardness weighting of in-batch negatives at Lan et al. 2025's alpha (9; MNRL's docstring), set before any result:
        # does guidance still help when hard in-batch negatives weigh more (and false negatives with them)?
        Variant("mnrl+hardness", "mnrl", hardness_mode="in_batch_negatives", hardness_strength=9.0),
        Variant("guided+hardness", "guided", hardness_mode="in_batch_negatives", hardness_strength=9.0),
    )
}
SEEDS = (0, 1, 2)


@dataclass
class Settings:
    mode: str
    student: str
    guide: str
    train_source: str
    sts: str
    beir: str
    selection: dict | None  # task -> "all" | at least this many rows (whole anchor groups); None: the first head_rows rows
    student_max_seq_length: int
    guide_max_seq_length: int | None
    head_rows: int | None = None
    batch_size: int = 32
    epochs: int = 1
    plan_seed: int = 0
    stage1_strategy: str = "by-task"  # the guide pass's own plan; other plans are re-planned from it
    margin_strategy: str = "absolute"
    margin: float = 0.0
    contrast_anchors: bool = True
    contrast_positives: bool = True
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"
    temperature: float = 0.01
    max_steps: int = -1  # -1: every planned step
    filter_top_k: int = 10
    filter_among: str = "positives"
    encode_batch_size: int = 64
    data_seed: int = 0
    notes: list = field(default_factory=list)

    def key(self, *parts) -> str:
        """A hash of the settings and `parts` (for --resume): a phase is reused only under the same ones."""
        d = asdict(self)
        d.pop("notes")
        return hashlib.sha256(json.dumps([d, parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_settings(quick: bool, models: Path) -> Settings:
    if quick:
        return Settings(
            mode="quick",
            student=str(SHARED / "models" / "tiny-student"),
            guide=str(SHARED / "models" / "tiny-guide-static"),
            train_source=str(ROOT / "data" / "train.parquet"),
            sts=str(ROOT / "data" / "stsb_dev.parquet"),
            beir=str(ROOT / "data" / "scifact"),
            selection=None,
            head_rows=640,
            student_max_seq_length=64,
            guide_max_seq_length=None,
            max_steps=8,
            notes=["quick mode: tiny random-init student and a static guide; a wiring check, not a quality result"],
        )
    return Settings(
        mode="full",
        student=str(models / "all-MiniLM-L6-v2"),
        guide=str(models / "all-mpnet-base-v2"),
        train_source=str(SHARED / "data" / "train_pairs.parquet"),
        sts=str(SHARED / "data" / "sts" / "stsb_test.parquet"),
        beir=str(SHARED / "data" / "scifact"),
        selection={"scifact": "all", "scitail": "all", "snli": 448},
        student_max_seq_length=64,
        guide_max_seq_length=128,
        notes=[
            "settings fixed before any result was seen (GISTEmbedLoss / common fine-tuning defaults; filter top-10 and "
            "distillation weight 1.0 chosen a priori); nothing tuned on a test split",
            "CPU budget: one planned epoch, student max_seq_length 64 in training and evaluation (SciFact abstracts "
            "truncated to their first sentences), guide max_seq_length 128",
            "scifact rows are SciFact train claims only; the 300 SciFact test queries never appear in training",
            "seeds are trainer seeds (dropout, the distillation projection if any); the plan is the same for every seed",
        ],
    )


def build_training_set(s: Settings, work: Path) -> tuple[Path, dict]:
    """Write the training Parquet (full: a documented selection of train_pairs) to WORK/train.parquet."""
    if s.selection is None:
        table = pq.read_table(s.train_source).slice(0, s.head_rows)
    else:
        import pandas as pd

        pairs = pd.read_parquet(s.train_source)
        rng = np.random.default_rng(s.data_seed)
        parts = []
        for task, wanted in s.selection.items():
            rows = pairs[pairs.task == task]
            if wanted == "all":
                parts.append(rows)
                continue
            # Whole groups of premises with several entailment hypotheses, until >= `wanted` rows.
            sizes = rows.groupby("anchor", sort=True).size()
            groups = sizes[sizes >= 2].index.to_numpy()
            chosen, total = [], 0
            for anchor in groups[rng.permutation(len(groups))]:
                if total >= wanted:
                    break
                chosen.append(anchor)
                total += sizes[anchor]
            parts.append(rows[rows.anchor.isin(set(chosen))])
        selected = pd.concat(parts)[["anchor", "positive", "task"]]
        selected = selected.iloc[rng.permutation(len(selected))].reset_index(drop=True)
        table = pa.Table.from_pandas(selected, preserve_index=False)
    path = work / "train.parquet"
    if not path.exists() or not pq.read_table(path).equals(table):  # rewritten only when it changes: its mtime stays
        pq.write_table(table, path)
    tasks = table.column("task").to_pylist() if "task" in table.column_names else []
    return path, {
        "path": str(path), "source": s.train_source, "rows": table.num_rows, "columns": table.column_names,
        "rows_per_task": {t: tasks.count(t) for t in sorted(set(tasks))},
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "selection": s.selection if s.selection is not None else f"first {s.head_rows} rows",
    }

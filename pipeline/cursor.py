"""The plan cursor: which planned batch the trainer trains next.

A module of its own so that `masks.parquet`'s reader (pipeline.masks, the artifact contract) and
the trainer's wiring (pipeline.train) both use it without importing each other.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from transformers import TrainerCallback

from pipeline import GistError


class PlanCursor(TrainerCallback):
    """The plan row the trainer trains next: its global step (one planned batch per optimizer step).

    The planned batch sampler and the loss read `step` from here rather than trusting the epoch the
    trainer hands to samplers: on resume under torchrun that epoch never reaches the sampler
    (SkipBatchSampler -> BatchSamplerShard -> sampler), which then silently replays epoch 0. Add
    `masks.cursor` to the trainer's callbacks (`build_trainer` does); tests set `step` by hand.
    """

    def __init__(self) -> None:
        self.step = 0

    def _follow(self, args, state, control, **kwargs):
        self.step = state.global_step

    on_epoch_begin = on_step_begin = _follow

    def on_train_begin(self, args, state, control, **kwargs):
        if args.gradient_accumulation_steps != 1:
            raise GistError(f"gradient_accumulation_steps {args.gradient_accumulation_steps}: a planned batch is one optimizer step; plan larger batches (use CachedGuidedMaskLoss for memory) instead")
        self._follow(args, state, control)


_CURSORS: weakref.WeakValueDictionary[Path, PlanCursor] = weakref.WeakValueDictionary()


def plan_cursor(masks_path: Path) -> PlanCursor:
    """The one PlanCursor of the masks file at `masks_path` in this process (by resolved path, kept
    while a PlannedMasks holds it): a loss opened from the path and the sampler given a PlannedMasks
    follow the same trainer step, whichever of them reached the trainer's callbacks."""
    key = Path(masks_path).resolve()
    cursor = _CURSORS.get(key)
    if cursor is None:
        cursor = _CURSORS[key] = PlanCursor()
    return cursor

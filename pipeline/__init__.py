"""gist: offline GISTEmbed guidance.

Stage 1 runs the guide once and stores its verdicts (false-negative masks) for a fixed batch plan;
stage 2 trains the student with those masks, without the guide. The names a training script needs
are importable from here (loaded on first use, so `import pipeline` stays light):

    from pipeline import GuidedMaskLoss, PlannedMasks, planned_dataset, planned_training_args
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Bumped whenever the layout of an artifact changes; stage 2 refuses other versions.
FORMAT_VERSION = 5


class GistError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


# name -> module that defines it
_EXPORTS = {
    "PlanParams": "pipeline.masks", "PlannedMasks": "pipeline.masks",
    "GuidedMaskLoss": "pipeline.loss", "CachedGuidedMaskLoss": "pipeline.loss",
    "GuidePass": "pipeline.stage1", "precompute_guide": "pipeline.stage1", "replan": "pipeline.stage1",
    "MiningParams": "pipeline.mine", "mine_from_pass": "pipeline.mine",
    "planned_dataset": "pipeline.train", "planned_training_args": "pipeline.train", "planned_batch_sampler": "pipeline.train",
    "TrainSettings": "pipeline.train", "train_student": "pipeline.train", "build_trainer": "pipeline.train",
    "make_static_student": "pipeline.static", "StaticGuidedMaskLoss": "pipeline.static", "CachedStaticGuidedMaskLoss": "pipeline.static",
}
__all__ = ["FORMAT_VERSION", "GistError", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")

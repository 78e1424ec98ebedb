"""The mask kernel's products run in full float32 whatever the caller's script set (issue 22 item 11):
TF32 on CUDA (or reduced-precision float32 matmuls on a CPU) moves guide similarities by ~1e-3."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.guide import load_guide_pass
from pipeline.masks import MASKS, PlannedMasks, device_masks


def test_mask_products_pin_full_float32_precision(guide_run, monkeypatch):
    _, data, embeddings = load_guide_pass(guide_run)
    batches = PlannedMasks(guide_run / MASKS).batch_rows(0, 2)
    seen, bmm = [], torch.bmm

    def recording_bmm(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # what `torch.backends.cuda.matmul.allow_tf32 = True`-style scripts set
    try:
        masks = device_masks(embeddings, data, batches, PlannedMasks(guide_run / MASKS).params)
        assert seen and set(seen) == {"highest"}, seen
        assert torch.get_float32_matmul_precision() == "medium"  # the caller's setting is restored
    finally:
        torch.set_float32_matmul_precision(saved)
    assert masks["ap"].shape == (2, 16, 16) and not np.any(masks["ap"].diagonal(dim1=1, dim2=2).numpy())

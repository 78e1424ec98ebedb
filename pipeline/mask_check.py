"""Stored masks against the mask rule recomputed here, with a rounding band (`gist report`, bench/gpu_check).

Masks made on a GPU (or with any other summation order of the same float32 products) are rounded
differently from the CPU's recomputation: an entry whose guide similarity lies within rounding of
its row's threshold can fall on either side of the strict ">". Such an entry is no integrity
problem. Every difference is therefore classed by the one mask rule itself: an entry is *near the
threshold* when moving its similarity by +-band changes the rule's decision; differences there are
rounding, the others are real (masks of another rule, guide or plan).

The band is the worst-case float32 error of the comparison: a dot product of two unit vectors of
dimension d summed in any order is within gamma_d = d * 2^-24 of its exact value (and so is the
threshold t_i, scaled by 1 + m under a relative margin). Two devices' results on opposite sides of
the boundary put the exact value within gamma_d * (2 + m) of it, and the similarity recomputed here
within twice that; hence band = 2 * gamma_d * (2 + m), m the margin for the relative rule, else 0
(1.8e-4 at d = 768). TF32 or 16-bit products are not float32 and can fall outside it, as they should:
the mask kernel pins full float32 precision.
"""

from __future__ import annotations

import numpy as np

from pipeline.masks import PlanParams, false_negative_mask

UNIT_ROUNDOFF = 2.0**-24  # float32


def rounding_band(dim: int, params: PlanParams) -> float:
    """Distance from a threshold within which float32 rounding may decide an entry (module docstring)."""
    margin = abs(params.margin) if params.margin_strategy == "relative" else 0.0
    return 2 * dim * UNIT_ROUNDOFF * (2 + margin)


def near_threshold(sim: np.ndarray, threshold: np.ndarray, params: PlanParams, band: float) -> np.ndarray:
    """True where the rule's decision changes when `sim` moves by +-`band` (`threshold`: (..., G, 1))."""
    above = false_negative_mask(sim + np.float32(band), threshold, params.margin_strategy, params.margin)
    return above & ~false_negative_mask(sim - np.float32(band), threshold, params.margin_strategy, params.margin)


def differences(stored: np.ndarray, recomputed: np.ndarray, sim: np.ndarray, threshold: np.ndarray, params: PlanParams, band: float) -> tuple[int, int]:
    """(real, near): entries where `stored` and `recomputed` masks differ, beyond the band of their
    threshold and within it. `sim`: the guide similarities of the entries, `threshold`: t_i (..., G, 1)."""
    differ = stored != recomputed
    if not differ.any():
        return 0, 0
    near = int((differ & near_threshold(sim, threshold, params, band)).sum())
    return int(differ.sum()) - near, near

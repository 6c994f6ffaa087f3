"""The options that shape metric values (recorded with every value they shaped)."""

from __future__ import annotations

from dataclasses import dataclass

BASELINES = ("zero", "blur")
MPRT_ORDERS = ("cascading", "independent")
#: MPRT passes (the map changes when the model is randomised) when the 95% interval of the
#: mean rank correlation after randomising every block lies below this
MPRT_THRESHOLD = 0.5


@dataclass(frozen=True)
class MetricOptions:
    """``steps`` and ``baseline`` shape deletion/insertion; ``road_noise`` and
    ``seed`` shape ROAD; ``box_threshold`` shapes the localisation IoU; ``topk``
    the top-k intersection; ``complexity_eps`` the effective complexity;
    ``flip_step`` (pixels per step) shapes pixel flipping; ``patch_size`` and
    ``regions`` region perturbation; ``corr_runs``, ``corr_subset`` and ``seed``
    the faithfulness correlation; ``seed`` and ``mprt_order`` (``cascading`` or
    ``independent``) shape MPRT."""

    steps: int = 20
    baseline: str = "zero"
    road_noise: float = 0.01
    seed: int = 0
    box_threshold: float = 0.2
    topk: int = 1000
    complexity_eps: float = 1e-5
    flip_step: int = 1
    patch_size: int = 8
    regions: int = 100
    corr_runs: int = 100
    corr_subset: int = 224
    mprt_order: str = "cascading"

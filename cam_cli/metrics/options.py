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
    ``seed`` shape ROAD; ``box_threshold`` shapes the localisation IoU; ``seed`` and
    ``mprt_order`` (``cascading`` or ``independent``) shape MPRT."""

    steps: int = 20
    baseline: str = "zero"
    road_noise: float = 0.01
    seed: int = 0
    box_threshold: float = 0.2
    mprt_order: str = "cascading"

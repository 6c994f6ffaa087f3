"""What ``camx evaluate`` is asked to do, and what a run did."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cam_cli.jobs.base import Tally
from cam_cli.metrics import DEFAULT_METRICS


@dataclass
class EvaluateConfig:
    """Everything ``camx evaluate`` is asked to do (the CLI's options, parsed).

    ``model`` and the fields after it override what the manifest records.
    """

    out_dir: Path
    metrics: Sequence[str] = DEFAULT_METRICS
    steps: int = 20
    baseline: str = "zero"
    road_noise: float = 0.01
    boxes_from: Path | None = None
    seed: int = 0
    box_threshold: float = 0.2
    #: a folder of PNG masks or COCO JSON with polygons, for the region metrics
    masks_from: Path | None = None
    topk: int = 1000
    complexity_eps: float = 1e-5
    flip_step: int = 1
    patch_size: int = 8
    regions: int = 100
    corr_runs: int = 100
    corr_subset: int = 224
    #: MPRT: ``cascading`` (from the top block down) or ``independent`` (one block at a time)
    mprt_order: str = "cascading"
    #: run metrics that would take more than ten times the deletion/insertion cost
    budget_ok: bool = False
    model: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    labels: Path | None = None
    input_size: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    output_key: str | None = None
    device: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    precision: str = "fp32"
    #: score with a model other than the run's on purpose; its metrics are kept apart
    with_other_model: bool = False


@dataclass
class EvaluateResult(Tally):
    """What a run did, counted in lines; ``as_dict`` is the ``--json`` output."""

    not_evaluated: int = 0
    passes: int = 0
    batches: int = 0
    metrics_file: str = ""
    summary_file: str = ""
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def passes_per_second(self) -> float:
        return self.passes / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "not_evaluated": self.not_evaluated,
            "seconds": round(self.seconds, 3),
            "forward_passes": self.passes,
            "forward_batches": self.batches,
            "passes_per_second": round(self.passes_per_second, 3),
            "metrics_file": self.metrics_file,
            "summary_file": self.summary_file,
            "warnings": self.warnings,
            "summary": self.summary,
        }

"""Faithfulness metrics for ``camx evaluate``, by the name used on the command line.

The registry holds names, the fields each metric writes and the options that
shape them; implementations are imported on first use (``plan_factory``), so
importing this package costs nothing. Perturbation metrics give a plan of
perturbed inputs (:mod:`cam_cli.metrics.base`); localisation metrics compare
the map with ground-truth boxes and need no model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cam_cli.metrics.options import BASELINES, MetricOptions


@dataclass(frozen=True)
class MetricSpec:
    """A metric's registry entry.

    ``fields``: what it adds to a ``metrics.jsonl`` line; ``settings``: the
    :class:`MetricOptions` fields its values depend on; ``entry``:
    ``module:function`` of its plan factory (perturbation metrics; metrics of
    one entry share one plan); ``better``: ``"lower"`` or ``"higher"`` per field.
    """

    name: str
    family: Literal["perturbation", "localisation"]
    fields: tuple[str, ...]
    settings: tuple[str, ...]
    better: tuple[str, ...]
    entry: str | None = None
    reference: str = ""


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "deletion",
            "perturbation",
            ("deletion_auc",),
            ("steps", "baseline"),
            ("lower",),
            "cam_cli.metrics.rise:make_plan",
            "torchcam DeletionInsertionMetric",
        ),
        MetricSpec(
            "insertion",
            "perturbation",
            ("insertion_auc",),
            ("steps", "baseline"),
            ("higher",),
            "cam_cli.metrics.rise:make_plan",
            "torchcam DeletionInsertionMetric",
        ),
        MetricSpec(
            "confidence",
            "perturbation",
            ("drop", "increase"),
            (),
            ("lower", "higher"),
            "cam_cli.metrics.confidence:make_plan",
            "torchcam ClassificationMetric",
        ),
        MetricSpec(
            "road",
            "perturbation",
            ("road_morf", "road_lerf", "road_combined"),
            ("road_noise", "seed"),
            ("lower", "higher", "higher"),
            "cam_cli.metrics.road:make_plan",
            "pytorch-grad-cam ROADCombined",
        ),
        MetricSpec("pointing", "localisation", ("pointing_hit",), ("boxes",), ("higher",)),
        MetricSpec("iou", "localisation", ("iou",), ("boxes", "box_threshold"), ("higher",)),
    )
}
DEFAULT_METRICS = ("deletion", "insertion", "confidence")

__all__ = ["BASELINES", "DEFAULT_METRICS", "METRICS", "MetricOptions", "MetricSpec", "parse_metrics", "plan_factory"]


def parse_metrics(text: str) -> list[str]:
    """``deletion,insertion`` as registry names in registry order; ``all`` for every one.

    Raises ``ValueError`` naming the valid choices for an unknown name.
    """
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return list(METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric {', '.join(unknown) or repr(text)}; choose from {', '.join(METRICS)} or all")
    return [n for n in METRICS if n in names]


def plan_factory(entry: str) -> Callable[..., Any]:
    """The plan factory ``module:function`` of a registry entry, imported now."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def fields_of(names: Sequence[str]) -> list[str]:
    """Every field the metrics ``names`` write, in registry order."""
    return [f for n in names for f in METRICS[n].fields]

"""Faithfulness metrics for ``camx evaluate``, by the name used on the command line.

The registry owns every fact about a metric: its name, the fields it writes on a
``metrics.jsonl`` line, which way each is better, the summary statistic made of
each (its name, scale, title and digits in the table) and the options that shape
its values. ``camx evaluate``, its table and ``camx report`` all read it.
Implementations are imported on first use (``plan_factory``), so importing this
package costs nothing (and no torch). Perturbation metrics give a plan of
perturbed inputs (:mod:`cam_cli.metrics.base`); localisation metrics compare the
map with ground-truth boxes, region metrics with a mask (or the boxes filled in),
complexity metrics look at the map alone: these need no model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cam_cli.metrics.options import BASELINES, MetricOptions

Better = Literal["lower", "higher"]


@dataclass(frozen=True)
class Statistic:
    """One field a metric writes on every ``metrics.jsonl`` line, and the summary
    statistic made of it.

    ``field``: its key on a line; ``name``: the statistic in ``metrics-summary.json``
    (the mean of ``field`` times ``scale``, with its bootstrap interval); ``better``:
    which way a more faithful map moves it; ``title`` and ``digits``: its column in
    the evaluate table.
    """

    field: str
    name: str
    better: Better
    title: str
    digits: int = 3
    scale: float = 1.0


@dataclass(frozen=True)
class MetricSpec:
    """A metric's registry entry.

    ``statistics``: what it adds to a ``metrics.jsonl`` line and how each is
    summarised; ``family``: ``perturbation`` (a plan of model passes), ``localisation``
    (the map against boxes), ``region`` (the map against a mask or boxes) or
    ``complexity`` (the map alone); ``settings``: the :class:`MetricOptions` fields
    (and ``boxes``, ``region_source``) its values depend on; ``entry``: ``module:function`` of its plan factory
    (perturbation metrics; metrics of one entry share one plan); ``reexplains``: its
    values need the pair's map made again by camx's own method (on the model randomised,
    for another class, or of the image multiplied by its map), so evaluate re-runs methods.
    """

    name: str
    family: Literal["perturbation", "localisation", "region", "complexity", "randomisation"]
    statistics: tuple[Statistic, ...]
    settings: tuple[str, ...]
    entry: str | None = None
    reference: str = ""
    #: part of ``--metrics all`` (the costly faithfulness metrics are asked for by name)
    in_all: bool = True
    #: fields it writes beside its statistics, not summarised (MPRT's per-block curves)
    extra: tuple[str, ...] = ()
    #: its values need the methods to explain again (see above)
    reexplains: bool = False

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields it writes on a ``metrics.jsonl`` line."""
        return tuple(s.field for s in self.statistics) + self.extra

    @property
    def better(self) -> tuple[Better, ...]:
        """``"lower"`` or ``"higher"`` per field."""
        return tuple(s.better for s in self.statistics)


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "deletion",
            "perturbation",
            (Statistic("deletion_auc", "deletion_auc", "lower", "deletion AUC"),),
            ("steps", "baseline"),
            "cam_cli.metrics.rise:make_plan",
            "torchcam DeletionInsertionMetric",
        ),
        MetricSpec(
            "insertion",
            "perturbation",
            (Statistic("insertion_auc", "insertion_auc", "higher", "insertion AUC"),),
            ("steps", "baseline"),
            "cam_cli.metrics.rise:make_plan",
            "torchcam DeletionInsertionMetric",
        ),
        MetricSpec(
            "confidence",
            "perturbation",
            (
                Statistic("drop", "average_drop_pct", "lower", "Avg Drop %", 1, 100.0),
                Statistic("increase", "increase_in_confidence_pct", "higher", "Incr. Conf. %", 1, 100.0),
            ),
            (),
            "cam_cli.metrics.confidence:make_plan",
            "torchcam ClassificationMetric",
        ),
        MetricSpec(
            "road",
            "perturbation",
            (
                Statistic("road_morf", "road_morf", "lower", "ROAD MoRF"),
                Statistic("road_lerf", "road_lerf", "higher", "ROAD LeRF"),
                Statistic("road_combined", "road_combined", "higher", "ROAD combined"),
            ),
            ("road_noise", "seed"),
            "cam_cli.metrics.road:make_plan",
            "pytorch-grad-cam ROADCombined",
        ),
        MetricSpec(
            "pixel-flipping",
            "perturbation",
            (Statistic("pixel_flipping_auc", "pixel_flipping_auc", "lower", "pixel flipping AUC"),),
            ("flip_step",),
            "cam_cli.metrics.flipping:make_pixel_flipping_plan",
            "Quantus PixelFlipping (Bach 2015)",
            in_all=False,
        ),
        MetricSpec(
            "irof",
            "perturbation",
            (Statistic("irof", "irof", "higher", "IROF"),),
            (),
            "cam_cli.metrics.irof:make_plan",
            "Quantus IROF (Rieger 2020)",
            in_all=False,
        ),
        MetricSpec(
            "region-perturbation",
            "perturbation",
            (
                Statistic("region_morf_aopc", "region_morf_aopc", "higher", "region MoRF AOPC"),
                Statistic("region_lerf_aopc", "region_lerf_aopc", "lower", "region LeRF AOPC"),
            ),
            ("patch_size", "regions"),
            "cam_cli.metrics.flipping:make_region_plan",
            "Quantus RegionPerturbation (Samek 2017)",
            in_all=False,
        ),
        MetricSpec(
            "faithfulness-correlation",
            "perturbation",
            (Statistic("faithfulness_correlation", "faithfulness_correlation", "higher", "faith. corr."),),
            ("corr_runs", "corr_subset", "seed"),
            "cam_cli.metrics.faithcorr:make_plan",
            "Quantus FaithfulnessCorrelation (Bhatt 2020)",
            in_all=False,
        ),
        MetricSpec(
            "arcc",
            "perturbation",
            (Statistic("arcc", "arcc", "higher", "ARCC"),),
            ("road_noise", "seed"),
            "cam_cli.metrics.arcc:make_plan",
            "pytorch-grad-cam 1.5 ARCC (Poppi 2021)",
            in_all=False,
            extra=("arcc_coherency", "arcc_complexity", "arcc_road"),
            reexplains=True,
        ),
        MetricSpec(
            "pointing",
            "localisation",
            (Statistic("pointing_hit", "pointing_pct", "higher", "pointing %", 1, 100.0),),
            ("boxes",),
        ),
        MetricSpec("iou", "localisation", (Statistic("iou", "iou", "higher", "box IoU"),), ("boxes", "box_threshold")),
        MetricSpec(
            "sparseness",
            "complexity",
            (Statistic("sparseness", "sparseness", "higher", "sparseness"),),
            (),
            reference="Quantus 0.6 Sparseness",
        ),
        MetricSpec(
            "complexity",
            "complexity",
            (Statistic("complexity", "complexity", "lower", "complexity"),),
            (),
            reference="Quantus 0.6 Complexity",
        ),
        MetricSpec(
            "effective-complexity",
            "complexity",
            (Statistic("effective_complexity", "effective_complexity", "lower", "eff. complexity", 0),),
            ("complexity_eps",),
            reference="Quantus 0.6 EffectiveComplexity",
        ),
        *(
            MetricSpec(
                name,
                "region",
                (Statistic(name.replace("-", "_"), name.replace("-", "_"), "higher", title),),
                ("region_source", "topk") if name == "topk-intersection" else ("region_source",),
                reference=f"Quantus 0.6 {reference}",
            )
            for name, title, reference in (
                ("energy-pointing", "energy pointing", "AttributionLocalisation"),
                ("relevance-mass", "relevance mass", "RelevanceMassAccuracy"),
                ("relevance-rank", "relevance rank", "RelevanceRankAccuracy"),
                ("topk-intersection", "top-k intersection", "TopKIntersection"),
                ("mask-auc", "mask AUC", "AUC"),
            )
        ),
        MetricSpec(
            "mprt",
            "randomisation",
            (
                Statistic("mprt_spearman", "mprt_spearman", "lower", "MPRT rank corr."),
                Statistic("mprt_ssim", "mprt_ssim", "lower", "MPRT SSIM"),
            ),
            ("seed", "mprt_order"),
            reference="Adebayo et al. 2018; Quantus MPRT",
            extra=("mprt_spearman_curve", "mprt_ssim_curve", "mprt_blocks"),
            in_all=False,
            reexplains=True,
        ),
        MetricSpec(
            "random-logit",
            "randomisation",
            (Statistic("random_logit_ssim", "random_logit_ssim", "lower", "random-logit SSIM"),),
            ("seed",),
            reference="Sixt et al. 2020; Quantus RandomLogit",
            extra=("random_logit_class",),
            in_all=False,
            reexplains=True,
        ),
    )
}
DEFAULT_METRICS = ("deletion", "insertion", "confidence")
#: the metrics that compare the map with a region (``--masks-from`` adds them)
REGION_METRICS = tuple(n for n, spec in METRICS.items() if spec.family == "region")

__all__ = [
    "BASELINES",
    "DEFAULT_METRICS",
    "METRICS",
    "MetricOptions",
    "MetricSpec",
    "REGION_METRICS",
    "Statistic",
    "fields_of",
    "parse_metrics",
    "plan_factory",
    "statistic",
    "statistics_of",
]


def parse_metrics(text: str) -> list[str]:
    """``deletion,insertion`` as registry names in registry order; ``all`` for every one
    but those left out of it (``in_all=False``: the costly faithfulness metrics and the
    randomisation sanity checks, which explain again once per block, are asked for by name).

    Raises ``ValueError`` naming the valid choices for an unknown name.
    """
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return [n for n, spec in METRICS.items() if spec.in_all]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric {', '.join(unknown) or repr(text)}; choose from {', '.join(METRICS)} or all")
    return [n for n in METRICS if n in names]


def plan_factory(entry: str) -> Callable[..., Any]:
    """The plan factory ``module:function`` of a registry entry, imported now."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def fields_of(names: Iterable[str]) -> list[str]:
    """Every field the metrics ``names`` write, in registry order."""
    return [f for n in names for f in METRICS[n].fields]


def statistics_of(names: Sequence[str]) -> list[Statistic]:
    """The summary statistics of the metrics ``names``, in their order."""
    return [s for n in names for s in METRICS[n].statistics]


def statistic(name: str) -> Statistic:
    """The summary statistic called ``name`` (``average_drop_pct``); ``KeyError`` if none is."""
    for spec in METRICS.values():
        for stat in spec.statistics:
            if stat.name == name:
                return stat
    raise KeyError(name)

"""ARCC, pytorch-grad-cam 1.5's combined score of a map (its ``metrics.arcc.ARCC``).

pytorch-grad-cam's ARCC is the ADCC of Poppi et al. ("Revisiting the Evaluation of
Class Activation Mapping for Explainability: A Novel Metric and Experimental
Analysis", CVPR 2021 workshops) with ROAD in place of the Average Drop: the harmonic
mean of three scores in [0, 1], each higher for a better map,

* ``coherency = (pearson(map, map') + 1) / 2``, where ``map'`` is the same method's
  map of the image multiplied by its own map (``x * map``, the explained class again;
  Pearson with ``n - 1`` and ``1e-8`` added to the product of the deviations),
* ``1 - complexity``, with ``complexity = mean(|map|)`` (the L1 norm over the pixels),
* ``road = clip(2 * ROADCombined, 0, 1)`` at percentiles 20, 40, 60, 80,

``arcc = 3 / (1 / (coherency + 1e-8) + 1 / (1 - complexity + 1e-8) + 1 / (road + 1e-8))``;
higher is better. (Its docstring calls it a geometric mean; the formula is harmonic.)

Coherency needs the method to explain the masked images again: ``camx evaluate --metrics
arcc`` re-runs the pair's own method on ``x * map`` (every pair of a batch in the same
passes) and hands the maps to :class:`ArccPlan` as ``Samples.remaps``; the library
function :func:`arcc` takes an ``explain`` callable. ROAD's passes go through the
scheduler as every metric's. A line records ``arcc`` and its parts, ``arcc_coherency``,
``arcc_complexity`` and ``arcc_road`` (ROADCombined at 20..80, before the clip). Equals
pytorch-grad-cam's ``ARCC(base_method)`` to 1e-4 with a softmax target, its imputer's
noise 0 and the same method as the base method.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np
import torch

from cam_cli.metrics.base import Forward, Samples, run_plans
from cam_cli.metrics.options import MetricOptions
from cam_cli.metrics.road import RoadPlan

ARCC_PERCENTILES = (20, 40, 60, 80)
EPS = 1e-8

#: maps ``(N, S, S)`` in [0, 1] of images ``(N, 3, S, S)`` for classes ``(N,)``
Explain = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def complexity(maps: np.ndarray) -> np.ndarray:
    """``(N,)`` mean absolute value of ``(N, H, W)`` maps."""
    flat = maps.reshape(maps.shape[0], -1)
    return np.abs(flat).sum(axis=1) / flat.shape[1]


def coherency(maps: np.ndarray, remaps: np.ndarray) -> np.ndarray:
    """``(N,)`` ``(pearson + 1) / 2`` of each map with the map of its masked image."""
    a = maps.reshape(maps.shape[0], -1).astype(np.float64)
    b = remaps.reshape(remaps.shape[0], -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    dof = a.shape[1] - 1
    cov = (a * b).sum(axis=1) / dof
    rho = cov / (np.sqrt((a * a).sum(axis=1) / dof) * np.sqrt((b * b).sum(axis=1) / dof) + EPS)
    return np.asarray((rho + 1) / 2)


def combine(coherent: np.ndarray, complex_: np.ndarray, road_combined: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's harmonic mean of coherency, ``1 - complexity`` and the clipped ROAD."""
    road = np.clip(road_combined * 2, 0, 1)
    return np.asarray(3 / (1 / (coherent + EPS) + 1 / ((1 - complex_) + EPS) + 1 / (road + EPS)))


class ArccPlan(RoadPlan):
    """ROAD's MoRF and LeRF inputs at ARCC's percentiles; ``finish`` combines ROADCombined
    with the coherency of ``samples.remaps`` and the complexity of the maps."""

    def __init__(self, samples: Samples, options: MetricOptions) -> None:
        if samples.remaps is None:
            raise ValueError("ARCC needs each map made again from its image multiplied by it (Samples.remaps)")
        super().__init__(samples, options, ARCC_PERCENTILES)

    def finish(self, scores: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.samples.remaps is not None
        road = super().finish(scores, base)["road_combined"].double().numpy()
        maps = self._maps.astype(np.float64)
        coherent = coherency(maps, self.samples.remaps.detach().double().cpu().numpy())
        complex_ = complexity(maps)
        values = {
            "arcc": combine(coherent, complex_, road),
            "arcc_coherency": coherent,
            "arcc_complexity": complex_,
            "arcc_road": road,
        }
        return {k: torch.from_numpy(np.asarray(v, dtype=np.float64)).float() for k, v in values.items()}


def make_plan(samples: Samples, names: Collection[str], options: MetricOptions) -> ArccPlan:
    """The registry's entry for ``arcc`` (``samples.remaps`` made by evaluate's re-explain)."""
    return ArccPlan(samples, options)


def arcc(
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    forward: Forward,
    explain: Explain,
    noise: float = 0.01,
    seed: int = 0,
    batch_size: int = 32,
    ids: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``{"arcc", "coherency", "complexity", "road_combined"}``, each ``(N,)``, for ``images``
    ``(N, 3, S, S)`` normalised, their ``maps`` ``(N, S, S)`` in [0, 1] and ``classes`` ``(N,)``;
    ``explain`` is the method that made the maps."""
    remaps = explain(images * maps.unsqueeze(1), classes)
    samples = Samples(images, maps, classes, list(ids or []), remaps=remaps)
    plan = ArccPlan(samples, MetricOptions(road_noise=noise, seed=seed))
    values = run_plans(samples, [plan], forward, batch_size)
    names = {"arcc": "arcc", "coherency": "arcc_coherency", "complexity": "arcc_complexity"}
    return {**{k: values[v] for k, v in names.items()}, "road_combined": values["arcc_road"]}

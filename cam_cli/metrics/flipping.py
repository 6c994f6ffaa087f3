"""Pixel flipping (Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier
Decisions by Layer-Wise Relevance Propagation", PLoS ONE 2015) and region perturbation
(Samek et al., "Evaluating the Visualization of What a Deep Neural Network Has Learned",
IEEE TNNLS 2017).

**Pixel flipping**: pixels are ranked by the map, highest first (a stable sort: ties in
raster order). Step ``k`` = 1, 2, ..., ``n = ceil(P / f)`` replaces the top ``min(k f, P)``
pixels (all three channels) with the baseline, the image's minimum over its channels and
pixels (Quantus's ``"black"``); the curve is the softmax probability of the explained
class after each step. ``pixel_flipping_auc`` is the area under it over ``[0, 1]``
(``np.trapz(curve, dx=1) / (n - 1)``): lower is better (a faithful map loses the class
fast). Equals Quantus 0.6's ``PixelFlipping(features_in_step=3 f, perturb_baseline="black",
abs=False, normalise=False, return_auc_per_sample=True)`` divided by ``n - 1``: Quantus
counts features per channel (its ``features_in_step=1`` flips a third of a pixel), camx
counts pixels.

**Region perturbation**: the image (padded to a multiple of ``p``, as Quantus does) is cut
into ``p x p`` patches ranked by the sum of the map over each (a stable sort). For
``k`` = 1, ..., ``L = min(regions, patches)`` the first ``k`` patches are replaced with
the black baseline; the curve is ``y - y_k`` (probability lost). MoRF removes the most
relevant patches first, LeRF the least. Each is summarised as Samek's AOPC,
``sum(curve) / (L + 1)`` (the curve's mean with its ``k = 0`` point of 0):
``region_morf_aopc`` higher is better, ``region_lerf_aopc`` lower is better. The curves
equal Quantus 0.6's ``RegionPerturbation(patch_size=p, regions_evaluation=L, order=...,
perturb_baseline="black", abs=False, normalise=False)``.

Every perturbed input of a sample is built from the original image and its ranks (the
perturbations are cumulative, so step ``k`` does not need step ``k - 1``): all steps of
all samples go through the scheduler in full batches.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from cam_cli.metrics.base import Forward, Samples, run_plans
from cam_cli.metrics.options import MetricOptions
from cam_cli.metrics.rise import position_ranks

REGION_ORDERS = ("morf", "lerf")


def black(images: torch.Tensor) -> torch.Tensor:
    """Quantus's ``"black"`` baseline of ``(N, 3, S, S)`` images: each one's minimum ``(N,)``."""
    return images.flatten(1).amin(dim=1)


def flip_points(positions: int, step: int) -> list[int]:
    """How many pixels each point of a pixel-flipping curve has flipped."""
    return [min(k * step, positions) for k in range(1, math.ceil(positions / step) + 1)]


def curve_auc(curve: torch.Tensor) -> torch.Tensor:
    """``(N,)`` area under ``(N, n)`` curves spread over ``[0, 1]`` (the only point when ``n == 1``)."""
    n = curve.shape[1]
    if n == 1:
        return curve[:, 0].clone()
    return torch.trapezoid(curve.double(), dx=1.0 / (n - 1), dim=1).float()


class RankedPlan:
    """Per sample ``len(points)`` inputs per order: the pixels whose rank (per order) is
    below each point replaced with the sample's black baseline."""

    def __init__(self, samples: Samples, ranks: list[torch.Tensor], points: list[int]) -> None:
        self.samples = samples
        self.ranks = ranks  # per order, (N, P) rank of each pixel
        self.points = points
        self.per_sample = len(points) * len(ranks)
        self.count = len(samples) * self.per_sample
        self.fill = black(samples.images)
        self._points = torch.tensor(points, device=samples.images.device)
        self._ranks = torch.stack(ranks, dim=1)  # (N, orders, P)

    def build(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.samples.images.device
        jobs = torch.arange(start, stop, device=device)
        sample, local = jobs // self.per_sample, jobs % self.per_sample
        order, point = local // len(self.points), local % len(self.points)
        removed = self._ranks[sample, order] < self._points[point].unsqueeze(1)  # (n, P)
        images = self.samples.images.flatten(2)[sample]
        fill = self.fill[sample].view(-1, 1, 1).to(images.dtype)
        x = torch.where(removed.unsqueeze(1), fill, images)
        return x.view(-1, *self.samples.images.shape[1:]), self.samples.classes[sample]

    def curves(self, scores: torch.Tensor) -> torch.Tensor:
        """``(N, orders, len(points))`` scores of the inputs."""
        return scores.view(len(self.samples), len(self.ranks), len(self.points))


class PixelFlippingPlan(RankedPlan):
    """Pixel flipping: ``ceil(P / flip_step)`` inputs per sample."""

    def __init__(self, samples: Samples, options: MetricOptions) -> None:
        positions = samples.maps.shape[1] * samples.maps.shape[2]
        super().__init__(samples, [position_ranks(samples.maps)], flip_points(positions, options.flip_step))

    def finish(self, scores: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
        curve = self.curves(scores)[:, 0]
        return {"pixel_flipping_auc": curve_auc(curve), "pixel_flipping_curve": curve}


def patch_ranks(maps: torch.Tensor, size: int, order: str) -> tuple[torch.Tensor, int]:
    """``(N, P)`` the rank of each pixel's patch (0 first removed) and the number of patches.

    The map is padded with zeros to a multiple of ``size`` (half the padding before, as
    Quantus); patches are ranked by their sums, highest first for MoRF and lowest first
    for LeRF, ties in raster order."""
    n, height, width = maps.shape
    pad_h, pad_w = -height % size, -width % size
    rows = (torch.arange(height, device=maps.device) + pad_h // 2) // size
    cols = (torch.arange(width, device=maps.device) + pad_w // 2) // size
    grid_w = (width + pad_w) // size
    patches = ((height + pad_h) // size) * grid_w
    patch_of = (rows.view(-1, 1) * grid_w + cols.view(1, -1)).flatten()  # (P,)
    sums = torch.zeros(n, patches, dtype=torch.float64, device=maps.device)
    sums.index_add_(1, patch_of, maps.flatten(1).double())
    ordered = torch.argsort(sums, dim=1, descending=order == "morf", stable=True)
    rank = torch.argsort(ordered, dim=1)
    return rank[:, patch_of], patches


class RegionPlan(RankedPlan):
    """Region perturbation: ``L`` inputs per sample for MoRF, then ``L`` for LeRF."""

    def __init__(self, samples: Samples, options: MetricOptions) -> None:
        ranks = []
        patches = 0
        for order in REGION_ORDERS:
            rank, patches = patch_ranks(samples.maps, options.patch_size, order)
            ranks.append(rank)
        super().__init__(samples, ranks, list(range(1, min(options.regions, patches) + 1)))

    def finish(self, scores: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
        lost = base.view(-1, 1, 1) - self.curves(scores)
        aopc = lost.double().sum(dim=2) / (len(self.points) + 1)
        return {
            "region_morf_aopc": aopc[:, 0].float(),
            "region_lerf_aopc": aopc[:, 1].float(),
            "region_morf_curve": lost[:, 0],
            "region_lerf_curve": lost[:, 1],
        }


def make_pixel_flipping_plan(samples: Samples, names: Collection[str], options: MetricOptions) -> PixelFlippingPlan:
    """The registry's entry for ``pixel-flipping``."""
    return PixelFlippingPlan(samples, options)


def make_region_plan(samples: Samples, names: Collection[str], options: MetricOptions) -> RegionPlan:
    """The registry's entry for ``region-perturbation``."""
    return RegionPlan(samples, options)


def pixel_flipping(
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    forward: Forward,
    flip_step: int = 1,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """``{"pixel_flipping_auc": (N,), "pixel_flipping_curve": (N, n)}`` for ``images``
    ``(N, 3, S, S)`` normalised, ``maps`` ``(N, S, S)`` and ``classes`` ``(N,)``."""
    samples = Samples(images, maps, classes)
    plan = PixelFlippingPlan(samples, MetricOptions(flip_step=flip_step))
    return run_plans(samples, [plan], forward, batch_size)


def region_perturbation(
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    forward: Forward,
    patch_size: int = 8,
    regions: int = 100,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """``region_{morf,lerf}_aopc`` ``(N,)`` and ``region_{morf,lerf}_curve`` ``(N, L)``."""
    samples = Samples(images, maps, classes)
    plan = RegionPlan(samples, MetricOptions(patch_size=patch_size, regions=regions))
    return run_plans(samples, [plan], forward, batch_size)

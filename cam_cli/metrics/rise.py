"""Deletion and insertion (Petsiuk et al., "RISE", BMVC 2018).

Positions are ranked by the map, highest first (a stable descending sort, so
ties keep raster order). Deletion replaces the top ``k`` positions of the image
(all three channels) with the baseline; insertion starts from the baseline and
restores them. With ``P = S * S`` positions, ``k`` runs over torchcam's
discretisation ``range(0, P, ceil(P / steps)) + [P]``; each curve is the
softmax probability of the explained class at those ``k``, and its area is
``torch.trapezoid`` over the fractions ``k / P``. The all-baseline input ends
the deletion curve and starts the insertion curve, so both curves of ``steps``
intervals cost ``2 * steps - 1`` forward passes beyond the unperturbed image.
Lower deletion and higher insertion AUC are better.

Equals torchcam 0.5's ``DeletionInsertionMetric(steps, baseline)`` fed the same
map (tested to 1e-4).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torchvision.transforms.v2.functional as TF

from cam_cli.metrics.base import Forward, Samples, run_plans
from cam_cli.metrics.options import MetricOptions

#: RISE's blur baseline: a Gaussian of sigma 5 in an 11 x 11 kernel
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0
CURVES = ("deletion", "insertion")


def perturbation_counts(positions: int, steps: int) -> list[int]:
    """How many positions are perturbed at each point of a curve (torchcam's grid)."""
    step = (positions + steps - 1) // steps
    return [*range(0, positions, step), positions]


def make_baseline(images: torch.Tensor, kind: str) -> torch.Tensor:
    """The baseline ``(N, 3, S, S)``: zeros of the normalised space, or the image blurred."""
    if kind == "zero":
        return torch.zeros_like(images)
    if kind == "blur":
        return blur(images)
    raise ValueError(f"unknown baseline {kind!r}")


def blur(images: torch.Tensor) -> torch.Tensor:
    """RISE's blur of ``(N, 3, S, S)`` images (torchvision's Gaussian blur, reflected edges)."""
    return TF.gaussian_blur(images, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])


def position_ranks(maps: torch.Tensor) -> torch.Tensor:
    """``(N, P)`` rank of every position of ``(N, S, S)`` maps, 0 for the highest (stable)."""
    order = torch.argsort(maps.flatten(1), dim=1, descending=True, stable=True)
    return torch.argsort(order, dim=1)


class RisePlan:
    """The deletion and/or insertion curves of a group: per sample the all-baseline
    input, then for each interior point one input per curve asked for."""

    def __init__(self, samples: Samples, curves: Collection[str], options: MetricOptions) -> None:
        self.samples = samples
        self.curves = [c for c in CURVES if c in curves]
        positions = samples.maps.shape[1] * samples.maps.shape[2]
        self.counts = perturbation_counts(positions, options.steps)
        self.fractions = torch.tensor(self.counts, dtype=torch.float32) / positions
        self.per_sample = 1 + (len(self.counts) - 2) * len(self.curves)
        self.count = len(samples) * self.per_sample
        self.ranks = position_ranks(samples.maps)
        self.baseline = make_baseline(samples.images, options.baseline)
        self._counts = torch.tensor(self.counts, device=samples.images.device)
        self._inserting = torch.tensor([c == "insertion" for c in self.curves], device=samples.images.device)

    def build(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.samples.images.device
        jobs = torch.arange(start, stop, device=device)
        sample = jobs // self.per_sample
        local = jobs % self.per_sample
        first = local == 0
        inner = (local - 1).clamp(min=0)
        point = torch.where(first, len(self.counts) - 1, inner // len(self.curves) + 1)
        curve = inner % len(self.curves)
        inserting = (~first) & self._inserting[curve]
        perturbed = self.ranks[sample] < self._counts[point].unsqueeze(1)  # (n, P)
        keep_original = torch.where(inserting.unsqueeze(1), perturbed, ~perturbed)
        images = self.samples.images.flatten(2)[sample]
        baseline = self.baseline.flatten(2)[sample]
        x = torch.where(keep_original.unsqueeze(1), images, baseline)
        return x.view(-1, *self.samples.images.shape[1:]), self.samples.classes[sample]

    def finish(self, scores: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(self.samples)
        table = scores.view(n, self.per_sample)
        empty = table[:, 0]
        inner = table[:, 1:].reshape(n, len(self.counts) - 2, len(self.curves))
        values: dict[str, torch.Tensor] = {}
        for c, curve in enumerate(self.curves):
            if curve == "deletion":
                points = torch.cat([base.view(n, 1), inner[:, :, c], empty.view(n, 1)], dim=1)
            else:
                points = torch.cat([empty.view(n, 1), inner[:, :, c], base.view(n, 1)], dim=1)
            values[f"{curve}_auc"] = torch.trapezoid(points, self.fractions, dim=1)
        return values


def make_plan(samples: Samples, names: Collection[str], options: MetricOptions) -> RisePlan:
    """The registry's entry: one plan for ``deletion`` and/or ``insertion``."""
    return RisePlan(samples, names, options)


def deletion_insertion(
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    forward: Forward,
    steps: int = 20,
    baseline: str = "zero",
    batch_size: int = 32,
    curves: Collection[str] = CURVES,
) -> dict[str, torch.Tensor]:
    """Deletion and insertion AUCs ``{"deletion_auc": (N,), "insertion_auc": (N,)}``.

    ``images`` ``(N, 3, S, S)`` normalised, ``maps`` ``(N, S, S)``, ``classes``
    ``(N,)``; ``forward`` gives logits. Perturbed inputs go through ``forward``
    in batches of ``batch_size``.
    """
    samples = Samples(images, maps, classes)
    options = MetricOptions(steps=steps, baseline=baseline)
    values = run_plans(samples, [RisePlan(samples, curves, options)], forward, batch_size)
    return {k: v for k, v in values.items() if k != "score"}


def deletion(
    images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, forward: Forward, **kw: object
) -> torch.Tensor:
    """Deletion AUC ``(N,)`` (lower is better); keywords as :func:`deletion_insertion`."""
    return deletion_insertion(images, maps, classes, forward, curves=("deletion",), **kw)["deletion_auc"]  # type: ignore[arg-type]


def insertion(
    images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, forward: Forward, **kw: object
) -> torch.Tensor:
    """Insertion AUC ``(N,)`` (higher is better); keywords as :func:`deletion_insertion`."""
    return deletion_insertion(images, maps, classes, forward, curves=("insertion",), **kw)["insertion_auc"]  # type: ignore[arg-type]

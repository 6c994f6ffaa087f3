"""Average Drop and Increase in Confidence (Chattopadhyay et al., "Grad-CAM++", WACV 2018).

With ``Y`` the softmax probability of the explained class on the image and
``O`` on the image multiplied by its map (``x * M``, in the normalised input
space), per image ``drop = max(0, Y - O) / Y`` and ``increase = 1[O > Y]``.
Average Drop % is ``100 * mean(drop)`` (lower is better), Increase in
Confidence % is ``100 * mean(increase)`` (higher is better). One forward pass
per image beyond the unperturbed one.

Equals torchcam 0.5's ``ClassificationMetric`` with a softmax (which adds
``1e-7`` to the denominator, as here). pytorch-grad-cam's ``DropInConfidence``
is not divided by ``Y``; camx follows the paper.

For a similarity run ``Y`` and ``O`` are the cosine similarities to the reference (not
probabilities); where ``Y`` is negative the drop is null, as a share of it means nothing.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from cam_cli.metrics.base import Forward, Samples, run_plans
from cam_cli.metrics.options import MetricOptions

EPS = 1e-7


class ConfidencePlan:
    """One input per sample: the image multiplied by its map."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples
        self.count = len(samples)

    def build(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples
        return s.images[start:stop] * s.maps[start:stop].unsqueeze(1), s.classes[start:stop]

    def finish(self, scores: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
        drop = torch.relu(base - scores) / (base + EPS)
        drop = torch.where(base >= 0, drop, torch.nan)  # a share of a negative score (a similarity below 0): null
        return {"drop": drop, "increase": (scores > base).float()}


def make_plan(samples: Samples, names: Collection[str], options: MetricOptions) -> ConfidencePlan:
    """The registry's entry for ``confidence``."""
    return ConfidencePlan(samples)


def confidence(
    images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, forward: Forward, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """``{"drop": (N,), "increase": (N,)}`` for ``images`` ``(N, 3, S, S)``, ``maps``
    ``(N, S, S)`` and ``classes`` ``(N,)``; ``forward`` gives logits."""
    samples = Samples(images, maps, classes)
    values = run_plans(samples, [ConfidencePlan(samples)], forward, batch_size)
    return {"drop": values["drop"], "increase": values["increase"]}

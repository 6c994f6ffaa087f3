"""Faithfulness correlation (Bhatt et al., "Evaluating and Aggregating Feature-based
Model Explanations", IJCAI 2020).

For ``runs`` random subsets ``S`` of ``subset`` features of the image (a feature is one
channel of one pixel, as Quantus counts them: ``3 S^2`` of them, the map broadcast over the
channels), the features of ``S`` are replaced with the image's minimum (Quantus's
``"black"``), and the drop of the explained class's softmax probability, ``y - y_S``, is
paired with the map's sum over ``S``. The value is the Pearson correlation of the two over
the runs: higher is better (NaN, written as null, when either is constant).

The subsets of a sample are drawn by ``numpy.random.RandomState([seed, crc32(id)])``,
``choice(3 S^2, subset, replace=False)`` once per run (and one uniform number thrown
away after each, as Quantus's baseline table draws one), where ``id`` is the sample's
``key`` and method: a value depends on ``--seed`` and the sample alone, not on the samples
that share its batch. Quantus 0.6's ``FaithfulnessCorrelation(nr_runs=runs,
subset_size=subset, perturb_baseline="black", abs=False, normalise=False)`` draws the same
subsets from numpy's global generator: seeded with the same ``[seed, crc32(id)]`` and run
on that one image with ``softmax=True``, it gives camx's value exactly. (Quantus's default
scores logits, ``softmax=False``; camx scores every metric by the class probability.)
"""

from __future__ import annotations

import zlib
from collections.abc import Collection

import numpy as np
import torch

from cam_cli.metrics.base import Forward, Samples, run_plans
from cam_cli.metrics.flipping import black
from cam_cli.metrics.options import MetricOptions


def subset_seed(seed: int, sample_id: str) -> list[int]:
    """What seeds the subsets of the sample ``sample_id``."""
    return [seed, zlib.crc32(sample_id.encode("utf-8"))]


def draw_subsets(seed: int, sample_id: str, features: int, runs: int, subset: int) -> np.ndarray:
    """``(runs, subset)`` feature indices, one ``choice`` without replacement per run, each
    followed by one uniform draw that is thrown away (Quantus 0.6's table of baselines
    draws it on every perturbation, used or not: the same stream as Quantus's)."""
    rng = np.random.RandomState(subset_seed(seed, sample_id))
    subsets = []
    for _ in range(runs):
        subsets.append(rng.choice(features, subset, replace=False))
        rng.uniform(size=1)
    return np.stack(subsets)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays in float64; NaN when either is constant."""
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


class CorrelationPlan:
    """Per sample ``runs`` inputs, each with one random subset of features blacked out."""

    def __init__(self, samples: Samples, options: MetricOptions) -> None:
        self.samples = samples
        self.runs = options.corr_runs
        channels, height, width = samples.images.shape[1:]
        features = channels * height * width
        maps = samples.maps.detach().double().cpu().numpy().reshape(len(samples), -1)
        subsets = [
            draw_subsets(options.seed, sid, features, self.runs, min(options.corr_subset, features))
            for sid in samples.ids
        ]
        # the map's sum over each subset: feature f lies on pixel f mod (H W)
        self.att_sums = np.stack([m[s % (height * width)].sum(axis=1) for m, s in zip(maps, subsets, strict=True)])
        self.subsets = torch.from_numpy(np.stack(subsets)).to(samples.images.device)  # (N, runs, subset)
        self.fill = black(samples.images)
        self.count = len(samples) * self.runs

    def build(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.samples.images
        jobs = torch.arange(start, stop, device=images.device)
        sample, run = jobs // self.runs, jobs % self.runs
        x = images.flatten(1)[sample].clone()
        index = self.subsets[sample, run]
        x.scatter_(1, index, self.fill[sample].view(-1, 1).to(x.dtype).expand_as(index))
        return x.view(-1, *images.shape[1:]), self.samples.classes[sample]

    def finish(self, scores: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(self.samples)
        drops = (base.view(n, 1) - scores.view(n, self.runs)).double().numpy()
        values = [pearson(self.att_sums[i], drops[i]) for i in range(n)]
        return {"faithfulness_correlation": torch.tensor(values, dtype=torch.float32)}


def make_plan(samples: Samples, names: Collection[str], options: MetricOptions) -> CorrelationPlan:
    """The registry's entry for ``faithfulness-correlation``."""
    return CorrelationPlan(samples, options)


def faithfulness_correlation(
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    forward: Forward,
    ids: list[str],
    runs: int = 100,
    subset: int = 224,
    seed: int = 0,
    batch_size: int = 32,
) -> torch.Tensor:
    """``(N,)`` faithfulness correlation of ``images`` ``(N, 3, S, S)`` normalised, ``maps``
    ``(N, S, S)``, ``classes`` ``(N,)``; ``ids`` name the samples (they seed the subsets)."""
    samples = Samples(images, maps, classes, list(ids))
    plan = CorrelationPlan(samples, MetricOptions(corr_runs=runs, corr_subset=subset, seed=seed))
    return run_plans(samples, [plan], forward, batch_size)["faithfulness_correlation"]

"""ROAD: Remove And Debias (Rong et al., "A Consistent and Efficient Evaluation
Strategy for Attribution Methods", ICML 2022).

At each percentile ``p`` in 10, 20, ..., 90 (pytorch-grad-cam's meaning: the
share of pixels *kept*), MoRF (most relevant first) removes the pixels whose
map value is at least the ``p``-th percentile of the map, LeRF (least relevant
first) those of ``1 - map``. Removed pixels are filled by the noisy linear
imputer: each takes the weighted mean of its eight neighbours (1/6 for edge
neighbours, 1/12 for corners, renormalised at the border), one sparse linear
system per image and percentile solved for all three channels at once, plus
Gaussian noise of standard deviation ``noise``. The score is the change of the
explained class's softmax probability, ``p(x_imputed) - p(x)``, averaged over
the percentiles: ``road_morf`` (lower is better), ``road_lerf`` (higher is
better) and ``road_combined = (road_lerf - road_morf) / 2`` (higher is better,
pytorch-grad-cam's ``ROADCombined``).

Equals pytorch-grad-cam 1.5's ``ROADMostRelevantFirstAverage`` /
``ROADLeastRelevantFirstAverage`` / ``ROADCombined`` with a softmax target and
an imputer of noise 0 (tested to 1e-4). Where camx differs: the noise is
seeded per (sample, percentile, order), so a value does not depend on the
batch it was computed in (pytorch-grad-cam draws from torch's global
generator); and where a percentile removes every pixel (a map whose ``p``-th
percentile is its minimum, common for sparse maps) nothing is left to
interpolate from, the system is singular, and camx fills with zeros (the mean
of the normalised space) where pytorch-grad-cam gives NaN.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.linalg import spsolve

from cam_cli.metrics.base import Forward, Samples, run_plans
from cam_cli.metrics.options import MetricOptions

PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
#: (row offset, column offset, weight) of the eight neighbours
NEIGHBOURS = (
    (1, 1, 1 / 12),
    (0, 1, 1 / 6),
    (-1, 1, 1 / 12),
    (1, -1, 1 / 12),
    (0, -1, 1 / 6),
    (-1, -1, 1 / 12),
    (1, 0, 1 / 6),
    (-1, 0, 1 / 6),
)
ORDERS = ("morf", "lerf")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _solver_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="camx-road")
        return _pool


def impute(
    image: np.ndarray, keep: np.ndarray, noise: float = 0.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Fill the pixels of ``image`` ``(C, H, W)`` where ``keep`` ``(H, W)`` is False.

    Each removed pixel equals the weighted mean of its in-image neighbours
    (known ones as they are, removed ones as unknowns): a sparse system in the
    removed pixels, solved for every channel at once; then ``noise`` times
    standard normal noise from ``rng`` is added to the filled values. Returns a
    float32 copy.
    """
    channels, height, width = image.shape
    flat = image.reshape(channels, -1).astype(np.float32)
    known = keep.reshape(-1).astype(bool)
    missing = np.flatnonzero(~known)
    out = flat.copy()
    if missing.size == 0:
        return out.reshape(image.shape)
    if missing.size == known.size:  # nothing to interpolate from: the system is singular
        out[:] = 0.0
        return out.reshape(image.shape)
    unknown_id = np.full(known.size, -1, dtype=np.int64)
    unknown_id[missing] = np.arange(missing.size)
    rows_y, cols_x = np.divmod(missing, width)
    b = np.zeros((missing.size, channels))
    weight_sum = np.zeros(missing.size)
    entries_r, entries_c, entries_v = [], [], []
    for dy, dx, w in NEIGHBOURS:
        y, x = rows_y + dy, cols_x + dx
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        eq = np.flatnonzero(inside)
        neighbour = y[inside] * width + x[inside]
        weight_sum[eq] += w
        is_known = known[neighbour]
        b[eq[is_known]] -= w * flat[:, neighbour[is_known]].T
        entries_r.append(eq[~is_known])
        entries_c.append(unknown_id[neighbour[~is_known]])
        entries_v.append(np.full(int((~is_known).sum()), w))
    diagonal = np.arange(missing.size)
    rows = np.concatenate([*entries_r, diagonal])
    cols = np.concatenate([*entries_c, diagonal])
    values = np.concatenate([*entries_v, -weight_sum])
    system = sparse.csc_matrix((values, (rows, cols)), shape=(missing.size, missing.size))
    solution = (
        np.asarray(spsolve(system, b, permc_spec="MMD_AT_PLUS_A")).reshape(missing.size, channels).astype(np.float32)
    )
    filled = solution.T
    if noise and rng is not None:
        filled = filled + (noise * rng.standard_normal(filled.shape)).astype(np.float32)
    out[:, missing] = filled
    return out.reshape(image.shape)


def kept_pixels(norm_map: np.ndarray, percentile: float, order: str) -> np.ndarray:
    """``(H, W)`` bool: the pixels a ROAD step keeps (pytorch-grad-cam's rule).

    MoRF keeps ``map < percentile(map, p)``; LeRF the same of ``1 - map``.
    """
    ranked = norm_map if order == "morf" else (1 - norm_map)
    threshold = np.percentile(ranked, percentile)
    return ranked < threshold


def _seed(seed: int, sample_id: str, percentile: int, order: str) -> list[int]:
    return [seed, zlib.crc32(sample_id.encode("utf-8")), percentile, ORDERS.index(order)]


class RoadPlan:
    """Per sample 9 MoRF then 9 LeRF inputs, imputed when their batch is built
    (the sparse solves of a batch run in threads)."""

    def __init__(self, samples: Samples, options: MetricOptions, percentiles: tuple[int, ...] = PERCENTILES) -> None:
        self.samples = samples
        self.percentiles = percentiles
        self.noise = options.road_noise
        self.seed = options.seed
        self.per_sample = 2 * len(percentiles)
        self.count = len(samples) * self.per_sample
        self._images = samples.images.detach().float().cpu().numpy()
        self._maps = samples.maps.detach().float().cpu().numpy()

    def _one(self, job: int) -> np.ndarray:
        sample, local = divmod(job, self.per_sample)
        order = ORDERS[local // len(self.percentiles)]
        percentile = self.percentiles[local % len(self.percentiles)]
        keep = kept_pixels(self._maps[sample], percentile, order)
        rng = np.random.default_rng(_seed(self.seed, self.samples.ids[sample], percentile, order))
        return impute(self._images[sample], keep, self.noise, rng)

    def build(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        jobs = range(start, stop)
        arrays = list(_solver_pool().map(self._one, jobs)) if len(jobs) > 1 else [self._one(j) for j in jobs]
        x = torch.from_numpy(np.stack(arrays)).to(self.samples.images.device)
        sample = torch.tensor([j // self.per_sample for j in jobs], device=self.samples.classes.device)
        return x, self.samples.classes[sample]

    def finish(self, scores: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(self.samples)
        change = scores.view(n, 2, len(self.percentiles)) - base.view(n, 1, 1)
        morf = change[:, 0].mean(dim=1)
        lerf = change[:, 1].mean(dim=1)
        return {"road_morf": morf, "road_lerf": lerf, "road_combined": (lerf - morf) / 2}


def make_plan(samples: Samples, names: Collection[str], options: MetricOptions) -> RoadPlan:
    """The registry's entry for ``road``."""
    return RoadPlan(samples, options)


def road(
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    forward: Forward,
    noise: float = 0.01,
    seed: int = 0,
    batch_size: int = 32,
    ids: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``{"road_morf", "road_lerf", "road_combined"}``, each ``(N,)``, for ``images``
    ``(N, 3, S, S)``, ``maps`` ``(N, S, S)`` and ``classes`` ``(N,)``."""
    samples = Samples(images, maps, classes, list(ids or []))
    plan = RoadPlan(samples, MetricOptions(road_noise=noise, seed=seed))
    values = run_plans(samples, [plan], forward, batch_size)
    return {k: values[k] for k in ("road_morf", "road_lerf", "road_combined")}

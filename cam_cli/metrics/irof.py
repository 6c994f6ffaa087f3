"""IROF: iterative removal of features (Rieger and Hansen, "IROF: a low resource
evaluation metric for explanation methods", ICLR 2020 workshop).

The normalised image is cut into superpixels by scikit-image's ``slic(image, start_label=0)``
(100 segments asked for; the image as ``(S, S, 3)`` float64, as Quantus passes it). Segments
are ranked by the mean of the map over them, highest first (a stable sort). Step ``k`` =
1, ..., ``K`` (every segment) replaces the ``k``-th segment with the mean of the image as
it stands after step ``k - 1`` (all channels and pixels; Quantus's ``"mean"`` baseline,
recomputed per step), so the fill of each segment is known before any forward pass and
every step is built from the original image. The curve is ``y_k / y`` (the explained
class's softmax probability relative to the unperturbed image's); its area over it is
``K - np.trapz(curve, dx=1)`` (Quantus) and camx's ``irof`` is that divided by ``K``, so
that it does not grow with the number of segments: higher is better.

Equals Quantus 0.6's ``IROF(segmentation_method="slic", perturb_baseline="mean", abs=False,
normalise=False)`` run one image at a time, divided by ``K``. Quantus run with several
images per batch fills with the mean of the whole batch (every image, every channel), so
its value for an image depends on the images that share its batch: camx follows the
paper (a per-image mean) and is tested against Quantus at ``batch_size=1``.

For a similarity run ``y`` is the cosine similarity to the reference; where the image's own
is negative the ratio means nothing, and ``irof`` is null.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection

import numpy as np
import torch
from skimage.segmentation import slic

from cam_cli.metrics.base import Forward, Samples, run_plans
from cam_cli.metrics.options import MetricOptions

#: what ``slic`` is asked for (its default, Quantus's)
SEGMENTS = 100


def superpixels(image: np.ndarray) -> np.ndarray:
    """``(S, S)`` int segment labels 0..K-1 of a normalised ``(3, S, S)`` image (Quantus's call)."""
    return np.asarray(slic(np.moveaxis(image, 0, -1).astype("double"), start_label=0))


def segment_order(norm_map: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """The segment labels ``(K,)`` by the map's mean over each, highest first (stable)."""
    count = int(segments.max()) + 1
    sums = np.bincount(segments.ravel(), weights=norm_map.ravel().astype(np.float64), minlength=count)
    sizes = np.bincount(segments.ravel(), minlength=count)
    means = np.where(sizes > 0, sums / np.maximum(sizes, 1), -np.inf)
    order = np.argsort(-means, kind="stable")
    return order[sizes[order] > 0]


def mean_fills(image: np.ndarray, segments: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``(K,)`` the value segment ``order[k]`` is filled with: the image's mean after the
    ``k`` segments before it were filled (a scalar recurrence, in float64)."""
    channels = image.shape[0]
    total_size = image.size
    flat = image.reshape(channels, -1).astype(np.float64)
    sums = np.bincount(segments.ravel(), weights=flat.sum(axis=0), minlength=int(segments.max()) + 1)
    sizes = np.bincount(segments.ravel(), minlength=int(segments.max()) + 1) * channels
    total = flat.sum()
    fills = np.empty(len(order))
    for k, seg in enumerate(order):
        fills[k] = total / total_size
        total += fills[k] * sizes[seg] - sums[seg]
    return fills


class IrofPlan:
    """Per sample one input per superpixel (``K`` differs between samples); the superpixels
    of an image are cut once for all the samples (methods) that share it."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples
        images = samples.images.detach().float().cpu().numpy()
        maps = samples.maps.detach().float().cpu().numpy()
        cut: dict[bytes, np.ndarray] = {}
        ranks: list[np.ndarray] = []
        fills: list[np.ndarray] = []
        self.steps: list[int] = []
        for image, norm_map in zip(images, maps, strict=True):
            key = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
            if key not in cut:
                cut[key] = superpixels(image)
            segments = cut[key]
            order = segment_order(norm_map, segments)
            step_of = np.full(int(segments.max()) + 1, len(order), dtype=np.int64)
            step_of[order] = np.arange(len(order))
            pixel_step = step_of[segments.ravel()]
            ranks.append(pixel_step)
            fills.append(mean_fills(image, segments, order)[np.minimum(pixel_step, len(order) - 1)])
            self.steps.append(len(order))
        device = samples.images.device
        self.rank = torch.from_numpy(np.stack(ranks)).to(device)  # (N, P) the step that removes each pixel
        self.fills = torch.from_numpy(np.stack(fills)).float().to(device)  # (N, P) its fill
        self.offsets = np.concatenate([[0], np.cumsum(self.steps)])
        self._offsets = torch.from_numpy(self.offsets).to(device)
        self.count = int(self.offsets[-1])

    def build(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.samples.images
        jobs = torch.arange(start, stop, device=images.device)
        sample = torch.searchsorted(self._offsets, jobs, right=True) - 1
        step = (jobs - self._offsets[sample]).unsqueeze(1)  # 0-based: segments 0..step removed
        removed = (self.rank[sample] <= step).unsqueeze(1)  # (n, 1, P)
        flat = images.flatten(2)[sample]
        x = torch.where(removed, self.fills[sample].unsqueeze(1).to(flat.dtype), flat)
        return x.view(-1, *images.shape[1:]), self.samples.classes[sample]

    def finish(self, scores: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
        values = []
        for sample, steps in enumerate(self.steps):
            curve = scores[self.offsets[sample] : self.offsets[sample + 1]].double() / float(base[sample])
            aoc = steps - float(torch.trapezoid(curve, dx=1.0))
            values.append(aoc / steps if float(base[sample]) >= 0 else math.nan)  # a ratio to a negative score (a
            # similarity below 0) means nothing: null
        return {"irof": torch.tensor(values, dtype=torch.float32)}


def make_plan(samples: Samples, names: Collection[str], options: MetricOptions) -> IrofPlan:
    """The registry's entry for ``irof``."""
    return IrofPlan(samples)


def irof(
    images: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor, forward: Forward, batch_size: int = 32
) -> torch.Tensor:
    """``(N,)`` IROF of ``images`` ``(N, 3, S, S)`` normalised, ``maps`` ``(N, S, S)``, ``classes`` ``(N,)``."""
    samples = Samples(images, maps, classes)
    return run_plans(samples, [IrofPlan(samples)], forward, batch_size)["irof"]

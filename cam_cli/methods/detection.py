"""CAMs of a detection model: one target per detection, its score as the model reports it.

A batch of images in [0, 1] at their own sizes goes through the model once with the
target layer hooked (the model resizes and pads them itself); the detections each map
explains are chosen (:class:`DetectionTargets`) by the model's
:class:`~cam_cli.models.detection_readout.DetectionReadout`, and the methods read the
capture as they read a classifier's, with the detections' scores ``(N, R)`` in place of
logits: rank ``r`` of every image is differentiated in one backward pass. Score-CAM and
Ablation-CAM then run their passes over each image's masked or ablated copies, where each
detection's score is that of its match (the readout's ``pinned`` passes). Maps come back
to each image's own pixels through the model's resize and padding (:func:`to_image`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cam_cli.errors import ModelError
from cam_cli.methods.base import Capture, Method, TargetLayer, to_feature_map
from cam_cli.methods.box_gradients import sparse_box_gradients
from cam_cli.models.detection_readout import DetectionReadout, matched_scores
from cam_cli.probe.capture import ActivationCapture

#: methods whose maps are a function of the activation and the gradient of one score
GRADIENT = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam-elementwise", "eigengradcam")
#: class-agnostic: one map per image, whatever the detections
AGNOSTIC = ("eigencam", "fem", "random")
#: channel weights from passes over each image's masked or ablated copies, each detection
#: scored by its match there
PERTURBATION = ("scorecam", "ablationcam", "sscam")
#: why each other method is refused for a detection model
REFUSED = {
    "cam": "needs a global-average-pooling + linear head, and a detector has box heads (use gradcam)",
    "finercam": "contrasts a class with its nearest rival class, and a detection's score has none",
    "refinecam": "fuses several layers' classifier gradients; not adapted to detections",
    "dff": "labels its concepts through a classifier head, and a detector has none",
    "fullgrad": "reads every bias of a classifier; its input-gradient pass is not adapted to detections",
    "guided-backprop": "runs a classifier pass of its own; not adapted to detections",
    "guided-gradcam": "runs a classifier pass of its own; not adapted to detections",
    "smoothgradcam++": "its noisy passes are not adapted to detections",
    "shapleycam": "needs second derivatives, which torchvision's RoI and box operators do not provide",
    "segeigencam": "not checked against a reference on detection models",
    "kpcacam": "not checked against a reference on detection models",
    "iscam": "its integrated masked passes are not checked against a reference on detections (sscam is)",
}


def check_detection_methods(names: Sequence[str]) -> None:
    """Refuse, in one line, a method that cannot apply to a detection model."""
    for name in names:
        if name not in GRADIENT and name not in AGNOSTIC and name not in PERTURBATION:
            reason = REFUSED.get(name, "not adapted to detection models")
            raise ModelError(f"{name} cannot explain a detection model: {reason}")


@dataclass(frozen=True)
class DetectionTargets:
    """Which detections get a map: those scoring at least ``min_score``, highest first,
    at most ``max_detections`` (``top``: at most K), of class ``label`` when given."""

    text: str = "all"
    min_score: float = 0.5
    max_detections: int = 10
    label: int | None = None
    top: int | None = None

    @property
    def limit(self) -> int:
        return self.top if self.top is not None else self.max_detections

    def select(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Indices ``(R,)`` of the chosen detections, highest score first."""
        keep = scores >= self.min_score
        if self.label is not None:
            keep &= labels == self.label
        index = keep.nonzero().flatten()
        order = scores[index].argsort(descending=True, stable=True)
        return index[order][: self.limit]


@dataclass
class Detections:
    """The chosen detections of one image: ``boxes`` ``(R, 4)`` x1, y1, x2, y2 in the
    image's pixels, ``labels`` ``(R,)`` and ``scores`` ``(R,)``; all detached, on the CPU."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class DetectionBatch:
    """One batch explained: per image its detections, and per method the maps
    ``(R_m, H, W)`` at the image's own size, min-maxed (R_m: one per detection, or 1)."""

    detections: list[Detections]
    maps: list[dict[str, torch.Tensor]]


class _Sizes:
    """Hooks the model's transform to read each image's size after its resize
    (``image_sizes``) and the padded batch's size."""

    def __init__(self, transform: nn.Module) -> None:
        self.transform = transform
        self.resized: list[tuple[int, int]] = []
        self.padded: tuple[int, int] = (0, 0)

    def __enter__(self) -> _Sizes:
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            images = output[0]
            self.resized = [(int(h), int(w)) for h, w in images.image_sizes]
            self.padded = (int(images.tensors.shape[-2]), int(images.tensors.shape[-1]))

        self._handle = self.transform.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def to_image(
    maps: torch.Tensor, resized: tuple[int, int], padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Maps ``(R, h, w)`` over the padded batch ``padded`` back to an image of ``size``
    (H, W) that the model resized to ``resized``: one bilinear sample (``align_corners``
    False, edges clamped) of the region the image covers, then exact min-max per map."""
    (hr, wr), (hp, wp), (height, width) = resized, padded, size
    device = maps.device
    ys = (torch.arange(height, device=device, dtype=torch.float64) + 0.5) * (hr / height) / hp * 2 - 1
    xs = (torch.arange(width, device=device, dtype=torch.float64) + 0.5) * (wr / width) / wp * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).float()  # (H, W, 2) as (x, y)
    count = maps.shape[0]
    up = F.grid_sample(
        maps[:, None].float(),
        grid.expand(count, height, width, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    span = up.amax(dim=(1, 2), keepdim=True) - low
    return (up - low) / torch.where(span > 0, span, torch.ones_like(span))


def own_cells(features: torch.Tensor, resized: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
    """The cells of ``features`` ``(..., h, w)`` over a padded batch that an image resized to
    ``resized`` covers (whole cells: the padding cut off); all of them without padding."""
    h, w = features.shape[-2:]
    rows = min(h, math.ceil(h * resized[0] / padded[0] - 1e-6))
    cols = min(w, math.ceil(w * resized[1] / padded[1] - 1e-6))
    return features[..., :rows, :cols]


class DetectionExplainer:
    """Runs prepared ``methods`` on a detection ``module`` at layer ``target``."""

    def __init__(self, module: nn.Module, target: TargetLayer, methods: Sequence[Method], targets: DetectionTargets,
                 batch_size: int = 16) -> None:  # fmt: skip
        check_detection_methods([m.name for m in methods])
        self.module = module
        self.target = target
        self.methods = list(methods)
        self.targets = targets
        self.batch_size = batch_size
        self.readout = DetectionReadout(targets.select)
        for method in self.methods:
            if method.name == "ablationcam":  # what its ``prepare`` would set: the full passes, hooked
                method.module, method.target = module, target  # type: ignore[attr-defined]

    def explain(self, images: list[torch.Tensor], names: Sequence[str] | None = None) -> DetectionBatch:
        """``images``: ``(3, H, W)`` float in [0, 1], each at its own size."""
        methods = [m for m in self.methods if names is None or m.name in names]
        grad = any(m.needs_gradient for m in methods)
        mode = torch.enable_grad() if grad else torch.inference_mode()
        transform = self.module.get_submodule("transform")
        sparse = sparse_box_gradients(self.module, self.target.name) if grad else contextlib.nullcontext()
        with mode, sparse, ActivationCapture(self.module, self.target, grad) as hooked, _Sizes(transform) as sz:
            outputs = self.module(images)
            leaf = hooked.activation
            if leaf is None:
                raise ModelError(f"layer {self.target.label} was not reached by the forward pass")
            scores = self.readout(outputs).to(leaf.device)
            detections = [Detections(b, v, s) for b, v, s in
                          zip(self.readout.boxes, self.readout.labels, self.readout.found, strict=True)]  # fmt: skip
            capture = self._capture(leaf, scores, grad)
            ranks = capture.classes.shape[1]
            raw = {m.name: m.maps(capture).detach() for m in methods
                   if not m.after_pass and (ranks or not m.info.class_specific)}  # fmt: skip
        if ranks:
            with torch.inference_mode():
                for method in (m for m in methods if m.after_pass):
                    raw[method.name] = self._perturbed(method, capture, images, sz)
        maps: list[dict[str, torch.Tensor]] = []
        for n, image in enumerate(images):
            size = (int(image.shape[-2]), int(image.shape[-1]))
            per: dict[str, torch.Tensor] = {}
            for method in methods:
                count = len(detections[n]) if method.info.class_specific else 1
                if count == 0:
                    continue
                per[method.name] = to_image(raw[method.name][n, :count], sz.resized[n], sz.padded, size)
            maps.append(per)
        return DetectionBatch(detections, maps)

    def _capture(self, leaf: torch.Tensor, scores: torch.Tensor, grad: bool) -> Capture:
        """The methods' view of the pass: the chosen scores ``(N, R)`` (zeros past an image's
        own detections) in place of logits, rank ``r`` differentiated as "class" ``r``."""
        n, ranks = scores.shape
        classes = torch.arange(ranks, device=leaf.device).expand(n, ranks)
        features = to_feature_map(leaf.detach(), self.target).float()
        return Capture(
            self.target,
            features,
            scores.detach().float(),
            classes,
            torch.zeros((n, 1), dtype=torch.long, device=leaf.device),
            leaf if grad else None,
            scores if grad else None,
        )

    def _pinned(self, image: int, rows: torch.Tensor | None) -> AbstractContextManager[None]:
        """Passes over copies of ``image`` of the last batch (``rows``: indices into a one-image capture)."""
        return self.readout.pinned(torch.tensor([image]) if rows is None else rows + image)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The readout of the model on copies of images ``(B, 3, H, W)`` of one size: ``(B, R)``
        (inside ``pinned``: each target's matched score)."""
        return self.readout(self.module(list(batch)))

    def _perturbed(self, method: Method, capture: Capture, images: list[torch.Tensor], sizes: _Sizes) -> torch.Tensor:
        """Raw maps ``(N, R, h, w)`` of a method with passes of its own (Score-CAM, Ablation-CAM):
        channel weights from each image's masked or ablated copies (its own cells of the
        activation: the padding cut off), then ``ReLU(sum_k w_k A_k)`` over the batch's activation."""
        features = capture.features
        n, ranks = capture.classes.shape
        out = features.new_zeros((n, ranks, *features.shape[-2:]))
        for i, image in enumerate(images):
            count = len(self.readout.boxes[i])
            if count == 0:
                continue
            part = Capture(
                self.target,
                own_cells(features[i : i + 1], sizes.resized[i], sizes.padded),
                capture.logits[i : i + 1, :count],
                torch.arange(count, device=features.device)[None],
                capture.top1[i : i + 1],
                x=image[None],
                forward=self._forward,
                batch_size=self.batch_size,
                pin=partial(self._pinned, i),
            )
            weights = channel_weights(method, part)[0]  # (count, K)
            out[i, :count] = torch.relu(torch.einsum("rk,khw->rhw", weights.to(features.dtype), features[i]))
        return out


def channel_weights(method: Method, capture: Capture) -> torch.Tensor:
    """Score-CAM's (and its variants') or Ablation-CAM's channel weights ``(N, R, K)`` from the
    passes of ``capture``."""
    from cam_cli.methods.perturbation import ScoreCAM

    if isinstance(method, ScoreCAM):  # its own masks and their scores, then softmax over the channels
        return torch.softmax(method.scores(capture), dim=2)
    if method.name == "ablationcam":
        y = capture.logits.gather(1, capture.classes)[:, :, None]
        return (y - method._ablated_scores(capture)) / y  # type: ignore[attr-defined]
    raise ModelError(f"{method.name} has no passes adapted to detections")


__all__ = [
    "AGNOSTIC",
    "GRADIENT",
    "PERTURBATION",
    "DetectionBatch",
    "DetectionExplainer",
    "DetectionTargets",
    "Detections",
    "check_detection_methods",
    "matched_scores",
    "to_image",
]

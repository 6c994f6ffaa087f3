"""What every CAM method shares: the target layer, the hook that captures it,
(:mod:`cam_cli.probe.capture`), and the method
contract (:class:`Method`) with the per-batch capture it reads (:class:`Capture`).

The contract: a method declares its registry entry (name, family, what it
needs), checks in ``prepare`` that it can apply to the model (raising
``ModelError`` with the reason before anything runs), and turns one batch's
capture into raw maps ``(N, R, h, w)``. The capture holds one forward pass;
gradients are computed on first request and cached, so every method that only
needs the activation ``A`` and its gradient ``g`` shares one backward pass.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from cam_cli.errors import ModelError
from cam_cli.methods.registry import info
from cam_cli.probe.capture import ActivationCapture, Layout, TargetLayer, resolve_module, to_feature_map
from cam_cli.probe.probe import Probe

ClassChooser = Callable[[torch.Tensor], torch.Tensor]


class Stopped(Exception):
    """Raised by a method's own passes when the run's stop event is set.

    ``scores``: what the passes gave for the first images of the batch, those whose
    passes were all done (``(M, ...)``, M may be 0); ``maps``: those images' finished
    raw maps ``(M, R, h, w)``, once the method made them. The rest of the batch is
    dropped; what was already complete is kept."""

    def __init__(self, scores: torch.Tensor | None = None, maps: torch.Tensor | None = None) -> None:
        super().__init__("stopped")
        self.scores = scores
        self.maps = maps

    @property
    def finished(self) -> int:
        """How many images of the batch (its first ones) the method finished."""
        kept = self.maps if self.maps is not None else self.scores
        return 0 if kept is None else len(kept)


@dataclass
class Explanation:
    """One batch explained.

    ``logits``: ``(N, C)``; ``classes``: ``(N, R)`` explained class indices
    (R targets per image); ``maps``: ``(N, R, h, w)`` raw float32 maps.
    """

    logits: torch.Tensor
    classes: torch.Tensor
    maps: torch.Tensor

    @property
    def scores(self) -> torch.Tensor:
        """Softmax probability of each explained class, ``(N, R)``."""
        return self.logits.float().softmax(dim=1).gather(1, self.classes)


@dataclass(frozen=True)
class MethodOptions:
    """Options that shape some methods' maps (recorded in the manifest where they apply)."""

    seed: int = 0
    finer_gamma: float = 1.0
    eigen_smooth: bool = False
    #: kpcacam: scikit-learn KernelPCA's kernel and its gamma (None: 1 / channels)
    kpca_kernel: str = "sigmoid"
    kpca_gamma: float | None = None
    #: smoothgradcam++ and sscam: noisy copies per image (iscam: integration steps), and the
    #: noise's standard deviation; None: the method's own default (torchcam 0.5.0's)
    noise_samples: int | None = None
    noise_std: float | None = None
    #: dff: the concepts (NMF components) an image is factorised into, one map each
    concepts: int = 5
    #: sess: the base method explaining each patch, and the number of scales (None: gradcam, 12)
    sess_base: str | None = None
    sess_scales: int | None = None


@dataclass
class MapLabels:
    """The classes a method gives its own maps (``Method.labels_maps``): ``classes`` and
    ``scores`` ``(N, R)``, one per map, and per image and map a dict of details for the
    manifest (DFF: the concept's index and its top classes with their scores)."""

    classes: torch.Tensor
    scores: torch.Tensor
    details: list[list[dict[str, Any]]]

    def first(self, count: int) -> MapLabels:
        return MapLabels(self.classes[:count], self.scores[:count], self.details[:count])


@dataclass
class Setup:
    """What ``Method.prepare`` may inspect: the probe pass and the model on its device."""

    probe: Probe
    target: TargetLayer | None
    module: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    #: every target layer when ``--layer`` names several (``target`` is the first)
    targets: tuple[TargetLayer, ...] = ()


@dataclass
class Capture:
    """One forward pass of a batch through the model, hooked at the target layer.

    ``features``: the activation as ``(N, K, h, w)`` float32; ``logits``: ``(N, C)``
    float32; ``classes``: ``(N, R)`` the explained classes; ``top1``: ``(N, 1)``.
    ``gradient(r)`` is ``dy/dA`` for the classes of rank ``r`` as ``(N, K, h, w)``
    float32, computed once and shared by every method that asks.
    """

    target: TargetLayer
    features: torch.Tensor
    logits: torch.Tensor
    classes: torch.Tensor
    top1: torch.Tensor
    activation: torch.Tensor | None = None  # the hooked leaf (raw layout), when gradients are needed
    graph_logits: torch.Tensor | None = None
    create_graph: bool = False
    #: the normalised input ``(N, 3, S, S)`` and the model's forward, for methods that run
    #: passes of their own after the hooked one (``Method.after_pass``): the hook is off then
    x: torch.Tensor | None = None
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: for those passes: how many images one of them takes (``--batch-size``), a callback told
    #: how many forward passes (one per image) were just done, and the run's stop event,
    #: checked between passes (raise :class:`Stopped` when it is set)
    batch_size: int = 16
    on_passes: Callable[[int], None] | None = None
    stop: threading.Event | None = None
    #: the captures of the other layers hooked in the same pass (several ``--layer``):
    #: the gradients of all of them come from one backward pass
    group: list[Capture] = field(default_factory=list)
    #: the readout's ``pinned(rows)`` (:mod:`cam_cli.models.readout`) for those passes: inside
    #: it, row ``i`` of a pass's batch is read as a perturbed copy of image ``rows[i]`` of this
    #: batch (a segmentation target keeps the original image's mask)
    pin: Callable[[torch.Tensor | None], AbstractContextManager[None]] | None = None
    _cache: dict[Any, Any] = field(default_factory=dict)

    def first(self, count: int) -> Capture:
        """This capture narrowed to the batch's first ``count`` images (no gradients, nothing cached)."""
        return Capture(
            self.target,
            self.features[:count],
            self.logits[:count],
            self.classes[:count],
            self.top1[:count],
            x=None if self.x is None else self.x[:count],
            forward=self.forward,
            batch_size=self.batch_size,
            pin=self.pin,
        )

    def pinned(self, rows: torch.Tensor | None = None) -> AbstractContextManager[None]:
        """Passes over perturbed copies of this batch's images run inside this (see ``pin``)."""
        return contextlib.nullcontext() if self.pin is None else self.pin(rows)

    def score_gradient(self, columns: torch.Tensor) -> torch.Tensor:
        """``d (sum_n y[n, columns[n]]) / dA`` in the activation's raw layout (graph kept when asked)."""
        if self.activation is None or self.graph_logits is None:
            raise ModelError("this method needs gradients, but the pass was run without them")
        score = self.graph_logits.gather(1, columns.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, self.activation, retain_graph=True, create_graph=self.create_graph)
        return grad

    def raw_gradient(self, r: int) -> torch.Tensor:
        key = ("raw", r)
        if key not in self._cache and len(self.group) > 1:  # every layer's from one backward pass
            if self.graph_logits is None or any(c.activation is None for c in self.group):
                raise ModelError("this method needs gradients, but the pass was run without them")
            score = self.graph_logits.gather(1, self.classes[:, r].view(-1, 1)).sum()
            leaves = [c.activation for c in self.group]
            grads = torch.autograd.grad(score, leaves, retain_graph=True, create_graph=self.create_graph)  # type: ignore[arg-type]
            for capture, grad in zip(self.group, grads, strict=True):
                capture._cache[key] = grad
        if key not in self._cache:
            self._cache[key] = self.score_gradient(self.classes[:, r])
        return self._cache[key]

    def gradient(self, r: int) -> torch.Tensor:
        key = ("grad", r)
        if key not in self._cache:
            self._cache[key] = to_feature_map(self.raw_gradient(r).detach(), self.target).float()
        return self._cache[key]


class Method:
    """A CAM method. Subclasses set ``name`` (a registry entry) and supply
    ``weights`` (channel weights ``(N, K)``) or ``weighted`` (element-wise
    weighted activations ``(N, K, h, w)``), or override ``maps``."""

    name: ClassVar[str]
    relu: ClassVar[bool] = True
    needs_gradient: ClassVar[bool] = False
    needs_second_order: ClassVar[bool] = False
    #: ``maps`` is called after the hooked pass, with the hook removed and ``capture.x`` and
    #: ``capture.forward`` set: for methods that run extra forward passes (perturbation)
    after_pass: ClassVar[bool] = False
    #: the forward passes of its own one image costs (set by ``prepare``; 0 for most methods)
    passes_per_image: int = 0
    #: reads every hooked layer at once (``layer_maps``) instead of one map per layer that the
    #: explainer fuses (RefineCAM)
    multi_layer: ClassVar[bool] = False
    #: gives each of its maps a class of its own (``concept_labels`` after ``maps``), not the
    #: image's explained classes (DFF's concepts)
    labels_maps: ClassVar[bool] = False
    #: those classes, for the batch ``maps`` was last called on
    concept_labels: MapLabels | None = None
    #: ``run`` is a pass of its own even though the method reads a target layer (Guided
    #: Grad-CAM); methods without a layer (``uses_layer`` False) always run their own
    own_pass: ClassVar[bool] = False
    #: ``run_with_gradients`` gives the 3-channel input-resolution image behind each map
    #: (guided backpropagation), written beside the map
    gives_gradients: ClassVar[bool] = False

    def __init__(self, options: MethodOptions | None = None) -> None:
        self.options = options or MethodOptions()
        self.info = info(self.name)

    def prepare(self, setup: Setup) -> None:
        """Raise ``ModelError`` when this method cannot apply to the model or layer."""

    def settings(self) -> dict[str, Any]:
        """What, beyond the run's settings, shaped this method's maps (for the manifest)."""
        return {"eigen_smooth": True} if self.options.eigen_smooth else {}

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        raise NotImplementedError

    def map_count(self, targets: int) -> int:
        """How many maps an input gets from this method when ``--target`` asks for ``targets``."""
        return targets if self.info.class_specific else 1

    def run(
        self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, classes: torch.Tensor | None,
        choose: ClassChooser,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """A pass of the method's own (methods without a target layer): ``(logits, classes, maps)``."""
        raise NotImplementedError

    def run_with_gradients(
        self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, classes: torch.Tensor | None,
        choose: ClassChooser,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """``run``, and for methods that ``gives_gradients`` the images ``(N, R, 3, S, S)``
        behind the maps (None for the others)."""
        return (*self.run(forward, x, classes, choose), None)

    def weighted(self, capture: Capture, r: int) -> torch.Tensor:
        return self.weights(capture, r)[:, :, None, None] * capture.features

    def layer_maps(self, captures: list[Capture], size: tuple[int, int]) -> torch.Tensor:
        """Raw maps ``(N, R, S, S)`` at the input's ``size`` from every hooked layer's capture
        (the layers of one pass, in ``--layer`` order), for methods with ``multi_layer``."""
        raise NotImplementedError

    def maps(self, capture: Capture) -> torch.Tensor:
        """Raw maps ``(N, R, h, w)``: ``sum_k`` of the weighted activations (or their first
        principal component with ``eigen_smooth``), then ReLU where the method has one."""
        ranks = capture.classes.shape[1] if self.info.class_specific else 1
        out = []
        for r in range(ranks):
            if self.options.eigen_smooth:
                cam = first_component(self.weighted(capture, r))
            elif type(self).weighted is Method.weighted:
                cam = torch.einsum("nk,nkhw->nhw", self.weights(capture, r), capture.features)
            else:
                cam = self.weighted(capture, r).sum(dim=1)
            out.append(torch.relu(cam) if self.relu else cam)
        return torch.stack(out, dim=1)


def sign_corrected(projection: torch.Tensor) -> torch.Tensor:
    """Seg-Eigen-CAM's sign rule (Chung & Ying 2025, eq. 13) on ``(N, P)`` projections:
    each flipped where its most negative value outweighs its largest."""
    low = projection.amin(dim=1, keepdim=True)
    high = projection.amax(dim=1, keepdim=True)
    return torch.where(low.abs() > high.abs(), -projection, projection)


def first_component(weighted: torch.Tensor) -> torch.Tensor:
    """Eigen-CAM's projection with Seg-Eigen-CAM's sign correction, per image.

    ``weighted``: ``(N, K, h, w)``. Each image's activations, as ``(h*w, K)`` with
    every channel centred over the positions, are projected on their first right
    singular vector ``v``; the projection is flipped where its most negative
    value outweighs its largest (Chung & Ying 2025, eq. 13). NaNs count as 0.
    Returns ``(N, h, w)`` float32. Computed through the smaller Gram matrix in
    float64: ``X v_1 = sigma_1 u_1`` with ``u_1`` the top eigenvector of ``X X^T``.
    """
    n, k, h, w = weighted.shape
    x = torch.nan_to_num(weighted.double(), nan=0.0).reshape(n, k, h * w).transpose(1, 2)  # (N, P, K)
    x = x - x.mean(dim=1, keepdim=True)
    if h * w <= k:
        values, vectors = torch.linalg.eigh(x @ x.transpose(1, 2))  # (N, P, P), ascending
        projection = vectors[:, :, -1] * values[:, -1:].clamp(min=0).sqrt()
    else:
        _, vectors = torch.linalg.eigh(x.transpose(1, 2) @ x)  # (N, K, K)
        projection = (x @ vectors[:, :, -1:]).squeeze(-1)
    return sign_corrected(projection).reshape(n, h, w).float()


__all__ = [
    "ActivationCapture",
    "Capture",
    "ClassChooser",
    "Explanation",
    "Layout",
    "MapLabels",
    "Method",
    "MethodOptions",
    "Setup",
    "Stopped",
    "TargetLayer",
    "first_component",
    "resolve_module",
    "to_feature_map",
]

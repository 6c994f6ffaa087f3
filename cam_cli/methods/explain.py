"""Several methods from one pass: one forward, at most one shared backward.

``BatchExplainer.explain(x, choose)`` runs the model once on a batch with the
target layer hooked, and asks each method for its maps from that capture;
gradients are computed on the first method's request and shared (see
``Capture``). Methods without a target layer (FullGrad, Guided Backpropagation) and
those that set ``own_pass`` (Guided Grad-CAM) run their own pass.
With ``aug_smooth`` the batch goes through six augmented passes (horizontal
flip x scaling the normalised input by 0.9, 1, 1.1, as pytorch-grad-cam's
``aug_smooth``), each finished at the input size (ReLU where the method has
one, bilinear resize, min-max), flipped back and averaged; the explained
classes are those of the plain pass in all six.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cam_cli.errors import ModelError
from cam_cli.methods.base import (
    ActivationCapture,
    Capture,
    ClassChooser,
    MapLabels,
    Method,
    Stopped,
    TargetLayer,
    to_feature_map,
)
from cam_cli.models.readout import Readout

AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))


@dataclass
class MultiExplanation:
    """One batch explained by several methods.

    ``logits``: ``(N, C)`` float32; ``classes``: ``(N, R)`` the explained classes;
    ``top1``: ``(N, 1)``; ``maps[name]``: ``(N, R_m, h, w)`` raw float32 maps, with
    ``R_m = R`` for class-specific methods and 1 (the top-1 class) for the others.
    ``stopped``: the run stopped during a method's own passes, and N counts only the
    batch's first images, those whose maps were all finished.
    """

    logits: torch.Tensor
    classes: torch.Tensor
    top1: torch.Tensor
    maps: dict[str, torch.Tensor]
    stopped: bool = False
    #: the classes of methods that label their maps themselves (DFF's concepts)
    labels: dict[str, MapLabels] = field(default_factory=dict)
    #: ``gradients[name]``: ``(N, R_m, 3, S, S)`` float32 at the input's size, for the methods
    #: that give the image behind their maps (guided backpropagation)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    #: scores are the outputs themselves (a similarity), not softmax probabilities
    raw_scores: bool = False
    #: the score of every target ``(N, C)`` as the readout gives it (a classifier: softmax);
    #: None: the softmax of ``logits``
    probabilities: torch.Tensor | None = None
    #: per image and explained target, what the readout records of it (None: nothing), and
    #: the same for the top-1 target that class-agnostic methods' lines name
    target_details: list[list[dict[str, Any]]] | None = None
    top1_details: list[list[dict[str, Any]]] | None = None
    #: per image, why its targets cannot be explained (None where they can)
    absent: list[str | None] | None = None

    def classes_of(self, method: Method) -> torch.Tensor:
        if method.name in self.labels:
            return self.labels[method.name].classes
        return self.classes if method.info.class_specific else self.top1

    def scores(self, classes: torch.Tensor) -> torch.Tensor:
        """The score of ``classes`` ``(N, R)``: softmax probability, the readout's, or (with
        ``raw_scores``, a similarity) the outputs themselves."""
        if self.probabilities is not None:
            probabilities = self.probabilities
        else:
            probabilities = self.logits if self.raw_scores else self.logits.softmax(dim=1)
        return probabilities.gather(1, classes.to(probabilities.device))

    def scores_of(self, method: Method) -> torch.Tensor:
        """The score of each of ``method``'s maps ``(N, R_m)``: the image's probability of the
        map's class, or the method's own (DFF: the concept's)."""
        if method.name in self.labels:
            return self.labels[method.name].scores
        return self.scores(self.classes_of(method))

    def details_of(self, method: Method) -> list[list[dict[str, Any]]] | None:
        """Per image and map, what the method says of the map beyond its class (DFF), or None."""
        labels = self.labels.get(method.name)
        if labels is not None:
            return labels.details
        return self.target_details if method.info.class_specific else self.top1_details


def fuse_layers(per_layer: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Maps of several layers as one, as pytorch-grad-cam aggregates ``target_layers``: each
    ``(N, R, h_l, w_l)`` min-maxed at its own resolution, resized (bilinear) to ``size``,
    ReLU'd, then averaged; the usual finish min-maxes the mean."""
    if len(per_layer) == 1:
        return per_layer[0]
    fused = []
    for maps in per_layer:
        low = maps.amin(dim=(2, 3), keepdim=True)
        span = maps.amax(dim=(2, 3), keepdim=True) - low
        scaled = (maps - low) / torch.where(span > 0, span, torch.ones_like(span))
        if tuple(scaled.shape[-2:]) != size:
            scaled = F.interpolate(scaled, size=size, mode="bilinear", align_corners=False)
        fused.append(scaled.clamp(min=0))
    return torch.stack(fused).mean(dim=0)


def layer_maps(method: Method, captures: list[Capture], size: tuple[int, int]) -> torch.Tensor:
    """One method's raw maps from the captures of every hooked layer: its own reading of all
    of them (``multi_layer``), or each layer's maps fused (:func:`fuse_layers`)."""
    if method.multi_layer:
        return method.layer_maps(captures, size).detach()
    return fuse_layers([method.maps(c).detach() for c in captures], size)


def finish_at(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, R, h, w)`` -> bilinear to ``size`` then exact min-max per map (flat: zeros)."""
    up = (
        maps if tuple(maps.shape[-2:]) == size else F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    )
    low = up.amin(dim=(2, 3), keepdim=True)
    span = up.amax(dim=(2, 3), keepdim=True) - low
    return (up - low) / torch.where(span > 0, span, torch.ones_like(span))


class BatchExplainer:
    """Runs ``methods`` (already prepared) over batches of normalised images ``(N, 3, S, S)``."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        module: nn.Module,
        target: TargetLayer | Sequence[TargetLayer] | None,
        methods: Sequence[Method],
        aug_smooth: bool = False,
        readout: Readout | None = None,
    ) -> None:
        self.forward = forward
        #: what the forward's outputs are (:mod:`cam_cli.models.readout`): how targets rank,
        #: score and are recorded, and how passes over perturbed copies are pinned
        self.readout = readout if readout is not None else Readout()
        self.module = module
        #: the target layers (several: their maps are fused, :func:`fuse_layers`); ``target`` the first
        self.targets = [] if target is None else [target] if isinstance(target, TargetLayer) else list(target)
        self.target = self.targets[0] if self.targets else None
        self.methods = list(methods)
        self.aug_smooth = aug_smooth
        #: for methods with passes of their own (``after_pass``): images per pass, a callback
        #: counting those passes, the run's stop event, and the seconds they took so far
        self.batch_size = 16
        self.on_passes: Callable[[int], None] | None = None
        self.stop: threading.Event | None = None
        self.extra_seconds = 0.0
        #: the score of a map is the model's output itself, not its softmax probability
        self.raw_scores = False
        self.own_pass = [m for m in self.methods if not m.info.uses_layer or m.own_pass]
        self.layer_methods = [m for m in self.methods if m not in self.own_pass]
        if self.layer_methods and target is None:
            raise ModelError(f"{self.layer_methods[0].name} needs a target layer")

    def explain(self, x: torch.Tensor, choose: ClassChooser, names: Collection[str] | None = None) -> MultiExplanation:
        """Every method's maps of batch ``x`` (only those in ``names``, when given).

        When the run's stop event is set during a method's own passes, the batch's first
        images whose maps are all finished come back (``stopped``), or :class:`Stopped` is
        raised when there are none (or with ``aug_smooth``, whose passes repeat the batch)."""
        layer_methods = [m for m in self.layer_methods if names is None or m.name in names]
        own_pass = [m for m in self.own_pass if names is None or m.name in names]
        plain = self._pass(x, choose, None, layer_methods, own_pass)
        if not self.aug_smooth:
            return plain
        size = (int(x.shape[-2]), int(x.shape[-1]))
        total = {name: finish_at(maps, size) for name, maps in plain.maps.items()}
        for flip, factor in AUGMENTATIONS:
            if not flip and factor == 1.0:
                continue  # the plain pass
            augmented = (x.flip(-1) if flip else x) * factor
            run = self._pass(augmented, choose, plain.classes, layer_methods, own_pass)
            for name, maps in run.maps.items():
                finished = finish_at(maps, size)
                total[name] += finished.flip(-1) if flip else finished
        plain.maps = {name: maps / len(AUGMENTATIONS) for name, maps in total.items()}
        return plain

    def _pass(
        self,
        x: torch.Tensor,
        choose: ClassChooser,
        classes: torch.Tensor | None,
        layer_methods: list[Method],
        own_pass: list[Method],
    ) -> MultiExplanation:
        maps: dict[str, torch.Tensor] = {}
        labels: dict[str, MapLabels] = {}
        gradients: dict[str, torch.Tensor] = {}
        logits = chosen = None
        stopped = False
        if layer_methods:
            logits, chosen = self._layer_pass(x, choose, classes, maps, layer_methods)
            labels = {m.name: m.concept_labels.first(len(logits)) for m in layer_methods if m.labels_maps
                      and m.name in maps and m.concept_labels is not None}  # fmt: skip
            if len(logits) < len(x):  # stopped: only the first images are finished
                stopped, x = True, x[: len(logits)]
        for method in own_pass:
            own_logits, own_classes, own_maps, own_gradients = method.run_with_gradients(
                self.forward, x, chosen if chosen is not None else classes, choose
            )
            if logits is None:
                logits, chosen = own_logits, own_classes
            maps[method.name] = own_maps
            if own_gradients is not None:
                gradients[method.name] = own_gradients
        assert logits is not None and chosen is not None
        readout = self.readout
        top1 = readout.ranking(logits).argmax(dim=1, keepdim=True)
        explained = MultiExplanation(logits, chosen, top1, maps, stopped, labels, gradients, self.raw_scores)
        if type(readout) is not Readout:  # the readout of the pass just run (x), before any other
            explained.probabilities = readout.scores(logits)
            explained.target_details = readout.details(chosen)
            explained.top1_details = readout.details(top1)
            explained.absent = readout.absent(chosen)
        return explained

    @staticmethod
    def _capture(
        hooked: ActivationCapture,
        logits: torch.Tensor,
        chosen: torch.Tensor,
        graph_logits: torch.Tensor | None,
        second: bool,
    ) -> Capture:
        activation = hooked.activation
        assert activation is not None
        return Capture(
            hooked.target,
            to_feature_map(activation.detach(), hooked.target).float(),
            logits,
            chosen,
            logits.argmax(dim=1, keepdim=True),
            activation if graph_logits is not None else None,
            graph_logits,
            create_graph=second,
        )

    def _layer_pass(
        self,
        x: torch.Tensor,
        choose: ClassChooser,
        classes: torch.Tensor | None,
        maps: dict[str, torch.Tensor],
        methods: list[Method],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.target is not None
        grad = any(m.needs_gradient for m in methods)
        second = any(m.needs_second_order for m in methods)
        mode = torch.enable_grad() if grad else torch.inference_mode()
        # A Hessian-vector product differentiates the backward pass; the fused attention
        # kernels have no second derivative, the reference implementation does.
        kernels = sdpa_kernel([SDPBackend.MATH]) if second else contextlib.nullcontext()
        chain = len(self.targets) > 1
        size = (int(x.shape[-2]), int(x.shape[-1]))
        with mode, kernels, contextlib.ExitStack() as stack:
            hooks = [stack.enter_context(ActivationCapture(self.module, t, grad, chain)) for t in self.targets]
            out = self.forward(x)
            for hooked in hooks:
                if hooked.activation is None:
                    hooked.feature_map()  # raises: the layer was not reached
            if grad and not out.requires_grad:
                raise ModelError(
                    f"the model's output does not depend on layer {self.target.label}, so there is no gradient "
                    "to follow; choose another --layer (or --output-key)"
                )
            logits = out.detach().float()
            chosen = classes if classes is not None else choose(logits)
            captures = [self._capture(h, logits, chosen, out if grad else None, second) for h in hooks]
            for capture in captures:
                capture.group = captures if chain else []
            for method in methods:
                if not method.after_pass:
                    maps[method.name] = layer_maps(method, captures, size)
        late = [m for m in methods if m.after_pass]
        if late:  # passes of their own, with the hook off and no graph
            return self._after_pass(x, captures, late, maps, logits, chosen)
        return logits, chosen

    def _after_pass(
        self,
        x: torch.Tensor,
        captures: list[Capture],
        late: list[Method],
        maps: dict[str, torch.Tensor],
        logits: torch.Tensor,
        chosen: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The maps of the methods with passes of their own (Score-CAM and kin); after a stop
        that left the first images finished, only those (logits and classes narrowed)."""
        size = (int(x.shape[-2]), int(x.shape[-1]))
        for capture in captures:
            capture.activation = capture.graph_logits = None
            capture.x, capture.forward = x, self.forward
            capture.batch_size, capture.on_passes, capture.stop = self.batch_size, self.on_passes, self.stop
            capture.pin = self.readout.pinned
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                for i, method in enumerate(late):
                    try:
                        maps[method.name] = layer_maps(method, captures, size)
                    except Stopped as stopped:
                        # the later methods (and layers) have not run: nothing is finished for them
                        if (stopped.maps is None or not stopped.finished or i < len(late) - 1 or self.aug_smooth
                                or len(captures) > 1):  # fmt: skip
                            raise Stopped() from None
                        count = stopped.finished
                        for name in maps:
                            maps[name] = maps[name][:count]
                        maps[method.name] = stopped.maps.detach()
                        return logits[:count], chosen[:count]
        finally:
            self.extra_seconds += time.perf_counter() - started
        return logits, chosen

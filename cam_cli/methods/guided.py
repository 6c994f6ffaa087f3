"""Guided Backpropagation and Guided Grad-CAM, at the input's resolution.

Guided Backpropagation (Springenberg et al., "Striving for Simplicity: The All
Convolutional Net", ICLR 2015 workshop): the gradient of the class score ``y_c``
with respect to the input ``x`` ``(N, 3, S, S)``, where every ReLU's backward
passes the incoming gradient ``G`` only where both its input ``z`` and ``G`` are
positive::

    dL/dz = G * 1[z > 0] * 1[G > 0]          (a plain ReLU: G * 1[z > 0])

Guided Grad-CAM (Selvaraju et al., "Grad-CAM", ICCV 2017): that guided gradient
times the run's Grad-CAM map of the same class, min-max'ed and resized to the
input (several layers: pytorch-grad-cam's fusion of them)::

    G_c = guided(x) * up(minmax(ReLU(sum_k w_k A_k))),   w_k = mean_ij dy_c/dA_k

Each method's raw map is Simonyan et al.'s saliency convention ``max_c |G_c|``
over the colour channels ``(N, R, S, S)``; the 3-channel images themselves
``(N, R, 3, S, S)`` come with it (``Method.run_with_gradients``) for the writer's
``.grad.npy`` and its picture.

The guided ReLU is applied to every ReLU the forward pass calls from Python
(``nn.ReLU`` modules, ``F.relu``, ``torch.relu``, ``Tensor.relu``, their in-place
forms, ``aten.relu``) through a ``TorchFunctionMode`` active during the forward
only: no module is swapped and no hook is registered, so the model is left as it
was whatever happens. A forward that calls no ReLU (a ViT's GELUs, SiLU,
ReLU6) is refused: its "guided" gradient would be the plain input gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from cam_cli.errors import ModelError
from cam_cli.methods.base import (
    ActivationCapture,
    Capture,
    ClassChooser,
    Method,
    Setup,
    TargetLayer,
    to_feature_map,
)

RELUS = {F.relu, torch.relu, torch.Tensor.relu, torch.ops.aten.relu.default}
IN_PLACE_RELUS = {torch.relu_, torch.Tensor.relu_, torch.ops.aten.relu_.default}


class Switch:
    """Whether the guided ReLUs of a pass guide their backward (off: a plain ReLU's)."""

    def __init__(self, on: bool = True) -> None:
        self.on = on


class GuidedReLU(torch.autograd.Function):
    """``relu(z)`` forward; backward ``G * 1[z > 0] * 1[G > 0]``, or ``G * 1[z > 0]`` while
    ``switch`` is off (for the Grad-CAM gradient of the same pass)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, switch: Switch) -> torch.Tensor:
        ctx.save_for_backward(z > 0)
        ctx.switch = switch
        return torch.relu(z)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (positive,) = ctx.saved_tensors
        if ctx.switch.on:
            positive = positive & (grad > 0)
        return torch.where(positive, grad, torch.zeros_like(grad)), None


class GuidedReLUs(TorchFunctionMode):
    """Routes every ReLU called while active through :class:`GuidedReLU`; ``count`` says how many."""

    def __init__(self, switch: Switch) -> None:
        super().__init__()
        self.switch = switch
        self.count = 0

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in RELUS and func not in IN_PLACE_RELUS:
            return func(*args, **kwargs)
        z = args[0] if args else kwargs.get("input", kwargs.get("self"))
        if not isinstance(z, torch.Tensor):
            return func(*args, **kwargs)
        in_place = func in IN_PLACE_RELUS or (
            func is F.relu and bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
        )
        self.count += 1
        out = GuidedReLU.apply(z, self.switch)
        return z.copy_(out) if in_place else out


@contextlib.contextmanager
def guided_relus(switch: Switch, name: str) -> Iterator[GuidedReLUs]:
    """The forward pass run inside is guided; refused (``ModelError``) when it called no ReLU."""
    with GuidedReLUs(switch) as mode:
        yield mode
    if mode.count == 0:
        raise ModelError(
            f"{name}: the model calls no ReLU (its activations are others: GELU in a ViT, ReLU6 or SiLU in "
            "mobile CNNs), so its guided gradient would be the plain input gradient; use gradcam or another method"
        )


def saliency(images: torch.Tensor) -> torch.Tensor:
    """``max_c |G_c|`` over the colour axis: ``(N, R, 3, S, S)`` -> ``(N, R, S, S)``."""
    return images.abs().amax(dim=2)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` min-max'ed per map (a flat map: zeros)."""
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return (maps - low) / torch.where(span > 0, span, torch.ones_like(span))


def scaled_cam(per_layer: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM maps ``(N, h_l, w_l)`` of each layer as pytorch-grad-cam hands them over:
    each min-max'ed, resized (bilinear) to ``size`` and ReLU'd, averaged, min-max'ed:
    ``(N, S, S)`` in [0, 1]."""
    resized = []
    for cam in per_layer:
        up = F.interpolate(_minmax(cam)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        resized.append(up.clamp(min=0))
    return _minmax(torch.stack(resized).mean(dim=0))


class GuidedBackprop(Method):
    """Springenberg et al. 2015: the guided gradient of ``y_c`` at the input; map ``max_c |G_c|``."""

    name = "guided-backprop"
    needs_gradient = True
    gives_gradients: ClassVar[bool] = True

    def run(
        self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, classes: torch.Tensor | None,
        choose: ClassChooser,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        logits, chosen, maps, _ = self.run_with_gradients(forward, x, classes, choose)
        return logits, chosen, maps

    def run_with_gradients(
        self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, classes: torch.Tensor | None,
        choose: ClassChooser,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Its own pass: ``(logits (N, C), classes (N, R), maps (N, R, S, S), images (N, R, 3, S, S))``."""
        switch = Switch()
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            with guided_relus(switch, self.name):
                out = forward(xg)
            logits, chosen = _classes(self.name, out, classes, choose)
            images = guided_gradients(out, xg, chosen, switch)
        return logits, chosen, saliency(images), images


class GuidedGradCAM(GuidedBackprop):
    """Selvaraju et al. 2017: the guided gradient times the upsampled Grad-CAM map of the same
    class, both from one forward pass (Grad-CAM's gradient through plain ReLU backwards)."""

    name = "guided-gradcam"
    own_pass: ClassVar[bool] = True

    targets: tuple[TargetLayer, ...] = ()

    def prepare(self, setup: Setup) -> None:
        if setup.target is None:
            raise ModelError(f"{self.name} needs a target layer")
        self.targets = setup.targets or (setup.target,)
        self.module = setup.module

    def run_with_gradients(
        self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, classes: torch.Tensor | None,
        choose: ClassChooser,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        switch = Switch()
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            xg = x.detach().clone().requires_grad_(True)
            # chained: the layers stay in the graph, so that the input gradient goes through them
            hooks = [stack.enter_context(ActivationCapture(self.module, t, True, chain=True)) for t in self.targets]
            with guided_relus(switch, self.name):
                out = forward(xg)
            for hooked in hooks:
                if hooked.activation is None:
                    hooked.feature_map()  # raises: the layer was not reached
            stack.close()  # the hooks off before the backward passes
            logits, chosen = _classes(self.name, out, classes, choose)
            switch.on = False  # Grad-CAM's gradient: plain ReLU backwards
            cams = gradcam_maps(hooks, out, logits, chosen, (int(x.shape[-2]), int(x.shape[-1])))
            images = guided_gradients(out, xg, chosen, switch) * cams[:, :, None]
        return logits, chosen, saliency(images), images


def guided_gradients(out: torch.Tensor, xg: torch.Tensor, chosen: torch.Tensor, switch: Switch) -> torch.Tensor:
    """``d y[n, chosen[n, r]] / d xg`` through guided ReLUs, ``(N, R, 3, S, S)`` float32; the
    graph is freed after the last rank."""
    switch.on = True
    ranks = chosen.shape[1]
    images = []
    for r in range(ranks):
        score = out.gather(1, chosen[:, r : r + 1]).sum()
        (grad,) = torch.autograd.grad(score, xg, retain_graph=r < ranks - 1)
        images.append(grad.detach().float())
    return torch.stack(images, dim=1)


def gradcam_maps(
    hooks: list[ActivationCapture], out: torch.Tensor, logits: torch.Tensor, chosen: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:  # fmt: skip
    """The Grad-CAM maps of the hooked layers (several: fused), ``(N, R, S, S)`` in [0, 1]
    (:func:`scaled_cam`); the graph is kept for the guided gradients."""
    from cam_cli.methods.gradient import GradCAM

    captures = []
    for hooked in hooks:
        assert hooked.activation is not None
        features = to_feature_map(hooked.activation.detach(), hooked.target).float()
        captures.append(Capture(hooked.target, features, logits, chosen, logits.argmax(dim=1, keepdim=True),
                                hooked.activation, out))  # fmt: skip
    for capture in captures:
        capture.group = captures if len(captures) > 1 else []
    gradcam = GradCAM()
    per_layer = [gradcam.maps(capture).detach() for capture in captures]  # (N, R, h, w) each
    return torch.stack([scaled_cam([m[:, r] for m in per_layer], size) for r in range(chosen.shape[1])], dim=1)


def _classes(
    name: str, out: torch.Tensor, classes: torch.Tensor | None, choose: ClassChooser
) -> tuple[torch.Tensor, torch.Tensor]:
    if not out.requires_grad:
        raise ModelError(f"{name}: the model's output does not depend on its input through autograd")
    logits = out.detach().float()
    return logits, classes if classes is not None else choose(logits)

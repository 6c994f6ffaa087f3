"""FullGrad: Srinivas & Fleuret, "Full-Gradient Representation for Neural Network
Visualization", NeurIPS 2019, as pytorch-grad-cam's ``FullGrad`` computes it.

No target layer. With ``x`` the normalised input and ``y`` the class score:

    M = sum_c nrm(|x_c * dy/dx_c|) + sum_layers up(sum_c nrm(|b_c * dy/dz_c|))

over every ``Conv2d`` and ``BatchNorm2d`` with a bias (``z`` its output; a
BatchNorm's bias is ``beta - mu * gamma / sqrt(var + eps)``), ``nrm`` a min-max
per image and channel with 1e-7 in the denominator (the reference's) and
``up`` bilinear resizing to the input size. Summing a layer's normalised
channels before resizing equals resizing each (interpolation is linear) and
keeps memory at one map per layer. One full forward and backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cam_cli.errors import ModelError
from cam_cli.methods.base import ClassChooser, Method, Setup

BIAS_TYPES = (nn.Conv2d, nn.BatchNorm2d)


def _normalise(t: torch.Tensor) -> torch.Tensor:
    """Per image and channel ``(t - min) / (max(t - min) + 1e-7)``; ``t``: ``(N, C, h, w)``."""
    t = t - t.amin(dim=(2, 3), keepdim=True)
    return t / (t.amax(dim=(2, 3), keepdim=True) + 1e-7)


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a layer adds to its output, per channel, or ``None``."""
    bias = getattr(module, "bias", None)
    if not isinstance(bias, torch.Tensor):
        return None
    if isinstance(module, nn.BatchNorm2d):
        if module.running_mean is None or module.running_var is None or module.weight is None:
            return None
        scale = module.weight / torch.sqrt(module.running_var + module.eps)
        return (bias - module.running_mean * scale).detach().float()
    return bias.detach().float()


class FullGrad(Method):
    name = "fullgrad"
    needs_gradient = True

    layers: list[tuple[nn.Module, torch.Tensor]]

    def prepare(self, setup: Setup) -> None:
        self.bind(setup.module)
        if not self.layers:
            raise ModelError("fullgrad needs Conv2d or BatchNorm2d layers with a bias, and this model has none")

    def bind(self, module: nn.Module) -> None:
        """Find the biased layers (exact types, as the reference does) of ``module``."""
        self.module = module
        self.layers = []
        for layer in module.modules():
            if type(layer) in BIAS_TYPES:
                bias = effective_bias(layer)
                if bias is not None:
                    self.layers.append((layer, bias))

    def run(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        classes: torch.Tensor | None,
        choose: ClassChooser,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Its own pass: ``(logits (N, C), classes (N, R), maps (N, R, S, S))``."""
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def keep(bias: torch.Tensor) -> Callable[..., Any]:
            def hook(_: nn.Module, __: Any, output: torch.Tensor) -> torch.Tensor:
                outputs.append((output, bias))
                return output.clone()  # later in-place ops (ReLU) must not change what was kept

            return hook

        handles = [layer.register_forward_hook(keep(bias)) for layer, bias in self.layers]
        try:
            with torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)
                out = forward(xg)
                if not out.requires_grad:
                    raise ModelError("fullgrad: the model's output does not depend on its input through autograd")
                logits = out.detach().float()
                chosen = classes if classes is not None else choose(logits)
                size = x.shape[-2:]
                ranks = chosen.shape[1]
                maps = []
                for r in range(ranks):
                    score = out.gather(1, chosen[:, r : r + 1]).sum()
                    inputs = [xg, *(o for o, _ in outputs)]
                    grads = torch.autograd.grad(score, inputs, retain_graph=r < ranks - 1, allow_unused=True)
                    total = _normalise((xg.detach() * grads[0]).abs().float()).sum(dim=1)
                    for (_, bias), grad in zip(outputs, grads[1:], strict=True):
                        if grad is None:
                            continue
                        part = _normalise((bias.to(grad.device)[None, :, None, None] * grad.float()).abs()).sum(dim=1)
                        if part.shape[-2:] != size:
                            part = F.interpolate(part[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                        total = total + part
                    maps.append(total)
        finally:
            for handle in handles:
                handle.remove()
        return logits, chosen, torch.stack(maps, dim=1)

"""Grad-CAM: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks
via Gradient-based Localization", ICCV 2017.

With ``y_c`` the pre-softmax score of class ``c`` and ``A`` the target layer's
activation ``(K, h, w)``:

    alpha_k = mean_ij dy_c / dA_k[i, j]
    M_c     = ReLU(sum_k alpha_k * A_k)

The gradient is taken with ``torch.autograd.grad`` with respect to the hooked
activation only; parameters are frozen, so nothing before the target layer is
recorded and the backward pass covers just the head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cam_cli.errors import ModelError
from cam_cli.methods.base import (
    ActivationCapture,
    ClassChooser,
    Explanation,
    TargetLayer,
    to_feature_map,
)


class GradCAM:
    name = "gradcam"

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        model: torch.nn.Module,
        target: TargetLayer,
    ) -> None:
        self.forward = forward
        self.model = model
        self.target = target

    def explain(self, x: torch.Tensor, choose: ClassChooser) -> Explanation:
        with torch.enable_grad(), ActivationCapture(self.model, self.target, True) as capture:
            logits = self.forward(x)
            activation = capture.activation
            if activation is None:
                capture.feature_map()  # raises: the layer was not reached
            assert activation is not None
            if not logits.requires_grad:
                raise ModelError(
                    f"the model's output does not depend on layer {self.target.label}, so Grad-CAM has no "
                    "gradient to follow; choose another --layer (or --output-key)"
                )
            classes = choose(logits.detach())
            features = to_feature_map(activation.detach(), self.target).float()
            rounds = classes.shape[1]
            maps = []
            for r in range(rounds):
                score = logits.gather(1, classes[:, r : r + 1]).sum()
                (grad,) = torch.autograd.grad(score, activation, retain_graph=r < rounds - 1)
                alpha = to_feature_map(grad, self.target).float().mean(dim=(2, 3))
                maps.append(torch.relu(torch.einsum("nk,nkhw->nhw", alpha, features)))
        return Explanation(logits.detach().float(), classes, torch.stack(maps, dim=1))

"""The gradient family: maps from the target activation ``A`` ``(N, K, h, w)`` and
its gradient ``g = dy_c/dA`` (one backward pass, shared by every method here
that needs nothing more). Formulas as in pytorch-grad-cam 1.5.7, the reference
camx equals; see README's "Methods" for the papers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cam_cli.errors import ModelError
from cam_cli.methods.base import Capture, Method, Setup, first_component, to_feature_map

SPATIAL = (2, 3)


class GradCAM(Method):
    """Selvaraju et al. 2017: ``w_k = mean_ij g``."""

    name = "gradcam"
    needs_gradient = True

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        return capture.gradient(r).mean(dim=SPATIAL)


class GradCAMPlusPlus(Method):
    """Chattopadhyay et al. 2018: ``a = g^2 / (2 g^2 + sum_ij(A) g^3 + 1e-6)`` (0 where
    ``g = 0``), ``w_k = sum_ij ReLU(g) a``."""

    name = "gradcam++"
    needs_gradient = True

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        g = capture.gradient(r)
        g2 = g * g
        return plus_plus_weights(g, g2, g2 * g, capture.features)


def plus_plus_weights(g: torch.Tensor, g2: torch.Tensor, g3: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++'s channel weights ``(N, K)`` from the first three derivatives ``(N, K, h, w)``
    (``g``, ``g^2``, ``g^3`` under the exponential, or their means over noisy inputs for
    Smooth Grad-CAM++) and the activation ``A``: ``a = g2 / (2 g2 + sum_ij(A) g3 + 1e-6)``,
    0 where ``g2 = 0``; ``w_k = sum_ij ReLU(g) a``."""
    total = features.sum(dim=SPATIAL, keepdim=True)
    alpha = g2 / (2 * g2 + total * g3 + 1e-6)
    alpha = torch.where(g2 != 0, alpha, torch.zeros_like(alpha))
    return (torch.relu(g) * alpha).sum(dim=SPATIAL)


class XGradCAM(Method):
    """Fu et al. 2020: ``w_k = sum_ij g A / (sum_ij A + 1e-7)``."""

    name = "xgradcam"
    needs_gradient = True

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        a = capture.features
        total = a.sum(dim=SPATIAL, keepdim=True)
        return (capture.gradient(r) * a / (total + 1e-7)).sum(dim=SPATIAL)


class LayerCAM(Method):
    """Jiang et al. 2021: ``ReLU(g) * A`` element-wise."""

    name = "layercam"
    needs_gradient = True

    def weighted(self, capture: Capture, r: int) -> torch.Tensor:
        return torch.relu(capture.gradient(r)) * capture.features


class HiResCAM(Method):
    """Draelos & Carin 2020: ``g * A`` element-wise."""

    name = "hirescam"
    needs_gradient = True

    def weighted(self, capture: Capture, r: int) -> torch.Tensor:
        return capture.gradient(r) * capture.features


class GradCAMElementWise(Method):
    """``ReLU(g * A)`` element-wise."""

    name = "gradcam-elementwise"
    needs_gradient = True

    def weighted(self, capture: Capture, r: int) -> torch.Tensor:
        return torch.relu(capture.gradient(r) * capture.features)


class EigenGradCAM(Method):
    """The first principal component of ``g * A`` (sign-corrected), then ReLU."""

    name = "eigengradcam"
    needs_gradient = True

    def weighted(self, capture: Capture, r: int) -> torch.Tensor:
        return capture.gradient(r) * capture.features

    def maps(self, capture: Capture) -> torch.Tensor:
        ranks = range(capture.classes.shape[1])
        return torch.stack([torch.relu(first_component(self.weighted(capture, r))) for r in ranks], dim=1)


class SegEigenCAM(Method):
    """Chung & Ying 2025: the first principal component of ``|g| * A`` (sign-corrected), then ReLU."""

    name = "segeigencam"
    needs_gradient = True

    def weighted(self, capture: Capture, r: int) -> torch.Tensor:
        return capture.gradient(r).abs() * capture.features

    def maps(self, capture: Capture) -> torch.Tensor:
        ranks = range(capture.classes.shape[1])
        return torch.stack([torch.relu(first_component(self.weighted(capture, r))) for r in ranks], dim=1)


class ShapleyCAM(Method):
    """Cai et al. 2025: ``w_k = mean_ij (g - Hv / 2)`` with ``Hv = (dg/dA) A``, a
    Hessian-vector product (the gradient is taken with its graph for it)."""

    name = "shapleycam"
    needs_gradient = True
    needs_second_order = True

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        raw = capture.raw_gradient(r)
        assert capture.activation is not None
        hvp: torch.Tensor | None = None
        if raw.requires_grad:
            (hvp,) = torch.autograd.grad(
                raw, capture.activation, grad_outputs=capture.activation.detach(), retain_graph=True, allow_unused=True
            )
        g = capture.gradient(r)
        if hvp is None:  # the layers after the target are linear in it: Grad-CAM
            return g.mean(dim=SPATIAL)
        return (g - 0.5 * to_feature_map(hvp, capture.target).float()).mean(dim=SPATIAL)


class FinerCAM(Method):
    """Zhang et al. 2025: Grad-CAM of ``y_c - gamma * y_r`` with ``r`` the other class whose
    logit is nearest to ``y_c``: ``g_c - gamma * g_r`` (one more backward, for ``g_r``)."""

    name = "finercam"
    needs_gradient = True

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "finer_gamma": self.options.finer_gamma}

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        logits = capture.logits
        c = capture.classes[:, r]
        distance = (logits - logits.gather(1, c.view(-1, 1))).abs()
        distance.scatter_(1, c.view(-1, 1), float("inf"))
        reference = distance.argmin(dim=1)
        g_ref = to_feature_map(capture.score_gradient(reference).detach(), capture.target).float()
        return (capture.gradient(r) - self.options.finer_gamma * g_ref).mean(dim=SPATIAL)


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map of ``(N, R, h, w)`` scaled to ``[0, 1]`` (a flat one: zeros)."""
    low = maps.amin(dim=SPATIAL, keepdim=True)
    span = maps.amax(dim=SPATIAL, keepdim=True) - low
    return (maps - low) / torch.where(span > 0, span, torch.ones_like(span))


class RefineCAM(Method):
    """Domeniconi et al. 2026 ("How to Evaluate and Refine your CAM", arXiv:2605.14641): the
    element-wise product over the hooked layers ``l`` of ``minmax(up(minmax(M_l)))``, ``M_l``
    each layer's Grad-CAM++ map ``(N, R, h_l, w_l)``, ``up`` bilinear to the input's size.

    Every layer is hooked in the one forward pass, and their gradients come from one
    backward pass (``Capture.group``). Needs two layers or more (``--layer a,b,c``,
    from the coarsest to the finest or in any order: the product does not depend on it)."""

    name = "refinecam"
    needs_gradient = True
    multi_layer = True

    def prepare(self, setup: Setup) -> None:
        if len(setup.targets) < 2:
            raise ModelError(
                "refinecam multiplies the maps of several layers: name two or more with --layer a,b,c "
                "(e.g. the last block of each stage, layer1,layer2,layer3,layer4 on a ResNet; "
                "`camx layers MODEL` lists them)"
            )

    def layer_maps(self, captures: list[Capture], size: tuple[int, int]) -> torch.Tensor:
        base = GradCAMPlusPlus(self.options)
        product: torch.Tensor | None = None
        for capture in captures:
            scaled = _min_max(base.maps(capture))
            if tuple(scaled.shape[-2:]) != size:
                scaled = F.interpolate(scaled, size=size, mode="bilinear", align_corners=False)
            scaled = _min_max(scaled)
            product = scaled if product is None else product * scaled
        assert product is not None
        return product

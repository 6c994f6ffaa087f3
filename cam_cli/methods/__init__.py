"""The CAM methods camx offers. The registry (``cam_cli.methods.registry``) names
them; implementations are imported on first use."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cam_cli.methods.base import (
    ClassChooser,
    Explanation,
    Method,
    MethodOptions,
    Setup,
    TargetLayer,
)
from cam_cli.methods.explain import BatchExplainer, MultiExplanation
from cam_cli.methods.registry import METHODS, info, load, method_names, parse_methods


def create(name: str, options: MethodOptions | None = None) -> Method:
    """A new (unprepared) method by registry name."""
    method: Method = load(name)(options)
    return method


class _Single:
    """One method over batches with the ``explain(x, choose) -> Explanation`` call."""

    def __init__(self, explainer: BatchExplainer, name: str) -> None:
        self._explainer = explainer
        self._name = name

    def explain(self, x: torch.Tensor, choose: ClassChooser) -> Explanation:
        result = self._explainer.explain(x, choose)
        return Explanation(result.logits, result.classes, result.maps[self._name])


class GradCAM(_Single):
    """Grad-CAM on ``target`` of ``model`` (``forward`` gives its logits)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module,
                 target: TargetLayer) -> None:  # fmt: skip
        super().__init__(BatchExplainer(forward, model, target, [create("gradcam")]), "gradcam")


class CAM(_Single):
    """CAM on ``target`` with the head's ``fc_weight`` ``(C, K)``."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        model: torch.nn.Module,
        target: TargetLayer,
        fc_weight: torch.Tensor,
        pre_activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        method = create("cam")
        method.use_head(fc_weight, pre_activation)  # type: ignore[attr-defined]
        super().__init__(BatchExplainer(forward, model, target, [method]), "cam")


__all__ = [
    "CAM",
    "METHODS",
    "BatchExplainer",
    "Explanation",
    "GradCAM",
    "Method",
    "MethodOptions",
    "MultiExplanation",
    "Setup",
    "TargetLayer",
    "create",
    "info",
    "load",
    "method_names",
    "parse_methods",
]

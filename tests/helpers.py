"""Test-only adapters: one method over batches with ``explain(x, choose) -> Explanation``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cam_cli.methods import BatchExplainer, create
from cam_cli.methods.base import ClassChooser, Explanation, TargetLayer


class _Single:
    def __init__(self, explainer: BatchExplainer, name: str) -> None:
        self._explainer = explainer
        self._name = name

    def explain(self, x: torch.Tensor, choose: ClassChooser) -> Explanation:
        result = self._explainer.explain(x, choose)
        return Explanation(result.logits, result.classes, result.maps[self._name])


class GradCAMRunner(_Single):
    """Grad-CAM on ``target`` of ``model`` (``forward`` gives its logits)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module,
                 target: TargetLayer) -> None:  # fmt: skip
        super().__init__(BatchExplainer(forward, model, target, [create("gradcam")]), "gradcam")


class CAMRunner(_Single):
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

"""CAM: Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016.

For a head that is global average pooling then one linear layer,
``y_c = sum_k W[c, k] * mean_ij A_k[i, j] + b_c``, and the class activation map is

    M_c = sum_k W[c, k] * A_k        (no bias, no ReLU)

No backward pass is needed: alone, the forward runs in inference mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cam_cli.errors import ModelError
from cam_cli.methods.base import Capture, Method, Setup


class CAM(Method):
    name = "cam"
    relu = False

    fc_weight: torch.Tensor  # (C, K)
    pre_activation: Callable[[torch.Tensor], torch.Tensor] | None = None

    def prepare(self, setup: Setup) -> None:
        from cam_cli.probe import cam_head

        if setup.target is None:
            raise ModelError("cam needs a target layer")
        if len(setup.targets) > 1:
            raise ModelError("cam reads one layer, the input of its GAP + linear head; give one --layer for it")
        try:
            head = cam_head(setup.probe, setup.target)
        except ModelError as exc:
            raise ModelError(f"cam: {exc}") from None
        self.use_head(head.weight.to(setup.device), head.pre_activation)

    def use_head(
        self, fc_weight: torch.Tensor, pre_activation: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """``fc_weight``: ``(C, K)`` weight of the linear layer after the pooling;
        ``pre_activation``: an element-wise function the model applies
        functionally between the target layer and the pooling (DenseNet's ReLU)."""
        self.fc_weight = fc_weight.detach().float()
        self.pre_activation = pre_activation

    def _features(self, capture: Capture) -> torch.Tensor:
        features = capture.features
        return self.pre_activation(features) if self.pre_activation is not None else features

    def weights(self, capture: Capture, r: int) -> torch.Tensor:
        return self.fc_weight.to(capture.features.device)[capture.classes[:, r]]

    def weighted(self, capture: Capture, r: int) -> torch.Tensor:
        return self.weights(capture, r)[:, :, None, None] * self._features(capture)

    def maps(self, capture: Capture) -> torch.Tensor:
        if self.options.eigen_smooth:
            return super().maps(capture)
        weights = self.fc_weight.to(capture.features.device)[capture.classes]  # (N, R, K)
        return torch.einsum("nrk,nkhw->nrhw", weights, self._features(capture))

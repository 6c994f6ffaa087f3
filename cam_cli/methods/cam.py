"""CAM: Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016.

For a head that is global average pooling then one linear layer,
``y_c = sum_k W[c, k] * mean_ij A_k[i, j] + b_c``, and the class activation map is

    M_c = sum_k W[c, k] * A_k        (no bias, no ReLU)

No backward pass is needed: the forward runs in inference mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cam_cli.methods.base import ActivationCapture, ClassChooser, Explanation, TargetLayer


class CAM:
    name = "cam"

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        model: torch.nn.Module,
        target: TargetLayer,
        fc_weight: torch.Tensor,
        pre_activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """``fc_weight``: ``(C, K)`` weight of the linear layer after the pooling;
        ``pre_activation``: an element-wise function the model applies
        functionally between the target layer and the pooling (DenseNet's ReLU)."""
        self.forward = forward
        self.model = model
        self.target = target
        self.fc_weight = fc_weight.detach().float()
        self.pre_activation = pre_activation

    def explain(self, x: torch.Tensor, choose: ClassChooser) -> Explanation:
        with torch.inference_mode(), ActivationCapture(self.model, self.target, False) as capture:
            logits = self.forward(x)
            features = capture.feature_map().float()
        if self.pre_activation is not None:
            features = self.pre_activation(features)
        classes = choose(logits)
        weights = self.fc_weight.to(features.device)[classes]  # (N, R, K)
        maps = torch.einsum("nrk,nkhw->nrhw", weights, features)
        return Explanation(logits.float(), classes, maps)

"""The head after the target layer: whether it is the global average pooling and
one linear layer that CAM needs, and a description of it where it is not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cam_cli.errors import ModelError
from cam_cli.probe.capture import ActivationCapture, TargetLayer, resolve_module
from cam_cli.probe.probe import HEAD_SHOWN, Probe


@dataclass
class CamHead:
    """What CAM needs from a GAP + linear head."""

    weight: torch.Tensor  # (C, K)
    pre_activation: Callable[[torch.Tensor], torch.Tensor] | None


def head_description(probe: Probe, target: TargetLayer) -> str:
    """The leaf modules that run after ``target``, e.g. ``AdaptiveAvgPool2d -> Flatten -> Linear``."""
    record = probe.find(target.label)
    start = record.order if record is not None else -1
    types = [c.module_type for c in probe.calls if c.order > start]
    if not types:
        return "no modules (only functional operations)"
    shown = " -> ".join(types[-HEAD_SHOWN:])
    return shown if len(types) <= HEAD_SHOWN else f"... -> {shown}"


def cam_head(probe: Probe, target: TargetLayer) -> CamHead:
    """Check that the logits are ``W @ GAP(A) + b``; raise ``ModelError`` naming the head if not."""
    record = probe.find(target.label)
    if record is None:
        raise ModelError(f"layer {target.label} was not seen by the probe")
    message = (
        "CAM needs a head of global average pooling then one linear layer after the target "
        f"layer {target.label}, but this model's head is {{}}; use --method gradcam"
    )
    if target.layout == "tokens":
        raise ModelError(message.format(f"a transformer's, on tokens ({head_description(probe, target)})"))
    head = probe.head
    if head is not None and probe.forward is not None and probe.input is not None:
        # Run again with the capture CAM uses: the probe's own records may have been
        # changed in place after their hook ran (DenseNet's F.relu(features, inplace=True)).
        seen: list[torch.Tensor] = []
        model = probe.modules[""]
        handle = resolve_module(model, head.name).register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
        try:
            device = next((p.device for p in model.parameters()), probe.input.device)  # the pipeline may have moved it
            with torch.inference_mode(), ActivationCapture(model, target, False) as capture:
                logits = probe.forward(probe.input.to(device)).float()
                features = capture.feature_map().float()
        finally:
            handle.remove()
        z, weight = seen[-1].float(), head.weight.detach().float()
        bias = None if head.bias is None else head.bias.detach().float()
        atol = 1e-5 * (float(z.abs().max()) + float(logits.abs().max()))
        if z.shape[1] == features.shape[1] and torch.allclose(F.linear(z, weight, bias), logits, 1e-4, atol):
            for activation in (None, torch.relu):
                mapped = features if activation is None else activation(features)
                if torch.allclose(mapped.mean(dim=(2, 3)), z, 1e-4, atol):
                    return CamHead(weight.clone(), activation)
    raise ModelError(message.format(head_description(probe, target)))

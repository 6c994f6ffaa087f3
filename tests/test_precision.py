"""``--precision bf16``: only the model runs in bfloat16; camx weighs, sums and upsamples
the captured activation and gradient in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import make_tiny

import cam_cli
from cam_cli.render import upsample_normalise


def captured_under_bf16(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target layer's activation and the top-1 score's gradient, from a bf16 autocast pass."""
    saved: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        saved["a"] = output

    hook = model.features.register_forward_hook(keep)
    try:
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x.requires_grad_(True))
        logits.gather(1, logits.float().argmax(1, keepdim=True)).sum().backward()
    finally:
        hook.remove()
    activation = saved["a"]
    assert activation.dtype == torch.bfloat16  # the model's own arithmetic is bf16
    return activation.detach(), activation.grad


def test_bf16_gradcam_is_the_float32_formula_on_the_bf16_activation_and_gradient():
    model = make_tiny(seed=3)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    activation, gradient = captured_under_bf16(model, x)
    got = cam_cli.explain(model, x, "gradcam,layercam", precision="bf16")
    weights = gradient.float().mean(dim=(2, 3), keepdim=True)
    gradcam = F.relu((weights * activation.float()).sum(dim=1))
    layercam = F.relu((F.relu(gradient.float()) * activation.float()).sum(dim=1))
    for name, raw in (("gradcam", gradcam), ("layercam", layercam)):
        want = torch.stack([upsample_normalise(m[None], 64, 64)[0] for m in raw])
        assert got[name].maps.dtype == torch.float32
        torch.testing.assert_close(got[name].maps, want, atol=2e-6, rtol=0)
        # the same formula in bfloat16 is visibly different: the test can tell
        low = F.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1)).float()
        if name == "gradcam":
            in_bf16 = torch.stack([upsample_normalise(m[None], 64, 64)[0] for m in low])
            assert (in_bf16 - want).abs().max() > 1e-4
